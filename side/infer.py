"""Length-sorted inference batching, shared by train.py (evaluation) and predict.py (labelling).

predict_logits / predict_embeddings -> run_batches: batches of similar lengths (little padding), at most
CPU_BATCH_TOKENS padded tokens each on a CPU, each batch's output written back to the rows it came from.
"""
import numpy as np
import torch

from data import batch_indices, make_batch, to_device
from model import autocast
from side.packing import use_packing

# On a CPU a batch of long texts is cut to at most this many (padded) tokens: smaller matmuls stay in cache.
# Model time on this 2-core CPU, MiniLM, texts sorted by length, 64 texts a batch against this cap: -23% on
# abstracts (mean 279 tokens), -13% on captions (36). Throughput on a GPU wants the largest batches: no cap.
CPU_BATCH_TOKENS = 2048


@torch.no_grad()
def predict_logits(model, seqs, pad_id, batch_size=64, amp="auto", packed=None, max_tokens=None):
    """Logits [N, num_labels] as float32 numpy, in the order of seqs. Batches are length-sorted
    (little padding); each batch's logits are written back to the rows they came from.
    A model with a windows_* strategy takes seqs as lists of windows (TextEncoder) and gives one row per text.
    packed: None = use_packing(). max_tokens: padded tokens per batch at most (None: CPU_BATCH_TOKENS on a CPU,
    no cap elsewhere; 0: no cap)."""
    return run_batches(lambda batch: model(**batch)[0], model, seqs, pad_id, batch_size, amp, packed,
                       (model.config.num_labels,), max_tokens)


@torch.no_grad()
def predict_embeddings(model, seqs, pad_id, batch_size=64, amp="auto", packed=None, pooling=None, max_tokens=None):
    """The vector each text's head reads (EncoderClassifier.embed; pooling None = the model's), float32 numpy
    [N, hidden] ([N, labels, hidden] with label_attention), in the order of seqs."""
    return run_batches(lambda batch: model.embed(**batch, pooling=pooling), model, seqs, pad_id, batch_size, amp,
                       packed, (model.config.hidden_size,), max_tokens)


def run_batches(output, model, seqs, pad_id, batch_size, amp, packed, shape, max_tokens=None):
    """output(batch) for length-sorted batches of seqs, put back in the order of seqs as float32 numpy [N, ...].
    shape: the shape of a row when there are no seqs."""
    device = next(model.parameters()).device
    packed = use_packing(device, amp, packed)
    if max_tokens is None:
        max_tokens = CPU_BATCH_TOKENS if device.type == "cpu" else 0
    windows = model.aggregation is not None  # a text is a list of windows: its tokens are theirs
    lengths = [sum(map(len, s)) if windows else len(s) for s in seqs]
    was_training = model.training
    model.eval()
    order, parts = [], []
    for rows in batch_indices(lengths, batch_size, shuffle=False, bucket=True, max_tokens=max_tokens):
        batch = make_batch([seqs[i] for i in rows], None, pad_id, windows, packed)
        with autocast(device, amp):
            part = output(to_device(batch, device))
        order.extend(rows)
        parts.append(part.float())  # kept on the device: one copy at the end, no wait per batch
    out = np.zeros((len(seqs), *(parts[0].shape[1:] if parts else shape)), np.float32)
    if parts:
        out[order] = torch.cat(parts).cpu().numpy()
    model.train(was_training)
    return out
