"""Everything between a user's file and a batch of tensors.

read_table -> Table(texts, labels, multi_label, path, label_columns, pairs); file_format (.gz too); Split: a job's
    encoded split
csv_rows / jsonl_rows / txt_rows   a file's rows one at a time, bad ones marked (predict.py streams them)
LabelEncoder   names <-> ids; saved as config.json's id2label, reloaded with from_id2label
train_val_split   seeded (stratified) validation split, returns index arrays
TextEncoder / load_tokenizer   checkpoint tokenizer -> token ids (truncated, windows of long documents, text pairs,
    or every token in consecutive pieces for pretraining)
batch_indices -> make_batch: pad_batch (B x T) or pack_batch (varlen layout), + doc_index for windows

Any problem with the user's data raises DataError naming the file, the row and the problem.
Rows are 1-based data rows (the header is not counted); CSV/TSV messages also give the line.
"""
import contextlib
import csv
import gzip
import io
import itertools
import json
import os
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

LONGEST_CSV_FIELD = 2**31 - 1  # clinical notes easily pass csv's 128 KiB default (see long_csv_fields)
DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": None, ".ndjson": None, ".txt": "lines"}
IGNORE_INDEX = -100  # torch CrossEntropyLoss's default ignore_index: rows with an ignored label
BUCKET_CHUNK_BATCHES = 64  # length bucketing sorts within chunks of this many batches
# make_batch(packed=None), off the flash kernel (CPU): packing saves the layers' matmuls on padding and adds
# copies around attention, so it pays only above this share of padding (measured: docs/benchmarks.md).
# Length-bucketed batches (train.py, predict.py) seldom have that much and stay padded.
PACK_ABOVE_PADDING = 0.2
LONG_DOCS = ("head", "tail", "head_tail", "native", "windows_max", "windows_mean", "windows_attention")
# label cells that spell a missing value (pandas' str(NaN), JSON's null, Python's None): an error like a blank cell,
# never a class of their own; compared case-insensitively
MISSING_LABELS = ("nan", "null", "none", "n/a", "<na>")


class DataError(ValueError):
    """The user's data (not our code) is wrong; the message says where and how."""


class OptionError(ValueError):
    """An option (max_length, the window stride) does not fit the checkpoint's tokenizer; the message says why."""


def is_blank_text(text):
    """A text with nothing to read: empty, or only whitespace (no-break spaces too: Unicode Z*) and invisible
    characters (controls and format characters: zero-width space U+200B, joiners, the BOM, soft hyphens). One rule
    for training files, predict.py's --text and files, and the Predictor API. Stops at the first visible character."""
    return not any(unicodedata.category(c)[0] != "Z" and unicodedata.category(c) not in ("Cc", "Cf") for c in text)


@dataclass
class Split:
    """One split of a training job, encoded. seqs: token ids per text (with windows_*, a list of windows per text);
    targets: int64 [N] or float32 multi-hot [N, L] (masked-LM: labels per token, or None for training data, whose
    masking draws anew each epoch)."""
    seqs: list
    targets: np.ndarray | list | None
    masking: object = None  # side/mlm.py's Masking


# ----------------------------------------------------------------------------- reading files

@dataclass
class Table:
    """texts; labels = a str per row (single-label), a list[str] per row (multi-label), or None
    when the file has no label column. label_columns: the 0/1 columns when labels came from several.
    pairs: each row's second text (read_table's pair_column), or None."""
    texts: list
    labels: list | None
    multi_label: bool
    path: str
    label_columns: list | None = None
    pairs: list | None = None

    def __iter__(self):  # allows `texts, labels = read_table(...)`
        return iter((self.texts, self.labels))


def file_format(path) -> tuple:
    """(delimiter, compressed) of a data file by its name: DELIMITERS' value for its suffix, and whether it ends
    in .gz (read through gzip: notes are usually stored compressed)."""
    path = Path(path)
    compressed = path.suffix.lower() == ".gz"
    suffix = Path(path.stem).suffix.lower() if compressed else path.suffix.lower()
    if suffix not in DELIMITERS:
        kinds = sorted(DELIMITERS)
        raise DataError(f"{path}: unsupported file type {suffix + '.gz' * compressed!r}; use one of {kinds}, "
                        "or any of them with .gz")
    return DELIMITERS[suffix], compressed


def file_not_found(path) -> DataError:
    """A relative path is read from the current folder, which may not be the one the user has in mind: name it."""
    where = "" if os.path.isabs(path) else f" (looked in {os.getcwd()})"
    return DataError(f"{path}: file not found{where}")


def _read_utf8(path: Path, compressed=False) -> str:
    if not path.is_file():
        raise file_not_found(path)
    raw = path.read_bytes()
    if compressed:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a complete gzip file ({e})") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # tolerate a BOM (Excel writes one)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line} (byte offset {e.start}): byte 0x{raw[e.start]:02x} is not "
                        "valid UTF-8; re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


# Rows one at a time: (row, line, record, problem). row counts data rows from 1 (bad ones too), line is the file
# line the row starts on, problem is None or what is wrong with the row ("row 3 (line 4): ...", record None).
# read_table stops at the first problem; predict.py's stream (side/stream.py) sets the row aside and goes on.

@contextlib.contextmanager
def long_csv_fields():
    """csv's field size limit raised to LONGEST_CSV_FIELD while the block runs, then put back. The limit is one
    setting of the whole process: reading a row with it raised leaves every other csv user as it was."""
    old = csv.field_size_limit(LONGEST_CSV_FIELD)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def csv_rows(path, lines, delimiter):
    """(header, rows) of CSV/TSV lines (each with its line ending, as a file gives them)."""
    # strict: a stray quote raises instead of silently swallowing the rest of the file into one field
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    try:
        with long_csv_fields():
            header = next((fields for fields in reader if fields), None)
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: malformed header ({e}); check its quotes") from None
    header = [f.strip() for f in header or []]
    if len(set(header)) != len(header):
        raise DataError(f"{path}: line {reader.line_num}: duplicate column names in header {header}")
    return header, _csv_data(reader, header, delimiter)


def _csv_data(reader, header, delimiter):
    row, last_line = 0, reader.line_num
    while True:
        start = last_line + 1
        try:
            with long_csv_fields():  # per row: a paused reader leaves the limit as it found it
                fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            row, last_line = row + 1, reader.line_num
            yield row, start, None, f"line {start}: malformed record starting here ({e}); check its quotes"
            continue
        last_line = reader.line_num
        if not fields:  # blank line
            continue
        row += 1
        if len(fields) != len(header):
            yield row, start, None, (f"row {row} (line {start}): has {len(fields)} fields but the header has "
                                     f"{len(header)}; quote fields that contain {delimiter!r}, quotes or newlines")
        else:
            yield row, start, dict(zip(header, fields)), None


def jsonl_rows(lines):
    """Rows of JSONL lines: one JSON object per non-blank line."""
    row = 0
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row += 1
        try:
            record = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            problem = None if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}"
        except json.JSONDecodeError as e:
            problem = f"invalid JSON ({e.msg}, column {e.colno})"
        except KeyError as e:
            problem = f"key {e.args[0]!r} appears twice in one record; keep one"
        yield row, line_no, None if problem else record, problem and f"row {row} (line {line_no}): {problem}"


def txt_rows(lines, text_column):
    """Rows of a .txt file: one text per line (blank lines skipped), no labels."""
    numbered = ((n, line) for n, line in enumerate(lines, 1) if line.strip())
    return ((row, n, {text_column: line}, None) for row, (n, line) in enumerate(numbered, 1))


def text_problem(record, column):
    """None, or why the record has no text to label in column: missing, not a string (JSONL), or blank
    (is_blank_text)."""
    value = record.get(column)
    if value is None:
        return f"no text in column {column!r} (missing, or JSON null)"
    if not isinstance(value, str):  # JSONL: a number, true/false, a list or an object
        kind = JSON_TYPES.get(type(value), type(value).__name__)
        return f"the text in column {column!r} is {kind} ({json.dumps(value)[:40]}), not a string: write it in quotes"
    if is_blank_text(value):
        return f"empty text in column {column!r} (nothing, or only spaces and invisible characters)"
    return None


def _records(path, rows):
    """[(where, record)] of rows and the keys of all records (JSONL: no header); the first bad row is a DataError."""
    records, keys = [], {}
    for row, line, record, problem in rows:
        if problem:
            raise DataError(f"{path}: {problem}")
        records.append((f"row {row} (line {line})", record))
        keys.update(dict.fromkeys(record))
    return records, list(keys)


def _no_duplicate_keys(pairs):
    """json.loads keeps the last of two equal keys without a word: which label was meant is unknowable."""
    record = {}
    for key, value in pairs:
        if key in record:
            raise KeyError(key)
        record[key] = value
    return record


def require_columns(path, columns, wanted, delimiter):
    missing = [c for c in wanted if c not in columns]
    if not missing:
        return
    where = "header" if delimiter else "all rows"  # JSONL has no header: no row has the field
    message = f"{path}: {where}: column(s) {missing} not found; the columns are {columns}"
    names = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
    other = [d for d in names if d != delimiter and len(columns) == 1 and d in columns[0]]
    if other:  # e.g. a TSV saved as .csv parses into one big column
        message += (f". The header is one column containing {other[0]!r}: the file looks {names[other[0]]}-"
                    "separated; save it as .csv (comma) or .tsv (tab) to match")
    raise DataError(message)


def _looks_multi(value, sep):
    return isinstance(value, list) or (isinstance(value, str) and (sep in value or _json_list(value) is not None))


def _json_list(value):
    """The list if value is a JSON list written as a string (CSV cells), else None."""
    s = value.strip()
    if not (s.startswith("[") and s.endswith("]")):
        return None
    try:
        parsed = json.loads(s)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) else None


def _is_blank(value):
    return value is None or (isinstance(value, str) and not value.strip())


def _parse_label(path, where, column, value, multi_label, sep):
    if _is_blank(value):
        raise DataError(f"{path}: {where}: no label in column {column!r}")
    if not multi_label:
        if isinstance(value, (list, dict)):
            raise DataError(f"{path}: {where}: label {value!r} is a {type(value).__name__} but multi_label=False")
        return _check_present(path, where, column, str(value).strip())
    items = value if isinstance(value, list) else _json_list(value) if isinstance(value, str) else [value]
    if items is None:
        items = value.split(sep)
        if not any(s.strip() for s in items):
            raise DataError(f"{path}: {where}: no label in column {column!r}")
    names = [_check_present(path, where, column, str(x).strip()) for x in items if str(x).strip()]
    return list(dict.fromkeys(names))  # dedupe, keep order


def _check_present(path, where, column, name):
    if name.lower() in MISSING_LABELS:
        raise DataError(f"{path}: {where}: label {name!r} in column {column!r} is how a missing value is written "
                        "(pandas, JSON); missing labels are an error: fill it in or remove the row")
    return name


def _flag(path, where, column, value):
    """A 0/1 label column cell -> bool."""
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true"):
        return True
    if text in ("0", "0.0", "false"):
        return False
    problem = "no label" if _is_blank(value) else f"must be 0 or 1, got {value!r}"
    raise DataError(f"{path}: {where}: label column {column!r} {problem}")


def read_table(path, text_column="text", label_column=None, multi_label=None, label_sep=";",
               pair_column=None) -> Table:
    """Read a UTF-8 .csv, .tsv or .jsonl file, or a .txt file of one text per line (no labels); each may be
    gzip-compressed (.csv.gz, ...).
    label_column: a name, a list of 0/1 column names (multi-label), or None for `label` if present else `labels`
    else no labels (prediction input); [] ignores any label column.
    multi_label=None auto-detects: several label columns, or any value that is a (JSON) list or
    contains label_sep, means multi-label. Explicit JSON `[]` = no positive label; blank = error.
    pair_column: the column of each row's second text (sentence pairs), or None."""
    path = Path(path)
    delimiter, compressed = file_format(path)
    text = _read_utf8(path, compressed)
    if delimiter == "lines":
        records, columns = _records(path, txt_rows(text.splitlines(), text_column))
    elif delimiter is None:
        records, columns = _records(path, jsonl_rows(text.splitlines()))
    else:
        header, rows = csv_rows(path, io.StringIO(text, newline=""), delimiter)
        records, columns = _records(path, rows)[0], header
    if label_column is None:
        label_column = next((c for c in ("label", "labels") if c in columns), None)
    several = isinstance(label_column, (list, tuple))
    label_columns = list(label_column) if several else [label_column] if label_column else []
    require_columns(path, columns, [text_column, *([pair_column] if pair_column else []), *label_columns], delimiter)
    if not records:
        raise DataError(f"{path}: no data rows after the header")
    texts = _texts(path, records, text_column)
    pairs = _texts(path, records, pair_column) if pair_column else None

    if not label_columns:
        return Table(texts, None, bool(multi_label), str(path), pairs=pairs)
    if several:
        if multi_label is False:
            raise DataError(f"{path}: several label columns {label_columns} need multi_label=True")
        labels = [row_labels(path, where, record, label_columns, True) for where, record in records]
        return Table(texts, labels, True, str(path), label_columns, pairs)
    values = [record.get(label_column) for _, record in records]
    if multi_label is None:
        multi_label = any(_looks_multi(v, label_sep) for v in values)
    labels = [row_labels(path, where, record, label_column, multi_label, label_sep) for where, record in records]
    return Table(texts, labels, multi_label, str(path), pairs=pairs)


def row_labels(path, where, record, columns, multi_label, sep=";"):
    """One row's labels as read_table gives them: a list of 0/1 columns gives the names of those set; one column
    its name (single-label) or names (multi-label). A blank or missing label is a DataError."""
    if isinstance(columns, (list, tuple)):
        return [c for c in columns if _flag(path, where, c, record.get(c))]
    return _parse_label(path, where, columns, record.get(columns), multi_label, sep)


def _texts(path, records, column):
    """The column's text of every record; a missing, blank (is_blank_text) or non-string one is an error naming its
    row."""
    texts = []
    for where, record in records:
        problem = text_problem(record, column)
        if problem:
            raise DataError(f"{path}: {where}: {problem}")
        texts.append(record[column])
    return texts


JSON_TYPES = {int: "a number", float: "a number", bool: "true or false", list: "a list", dict: "an object"}


# ----------------------------------------------------------------------------- labels

def _first(items, limit, noun=None):
    """'row 3' / 'rows 3, 7, ...': short lists for error messages."""
    text = ", ".join(map(str, items[:limit])) + (", ..." if len(items) > limit else "")
    return text if noun is None else f"{noun}{'s' * (len(items) > 1)} {text}"


class LabelEncoder:
    """Label names <-> ids. Single-label targets: int64 class ids [N]; multi-label: float32 multi-hot [N, C]."""

    def __init__(self, names, multi_label: bool):
        names = [str(n) for n in names]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"label names must be non-empty and unique, got {names}")
        self._names, self._multi_label = names, bool(multi_label)
        self._label2id = {n: i for i, n in enumerate(names)}

    @classmethod
    def fit(cls, raw_labels, multi_label: bool, names=()):
        """Names sorted for determinism (numerically when all are integers, so "2" < "10").
        names: extra names to include even if unseen (e.g. Table.label_columns)."""
        if raw_labels is None:
            raise ValueError("cannot fit a label encoder: the training data has no label column")
        seen = set(map(str, names))
        for row in raw_labels:
            seen.update(map(str, row if multi_label else [row]))
        numeric = all(n.lstrip("-").isdecimal() for n in seen)
        return cls(sorted(seen, key=int if numeric else None), multi_label)

    @classmethod
    def from_id2label(cls, id2label: dict, multi_label: bool):
        by_id = {int(i): name for i, name in id2label.items()}  # JSON turns int keys into strings
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"id2label ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
        return cls([by_id[i] for i in range(len(by_id))], multi_label)

    names = property(lambda self: list(self._names))
    id2label = property(lambda self: dict(enumerate(self._names)))
    label2id = property(lambda self: dict(self._label2id))
    num_labels = property(lambda self: len(self._names))
    multi_label = property(lambda self: self._multi_label)

    def encode(self, raw_labels, path=None, unknown="error", hint='or pass unknown="ignore"', rows=None) -> np.ndarray:
        """unknown="error" raises DataError on labels not seen in training, ending with hint (what the caller's
        user can do: train.py names its flag); "ignore" drops them (single-label rows get IGNORE_INDEX) and
        warns with the count. rows: the file's row number of each label, for the message (default 1, 2, ...)."""
        if unknown not in ("error", "ignore"):
            raise ValueError(f'unknown must be "error" or "ignore", got {unknown!r}')
        n, unknown_rows = len(raw_labels), {}
        if self._multi_label:
            targets = np.zeros((n, self.num_labels), np.float32)
        else:
            targets = np.full(n, IGNORE_INDEX, np.int64)
        for row, value in enumerate(raw_labels):
            for name in value if self._multi_label else [value]:
                idx = self._label2id.get(str(name))
                if idx is None:
                    unknown_rows.setdefault(name, []).append(row + 1 if rows is None else rows[row])
                elif self._multi_label:
                    targets[row, idx] = 1.0
                else:
                    targets[row] = idx
        if unknown_rows:
            message = self._unknown_message(unknown_rows, path)
            if unknown == "error":
                raise DataError(f"{message}; fix the data {hint}")
            warnings.warn(message + "; ignored them", stacklevel=2)
        return targets

    def _unknown_message(self, unknown_rows, path):
        count = sum(map(len, unknown_rows.values()))
        shown = ", ".join(f"{name!r} ({_first(rows, 5, 'row')})" for name, rows in unknown_rows.items())
        return (f"{path or 'labels'}: {count} occurrence(s) of {len(unknown_rows)} label(s) not seen in "
                f"training: {shown}; training labels: {_first(self._names, 20)}")

    def decode(self, targets, threshold=0.5) -> list:
        """Class ids -> names; multi-hot rows (or probabilities, cut at threshold) -> lists of names."""
        targets = np.asarray(targets)
        if self._multi_label:
            return [[self._names[j] for j in np.flatnonzero(row >= threshold)] for row in targets]
        return [self._names[int(i)] for i in targets]


def train_val_split(n_or_labels, val_fraction=0.1, seed=0, stratify=True):
    """-> (train_idx, val_idx), sorted int64 arrays. Stratified for single labels (every class keeps
    >= 1 training example; classes with one example stay in train); plain random for an int, for
    multi-label rows (lists, or a 2-D multi-hot array) or stratify=False."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = None if isinstance(n_or_labels, (int, np.integer)) else n_or_labels
    n = len(labels) if labels is not None else int(n_or_labels)
    if n < 2:
        raise DataError(f"need at least 2 rows to split off a validation set, got {n}")
    rng = np.random.default_rng(seed)
    multi = labels is not None and any(isinstance(x, (list, tuple, np.ndarray)) for x in labels)  # rows of names
    if labels is None or multi or not stratify:
        val = rng.permutation(n)[:min(max(int(n * val_fraction + 0.5), 1), n - 1)]
    else:
        _, class_of = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
        val = []
        for c in range(class_of.max() + 1):
            members = rng.permutation(np.flatnonzero(class_of == c))
            val.extend(members[:min(int(len(members) * val_fraction + 0.5), len(members) - 1)])
    is_val = np.zeros(n, bool)
    is_val[np.asarray(val, np.int64)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ----------------------------------------------------------------------------- tokenizer

def _token_content(token):
    return token["content"] if isinstance(token, dict) else token  # old configs store AddedToken dicts


def _special_tokens(model_dir: Path) -> dict:
    """tokenizer_config.json overlaid with special_tokens_map.json (both optional)."""
    config = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).is_file():
            config.update(json.loads((model_dir / name).read_text(encoding="utf-8")))
    return config


def _bert_wordpiece(model_dir: Path, config: dict) -> Tokenizer:
    """The BERT tokenizer as transformers builds it from vocab.txt (BertTokenizer/BertTokenizerFast)."""
    special = {role: str(_token_content(config.get(f"{role}_token") or f"[{role.upper()}]"))
               for role in ("pad", "unk", "cls", "sep", "mask")}
    vocab = WordPiece.read_file(str(model_dir / "vocab.txt"))
    tokenizer = Tokenizer(WordPiece(vocab, unk_token=special["unk"]))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),  # None = strip when lowercasing, as in BERT
        lowercase=config.get("do_lower_case", True))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    extra = [_token_content(t) for t in config.get("additional_special_tokens") or []]
    # Special tokens written in the text ("[SEP]") match as themselves, before lowercasing.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*special.values(), *extra]])
    cls, sep = special["cls"], special["sep"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))])
    return tokenizer


def load_tokenizer(model_dir) -> Tokenizer:
    """tokenizer.json if present, else BERT WordPiece from vocab.txt + tokenizer_config.json.
    Padding/truncation saved in tokenizer.json are switched off: we pad per batch ourselves."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    elif (model_dir / "vocab.txt").is_file():
        tokenizer = _bert_wordpiece(model_dir, _special_tokens(model_dir))
    else:
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json or vocab.txt")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def special_ids(tokenizer: Tokenizer):
    """(prefix, suffix): the ids the post-processor puts around one text, e.g. ([CLS], [SEP]) for BERT."""
    content = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a").ids
    start = full.index(content[0]) if content and content[0] in full else -1
    if start < 0 or full[start:start + len(content)] != content:
        raise ValueError(f"cannot find the text between the special tokens of {full}: unsupported post-processor")
    return full[:start], full[start + len(content):]


def truncate(ids, budget, strategy):
    """At most budget ids: the first (head, native), the last (tail), or the first quarter of the budget and
    the last three quarters (head_tail: a note's opening and its conclusion both survive)."""
    if len(ids) <= budget:
        return ids
    if strategy in ("head", "native"):
        return ids[:budget]
    head = budget // 4 if strategy == "head_tail" else 0
    return ids[:head] + ids[len(ids) - (budget - head):]


def split_windows(ids, size, stride):
    """Windows of `size` ids starting every `stride` ids, the last reaching the end: every id is in a window
    and neighbours share size - stride ids. A text of up to `size` ids (even none) is one window."""
    count = 1 + max(0, -(-(len(ids) - size) // stride))  # ceil division
    return [ids[i * stride:i * stride + size] for i in range(count)]


class PairIds(list):
    """The token ids of a text pair ([CLS] A [SEP] B [SEP] for BERT), a list like any sequence's, with the token type
    of each (type_ids: 0 in the first segment, 1 in the second), which batches give as token_type_ids."""

    def __init__(self, ids, type_ids):
        super().__init__(ids)
        self.type_ids = list(type_ids)


class TextEncoder:
    """A checkpoint's tokenizer with its max_length, pad id and long-document strategy (long_docs):
    TextEncoder(dir, 512).encode(texts). No sequence passes max_length, special tokens included.
    - head / tail / head_tail / native (= head; train.py gives it the model's full length) truncate the text;
      encode() gives one list of ids per text.
    - windows_max / windows_mean / windows_attention split it into windows of max_length whose texts start
      `stride` tokens apart (default: half a window's text, i.e. 50% overlap); encode() gives a list of windows
      per text, and the model turns them into one prediction (side/windows.py's per_document).
    Each truncated text or window is wrapped in the checkpoint's special tokens ([CLS] ... [SEP]).
    encode(texts, pairs) encodes text pairs as the reference does (PairIds); pieces(texts) cuts every text into
    consecutive sequences, for pretraining."""

    def __init__(self, model_dir, max_length=512, long_docs="head", stride=0):
        self.tokenizer, self.max_length = load_tokenizer(model_dir), max_length
        specials = _special_tokens(Path(model_dir))
        pad = _token_content(specials.get("pad_token") or "[PAD]")
        self.pad_id = self.tokenizer.token_to_id(pad)
        if self.pad_id is None:
            raise ValueError(f"{model_dir}: pad token {pad!r} is not in the vocabulary")
        self.mask_token = _token_content(specials.get("mask_token") or "[MASK]")  # masked-LM only (Masking)
        if long_docs not in LONG_DOCS:
            raise ValueError(f"long_docs {long_docs!r} is not one of {LONG_DOCS}")
        self.strategy, self.windows = long_docs, long_docs.startswith("windows_")
        self.prefix, self.suffix = special_ids(self.tokenizer)
        self.budget = max_length - len(self.prefix) - len(self.suffix)  # text tokens per sequence
        self.stride = (stride or max(self.budget // 2, 1)) if self.windows else None
        specials = max_length - self.budget
        if self.budget < 1:
            raise OptionError(f"max_length {max_length} leaves no room for text: the special tokens take {specials}; "
                             f"use at least {specials + 1}")
        if self.windows and not 1 <= self.stride <= self.budget:
            raise OptionError(f"window stride {stride} must be between 1 and {self.budget} (the text tokens of a "
                             f"window of max_length {max_length}: a larger stride would skip tokens)")
        # config.json's long_document: predict.py rebuilds this encoder from it
        self.long_document = {"strategy": long_docs, "max_length": max_length}
        if self.windows:
            self.long_document["stride"] = self.stride

    def encode(self, texts, pairs=None) -> list:
        """Per text: its ids, or its list of windows (windows_*). pairs: each text's second text; then per pair
        its PairIds, truncated as the reference's `longest_first` (head and native only). A blank text (is_blank_text)
        is an error: there would be nothing to read but the special tokens."""
        texts = list(texts)
        for name, given in (("text", texts), ("text_pair", pairs or ())):
            blank = [i for i, text in enumerate(given, 1) if is_blank_text(text)]
            if blank:
                raise DataError(f"{_first(blank, 5, name)} (of {len(given)}): empty, or only spaces and invisible "
                                "characters; there is nothing to read")
        if pairs is not None:
            return self.encode_pairs(texts, pairs)
        wrap = lambda ids: self.prefix + ids + self.suffix
        out = []
        for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False):
            if self.windows:
                out.append([wrap(w) for w in split_windows(e.ids, self.budget, self.stride)])
            else:
                out.append(wrap(truncate(e.ids, self.budget, self.strategy)))
        return out

    def encode_pairs(self, texts, pairs):
        """Text pairs as AutoTokenizer(texts, pairs, truncation=True, max_length=...) encodes them: the tokenizer's
        own pair template and truncation (longest_first: the longer text loses tokens first)."""
        if self.strategy not in ("head", "native"):
            raise ValueError(f"text pairs are truncated as the reference's longest_first; long_docs {self.strategy!r} "
                             "does not apply to them (use head)")
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first")
        try:
            encodings = self.tokenizer.encode_batch(list(zip(texts, pairs)))
        finally:  # single texts are cut by encode() itself
            self.tokenizer.no_truncation()
        return [PairIds(e.ids, e.type_ids) for e in encodings]

    def pieces(self, texts) -> list:
        """Every token of every text, in consecutive sequences of at most max_length tokens (a long text gives
        several, none overlapping), each wrapped in the special tokens: pretraining reads all the text."""
        return [self.prefix + ids + self.suffix
                for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
                for ids in split_windows(e.ids, self.budget, self.budget)]


# ----------------------------------------------------------------------------- batching

def batch_indices(lengths, batch_size, shuffle, seed=0, epoch=0, bucket=True, drop_last=False, max_tokens=0) -> list:
    """Row indices per batch. shuffle: a new order per (seed, epoch); with bucket, rows are sorted
    by length within chunks of BUCKET_CHUNK_BATCHES batches (less padding) and the batch order is
    shuffled. shuffle=False with bucket sorts everything longest first: put outputs back by index.
    max_tokens > 0 (inference, shuffle=False): a batch also ends before its rows, padded to its longest, would
    pass max_tokens (a longer row goes alone), so batches of long texts hold fewer of them."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if bucket:
        chunk = batch_size * BUCKET_CHUNK_BATCHES if shuffle else max(len(lengths), 1)
        order = np.concatenate([part[np.argsort(-lengths[part], kind="stable")]
                                for part in np.split(order, range(chunk, len(order), chunk))])
    if max_tokens and shuffle:
        raise ValueError("max_tokens is for inference (shuffle=False): training batches keep batch_size rows")
    batches = (capped_batches(order, lengths, batch_size, max_tokens) if max_tokens else
               [order[i:i + batch_size] for i in range(0, len(order), batch_size)])
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle and bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return [b.tolist() for b in batches]


def capped_batches(order, lengths, batch_size, max_tokens):
    """order cut into consecutive batches of at most batch_size rows and at most max_tokens padded tokens."""
    batches, start, longest = [], 0, 0
    for i, row in enumerate(order):
        longest = max(longest, int(lengths[row]))
        if i > start and (i - start == batch_size or (i - start + 1) * longest > max_tokens):
            batches.append(order[start:i])
            start, longest = i, int(lengths[row])
    if len(order) > start:
        batches.append(order[start:])
    return batches


def _labels_tensor(labels):
    return {} if labels is None else {"labels": torch.as_tensor(np.asarray(labels))}


def pad_batch(seqs, labels, pad_id) -> dict:
    """Right-pad to the longest sequence: input_ids, attention_mask, token_type_ids [B, T] int64 (+ labels).
    token_type_ids are 0 for single texts, a PairIds' type_ids for a pair; models without them (ModernBERT)
    ignore them."""
    lengths = [len(s) for s in seqs]
    input_ids = np.full((len(seqs), max(lengths)), pad_id, np.int64)
    attention_mask = np.zeros_like(input_ids)
    token_type_ids = np.zeros_like(input_ids)
    for row, seq in enumerate(seqs):
        input_ids[row, :len(seq)] = seq
        attention_mask[row, :len(seq)] = 1
        if isinstance(seq, PairIds):
            token_type_ids[row, :len(seq)] = seq.type_ids
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "token_type_ids": torch.from_numpy(token_type_ids), **_labels_tensor(labels)}


def pack_batch(seqs, labels=None) -> dict:
    """Unpadded layout for varlen attention: input_ids, position_ids, token_type_ids [T_total] int64
    (positions restart at 0 per sequence), cu_seqlens int32 [B + 1], max_seqlen int (+ labels)."""
    lengths = np.array([len(s) for s in seqs], np.int64)
    cu_seqlens = np.concatenate([[0], np.cumsum(lengths)])
    input_ids = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, count=int(cu_seqlens[-1]))
    position_ids = np.arange(len(input_ids)) - np.repeat(cu_seqlens[:-1], lengths)
    types = (seq.type_ids if isinstance(seq, PairIds) else itertools.repeat(0, len(seq)) for seq in seqs)
    token_type_ids = np.fromiter(itertools.chain.from_iterable(types), np.int64, count=len(input_ids))
    return {"input_ids": torch.from_numpy(input_ids), "position_ids": torch.from_numpy(position_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens.astype(np.int32)), "max_seqlen": int(lengths.max()),
            **_labels_tensor(labels)}


def make_batch(seqs, labels, pad_id, windows=False, packed=False) -> dict:
    """The model's inputs for one batch: pad_batch, or pack_batch (no padding; what flash attention runs).
    packed None: packed when padding would take more than PACK_ABOVE_PADDING of the padded batch.
    windows: seqs are texts as lists of windows (TextEncoder with windows_*); every window is a row, and
    doc_index [W] int64 gives each window's text and num_docs (an int) their count, while labels stay one
    row per text."""
    if windows:
        counts = torch.tensor([len(doc) for doc in seqs])
        seqs = [window for doc in seqs for window in doc]
    if packed is None:
        lengths = [len(s) for s in seqs]
        packed = sum(lengths) < (1 - PACK_ABOVE_PADDING) * len(lengths) * max(lengths)
    batch = pack_batch(seqs, labels) if packed else pad_batch(seqs, labels, pad_id)
    if windows:
        batch["doc_index"] = torch.repeat_interleave(torch.arange(len(counts)), counts)
        batch["num_docs"] = len(counts)  # known here: the model need not ask the device
    return batch


def to_device(batch, device):
    """A batch's tensors on the device (max_seqlen and num_docs stay Python ints)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
