"""Inference batching that train.py (evaluation) and predict.py share: logits and embeddings of encoded texts in
length-sorted batches, put back in input order; the int8 copy of a model for the CPU and how closely it follows
the fp32 one; and the check of a --device name before anything loads."""
import copy
import time
import warnings

import numpy as np
import torch

from data import batch_indices, make_batch, to_device
from metrics import sigmoid, softmax
from model import autocast
from side.packing import use_packing

# On a CPU a batch of long texts is cut to at most this many (padded) tokens: smaller matmuls stay in cache
# (measured: docs/benchmarks.md). Throughput on a GPU wants the largest batches: no cap.
CPU_BATCH_TOKENS = 2048


@torch.inference_mode()  # not no_grad: no version counters or view tracking, a few % on short texts
def predict_logits(model, seqs, pad_id, batch_size=64, amp="auto", packed=None, max_tokens=None):
    """Logits [N, num_labels] as float32 numpy, in the order of seqs. Batches are length-sorted
    (little padding); each batch's logits are written back to the rows they came from.
    A model with a windows_* strategy takes seqs as lists of windows (TextEncoder) and gives one row per text.
    packed: None = use_packing(). max_tokens: padded tokens per batch at most (None: CPU_BATCH_TOKENS on a CPU,
    no cap elsewhere; 0: no cap)."""
    return run_batches(lambda batch: model(**batch)[0], model, seqs, pad_id, batch_size, amp, packed,
                       (model.config.num_labels,), max_tokens)


@torch.inference_mode()
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


def int8_copy(model):
    """A copy of the model whose encoder's linear layers compute in int8 (torch's dynamic quantization: weights
    quantized once per output channel, activations per batch on the fly; CPU kernels only). The head stays
    fp32: it is small, and label attention reads its classifier's weight directly."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    quantized = copy.deepcopy(model)
    with warnings.catch_warnings():
        # torch deprecates torch.ao.quantization in favour of torchao, a separate package: it is still torch's own
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        quantized.encoder = quantize_dynamic(quantized.encoder, {torch.nn.Linear: per_channel_dynamic_qconfig})
    return quantized


def int8_agreement(int8_logits, fp32_logits, multi_label, thresholds):
    """How closely the int8 model follows the fp32 one: the share of texts given the same label (single-label)
    or the same set of labels (multi-label, at the checkpoint's thresholds), and the largest difference of any
    probability."""
    if multi_label:
        p, q = sigmoid(int8_logits), sigmoid(fp32_logits)
        same = ((p >= thresholds) == (q >= thresholds)).all(axis=1)
    else:
        p, q = softmax(int8_logits), softmax(fp32_logits)
        same = p.argmax(axis=1) == q.argmax(axis=1)
    return {"same_prediction": float(same.mean()), "max_probability_difference": float(np.abs(p - q).max())}


# --int8 scores this many texts of the first chunk in fp32 as well (and again in int8), to report agreement and
# speed: a bounded cost, whatever the chunk size
INT8_SAMPLE = 100


def int8_sample_check(score, int8_model, fp32_model, seqs, multi_label, thresholds):
    """--int8's check on the first INT8_SAMPLE encoded texts: (texts, int8_agreement, fp32 seconds, int8 seconds).
    score(seqs, model) -> logits. Each model scores the sample once, fp32 first."""
    sample, results = seqs[:INT8_SAMPLE], []
    for model in (fp32_model, int8_model):
        start = time.perf_counter()
        results.append((score(sample, model), time.perf_counter() - start))
    (fp32, fp32_seconds), (int8, int8_seconds) = results
    return len(sample), int8_agreement(int8, fp32, multi_label, thresholds), fp32_seconds, int8_seconds


def speed_report(scored, seconds, tokenizing, device, explaining=None, int8_check=None, multi_label=False):
    """predict.py's lines about its speed: scored texts in seconds of scoring (tokenizing apart); with --explain,
    the evidence's time; with --int8, its check (int8_sample_check)."""
    seconds = max(seconds, 1e-9)
    lines = [f"scored {scored} texts in {seconds:.2f} s: {scored / seconds:.1f} texts/s{' (int8)' * bool(int8_check)} "
             f"on {device} (tokenizing took {tokenizing:.2f} s)"]
    if explaining is not None:
        lines.append(f"evidence took {explaining:.2f} s ({scored / max(explaining, 1e-9):.1f} texts/s)")
    if int8_check:
        count, agreement, fp32_seconds, int8_seconds = int8_check
        lines.append(int8_report(count, scored, agreement, fp32_seconds, int8_seconds, multi_label))
    return "\n".join(lines)


def int8_report(count, scored, agreement, fp32_seconds, int8_seconds, multi_label):
    """The line predict.py prints about an int8_sample_check of count texts, in a run of scored texts."""
    which = f"these {count}" if count == scored else f"the first {count} (of {scored})"
    same = "set of labels" if multi_label else "label"
    return (f"int8 against fp32 on {which} texts: the same {same} for {agreement['same_prediction']:.2%}, "
            f"probabilities at most {agreement['max_probability_difference']:.4f} apart; on them fp32 took "
            f"{fp32_seconds:.2f} s, int8 {int8_seconds:.2f} s: {fp32_seconds / max(int8_seconds, 1e-9):.2f}x as fast "
            "(a few texts, or a model of 1-2 layers, may gain nothing: docs/benchmarks.md)")


def device_problem(name):
    """Why --device `name` cannot run here, or None: checked before a model loads, so that a typo or a CPU-only
    torch is one line, not a traceback after minutes of loading."""
    if not name:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name} is not a device torch knows: use cpu, cuda or cuda:N"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"--device {name}: only cpu and cuda (cuda:N) are supported"
    if not torch.cuda.is_available():
        return (f"--device {name}: torch {torch.__version__} sees no GPU here (a CPU-only build, or no driver); "
                "use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: there are {torch.cuda.device_count()} GPU(s), numbered from 0"
    return None
