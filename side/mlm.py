"""The masked-LM objective (train.py --task mlm): continued pretraining on unlabelled in-domain text, in the one
training loop, behind the same methods as train.py's Classification.

MaskedLanguageModelling(cfg, model_dir, hf, encoder)   options, splits (every token, in consecutive pieces)
    .build_model -> .batch -> .loss -> .evaluate (mlm_metrics) -> .report
Masking -> make_mlm_batch   BERT's masking recipe, as the reference applies it, and masked-LM batches
"""
import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data import IGNORE_INDEX, Split, batch_indices, make_batch, read_table, to_device, train_val_split
from model import MaskedLM, autocast
from side import files
from side.distill import check_layers
from side.distributed import all_reduce, is_main_rank, rank_rows
from side.hf import base_model_type, dropout_overrides
from side.packing import use_packing
from side.weights import check_vocab

MLM_RATE = {"bert": 0.15, "modernbert": 0.3}  # the share of tokens masked in each architecture's recipe


class MaskedLanguageModelling:
    """Predict masked tokens: BERT's masking recipe (Masking, below), the loss over masked tokens only, and model
    selection on the validation loss."""
    columns = ["perplexity", "accuracy"]  # the evaluation row's, after the losses
    metric = "loss"  # model selection: lower is better

    @staticmethod
    def option_rules(cfg):
        """Lines of check_options that masked-LM allows less than a classifier does."""
        held_out = 0 < cfg.val_fraction < 1 or (cfg.val_file and cfg.val_fraction == 0)
        return {"val_fraction": (held_out, "in (0, 1) with --task mlm, which keeps the checkpoint of the lowest "
                                 "validation loss (0 = no validation data is for classifiers), or give a --val-file"),
                "text_pair_column": (not cfg.text_pair_column, "a column name, for a classifier: not with --task mlm"),
                "long_docs": (cfg.long_docs == "head", "head with --task mlm (it reads every token)"),
                "teacher": (not cfg.teacher, "a fine-tuned classifier, for a classifier: not with --task mlm"),
                "metric": (cfg.metric in ("auto", "loss"), "auto or loss with --task mlm"),
                "calibrate": (cfg.calibrate == "off", "off with --task mlm (it has no labels to calibrate)"),
                "reinit_layers": (cfg.reinit_layers == 0, "0 with --task mlm (it continues the pretraining)"),
                "layer_mix": (not cfg.layer_mix, "off with --task mlm (the masked-LM head reads the last layer)")}

    def __init__(self, cfg, model_dir, hf, encoder):
        rate = MLM_RATE.get(base_model_type(hf.get("model_type")), 0.15) if cfg.mlm_probability is None else cfg.mlm_probability
        # so that train_config.json and --resume see what the run used; lower is better for the loss
        self.cfg = dataclasses.replace(cfg, mlm_probability=rate, metric="loss")
        self.model_dir, self.hf, self.encoder, self.id2label = model_dir, hf, encoder, None
        check_layers(hf, cfg.num_layers)
        self.splits = load_mlm_splits(self.cfg, encoder, model_dir)

    def describe(self):
        return f"sequences; masked-LM pretraining, {self.cfg.mlm_probability:.0%} of tokens masked"

    def build_model(self, device):
        """The checkpoint's encoder with its MLM head (initialised as the reference does where it has none)."""
        cfg = self.cfg
        try:
            overrides = dropout_overrides(self.hf.get("model_type"), cfg.hidden_dropout, cfg.attention_dropout,
                                          cfg.classifier_dropout)
            model = MaskedLM.from_pretrained(self.model_dir, overrides=overrides, verbose=is_main_rank(),
                                             num_layers=cfg.num_layers)
            check_vocab(self.encoder.tokenizer, model.config.vocab_size, self.model_dir)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"cannot use the checkpoint {self.model_dir}: {e}") from None
        model.to(device)
        model.encoder.grad_checkpointing = cfg.grad_checkpointing
        return model

    def batch(self, split, rows, packed, epoch):
        """Training rows masked anew each epoch (keyed (epoch + 1, row)); evaluation splits are masked once."""
        masked = [split.masking(split.seqs[r], (epoch + 1, r)) for r in rows]
        return make_mlm_batch([m[0] for m in masked], [m[1] for m in masked], self.encoder.pad_id, packed)

    def loss(self, inputs, logits, loss):
        return loss

    def evaluate(self, model, split, threshold=None):
        cfg = self.cfg
        return mlm_metrics(model, split, self.encoder.pad_id, cfg.batch_size * 2, cfg.amp, cfg.pack), None, None

    def report(self, device, best):
        return mlm_report(self.cfg, self.splits, self.evaluate, device, best, self.model_dir)


def load_mlm_splits(cfg, encoder, model_dir):
    """train / val / test Splits of unlabelled text, every text cut into consecutive sequences of max_length tokens
    (TextEncoder.pieces). Without --val-file, val_fraction of the training texts are held out. Evaluation data is
    masked once, here, so every evaluation scores the same tokens; training data at each step (batch)."""
    try:
        masking = Masking.for_encoder(encoder, cfg.mlm_probability, cfg.seed)
    except ValueError as e:
        raise SystemExit(f"cannot use the checkpoint {model_dir}: {e}") from None
    read = lambda path: read_table(path, cfg.text_column, label_column=[]).texts  # any label column is ignored
    texts = read(cfg.train_file)
    if cfg.val_file:
        train_texts, val_texts = texts, read(cfg.val_file)
    else:
        train_rows, val_rows = train_val_split(len(texts), cfg.val_fraction, cfg.seed)
        train_texts, val_texts = [texts[i] for i in train_rows], [texts[i] for i in val_rows]
    splits = {"train": Split(encoder.pieces(train_texts), None, masking),
              "val": masked_once(encoder.pieces(val_texts), masking)}
    if cfg.test_file:
        splits["test"] = masked_once(encoder.pieces(read(cfg.test_file)), masking)
    more_val = "a longer --val-file" if cfg.val_file else "a --val-file or a larger --val-fraction"
    for name, what, more in (("val", "validation", more_val), ("test", "test", "a longer --test-file")):
        if name in splits:
            check_something_masked(splits[name], what, cfg.mlm_probability, more)
    return splits


def check_something_masked(split, name, rate, more):
    """An evaluation split with no masked token has nothing to score: its loss would read 0 (perplexity 1) and
    select a checkpoint on nothing."""
    if any((labels != IGNORE_INDEX).any() for labels in split.targets):
        return
    tokens = sum(len(seq) for seq in split.seqs)
    raise SystemExit(f"--mlm-probability {rate} masks none of the {tokens} tokens of the {len(split.seqs)} {name} "
                     f"sequence(s): there is nothing to score. Raise --mlm-probability, or give more {name} text "
                     f"({more})")


def masked_once(seqs, masking):
    """Evaluation data: the masked sequences and their labels, each sequence keyed (0, row)."""
    masked = [masking(seq, (0, row)) for row, seq in enumerate(seqs)]
    return Split([inputs for inputs, _ in masked], [labels for _, labels in masked])


@torch.no_grad()
def mlm_metrics(model, split, pad_id, batch_size, amp, pack):
    """Over every masked token of an evaluation split: the mean cross-entropy (loss), its exp (perplexity) and the
    share predicted right (accuracy), with the count. Each rank scores its rank_rows; a stand-in row is row 0 with
    nothing masked."""
    device = next(model.parameters()).device
    packed = use_packing(device, amp, pack)
    n = len(split.seqs)
    rows = rank_rows(n)
    seqs = [split.seqs[r if r < n else 0] for r in rows]
    labels = [split.targets[r] if r < n else np.full(len(split.seqs[0]), IGNORE_INDEX) for r in rows]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # cross-entropy, masked tokens, right
    was_training = model.training
    model.eval()
    for batch_rows in batch_indices([len(s) for s in seqs], batch_size, shuffle=False):
        batch = make_mlm_batch([seqs[i] for i in batch_rows], [labels[i] for i in batch_rows], pad_id, packed)
        batch = to_device(batch, device)
        with autocast(device, amp):
            logits, _ = model(**batch)
        logits, targets = logits.float(), batch["labels"].flatten()[batch["masked_index"]]
        sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum"), logits.new_tensor(len(targets)),
                             (logits.argmax(-1) == targets).sum()]).double()
    model.train(was_training)
    total, count, right = all_reduce(sums).tolist()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": right / max(count, 1), "masked_tokens": int(count)}


def mlm_report(cfg, splits, evaluate, device, best, model_dir):
    """Reload the best checkpoint from disk (proves it loads) and score it on the test data (the validation data
    when there is none), beside the checkpoint the run started from, on the same masked tokens."""
    name = "test" if "test" in splits else "val"
    scored = splits[name]
    after = evaluate(MaskedLM.from_pretrained(cfg.out_dir, device=device, verbose=False), scored)[0]
    torch.manual_seed(cfg.seed)  # an MLM head the start lacks is drawn as the run's was
    start = MaskedLM.from_pretrained(model_dir, device=device, verbose=False, num_layers=cfg.num_layers)
    before = evaluate(start, scored)[0]
    lines = [f"best validation loss: {best:.4f}", "",
             f"{name} ({len(scored.seqs)} sequences, {after['masked_tokens']} masked tokens): masked-token prediction",
             f"{'':<8}{'loss':>8}{'perplexity':>12}{'accuracy':>10}"]
    for label, m in (("start", before), ("trained", after)):
        lines.append(f"{label:<8}{m['loss']:>8.4f}{m['perplexity']:>12.2f}{m['accuracy']:>10.4f}")
    if start.fresh_weights:
        lines.append(f"(the start's MLM head was not in {model_dir}: it is the run's newly initialised one)")
    result = {"best_val": best, name: after, "start": before}
    if name == "test":
        files.write_json(os.path.join(cfg.out_dir, "test_metrics.json"), {**after, "start": before})
    report = "\n".join(lines)
    files.write_text(os.path.join(cfg.out_dir, "report.txt"), report + "\n")
    print("\n" + report + f"\n\nsaved to {cfg.out_dir}/")
    return result


# ----------------------------------------------------------------------------- BERT's masking, and masked-LM batches

@dataclass
class Masking:
    """BERT's masking recipe, as the reference's DataCollatorForLanguageModeling applies it: each token that is not
    a special token is chosen with probability `rate` and is to be predicted; a chosen token is replaced by the mask
    token 80% of the time, by a random token of the vocabulary 10%, and left as it is 10%.
    A sequence's draws come from its own generator, seeded by (seed, *key): train.py keys a training sequence by
    (epoch + 1, row), so each epoch masks it anew and a resumed run (or another number of processes) masks it as
    before; and an evaluation sequence by (0, row), so every evaluation masks the same tokens."""
    rate: float
    mask_id: int
    vocab_size: int  # the tokenizer's, special tokens included: where random replacements come from
    special_ids: np.ndarray  # never masked
    seed: int = 0

    @classmethod
    def for_encoder(cls, encoder, rate, seed):
        """The recipe with a TextEncoder's tokenizer: its mask token and its special tokens (the added tokens marked
        special, as the reference's all_special_ids, and whatever the template wraps a text in)."""
        tokenizer = encoder.tokenizer
        mask_id = tokenizer.token_to_id(encoder.mask_token)
        if mask_id is None:
            raise ValueError(f"the tokenizer has no mask token {encoder.mask_token!r}: masked-LM training needs one")
        added = [i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special]
        special = np.unique([*added, *encoder.prefix, *encoder.suffix, encoder.pad_id]).astype(np.int64)
        return cls(rate, mask_id, tokenizer.get_vocab_size(with_added_tokens=True), special, seed)

    def __call__(self, ids, key):
        """(inputs, labels) for one sequence of token ids: the masked ids, and the id to predict at each chosen
        position (IGNORE_INDEX elsewhere), both int64 arrays."""
        rng = np.random.default_rng([self.seed, *key])
        ids = np.asarray(ids, np.int64)
        chosen = (rng.random(len(ids)) < self.rate) & ~np.isin(ids, self.special_ids)
        how = rng.random(len(ids))  # < 0.8: the mask token; 0.8 to 0.9: a random token; above: kept
        inputs = np.where(chosen & (how < 0.8), self.mask_id, ids)
        random = chosen & (how >= 0.8) & (how < 0.9)
        inputs[random] = rng.integers(self.vocab_size, size=int(random.sum()))
        return inputs, np.where(chosen, ids, IGNORE_INDEX)


def make_mlm_batch(inputs, labels, pad_id, packed=False) -> dict:
    """make_batch for masked-LM: inputs are masked sequences, labels per token (Masking). labels are laid out like
    input_ids (IGNORE_INDEX on padding), and masked_index gives the flat positions of the tokens to predict, found
    here on the CPU so that the model need not ask the device."""
    batch = make_batch(inputs, None, pad_id, packed=packed)
    shape = batch["input_ids"].shape
    packed = "cu_seqlens" in batch  # packed None: make_batch chose
    starts = batch["cu_seqlens"][:-1].numpy() if packed else np.arange(len(inputs)) * shape[-1]
    flat = np.full(batch["input_ids"].numel(), IGNORE_INDEX, np.int64)
    for start, row in zip(starts, labels):
        flat[start:start + len(row)] = row
    batch["labels"] = torch.from_numpy(flat).view(shape)
    batch["masked_index"] = torch.from_numpy(np.flatnonzero(flat != IGNORE_INDEX))
    return batch
