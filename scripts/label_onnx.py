"""
Label a CSV without torch: an ONNX file from scripts/export_onnx.py, the model folder's tokenizer.json and
config.json, and only onnxruntime, tokenizers and numpy (docs/serving.md). Gives predict.py's labels.

    pip install onnxruntime tokenizers numpy
    python scripts/label_onnx.py --onnx model.onnx --model out --input notes.csv --output labels.csv

Output: each row's columns except the text, then label and probability (multi-label: labels and probabilities,
`;`-joined), as predict.py writes a CSV. Written beside the output, then renamed.
"""
import argparse
import csv
import json
import os
import sys

import numpy as np
import onnxruntime
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile
from tokenizers import Tokenizer

ORT_ERRORS = (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile)  # not a graph, or not this model's


def read_folder(folder):
    """config.json's labels, thresholds and length; the tokenizer, its pad id and the special tokens around a text."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    cut = config.get("long_document") or {}
    strategy = cut.get("strategy", "head")
    if strategy.startswith("windows_"):
        raise SystemExit(f"error: {folder} reads long documents as windows ({strategy}): use predict.py")
    positions = config["max_position_embeddings"]
    length = positions if strategy == "native" else min(cut.get("max_length") or positions, positions)
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    text = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a").ids
    start = full.index(text[0])
    prefix, suffix = full[:start], full[start + len(text):]
    pad = tokenizer.token_to_id(pad_token(folder))
    names = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    multi = config.get("problem_type") == "multi_label_classification"
    thresholds = np.asarray(config.get("thresholds") or 0.5, np.float32)
    return dict(tokenizer=tokenizer, prefix=prefix, suffix=suffix, pad=pad, budget=length - len(prefix) - len(suffix),
                strategy=strategy, names=names, multi=multi, thresholds=thresholds)


def pad_token(folder):
    path = os.path.join(folder, "special_tokens_map.json")
    token = json.load(open(path)).get("pad_token", "[PAD]") if os.path.isfile(path) else "[PAD]"
    return token["content"] if isinstance(token, dict) else token


def cut(ids, budget, strategy):
    """As predict.py cuts a long text: its head, its tail, or a quarter of head and the rest tail (head_tail)."""
    if len(ids) <= budget:
        return ids
    if strategy in ("head", "native"):
        return ids[:budget]
    head = budget // 4 if strategy == "head_tail" else 0
    return ids[:head] + ids[len(ids) - (budget - head):]


def logits(session, folder, texts, batch_size=32):
    """The graph's logits for texts, in length-sorted batches padded on the right."""
    encoded = folder["tokenizer"].encode_batch(texts, add_special_tokens=False)
    seqs = [folder["prefix"] + cut(e.ids, folder["budget"], folder["strategy"]) + folder["suffix"] for e in encoded]
    inputs = [i.name for i in session.get_inputs()]
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    out = np.zeros((len(seqs), len(folder["names"])), np.float32)
    for start in range(0, len(seqs), batch_size):
        rows = order[start:start + batch_size]
        longest = max(len(seqs[r]) for r in rows)
        ids = np.full((len(rows), longest), folder["pad"], np.int64)
        mask = np.zeros((len(rows), longest), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(seqs[r])], mask[i, :len(seqs[r])] = seqs[r], 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        out[rows] = session.run(None, {n: feed[n] for n in inputs})[0]
    return out


def decode(values, folder):
    """(labels, probabilities) cells per row, as predict.py writes them."""
    names = folder["names"]
    if folder["multi"]:
        p = 1 / (1 + np.exp(-values))
        picked = [np.flatnonzero(row >= folder["thresholds"]) for row in p]
        return [(";".join(names[j] for j in js), ";".join(f"{row[j]:.4f}" for j in js)) for row, js in zip(p, picked)]
    p = np.exp(values - values.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return [(names[int(row.argmax())], f"{row.max():.4f}") for row in p]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True)
    p.add_argument("--model", required=True, help="the folder the graph was exported from")
    p.add_argument("--input", required=True, help="a UTF-8 CSV")
    p.add_argument("--output", required=True)
    p.add_argument("--text-column", default="text")
    args = p.parse_args(argv)
    model_files = [os.path.join(args.model, f) for f in os.listdir(args.model)] if os.path.isdir(args.model) else []
    if any(os.path.realpath(args.output) == os.path.realpath(f) for f in [args.input, args.onnx, *model_files]):
        raise SystemExit(f"error: --output {args.output} is one of the inputs: choose another file")
    try:
        label(args)
    except (OSError, ValueError, KeyError, *ORT_ERRORS) as e:
        raise SystemExit(f"error: {type(e).__name__}: {e}") from None


def label(args):
    folder = read_folder(args.model)
    with open(args.input, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if rows and args.text_column not in rows[0]:
        raise SystemExit(f"error: {args.input} has no column {args.text_column!r}")
    blank = [i + 1 for i, row in enumerate(rows) if not (row[args.text_column] or "").strip()]
    if blank:
        raise SystemExit(f"error: {args.input}: rows {blank[:5]} have no text")
    session = onnxruntime.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
    cells = decode(logits(session, folder, [row[args.text_column] for row in rows]), folder)
    header = [c for c in (rows[0] if rows else []) if c != args.text_column]
    header += ["labels", "probabilities"] if folder["multi"] else ["label", "probability"]
    tmp = args.output + ".partial"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row, pair in zip(rows, cells):
            writer.writerow([row[c] for c in header[:-2]] + list(pair))
    os.replace(tmp, args.output)
    print(f"labelled {len(rows)} rows into {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
