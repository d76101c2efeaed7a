"""
Predict labels with a fine-tuned checkpoint (a train.py output folder, or any compatible HF folder).

    python predict.py --model out --text "CT shows a spiculated nodule." --text "Normal study."
    python predict.py --model out --input notes.csv --output predictions.jsonl
    python predict.py --model out --input notes.csv --output predictions.csv --int8   # faster on a CPU
    python predict.py --model out --input pairs.csv --text-pair-column hypothesis   # sentence pairs
    python predict.py --model any_checkpoint --input notes.csv --embeddings vectors.npy  # one vector per text

From Python:
    from predict import Predictor
    Predictor("out").predict(["CT shows a spiculated nodule."])
    -> [{"label": "neoplasms", "probability": 0.93, "probabilities": {...}}]

Multi-label checkpoints return every label whose probability reaches its threshold (saved by train.py).
"""
import argparse
import csv
import json
import os
import sys
import time

import numpy as np
import torch

from data import LONG_DOCS, DataError, LabelEncoder, TextEncoder, read_table
from metrics import compute_metrics, sigmoid, softmax
from model import EncoderClassifier, check_vocab, window_aggregation
from side.infer import CPU_BATCH_TOKENS, int8_agreement, int8_copy, predict_embeddings, predict_logits

class Predictor:
    """A checkpoint's model, tokenizer, label names and thresholds, ready to label texts (a fine-tuned checkpoint)
    or to embed them (any checkpoint). pairs: each text's second text, for a model trained on sentence pairs.
    int8: the encoder's linear layers run in int8 on the CPU (int8_copy); the fp32 model is kept as `fp32`
    to compare with (predict.py reports their agreement)."""

    def __init__(self, model_dir, device=None, max_length=None, batch_size=64, amp="auto",
                 long_docs=None, window_stride=None, int8=False, batch_tokens=None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() and not int8 else "cpu"))
        if int8 and self.device.type != "cpu":
            raise ValueError(f"int8 inference runs on the CPU only, not on {self.device}")
        self.model = EncoderClassifier.from_pretrained(model_dir, device=self.device, verbose=False).eval()
        self.fp32, self.model = (self.model, int8_copy(self.model)) if int8 else (None, self.model)
        self.model_dir = model_dir
        config = self.model.config
        self.names = None if config.id2label is None else [config.id2label[i] for i in range(config.num_labels)]
        # long documents as in training (config.json); a checkpoint not from train.py: head at its maximum
        trained = config.long_document or {}
        strategy = long_docs or trained.get("strategy", "head")
        if window_aggregation(strategy) == "attention" and not hasattr(self.model, "window_attention"):
            raise ValueError(f"{model_dir} was trained with {trained.get('strategy', 'head')!r}, without window "
                             "attention weights; use windows_max or windows_mean")
        self.model.aggregation = window_aggregation(strategy)  # max / mean need no weights: any model can
        positions = config.max_position_embeddings
        if max_length and max_length > positions and strategy != "native":
            print(f"note: max_length {max_length} is more than the model's {positions} positions: texts are cut at "
                  f"{positions} tokens", file=sys.stderr)
        length = min(max_length or trained.get("max_length") or positions, positions)
        length = positions if strategy == "native" else length
        self.encoder = TextEncoder(model_dir, length, strategy, window_stride or trained.get("stride", 0))
        check_vocab(self.encoder.tokenizer, config.vocab_size, model_dir)
        self.thresholds = np.asarray(config.thresholds if config.thresholds is not None else 0.5, np.float32)
        self.batch_size, self.batch_tokens, self.amp = batch_size, batch_tokens, amp

    def logits(self, texts, pairs=None):
        return self.score(self.encoder.encode(texts, pairs))

    def score(self, seqs, model=None):
        """Logits of encoded texts by the model, or by another one of the same checkpoint (fp32)."""
        if self.names is None:
            raise ValueError(f"{self.model_dir}: config.json has no id2label; was this checkpoint fine-tuned?")
        return predict_logits(model or self.model, seqs, self.encoder.pad_id, self.batch_size, self.amp,
                              max_tokens=self.batch_tokens)

    def embeddings(self, texts, pairs=None):
        """One vector per text, as the classifier pools its token vectors (a checkpoint without a classifier, such
        as a bare or masked-LM encoder, has no pooling of its own: mean pooling)."""
        pooling = "mean" if self.model.fresh_head else None
        seqs = self.encoder.encode(texts, pairs)
        return predict_embeddings(self.model, seqs, self.encoder.pad_id, self.batch_size, self.amp, pooling=pooling,
                                  max_tokens=self.batch_tokens)

    def predict(self, texts, pairs=None):
        return self.decode(self.logits(texts, pairs))

    def decode(self, logits):
        """Labels and probabilities from logits."""
        if self.model.config.multi_label:
            probs = sigmoid(logits)
            return [{"labels": [{"label": self.names[j], "probability": float(p[j])}
                                for j in np.flatnonzero(p >= self.thresholds)]} for p in probs]
        probs = softmax(logits)
        return [{"label": self.names[int(p.argmax())], "probability": float(p.max()),
                 "probabilities": {n: float(x) for n, x in zip(self.names, p)}} for p in probs]


def read_labelled(predictor, path, text_column="text", label_column="label", pair_column=None):
    """Texts, pairs and targets of a labelled file, to score the checkpoint on. Its labels must be ones the checkpoint
    knows (id2label): LabelEncoder.encode raises a DataError naming any other label and its rows."""
    config = predictor.model.config
    columns = label_column.split(",") if "," in label_column else label_column
    table = read_table(path, text_column, columns, config.multi_label, pair_column=pair_column)
    if predictor.names is None:
        raise ValueError(f"{predictor.model_dir}: config.json has no id2label; was this checkpoint fine-tuned?")
    targets = LabelEncoder.from_id2label(config.id2label, config.multi_label).encode(
        table.labels, path, hint="or leave those rows out: a checkpoint scores only the labels it was trained on")
    return table.texts, table.pairs, targets


def scored(predictor, texts, pairs=None):
    """The logits of texts, saying how fast the model scored them (tokenizing apart); with int8, also how closely
    and how fast the fp32 model scores the same texts."""
    start = time.perf_counter()
    seqs = predictor.encoder.encode(texts, pairs)
    tokenized = time.perf_counter()
    logits = predictor.score(seqs)
    seconds = max(time.perf_counter() - tokenized, 1e-9)
    int8 = predictor.fp32 is not None
    print(f"scored {len(texts)} texts in {seconds:.2f} s: {len(texts) / seconds:.1f} texts/s{' (int8)' * int8} "
          f"on {predictor.device} (tokenizing took {tokenized - start:.2f} s)", file=sys.stderr)
    if int8:
        start = time.perf_counter()
        reference = predictor.score(seqs, predictor.fp32)
        fp32_seconds = max(time.perf_counter() - start, 1e-9)
        multi = predictor.model.config.multi_label
        agreement = int8_agreement(logits, reference, multi, predictor.thresholds)
        print(f"int8 against fp32 on these {len(texts)} texts: the same {'set of labels' if multi else 'label'} for "
              f"{agreement['same_prediction']:.2%}, probabilities at most {agreement['max_probability_difference']:.4f}"
              f" apart; fp32 took {fp32_seconds:.2f} s ({len(texts) / fp32_seconds:.1f} texts/s): int8 is "
              f"{fp32_seconds / seconds:.2f}x as fast", file=sys.stderr)
    return logits


def input_rows(texts, pairs):
    """{"text": ...} per input, with "text_pair" for sentence pairs: what a prediction is written beside."""
    if pairs is None:
        return [{"text": text} for text in texts]
    return [{"text": text, "text_pair": pair} for text, pair in zip(texts, pairs)]


def write_predictions(path, texts, predictions, multi_label, pairs=None):
    """CSV (label columns flattened; multi-label as `;`-joined names) or JSONL (everything). pairs: a text_pair
    field or column after text."""
    inputs = input_rows(texts, pairs)
    if path.endswith((".jsonl", ".json")):
        with open(path, "w", encoding="utf-8") as f:
            for given, p in zip(inputs, predictions):
                f.write(json.dumps({**given, **p}, ensure_ascii=False) + "\n")
        return
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t" if path.endswith(".tsv") else ",")
        given = ["text"] if pairs is None else ["text", "text_pair"]
        if multi_label:
            writer.writerow([*given, "labels", "probabilities"])
            for row, p in zip(inputs, predictions):
                writer.writerow([*row.values(), ";".join(x["label"] for x in p["labels"]),
                                 ";".join(f"{x['probability']:.4f}" for x in p["labels"])])
        else:
            writer.writerow([*given, "label", "probability"])
            for row, p in zip(inputs, predictions):
                writer.writerow([*row.values(), p["label"], f"{p['probability']:.4f}"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="out", help="checkpoint folder written by train.py")
    parser.add_argument("--text", action="append", help="a text to label (repeatable)")
    parser.add_argument("--input", help="CSV, TSV or JSONL file with a text column, or TXT (one text per line)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--text-pair-column", help="the --input file's column of each row's second text, for a model "
                        "trained on sentence pairs (train.py --text-pair-column)")
    parser.add_argument("--embeddings", help="write one vector per text (.npy, float32, in input order) instead of "
                        "predictions: what the classifier pools, or the mean of the token vectors for a checkpoint "
                        "without one")
    parser.add_argument("--output", help="where to write predictions (.csv, .tsv or .jsonl); default: stdout as JSONL")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per batch at most")
    parser.add_argument("--batch-tokens", type=int, help="padded tokens per batch at most; default: "
                        f"{CPU_BATCH_TOKENS} on a CPU (long texts go in smaller batches), no cap on a GPU; 0 = no cap")
    parser.add_argument("--max-length", type=int, help="default: the max_length the model was trained with")
    parser.add_argument("--device", help="cuda, cpu, ...; default: cuda when available")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--long-docs", choices=LONG_DOCS, help="default: the strategy the model was trained with")
    parser.add_argument("--window-stride", type=int, help="windows_*: default: as trained")
    parser.add_argument("--label-column", help="score the --input file against this label column: print its "
                        "metrics as JSON instead of predictions (labels the checkpoint does not know are an error)")
    parser.add_argument("--int8", action="store_true", help="CPU: the encoder's linear layers in int8 (dynamic "
                        "quantization); prints how closely the fp32 model agrees on the same texts, and its speed")
    args = parser.parse_args(argv)
    if bool(args.text) == bool(args.input):
        parser.error("give texts with --text or a file with --input (one of them)")
    if args.label_column and not args.input:
        parser.error("--label-column scores a labelled --input file")
    if args.text_pair_column and not args.input:
        parser.error("--text-pair-column reads the pairs from an --input file")
    if args.embeddings and (args.output or args.label_column):
        parser.error("--embeddings writes vectors instead of predictions: not with --output or --label-column")
    check_arguments(args)
    try:
        if not args.label_column:  # read before the model loads: a bad file fails at once
            texts, pairs = args.text, None
            if args.input:
                # [] = ignore any label column
                table = read_table(args.input, args.text_column, [], pair_column=args.text_pair_column)
                texts, pairs = table.texts, table.pairs
        predictor = Predictor(args.model, args.device, args.max_length, args.batch_size, args.amp,
                              args.long_docs, args.window_stride, args.int8, args.batch_tokens)
        if args.label_column:
            texts, pairs, targets = read_labelled(predictor, args.input, args.text_column, args.label_column,
                                                  args.text_pair_column)
        if args.embeddings:
            return write_embeddings(args.embeddings, predictor.embeddings(texts, pairs))
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    except (FileNotFoundError, ValueError) as e:  # no weights, a tokenizer of another model, ...
        raise SystemExit(f"cannot use the checkpoint {args.model}: {e}") from None
    logits = scored(predictor, texts, pairs)
    if args.label_column:
        metrics = compute_metrics(logits, targets, predictor.model.config.multi_label, predictor.thresholds)
        print(json.dumps(metrics))
        return metrics
    predictions = predictor.decode(logits)
    if args.output:
        write_predictions(args.output, texts, predictions, predictor.model.config.multi_label, pairs)
        print(f"wrote {len(predictions)} predictions to {args.output}", file=sys.stderr)
    else:
        for row, p in zip(input_rows(texts, pairs), predictions):
            print(json.dumps({**row, **p}, ensure_ascii=False))


def write_embeddings(path, vectors):
    np.save(path, vectors)
    print(f"wrote {len(vectors)} vectors of shape {vectors.shape[1:]} to {path}", file=sys.stderr)
    return vectors


def check_arguments(args):
    """What can be wrong before the model loads: numbers out of range, an empty --text, a --model folder that
    is not there, an --output that cannot be written or would replace the --input file."""
    allowed = {"batch_size": (args.batch_size >= 1, ">= 1"),
               "batch_tokens": (args.batch_tokens is None or args.batch_tokens >= 0, ">= 0 (0 = no cap)"),
               "max_length": (args.max_length is None or args.max_length >= 0, ">= 0 (0 = as trained)"),
               "window_stride": (args.window_stride is None or args.window_stride >= 0, ">= 0 (0 = as trained)")}
    bad = [f"--{name.replace('_', '-')} {getattr(args, name)} must be {what}" for name, (ok, what) in allowed.items()
           if not ok]
    bad += [f"--text number {i} is empty: there is nothing to label" for i, text in enumerate(args.text or [], 1)
            if not text.strip()]
    if not os.path.isdir(args.model):
        bad.append(f"--model {args.model}: no such folder (train.py writes one to its --out-dir)")
    if args.int8 and args.device and args.device.split(":")[0] != "cpu":
        bad.append(f"--int8 runs on the CPU only: leave out --device {args.device}, or pass --device cpu")
    if args.output:
        bad += output_problems(args.output, args.input)
    if args.embeddings:
        bad += output_problems(args.embeddings, args.input, "--embeddings")
        if not args.embeddings.endswith(".npy"):
            bad.append(f"--embeddings {args.embeddings}: name a .npy file (numpy.load reads it)")
    if bad:
        raise SystemExit("; ".join(bad))


def output_problems(output, input_path, flag="--output"):
    folder = os.path.dirname(os.path.abspath(output))
    if input_path and os.path.realpath(output) == os.path.realpath(input_path):
        return [f"{flag} {output} is the --input file: the predictions would replace it; name another file"]
    if os.path.isdir(output):
        return [f"{flag} {output} is a folder; name a file"]
    if not os.path.isdir(folder):
        return [f"{flag} {output}: the folder {folder} does not exist"]
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(output) and not os.access(output, os.W_OK)):
        return [f"{flag} {output}: cannot write there (permission denied)"]
    return []


if __name__ == "__main__":
    main()
