"""Smaller models: a student of fewer layers (--num-layers) and distillation from a teacher (--teacher).

check_student   before anything loads: the layer count fits, and the teacher can score the student's batches
load_teacher    the teacher in eval mode, without gradients
with_teacher -> distillation_loss   the teacher's soft targets join the labels' loss, for the very same batch
"""
import os

import torch
import torch.nn.functional as F

from data import TextEncoder
from model import EncoderClassifier
from side.hf import MULTI_LABEL
from side.options import read_model_folder


def check_student(hf, num_layers, teacher_dir, out_dir, encoder, labels):
    """--num-layers fits the checkpoint, and the --teacher folder can teach this run: a classifier of the same
    labels, reading the very batches the student reads (same tokenizer, max_length and long-document scheme).
    Checked before either model loads. Returns the teacher's folder, or None."""
    check_layers(hf, num_layers)
    if not teacher_dir:
        return None
    if not os.path.isdir(teacher_dir):
        raise SystemExit(f"--teacher {teacher_dir}: no such folder (a fine-tuned classifier: train.py's --out-dir)")
    if os.path.realpath(teacher_dir) == os.path.realpath(out_dir):
        raise SystemExit(f"--out-dir {out_dir} is the --teacher: the student would replace it; pass another")
    teacher = read_model_folder(teacher_dir)
    architectures = teacher.get("architectures") or ["ForSequenceClassification"]  # none named: judge by the labels
    if not teacher.get("id2label") or not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise SystemExit(f"--teacher {teacher_dir}: not a fine-tuned classifier ({', '.join(architectures)}, "
                         f"{'no labels' if not teacher.get('id2label') else 'no classifier head'} in its config.json): "
                         "fine-tune it on this data first (train.py --model it), then distil from that folder")
    problems = teacher_problems(teacher, teacher_dir, encoder, labels)
    if problems:
        raise SystemExit(f"--teacher {teacher_dir} cannot teach this run: " + "; ".join(problems))
    return teacher_dir


def check_layers(hf, num_layers):
    """--num-layers keeps at most the layers the checkpoint (its config.json, hf) has."""
    layers = hf.get("num_hidden_layers")
    if layers and num_layers > layers:
        raise SystemExit(f"--num-layers {num_layers}: the checkpoint has only {layers} layers")


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
    if teacher.fresh_weights:
        raise SystemExit(f"--teacher {teacher_dir}: it has no trained classifier head; fine-tune it first")
    return teacher.eval().requires_grad_(False)


def with_teacher(teacher, weight, temperature, inputs, logits, hard_loss):
    """The loss of a step with a teacher: (1 - weight) x the labels' loss + weight x the soft-target loss against
    the teacher's logits, computed here for the very batch the student got (same device, same autocast)."""
    with torch.no_grad():  # not inference_mode: the soft loss saves the teacher's probabilities for backward
        teacher_logits, _ = teacher(**{k: v for k, v in inputs.items() if k != "labels"})
    soft = distillation_loss(logits, teacher_logits, teacher.config.multi_label, temperature)
    return (1 - weight) * hard_loss + weight * soft


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
