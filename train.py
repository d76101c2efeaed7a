"""
Fine-tune a BERT or ModernBERT checkpoint as a text classifier, or continue its masked-LM pretraining (--task mlm).

    python train.py                                   # MiniLM on the shipped medical abstracts
    python train.py --train-file my.csv --label-column code --epochs 3 --out-dir out/codes
    python train.py --task mlm --train-file notes.txt --out-dir out/mlm    # then: --model out/mlm
    python train.py --config job.toml --lr 3e-5       # a config file, then command-line overrides
    torchrun --nproc_per_node 4 train.py ...          # 4 GPUs: global batch = batch_size x grad_accum x 4
    python train.py ... --resume                      # continue from out_dir/last after a crash

The output folder loads in transformers (AutoModelForSequenceClassification, with trust_remote_code=True for heads it
lacks: docs/serving.md; AutoModelForMaskedLM with --task mlm)
and in predict.py.

The file, top to bottom:
TrainConfig   every option, with its explanation and choices (side/config.py; python train.py -h prints them)
Classification   the objective: labels (single- or multi-label) -> splits, model, batches, loss, evaluation, report;
    side/mlm.py's MaskedLanguageModelling has the same methods, and train() picks one of the two once
Learner / build_learner / linear_schedule   AdamW with warmup and decay, the grad scaler, DDP/FSDP, compile
epoch_steps -> train_step -> optimizer_step   a training step (tests/test_train.py checks it against the reference)
Progress / validate / evaluate_and_checkpoint   how far a run is, saved at each evaluation for --resume
train()   the job, read top to bottom; main() turns expected failures into one-line messages (side/failures.py),
    and Ctrl-C or SIGTERM too (side/signals.py: a save in progress is finished first)
Side concerns live in side/: options and checks, checkpoints, logs, distributed, distillation, masked-LM, the final
report and calibration.
"""
from side.signals import quiet_start
quiet_start(__name__)  # first: a Ctrl-C or SIGTERM while torch loads ends with one line, not an import traceback
import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from data import IGNORE_INDEX, DataError, LabelEncoder, Split, TextEncoder, batch_indices, make_batch, read_table
from data import to_device, train_val_split
from metrics import calibration_metrics, compute_metrics, tune_thresholds
from model import EncoderClassifier, amp_dtype, autocast
from side import calibrate, checkpoints, distill, failures, files, options, signals
from side.config import TrainConfig
from side.distributed import (gather_logits, init_distributed, is_main_rank, is_sharded, leave_group, rank_and_world,
                              rank_steps, sync_gradients, wrap_for_ranks)
from side.hf import MULTI_LABEL, SINGLE_LABEL, dropout_overrides
from side.weights import check_vocab
from side.logs import TrainLog, plot_curves
from side.mlm import MaskedLanguageModelling
from side.packing import FlashCheckError, use_packing
from side.reports import final_report, threshold_list
from side.validation import check_validation_share


# ----------------------------------------------------------------------------- the objective: classification

class Classification:
    """Labels per text: single-label (softmax + cross-entropy, the reference's numerics) or multi-label (sigmoid +
    BCE or ASL on float multi-hot targets, a tuned threshold). A --teacher's soft targets join the loss
    (side/distill.py). side/mlm.py's MaskedLanguageModelling provides the same methods."""

    @staticmethod
    def option_rules(cfg):
        return {}  # check_options' own lines are the classifier's

    def __init__(self, cfg, model_dir, hf, encoder):
        self.splits, self.labels = load_splits(cfg, encoder)
        self.cfg = cfg = options.with_task_defaults(cfg, self.labels.multi_label)
        options.check_metric(cfg.metric, cfg.loss, self.labels)
        self.teacher_dir = distill.check_student(hf, cfg.num_layers, cfg.teacher, cfg.out_dir, encoder, self.labels)
        self.model_dir, self.hf, self.encoder, self.id2label = model_dir, hf, encoder, self.labels.id2label
        multi = self.labels.multi_label
        self.columns = ["micro_f1", "macro_f1", "exact_match"] if multi else ["accuracy", "macro_f1", "micro_f1"]
        self.metric = options.selection_metric(cfg.metric, multi)
        self.teacher = None

    def describe(self):
        kind = "multi" if self.labels.multi_label else "single"
        threshold = self.fixed_threshold()
        fixed = f", threshold {threshold}: no validation data to tune it on" if threshold is not None else ""
        return f"texts; {self.labels.num_labels} labels ({kind}-label{fixed})"

    def fixed_threshold(self):
        """Multi-label without validation data: the threshold config.json keeps, as there is nothing to tune it on
        (--threshold global then means 0.5; per_label is refused). None otherwise."""
        if not self.labels.multi_label or "val" in self.splits:
            return None
        return 0.5 if self.cfg.threshold == "global" else float(self.cfg.threshold)

    def build_model(self, device):
        """The checkpoint's encoder with a head for our labels, on the device (and the teacher, if any)."""
        model = build_classifier(self.cfg, self.model_dir, self.hf, self.encoder, self.labels,
                                 self.splits["train"].targets, device)
        if self.fixed_threshold() is not None:  # with validation data, each best evaluation sets them
            model.config.thresholds = threshold_list(self.fixed_threshold(), self.labels.num_labels)
        self.teacher = distill.load_teacher(self.teacher_dir, device)
        return model

    def batch(self, split, rows, packed, epoch):
        return make_batch([split.seqs[r] for r in rows], split.targets[rows], self.encoder.pad_id,
                          self.encoder.windows, packed)

    def loss(self, inputs, logits, loss):
        if self.teacher is None:
            return loss
        return distill.with_teacher(self.teacher, self.cfg.distill_weight, self.cfg.distill_temperature, inputs,
                                    logits, loss)

    def evaluate(self, model, split, threshold=None):
        """Metrics dict (with ECE and Brier) for a split, the threshold (multi-label: tuned here when None) and the
        logits."""
        return self.score(model, self.logits(model, split), split.targets, threshold)

    def logits(self, model, split):
        cfg = self.cfg
        return gather_logits(model, split.seqs, self.encoder.pad_id, cfg.batch_size * 2, cfg.amp, cfg.pack)

    def score(self, model, logits, targets, threshold=None):
        """evaluate's results from the logits, divided first by the model's temperature (side/calibrate.py)."""
        logits, multi = logits / calibrate.temperature_of(model.config), model.config.multi_label
        loss = model.loss(torch.from_numpy(logits), torch.from_numpy(targets)).item()
        if multi and threshold is None:
            threshold = tuned_threshold(self.cfg.threshold, self.cfg.metric, logits, targets)
        metrics = compute_metrics(logits, targets, multi, threshold if multi else 0.5)
        return {"loss": loss, **metrics, **calibration_metrics(logits, targets, multi)}, threshold, logits

    def report(self, device, best):
        return final_report(self, self.cfg.out_dir, self.cfg.calibrate, device, best)


def text_encoder(cfg, model_dir, hf):
    """The checkpoint's tokenizer, cutting texts at max_length (at most the model's positions) as long_docs says."""
    positions = hf.get("max_position_embeddings", 512)
    max_length = positions if cfg.long_docs == "native" else min(cfg.max_length or positions, positions)
    if cfg.max_length > positions and cfg.long_docs != "native" and is_main_rank():
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

    def read(path, multi=multi):
        return read_table(path, cfg.text_column, columns, multi, cfg.label_sep, pair_column)

    train = read(cfg.train_file)
    if train.labels is None:
        raise DataError(f"{cfg.train_file}: no label column (looked for 'label' and 'labels'); "
                        "name it with --label-column")
    labels = LabelEncoder.fit(train.labels, train.multi_label, names=train.label_columns or ())
    if not train.multi_label and labels.num_labels < 2:
        raise DataError(f"{cfg.train_file}: every row has the label {labels.names[0]!r}: a classifier needs "
                        "rows of at least 2 classes")

    def split(table, rows=None):
        return encoded_split(table, rows, labels, encoder, cfg.unknown_labels)

    def read_other(path):
        table = read(path)
        if table.labels is None:
            raise DataError(f"{path}: no label column; evaluation data needs labels")
        return read(path, train.multi_label) if table.multi_label != train.multi_label else table

    if cfg.val_file:
        splits = {"train": split(train), "val": split(read_other(cfg.val_file))}
    elif options.no_validation(cfg):  # --val-fraction 0: every row is trained on
        splits = {"train": split(train)}
    else:
        train_rows, val_rows = train_val_split(train.labels, cfg.val_fraction, cfg.seed,
                                               stratify=not train.multi_label)
        check_validation_share(cfg.train_file, cfg.val_fraction, train.labels, train_rows, val_rows, train.multi_label)
        splits = {"train": split(train, train_rows), "val": split(train, val_rows)}
    if cfg.test_file:
        splits["test"] = split(read_other(cfg.test_file))
    return splits, labels


def encoded_split(table, rows, labels, encoder, unknown_labels):
    """The Split of a table's rows (all when None): their token ids and targets."""
    rows = range(len(table.texts)) if rows is None else rows
    targets = labels.encode([table.labels[i] for i in rows], table.path, unknown_labels,
                            hint="or pass --unknown-labels ignore")
    if not labels.multi_label:  # a row whose only label was unknown (and ignored) has nothing left to score
        rows, targets = [r for r, t in zip(rows, targets) if t != IGNORE_INDEX], targets[targets != IGNORE_INDEX]
    if not len(rows):
        raise DataError(f"{table.path}: no rows left: every label in it was unknown and ignored "
                        "(--unknown-labels ignore)")
    pairs = [table.pairs[i] for i in rows] if table.pairs else None
    return Split(encoder.encode([table.texts[i] for i in rows], pairs), targets)


def build_classifier(cfg, model_dir, hf, encoder, labels, train_targets, device):
    """A folder without weights, weights that do not fit its config.json or a tokenizer from another model end the
    job with the reason."""
    head = {"multi_label_loss": cfg.loss, "layer_mix": cfg.layer_mix,
            **({} if cfg.pooling == "auto" else {"classifier_pooling": cfg.pooling})}
    dropout = dropout_overrides(hf.get("model_type"), cfg.hidden_dropout, cfg.attention_dropout,
                                        cfg.classifier_dropout)
    try:
        model = EncoderClassifier.from_pretrained(
            model_dir, id2label=labels.id2label, problem_type=MULTI_LABEL if labels.multi_label else SINGLE_LABEL,
            overrides={**dropout, **head, "long_document": encoder.long_document}, verbose=is_main_rank(),
            num_layers=cfg.num_layers)
        check_vocab(encoder.tokenizer, model.config.vocab_size, model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot use the checkpoint {model_dir}: {e}") from None
    calibrate.set_temperature(model.config, None)  # a calibrated checkpoint's temperature is not this model's
    layers = model.config.num_hidden_layers
    if cfg.reinit_layers > layers:
        cut = f" (--num-layers {cfg.num_layers})" if cfg.num_layers else ""
        raise SystemExit(f"--reinit-layers {cfg.reinit_layers}: the model has only {layers} "
                         f"layer{'s' if layers != 1 else ''}{cut}")
    model.reinit_top_layers(cfg.reinit_layers)
    if labels.multi_label and cfg.prior_bias and classifier_is_new(model):
        with torch.no_grad():
            model.head.classifier.bias.copy_(prior_bias(train_targets))
    model.to(device)
    model.encoder.grad_checkpointing = cfg.grad_checkpointing
    return model


def classifier_is_new(model):
    """Whether the checkpoint had no classifier for these labels. A trained one that only gains label queries or a
    layer mix (--pooling label_attention, --layer-mix) keeps its biases instead of restarting at the priors."""
    return "classifier.bias" in model.fresh_weights


def prior_bias(targets, eps=1e-4):
    """Log-odds of each label's training frequency: a new multi-label head starts predicting the base
    rates instead of 0.5, so BCE's first steps are not spent pushing every logit down."""
    p = np.clip(targets.mean(axis=0), eps, 1 - eps)
    return torch.from_numpy(np.log(p / (1 - p))).float()


def tuned_threshold(threshold, metric, logits, targets):
    if threshold in ("global", "per_label"):
        average = "macro" if metric == "macro_f1" else "micro"
        return tune_thresholds(logits, targets, per_label=threshold == "per_label", average=average)
    return float(threshold)


# ----------------------------------------------------------------------------- what trains the model

@dataclass
class Learner:
    """The model and what trains it. Training steps run step_model: the model itself, or the model wrapped
    for several processes (DDP, FSDP) and compiled; evaluations and checkpoints use model."""
    model: torch.nn.Module
    step_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device


def build_learner(cfg, model, total_steps, device):
    """What trains the model: the module the steps run (wrapped for several processes, compiled if asked),
    AdamW with linear warmup and decay, and the grad scaler (active with fp16 only)."""
    step_model = wrap_for_ranks(model, cfg.fsdp, device)  # before the optimizer: FSDP replaces the parameters
    step_model = torch.compile(step_model, dynamic=True) if cfg.compile else step_model
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)  # as the HF Trainer rounds
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, cfg.head_lr, device_type=device.type,
                                           layer_decay=cfg.layer_lr_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total_steps))
    fp16 = amp_dtype(device, cfg.amp) == torch.float16  # bf16 keeps fp32's range: no loss scaling
    if fp16 and is_sharded(cfg.fsdp):
        raise SystemExit("--fsdp has no fp16 grad scaler here: use --amp bf16 (or off)")
    return Learner(model, step_model, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=fp16), device)


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


# ----------------------------------------------------------------------------- a training step

def epoch_steps(cfg, objective, progress, device):
    """This process's batches, as (batch, weight) lists, for each optimizer step of the epoch still to do."""
    rank, world = rank_and_world()
    split = objective.splits["train"]
    packed = use_packing(device, cfg.amp, cfg.pack)
    order = batch_indices([len(s) for s in split.seqs], cfg.batch_size, shuffle=True, seed=cfg.seed,
                          epoch=progress.epoch, bucket=cfg.bucket)  # the same on every rank
    for step in rank_steps(order, cfg.grad_accum, rank, world, progress.position):
        yield [(objective.batch(split, rows, packed, progress.epoch), weight) for rows, weight in step]


def train_step(cfg, learner, objective, batches):
    """Forward and backward over a step's batches, then the update. Returns the step's [sum of losses,
    batches] and whether its gradient was bad, both on the device: no host sync."""
    sums = torch.zeros(2, device=learner.device)
    for i, (batch, weight) in enumerate(batches):
        with sync_gradients(learner.step_model, last=i == len(batches) - 1):
            with autocast(learner.device, cfg.amp):
                inputs = to_device(batch, learner.device)
                logits, loss = learner.step_model(**inputs)
                loss = objective.loss(inputs, logits, loss)
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


# ----------------------------------------------------------------------------- progress, evaluation, checkpoints

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


def start_or_resume(cfg, learner, state):
    """Progress at step 0; from a saved state (checkpoints.load_training_state), as it was, with the weights,
    optimizer moments, schedule, grad scale and this rank's random generators put back."""
    progress = Progress.from_state_dict(state) if state else Progress()
    if state:
        checkpoints.restore_training_state(state, learner, is_sharded(cfg.fsdp), rank_and_world()[0])
    progress.bad_steps = progress.bad_steps.to(learner.device)  # counted on the device: see count_bad_step
    return progress


def validate(cfg, model, objective, progress, log):
    """Score the model on the validation data and log it. Returns whether it is the best so far (its threshold
    then goes into its config.json). Without validation data (--val-fraction 0) the newest model counts as best."""
    if "val" not in objective.splits:
        log.evaluation(progress, None)
        return True
    metrics, threshold, _ = objective.evaluate(model, objective.splits["val"])  # the same on every rank
    log.evaluation(progress, metrics)
    score = float(metrics[log.metric])
    higher_is_better = options.greater_is_better(cfg.greater_is_better, log.metric)
    if progress.best is None:
        improved = True
    else:
        improved = score > progress.best if higher_is_better else score < progress.best
    if improved:
        progress.best, progress.bad_evals = score, 0
        model.config.thresholds = threshold_list(threshold, model.config.num_labels)
    else:
        progress.bad_evals += 1
    return improved


def evaluate_and_checkpoint(cfg, learner, objective, progress, log, model_dir, data):
    """Validate the model (validate); save it to out_dir when it is the best so far (and to out_dir/checkpoints
    with --keep-checkpoints); then all that --resume needs (with the data's fingerprints) to out_dir/last."""
    model, main_rank = learner.model, is_main_rank()
    improved = validate(cfg, model, objective, progress, log)
    progress.last_eval, progress.evals = progress.step, progress.evals + 1
    sharded, run_options = is_sharded(cfg.fsdp), dataclasses.asdict(cfg)
    with signals.held():  # a Ctrl-C or SIGTERM waits for the saves: the message then names this checkpoint, whole
        weights, optim = checkpoints.full_state(model, learner.optimizer, sharded)  # a collective under FSDP
        saved = checkpoints.unsharded(model, weights) if sharded and main_rank else model
        if main_rank and improved:
            checkpoints.save_checkpoint(saved, cfg.out_dir, model_dir, run_options)
        if main_rank and cfg.keep_checkpoints:
            checkpoints.keep_recent(saved, cfg.out_dir, cfg.keep_checkpoints, progress.step, model_dir, run_options)
        # after the best model: a kill between the two redoes this evaluation on --resume
        checkpoints.save_training_state(cfg.out_dir, learner, progress.state_dict(), weights, optim, run_options,
                                        data)
    log.restart_clock()


# ----------------------------------------------------------------------------- the job

def train(cfg):
    # all that can be checked is checked before the model loads: a bad option, file or folder ends the job at once
    Objective = MaskedLanguageModelling if cfg.task == "mlm" else Classification
    options.check_options(cfg, Objective.option_rules(cfg))
    torch.manual_seed(cfg.seed)
    rank, world, device = init_distributed(cfg.device)
    model_dir = options.resolve_model(cfg.model)
    hf = options.read_model_folder(model_dir)
    # a run on the folder now is named before anything else (the lock is taken at the latest before the first write)
    lock = options.hold_out_dir(cfg.out_dir, create=False) if rank == 0 else None
    reads = {"--train-file": cfg.train_file, "--val-file": cfg.val_file, "--test-file": cfg.test_file,
             "--config file": cfg.config}
    old_run = options.check_out_dir(cfg.out_dir, model_dir, cfg.overwrite, cfg.resume, rank == 0, reads)
    encoder = text_encoder(cfg, model_dir, hf)
    objective = Objective(cfg, model_dir, hf, encoder)
    cfg = objective.cfg  # with the objective's defaults in place of auto
    data = checkpoints.data_fingerprints({"train_file": cfg.train_file, "val_file": cfg.val_file})
    state = (checkpoints.load_training_state(cfg.out_dir, dataclasses.asdict(cfg), objective.id2label, data)
             if cfg.resume else None)
    if rank == 0:  # only rank 0 prints and writes files
        print(describe(cfg, objective, device))
    model = objective.build_model(device)
    steps_per_epoch, total_steps = count_steps(cfg, len(objective.splits["train"].seqs))
    learner = build_learner(cfg, model, total_steps, device)
    progress = start_or_resume(cfg, learner, state)
    if rank == 0:
        lock = lock or options.hold_out_dir(cfg.out_dir)
        options.clear_old_run(cfg.out_dir, old_run)
    log = TrainLog(cfg.out_dir, cfg.resume, progress, total_steps, steps_per_epoch, objective.metric,
                   objective.columns, device, cfg.report_to, dataclasses.asdict(cfg))
    checkpoint = lambda: evaluate_and_checkpoint(cfg, learner, objective, progress, log, model_dir, data)

    model.train()
    while not progress.out_of_patience(cfg) and progress.step < total_steps:
        for batches in epoch_steps(cfg, objective, progress, device):
            sums, bad = train_step(cfg, learner, objective, batches)
            count_bad_step(progress.bad_steps, bad)
            log.add_step(sums, bad, batches)
            progress.step, progress.position = progress.step + 1, progress.position + 1
            if log.due(progress.step, cfg.log_every):
                skipped = check_bad_steps(progress.bad_steps, cfg, progress.step)
                log.training(progress.step, learner.scheduler.get_last_lr()[0], skipped)
            if cfg.eval_every and progress.step % cfg.eval_every == 0:
                checkpoint()
            if progress.out_of_patience(cfg) or progress.step >= total_steps:
                break
        progress.epoch, progress.position = progress.epoch + 1, 0
        if not cfg.eval_every:
            checkpoint()
    if progress.last_eval != progress.step:  # steps after the last evaluation still count
        checkpoint()
    log.close()

    if world > 1:
        leave_group()  # what follows is rank 0's alone
    if rank != 0:
        return None
    plot_curves(log.path, os.path.join(cfg.out_dir, "training_curves.png"))
    with failures.writing(cfg.out_dir, "the report to"):
        report = objective.report(device, progress.best)
    log.publish()  # --report-to: the report as artifacts
    # after the report: a kill before the state is slimmed resumes to the report
    print(checkpoints.finished_state(cfg.out_dir, cfg.keep_state, "val" in objective.splits))
    files.release(lock)  # (a run that fails lets go of it in main)
    return report


def describe(cfg, objective, device):
    world = rank_and_world()[1]
    sizes = ", ".join(f"{len(s.seqs)} {name}" for name, s in objective.splits.items())
    unvalidated = ("\nno validation data (--val-fraction 0): every training text is trained on, nothing is "
                   "validated, and the model saved is the last step's") if "val" not in objective.splits else ""
    return (f"{sizes} {objective.describe()}; device {device}"
            + (f" x {world} processes ({'FSDP' if cfg.fsdp else 'DDP'})" if world > 1 else "") + unvalidated)


def parse_config(argv=None):
    return options.parse_config(TrainConfig, argv, __doc__)


@signals.stopping()  # SIGINT and SIGTERM raise KeyboardInterrupt (once); a signal before cfg is known ends there
def main(argv=None):
    cfg = parse_config(argv)
    try:
        return train(cfg)
    except DataError as e:
        raise SystemExit(f"data error: {e}")
    except FlashCheckError as e:  # --pack on a GPU whose flash kernel failed the self-check
        raise SystemExit(str(e)) from None
    except torch.OutOfMemoryError:  # raised by the forward, backward or optimizer step (or an evaluation)
        raise SystemExit(failures.oom_message(cfg.batch_size, cfg.grad_accum)) from None
    except failures.WriteFailed as e:  # disk full, permission denied, the folder removed: the last checkpoint is whole
        raise SystemExit(failures.write_failed(e, cfg.out_dir)) from None
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (a scheduler preempting the job): the last checkpoint is whole
        raise signals.stopped(e, failures.interrupted(cfg.out_dir), quiet=not is_main_rank()) from None
    finally:
        leave_group()  # a run that ended early: leave the process group cleanly
        files.release_all()  # and its lock on the out-dir


if __name__ == "__main__":
    main()
