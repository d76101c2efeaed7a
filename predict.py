"""
Label texts with a fine-tuned checkpoint (a train.py output folder, or any compatible HF folder), from a few texts
to files of millions of notes: the file is read, tokenized, scored and written in chunks, so memory stays flat.

The file, in order: Predictor (the model and its tokenizer; predict, stream); Job and label_chunk (one chunk of
rows -> its output bytes, rejects, or logits to score); the sinks (a file through side/output.py's ChunkWriter,
stdout, metrics); run (chunks over the ranks of torchrun or one --shard, side/shards.py); main and its arguments.
Side rooms: side/stream.py reads the rows, side/progress.py prints the progress line and the speed, side/infer.py
batches, side/inputs.py checks the options and the API's arguments by one set of rules, side/files.py writes every
file, side/signals.py ends a run on Ctrl-C, SIGTERM or a closed stdout.

    python predict.py --model out --text "CT shows a spiculated nodule." --text "Normal study."
    python predict.py --model out --input notes.csv --output predictions.csv    # one row per note, id columns kept
    python predict.py --model out --input notes.csv.gz --output predictions.jsonl --resume   # after a kill
    python predict.py --model out --input notes.csv --output predictions.csv --int8   # faster on a CPU
    torchrun --nproc_per_node 4 predict.py --model out --input notes.csv --output predictions.csv
    python predict.py --model out --input notes.csv --output part0.csv --shard 0/2   # + 1/2; `cat part0.csv part1.csv`
    python predict.py --model out --input pairs.csv --text-pair-column hypothesis   # sentence pairs
    python predict.py --model any_checkpoint --input notes.csv --embeddings vectors.npy  # one vector per row
    python predict.py --model out --input notes.csv --output predictions.jsonl --explain  # + each label's evidence
    python predict.py --model out --input test.csv --label-column label               # metrics as JSON

Output: each input row's columns except the text (and pair; --keep-text writes them too), then label and
probability (multi-label: labels and probabilities, `;`-joined in CSV), in input order. An input column named like
a prediction column is written as input_<name>. --text texts are written with their text. Nothing is written in
place: PATH.partial grows chunk by chunk and becomes PATH at the end; PATH.resume.json (sizes and sha256 of what
was written) lets --resume go on after the last complete chunk, byte for byte as an uninterrupted run. Before any
work the run refuses to write onto a file it reads or twice onto one (side/files.py), and holds PATH.lock while
it runs. A row without text, a line that does not parse or is not UTF-8 (a blank line of a .txt file) goes to
PATH's rejects file (predictions.rejects.jsonl: row, line, id columns, reason) and the run goes on; then the exit
status is 3. Progress goes to stderr. Docs: docs/predict.md.

From Python:
    from predict import Predictor
    Predictor("out").predict(["CT shows a spiculated nodule."])
    -> [{"label": "neoplasms", "probability": 0.93, "probabilities": {...}}]
    for p in Predictor("out").stream(cursor):   # texts or rows (dicts) from any iterable, chunk by chunk
        ...
    Predictor("out").explain(["CT shows ..."])   # each predicted label with its "evidence" spans: docs/explain.md

Multi-label checkpoints return every label whose probability reaches its threshold (saved by train.py). A checkpoint
calibrated by train.py --calibrate temperature has its logits divided by the temperature in its config.json.
"""
from side.signals import quiet_start
quiet_start(__name__)  # first: a Ctrl-C or SIGTERM while torch loads ends with one line, not an import traceback
import argparse
import csv
import io
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from data import LONG_DOCS, DataError, LabelEncoder, OptionError, TextEncoder, row_labels
from metrics import compute_metrics, sigmoid, softmax
from model import EncoderClassifier
from side import files, signals
from side.explain import METHODS, HtmlItems, add_evidence, evidence_cell, method_problem
from side.infer import (CPU_BATCH_TOKENS, int8_copy, int8_sample_check, predict_embeddings, predict_logits,
                        speed_report)
from side.inputs import check_arguments, check_numbers, checked_items, checked_texts
from side.label_names import gold_labels, read_label_names, with_names
from side.output import (NPY_HEADER_BYTES, ChunkWriter, ResumeRefused, fingerprint_of_file, npy_header,
                         output_format, rejects_path)
from side.progress import Progress
from side.shards import Plan, from_first, gather_step, join_ranks, leave_ranks, parse_shard, shard_chunks
from side.stream import RowStream, TextRows
from side.weights import check_vocab, read_json_object
from side.windows import window_aggregation

CHUNK_ROWS = 4096  # rows read, scored and written at a time: memory is bounded by a chunk, resume resumes one
PREDICTION_FIELDS = ("label", "probability", "probabilities", "labels", "evidence")
REJECT_FIELDS = ("row", "line", "reason")
REJECTED_EXIT = 3  # the run finished, but some rows were set aside: a pipeline should notice


class Predictor:
    """A checkpoint's model, tokenizer, label names and thresholds, ready to label texts (a fine-tuned checkpoint)
    or to embed them (any checkpoint). pairs: each text's second text, for a model trained on sentence pairs.
    int8: the encoder's linear layers run in int8 on the CPU (int8_copy); the fp32 model is kept as `fp32`
    to compare with (predict.py reports their agreement)."""

    def __init__(self, model_dir, device=None, max_length=None, batch_size=64, amp="auto",
                 long_docs=None, window_stride=None, int8=False, batch_tokens=None):
        check_numbers(batch_size=batch_size, max_length=max_length, window_stride=window_stride,
                      batch_tokens=batch_tokens)  # the command line's rules (side/inputs.py)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() and not int8 else "cpu"))
        if int8 and self.device.type != "cpu":
            raise ValueError(f"int8 inference runs on the CPU only, not on {self.device}")
        self.model = EncoderClassifier.from_pretrained(model_dir, device=self.device, verbose=False).eval()
        self.encoder = text_encoder(self.model, model_dir, max_length, long_docs, window_stride)
        self.model.aggregation = window_aggregation(self.encoder.strategy)  # windows as cut here; before the copy
        self.fp32, self.model = (self.model, int8_copy(self.model)) if int8 else (None, self.model)
        self.model_dir = model_dir
        config = self.model.config
        self.names = None if config.id2label is None else [config.id2label[i] for i in range(config.num_labels)]
        check_vocab(self.encoder.tokenizer, config.vocab_size, model_dir)
        self.thresholds = np.asarray(config.thresholds if config.thresholds is not None else 0.5, np.float32)
        # train.py --calibrate temperature: every logit is divided by it (one, or one per label); 1 without
        self.temperature = np.asarray(config.hf.get("calibration_temperature", 1.0), np.float32)
        self.batch_size, self.batch_tokens, self.amp = batch_size, batch_tokens, amp
        self.pair_column = trained_option(model_dir, "text_pair_column")

    def encode(self, texts, pairs=None, first=1):
        """Token ids of texts (checked_texts; first: texts[0]'s position in the whole input), with a warning when a
        model trained on pairs gets none."""
        texts, pairs = checked_texts(texts, pairs, first)
        if pairs is None and self.pair_column:
            print(f"warning: {self.model_dir} was trained on sentence pairs (--text-pair-column {self.pair_column}); "
                  "these texts come without their second text: pass --text-pair-column (Predictor: pairs=)",
                  file=sys.stderr)
        return self.encoder.encode(texts, pairs)

    def logits(self, texts, pairs=None):
        return self.score(self.encode(texts, pairs))

    def score(self, seqs, model=None):
        """Logits of encoded texts by the model, or by another one of the same checkpoint (fp32), divided by the
        checkpoint's calibration temperature when it has one."""
        if self.names is None:
            raise ValueError(f"{self.model_dir}: config.json has no id2label; was this checkpoint fine-tuned?")
        return predict_logits(model or self.model, seqs, self.encoder.pad_id, self.batch_size, self.amp,
                              max_tokens=self.batch_tokens) / self.temperature

    def embed(self, seqs):
        """One vector per encoded text, as the classifier pools its token vectors (a checkpoint without a classifier,
        such as a bare or masked-LM encoder, has no pooling of its own: mean pooling)."""
        pooling = "mean" if self.model.fresh_weights else None
        return predict_embeddings(self.model, seqs, self.encoder.pad_id, self.batch_size, self.amp, pooling=pooling,
                                  max_tokens=self.batch_tokens)

    def embeddings(self, texts, pairs=None):
        return self.embed(self.encode(texts, pairs))

    def predict(self, texts, pairs=None):
        return self.decode(self.logits(texts, pairs))

    def stream(self, items, chunk_rows=CHUNK_ROWS, text_column="text", pair_column=None):
        """Predictions for any iterable (a list, a file, a database cursor), in order, chunk_rows at a time: memory
        stays that of a chunk. An item is a text, or a row (a dict) whose text is in text_column (and its pair in
        pair_column); a row's other fields come along in its prediction, so an id column does. Its arguments are
        checked at once, each item as its chunk comes (a bad one is named by its position in the whole input)."""
        check_numbers(chunk_rows=chunk_rows)
        return streamed(self, checked_items(items), chunk_rows, text_column, pair_column)

    def explain(self, texts, top=3, method=None, predictions=None):
        """predict() with each predicted label's "evidence": its top spans of the text (side/explain.py, by the fp32
        model with int8). predictions: those of these texts, when made already."""
        check_numbers(top=top)
        texts = checked_texts(texts)[0]
        return add_evidence(self.fp32 or self.model, self.encoder, texts, predictions or self.predict(texts),
                            self.names, top, method, self.batch_size, self.amp)

    def decode(self, logits):
        """Labels and probabilities from logits."""
        return decoded(logits, self.names, self.thresholds, self.model.config.multi_label)


def streamed(predictor, items, chunk_rows, text_column, pair_column):
    """Predictor.stream's predictions, a chunk at a time; each chunk's texts are checked with their positions in
    the whole stream."""
    for first in itertools.count(1, chunk_rows):
        chunk = list(itertools.islice(items, chunk_rows))
        if not chunk:
            return
        rows = [item if isinstance(item, dict) else None for item in chunk]
        texts = [item.get(text_column) if row is not None else item for item, row in zip(chunk, rows)]
        pairs = [row.get(pair_column) if row is not None else None for row in rows] if pair_column else None
        for row, prediction in zip(rows, predictor.decode(predictor.score(predictor.encode(texts, pairs, first)))):
            yield prediction if row is None else {**given_fields(row, (text_column, pair_column)), **prediction}


def decoded(logits, names, thresholds, multi_label):
    """Predictor.decode: the label (and every probability), or the labels at or over their thresholds."""
    if multi_label:
        return [{"labels": [{"label": names[j], "probability": float(p[j])} for j in np.flatnonzero(p >= thresholds)]}
                for p in sigmoid(logits)]
    return [{"label": names[int(p.argmax())], "probability": float(p.max()),
             "probabilities": {n: float(x) for n, x in zip(names, p)}} for p in softmax(logits)]


def text_encoder(model, model_dir, max_length=None, long_docs=None, window_stride=None):
    """The checkpoint's tokenizer, cutting and windowing long documents as in training (config.json's long_document;
    a checkpoint not from train.py: head at its maximum) unless the options say otherwise. The model is read, not
    changed: its window aggregation must then follow the encoder's strategy (Predictor sets it)."""
    config = model.config
    trained = config.long_document or {}
    strategy = long_docs or trained.get("strategy", "head")
    if window_aggregation(strategy) == "attention" and not hasattr(model, "window_attention"):
        raise ValueError(f"{model_dir} was trained with {trained.get('strategy', 'head')!r}, without window "
                         "attention weights; use windows_max or windows_mean")
    positions = config.max_position_embeddings
    if max_length and max_length > positions and strategy != "native":
        print(f"note: max_length {max_length} is more than the model's {positions} positions: texts are cut at "
              f"{positions} tokens", file=sys.stderr)
    length = min(max_length or trained.get("max_length") or positions, positions)
    length = positions if strategy == "native" else length
    return TextEncoder(model_dir, length, strategy, window_stride or trained.get("stride", 0))


def trained_option(model_dir, name):
    """An option of the train.py run that wrote the folder (train_config.json), or None."""
    path = os.path.join(model_dir, "train_config.json")
    return read_json_object(path).get(name) if os.path.isfile(path) else None


def given_fields(record, dropped, reserved=PREDICTION_FIELDS):
    """A row's fields that go beside its prediction: all but those dropped (the text unless kept); one named like
    a field we write is renamed input_<name>, and so is one named like a renamed one (input_label, when label is
    renamed so), so no two fields meet under one name whatever the row holds."""
    return {renamed(k, reserved): v for k, v in record.items() if k not in dropped}


def renamed(name, reserved):
    taken = name in reserved or (name.startswith("input_") and renamed(name[6:], reserved) != name[6:])
    return f"input_{name}" if taken else name


def cell(value):
    """A JSON value as a CSV cell: text as it is, None empty, anything else as JSON (numbers, lists)."""
    return value if isinstance(value, str) else "" if value is None else json.dumps(value, ensure_ascii=False)


# ----------------------------------------------------------------------------- one chunk

@dataclass
class Chunk:
    """What one chunk of input rows became: its output (bytes, in input order), its rejects (JSONL bytes), the
    rows labelled and set aside, and with --label-column the logits and targets to score."""
    index: int
    output: bytes = b""
    rejects: bytes = b""
    rows: int = 0
    rejected: int = 0
    logits: np.ndarray | None = None
    targets: np.ndarray | None = None


class Job:
    """What turns chunks of rows into Chunks: the predictor, the columns, the output's format (from its name: CSV,
    TSV, JSONL; stdout: JSONL), and the time spent tokenizing and scoring."""

    def __init__(self, args, predictor, stream):
        self.predictor, self.args = predictor, args
        self.text_column, self.pair_column = args.text_column, args.text_pair_column
        keep = args.keep_text or bool(args.text)
        self.dropped = () if keep else (self.text_column, self.pair_column)
        self.format = output_format(args.output)
        # --label-names writes name (names) too: an input column of that name is renamed, not overwritten
        self.reserved = PREDICTION_FIELDS + ("name", "names") * bool(args.label_names)
        self.given = [given for c in stream.columns for given in given_fields({c: None}, self.dropped, self.reserved)]
        self.unwritten = set()  # JSONL fields that CSV output has no column for (not in the first record)
        self.labels = None
        if args.label_column:
            config = predictor.model.config
            columns = args.label_column.split(",") if "," in args.label_column else args.label_column
            self.labels = (columns, LabelEncoder.from_id2label(config.id2label, config.multi_label))
        self.tokenizing, self.scoring, self.scored, self.explaining = 0.0, 0.0, 0, 0.0
        title = f"Evidence of {args.model} on {args.input or 'the --text texts'}"
        self.page = HtmlItems(args.explain_html, title) if args.explain_html else None
        self.label_names = read_label_names(args.label_names, predictor.names) if args.label_names else None
        self.row_shape = None  # of a vector (--embeddings), once one is made
        self.int8_check = None  # --int8: int8_sample_check on the first chunk's first texts

    def header(self):
        """The CSV/TSV header (chunk 0 writes it), or nothing."""
        if self.format == "jsonl":
            return ""
        multi = self.predictor.model.config.multi_label
        return self.csv_text([[*self.given, *prediction_columns(multi, self.args.explain, self.label_names)]])

    def csv_text(self, rows):
        buffer = io.StringIO()
        csv.writer(buffer, delimiter="\t" if self.format == "tsv" else ",").writerows(rows)
        return buffer.getvalue()

    def targets(self, rows):
        """--label-column: the targets of rows; a missing label or one the checkpoint does not know is a
        DataError naming the rows."""
        columns, encoder = self.labels
        path = self.args.input
        raw = [row_labels(path, f"row {r.number} (line {r.line})", r.record, columns, encoder.multi_label)
               for r in rows]
        return encoder.encode(raw, path, rows=[r.number for r in rows],
                              hint="or leave those rows out: a checkpoint scores only the labels it was trained on")

    def values(self, rows):
        """Logits (or vectors, --embeddings) of rows, tokenizing and scoring timed."""
        texts = [r.record[self.text_column] for r in rows]
        pairs = [r.record[self.pair_column] for r in rows] if self.pair_column else None
        start = time.perf_counter()
        seqs = self.predictor.encode(texts, pairs)
        tokenized = time.perf_counter()
        values = out_of_memory_retry(self.predictor, self.predictor.embed if self.args.embeddings else
                                     self.predictor.score, seqs)
        self.tokenizing += tokenized - start
        self.scoring += time.perf_counter() - tokenized
        self.scored += len(rows)
        self.row_shape = self.row_shape or (values.shape[1:] if len(values) else None)
        predictor = self.predictor
        if predictor.fp32 is not None and self.int8_check is None and seqs:
            self.int8_check = int8_sample_check(predictor.score, predictor.model, predictor.fp32, seqs,
                                                predictor.model.config.multi_label, predictor.thresholds)
        return values

    def render(self, rows, predictions, index):
        """The output text of a chunk's labelled rows (the header with chunk 0)."""
        fields = [{**given_fields(r.record, self.dropped, self.reserved), **p} for r, p in zip(rows, predictions)]
        if self.format == "jsonl":
            return "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in fields)
        body = [[cell(f.get(name)) for name in self.given] + prediction_cells(p, self.args.explain, self.label_names)
                for f, p in zip(fields, predictions)]
        self.unwritten.update(name for f in fields for name in f if name not in self.given)
        return (self.header() if index == 0 else "") + self.csv_text(body)


def prediction_columns(multi_label, explain, named=False):
    """The CSV columns of a prediction: its label(s), their name(s) with --label-names, probability(ies), and with
    --explain their evidence."""
    columns = ("labels", "names" * bool(named), "probabilities") if multi_label else (
        "label", "name" * bool(named), "probability")
    return tuple(c for c in columns if c) + ("evidence",) * bool(explain)


def prediction_cells(p, explain, named=False):
    """A prediction's CSV cells: multi-label's labels and probabilities `;`-joined; evidence_cell with --explain."""
    labels = p["labels"] if "labels" in p else [p]  # single-label: the one
    cells = [";".join(x[key] for x in labels) for key in (("label", "name") if named else ("label",))]
    cells.append(";".join(f"{x['probability']:.4f}" for x in labels))
    return cells + ([evidence_cell(p)] if explain else [])


def explained(job, rows, predictions, gold=None):
    """--explain: the predictions of rows with their evidence; the first ones kept for --explain-html's page (with
    gold: each row's true labels)."""
    texts = [r.record[job.text_column] for r in rows]
    start = time.perf_counter()
    predictions = job.predictor.explain(texts, job.args.explain_top, job.args.explain_method, predictions)
    job.explaining += time.perf_counter() - start
    if job.page:
        job.page.add([r.record for r in rows], texts, predictions, gold)
    return predictions


def label_chunk(job, index, rows):
    """One chunk of input rows -> its Chunk. Rows with a problem are set aside; the others are tokenized, sorted by
    length into batches (side/infer.py), scored and put back in input order."""
    good = [r for r in rows if not r.problem]
    bad = [r for r in rows if r.problem]
    chunk = Chunk(index, rows=len(good), rejected=len(bad),
                  rejects=reject_lines(bad, (job.text_column, job.pair_column)).encode())
    if job.labels:
        chunk.targets = job.targets(good)
    values = job.values(good)
    if job.args.embeddings:  # a row set aside keeps its place as NaNs: vector i is still input row i + 1
        vectors = np.full((len(rows), *values.shape[1:]), np.nan, np.float32)
        vectors[[i for i, r in enumerate(rows) if not r.problem]] = values
        chunk.output = vectors.tobytes()
    elif job.labels:
        chunk.logits = values
        if job.page and good:  # the page shows each text's true labels beside the predicted ones
            gold = gold_labels(chunk.targets, job.predictor.names, job.label_names)
            explained(job, good, with_names(job.predictor.decode(values), job.label_names), gold)
    else:
        predictions = with_names(job.predictor.decode(values), job.label_names)
        predictions = explained(job, good, predictions) if job.args.explain and good else predictions
        chunk.output = job.render(good, predictions, index).encode()
    return chunk


def reject_lines(rows, texts):
    """JSONL lines of the rows set aside: row, line, their fields but the texts, and the reason."""
    return "".join(json.dumps({"row": r.number, "line": r.line, **given_fields(r.record or {}, texts, REJECT_FIELDS),
                               "reason": r.problem}, ensure_ascii=False) + "\n" for r in rows)


def out_of_memory_retry(predictor, score, seqs):
    """score(seqs); out of GPU memory, again with batches half as large, down to one text: as large as memory
    allows, whatever --batch-size asked."""
    while True:
        try:
            return score(seqs)
        except torch.OutOfMemoryError:
            if predictor.batch_size == 1:
                raise SystemExit("out of memory with one text per batch: lower --max-length or use a larger "
                                 "device") from None
            predictor.batch_size = max(predictor.batch_size // 2, 1)
            if predictor.batch_tokens:  # None (the CPU's default cap) and 0 (no cap) stay as they are
                predictor.batch_tokens = max(predictor.batch_tokens // 2, 1)
            torch.cuda.empty_cache()
            print(f"note: out of memory; batches of at most {predictor.batch_size} texts from here on",
                  file=sys.stderr)


# ----------------------------------------------------------------------------- where chunks go

class FileSink:
    """--output / --embeddings: chunks through a ChunkWriter (never in place, resumable); the rows set aside to the
    rejects file beside it."""

    def __init__(self, args, job, fingerprint):
        self.path = args.output or args.embeddings
        self.npy = bool(args.embeddings)
        self.writer = ChunkWriter(self.path, fingerprint, args.resume,
                                  head_bytes=NPY_HEADER_BYTES if self.npy else 0, rejects=rejects_path(self.path))
        self.job, self.done = job, self.writer.rows + self.writer.rejected
        if args.resume and not self.writer.chunks:
            print(f"note: no interrupted run of {self.path} to resume: starting at the first row", file=sys.stderr)

    def write(self, chunk):
        self.writer.commit(chunk.output, chunk.rejects, chunk.rows, chunk.rejected)

    def finish(self):
        writer = self.writer
        shape = self.job.row_shape or (self.job.predictor.model.config.hidden_size,)
        with signals.held():  # Ctrl-C between the renames would leave a state that no longer matches the files
            writer.finish(npy_header((writer.rows + writer.rejected, *shape)) if self.npy else b"")
        what = "vectors" if self.npy else "predictions"
        print(f"wrote {writer.rows + writer.rejected * self.npy} {what} to {self.path}", file=sys.stderr)
        return writer.rejected, writer.rejects


class StdoutSink:
    """No --output: predictions as JSONL on stdout, the rows set aside on stderr."""

    def __init__(self):
        self.rejected = self.done = 0

    def write(self, chunk):
        sys.stdout.write(chunk.output.decode())
        sys.stdout.flush()
        sys.stderr.write("".join(f"set aside: {line}\n" for line in chunk.rejects.decode().splitlines()))
        self.rejected += chunk.rejected

    def finish(self):
        return self.rejected, "stderr"


class MetricsSink:
    """--label-column: the logits and targets of every chunk (a few numbers a row), scored at the end."""

    def __init__(self, predictor):
        self.predictor, self.logits, self.targets, self.rejected, self.done = predictor, [], [], 0, 0

    def write(self, chunk):
        self.logits.append(chunk.logits)
        self.targets.append(chunk.targets)
        self.rejected += chunk.rejected

    def finish(self):
        config = self.predictor.model.config
        self.metrics = compute_metrics(np.concatenate(self.logits), np.concatenate(self.targets),
                                       config.multi_label, self.predictor.thresholds)
        print(json.dumps(self.metrics))
        return self.rejected, "stderr"


# ----------------------------------------------------------------------------- the run

def chunks_of(stream, plan):
    """(index, rows) of the chunks from plan.first to plan.stop; earlier chunks are read (to count rows) and
    skipped: a resumed run, or a shard, starts there."""
    rows = iter(stream)
    for index in itertools.count():
        chunk = list(itertools.islice(rows, plan.chunk_rows))
        if not chunk or (plan.stop is not None and index >= plan.stop):
            return
        if index >= plan.first:
            yield index, chunk


def labelled(job, stream, plan):
    """The Chunks to write, in order. Under torchrun each rank labels its chunk of every step and rank 0 gets
    them all (gather_step); the others yield nothing. All ranks read the whole file, so all see the same steps."""
    mine, pending = None, False
    for index, rows in chunks_of(stream, plan):
        if plan.world == 1:
            yield label_chunk(job, index, rows)
            continue
        if plan.mine(index):
            mine = label_chunk(job, index, rows)
        pending = True
        if plan.step_ends(index):
            yield from (c for c in gather_step(mine, plan.rank, plan.world) if c is not None)
            mine, pending = None, False
    if pending:  # the file ended within a step
        yield from (c for c in gather_step(mine, plan.rank, plan.world) if c is not None)


def run(job, stream, plan, sink, progress_every):
    """Label the chunks and write them, with the progress line; then the speed report and the rows set aside."""
    if sink is None:  # a rank of torchrun other than 0: its chunks go to rank 0
        for _ in labelled(job, stream, plan):
            pass
        return None
    done = sink.done
    progress = Progress(stream.size, progress_every, resumed=done > 0)
    for chunk in labelled(job, stream, plan):
        sink.write(chunk)
        done += chunk.rows + chunk.rejected
        progress.update(done, stream.bytes_read())
    progress.update(done, stream.size, force=True)
    progress.done()
    report_speed(job)
    unwritten = sorted(job.unwritten - set(job.reserved))
    if unwritten:
        print(f"note: fields {unwritten} of some rows are not among the first row's, so the CSV has no column for "
              "them; write .jsonl to keep every field", file=sys.stderr)
    result = sink.finish()
    if job.page:  # after the predictions are safe: a page that cannot be written loses none of them
        write_page(job.page, getattr(sink, "path", "stdout"))
    return result


def write_page(page, predictions):
    try:
        print(f"wrote the evidence of {len(page.items)} texts to {page.write()}", file=sys.stderr)
    except files.WriteFailed as e:
        raise SystemExit(f"{e}; the predictions are complete in {predictions}: once that is fixed, run the same "
                         "command again for the page (it labels the texts again)") from None


def report_speed(job):
    explaining = job.explaining if job.args.explain else None
    print(speed_report(job.scored, job.scoring, job.tokenizing, job.predictor.device, explaining, job.int8_check,
                       job.predictor.model.config.multi_label), file=sys.stderr)


def fingerprint(args, stream):
    """What a resumed run must share with the run it continues: the input file, the model, every option that
    changes the output's bytes."""
    model = {name: fingerprint_of_file(os.path.join(args.model, name)) for name in sorted(os.listdir(args.model))
             if name.endswith((".json", ".safetensors", ".bin", ".txt"))}
    options = {k: getattr(args, k) for k in ("text_column", "text_pair_column", "keep_text", "batch_size",
                                             "batch_tokens", "max_length", "amp", "long_docs", "window_stride",
                                             "int8", "chunk_rows", "shard", "device")}
    if args.explain:  # only then: a run from before --explain existed still resumes
        options.update({k: getattr(args, k) for k in ("explain", "explain_top", "explain_method")})
    return {"input": fingerprint_of_file(args.input) if args.input else args.text, "model": model,
            "options": options}


def plan_chunks(args, stream, sink, rank, world):
    """The chunks this process labels: all; its turns under torchrun; its shard's run; resumed after the last
    complete one."""
    plan = Plan(args.chunk_rows, rank=rank, world=world)
    if args.shard:
        k, n = parse_shard(args.shard)
        plan.first, plan.stop = shard_chunks(sum(1 for _ in stream), args.chunk_rows, k, n)
    writer = getattr(sink, "writer", None)
    plan.first += from_first(writer.chunks if writer else 0, rank, world)
    return plan


def open_sink(args, job, stream, rank, world):
    """Rank 0's sink (the others write nothing); a refused resume or a failed write on rank 0 stops every rank."""
    sink, problem = None, None
    if rank == 0:
        try:
            if args.label_column:
                sink = MetricsSink(job.predictor)
            elif args.output or args.embeddings:
                sink = FileSink(args, job, fingerprint(args, stream))
            else:
                sink = StdoutSink()
        except (ResumeRefused, files.WriteFailed) as e:
            problem = e
    problem = from_first(problem, rank, world)
    if problem:
        raise problem
    return sink


@signals.stopping()  # SIGINT and SIGTERM raise KeyboardInterrupt (once); a closed stdout ends quietly
def main(argv=None):
    args = parse_arguments(argv)
    check_arguments(args)
    finished, lock = False, None
    try:
        stream = RowStream(args.input, args.text_column, args.text_pair_column) if args.input else TextRows(args.text)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.int8 else "cpu"))
        rank, world, device = join_ranks(device)
        lock = hold_output(args) if rank == 0 else None
        predictor = load_predictor(args, device)
        job = Job(args, predictor, stream)
        if job.labels:  # every label is checked before the first is scored
            for _, rows in chunks_of(stream, Plan(args.chunk_rows)):
                job.targets([r for r in rows if not r.problem])
        sink = open_sink(args, job, stream, rank, world)
        plan = plan_chunks(args, stream, sink, rank, world)
        result = run(job, stream, plan, sink, args.progress_every)
        finished = True
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM
        raise signals.stopped(e, stop_advice(args), quiet=os.environ.get("RANK", "0") != "0") from None
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    except ResumeRefused as e:
        raise SystemExit(str(e)) from None
    except files.WriteFailed as e:
        raise SystemExit(f"{e}; an existing output file is untouched and the complete chunks are kept: make room "
                         "(or fix the permission) and run again with --resume") from None
    finally:
        leave_ranks(wait=finished)  # after a failure the other ranks may wait for this one: torchrun stops them
        files.release(lock)
    if result is None:  # a rank of torchrun other than 0
        return None
    rejected, where = result
    if rejected:
        print(f"{rejected} row(s) set aside (no text, or a line that does not parse): see {where}", file=sys.stderr)
        raise SystemExit(REJECTED_EXIT)
    return getattr(sink, "metrics", None)


def stop_advice(args):
    """What to run after Ctrl-C or SIGTERM: a file output's complete chunks are kept, and --resume goes on after them."""
    if (args.output or args.embeddings) and not args.label_column:
        return "The complete chunks are kept: run the same command with --resume to go on after them"
    return "Run the same command again"


def hold_output(args):
    """The lock on --output (--embeddings) while this run writes it: a second run on it is refused (side/files.py),
    it would mix its chunks with ours."""
    path = args.output or args.embeddings
    try:
        return files.hold(path + ".lock", f"{'--output' if args.output else '--embeddings'} {path}") if path else None
    except files.Busy as e:
        raise SystemExit(str(e)) from None
    except OSError as e:
        raise SystemExit(f"cannot write {path}.lock: {files.os_reason(e)}; make room (or fix the permission) and run "
                         "the same command again") from None


def load_predictor(args, device):
    """The Predictor, or a one-line reason why the checkpoint cannot serve (no weights, another model's tokenizer,
    no classifier for labels)."""
    try:
        predictor = Predictor(args.model, device, args.max_length, args.batch_size, args.amp, args.long_docs,
                              args.window_stride, args.int8, args.batch_tokens)
    except OptionError as e:  # --max-length or --window-stride: the checkpoint is fine
        raise SystemExit(str(e)) from None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"cannot use the checkpoint {args.model}: {e}") from None
    problem = args.explain and args.explain_method and method_problem(predictor.model, args.explain_method)
    if problem:
        raise SystemExit(f"--explain-method: {problem}")
    if predictor.names is None and not args.embeddings:
        raise SystemExit(f"cannot use the checkpoint {args.model} to label texts: it has no classifier (config.json "
                         "has no id2label; a masked-LM or bare encoder); fine-tune it with train.py, or use "
                         "--embeddings")
    return predictor


def parse_arguments(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out", help="checkpoint folder written by train.py")
    p.add_argument("--text", action="append", help="a text to label (repeatable)")
    p.add_argument("--input", help="CSV, TSV or JSONL file with a text column, or TXT (one text per line); any of "
                   "them gzip-compressed (.csv.gz, ...)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column", help="the --input file's column of each row's second text, for a model "
                   "trained on sentence pairs (train.py --text-pair-column)")
    p.add_argument("--keep-text", action="store_true", help="also write each row's text (and pair) beside its "
                   "prediction; by default only the other columns are (an id column joins the labels back)")
    p.add_argument("--embeddings", help="write one vector per row (.npy, float32, in input order; a row set aside "
                   "is NaNs) instead of predictions: what the classifier pools, or the mean of the token vectors for "
                   "a checkpoint without one")
    p.add_argument("--output", help="where to write predictions (.csv, .tsv or .jsonl, by the name); default (or -): "
                   "stdout as JSONL")
    p.add_argument("--resume", action="store_true", help="go on with an interrupted run of the same input, model "
                   "and options after its last complete chunk (the output is the one an uninterrupted run writes)")
    p.add_argument("--shard", help="K/N: label shard K (from 0) of N into --output, for processes that do not talk "
                   "(SLURM arrays); `cat` the N outputs in order (and their rejects files) for the whole file")
    p.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="rows read, scored and written at a time")
    p.add_argument("--progress-every", type=float, help="seconds between progress lines; default 0.5 on a "
                   "terminal (one line, in place), 30 into a log file")
    p.add_argument("--batch-size", type=int, default=64, help="texts per batch at most (halved if a GPU runs out "
                   "of memory)")
    p.add_argument("--batch-tokens", type=int, help="padded tokens per batch at most; default: "
                   f"{CPU_BATCH_TOKENS} on a CPU (long texts go in smaller batches), no cap on a GPU; 0 = no cap")
    p.add_argument("--max-length", type=int, help="default: the max_length the model was trained with")
    p.add_argument("--device", help="cpu, cuda or cuda:N; default: cuda when available")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--long-docs", choices=LONG_DOCS, help="default: the strategy the model was trained with")
    p.add_argument("--window-stride", type=int, help="windows_*: default: as trained")
    p.add_argument("--label-column", help="score the --input file against this label column: print its "
                   "metrics as JSON instead of predictions (labels the checkpoint does not know are an error)")
    p.add_argument("--int8", action="store_true", help="CPU: the encoder's linear layers in int8 (dynamic "
                   "quantization). It pays on long runs of 3 or more layers: 1.6x as fast for MiniLM and its "
                   "3-layer student on abstracts and on captions (docs/benchmarks.md); a model of 1-2 layers or a "
                   "few texts may gain nothing. Prints how closely fp32 agrees on the first 100 texts, and the "
                   "speed of both on them")
    p.add_argument("--explain", action="store_true", help="give each predicted label its evidence: its best spans "
                   "of the text (start and end character offsets, text, score); docs/explain.md")
    p.add_argument("--explain-top", type=int, help="--explain: spans per label (default 3)")
    p.add_argument("--explain-method", choices=METHODS, help="--explain: how words are scored; default: attention "
                   "for a label_attention head, else gradient (input x gradient)")
    p.add_argument("--explain-html", help="also write a page of the first 5000 texts with their evidence marked "
                   "(HTML; implies --explain); with --label-column, their true labels beside the predicted ones")
    p.add_argument("--label-names", help="a CSV of code,name rows: each label's name beside its code in the output "
                   "and on the --explain-html page")
    args = p.parse_args(argv)
    args.output = None if args.output == "-" else args.output  # `-`: stdout, as without --output
    args.explain = args.explain or bool(args.explain_html)
    if not args.explain and (args.explain_top is not None or args.explain_method):
        p.error("--explain-top and --explain-method go with --explain")
    args.explain_top = 3 if args.explain_top is None else args.explain_top
    if bool(args.text) == bool(args.input):
        p.error("give texts with --text or a file with --input (one of them)")
    if args.label_column and not args.input:
        p.error("--label-column scores a labelled --input file")
    if args.label_column and args.output:
        p.error("--label-column prints the metrics as JSON instead of writing predictions: leave out --output "
                "(or label the file in a run without --label-column)")
    if args.text_pair_column and not args.input:
        p.error("--text-pair-column reads the pairs from an --input file")
    if args.embeddings and (args.output or args.label_column):
        p.error("--embeddings writes vectors instead of predictions: not with --output or --label-column")
    return args


if __name__ == "__main__":
    main()
