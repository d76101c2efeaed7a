"""A data file as a stream of rows, for predict.py: plain or gzip-compressed, read a line at a time, so memory does
not grow with the file. The rows are data.py's (csv_rows, jsonl_rows), or a .txt file's lines, a blank one too (set
aside, so that row i stays line i); each is checked for its text (and pair) and for bytes that are not UTF-8, and
a bad row is handed on with its reason instead of ending the run. A bad file (missing, empty, not UTF-8 at the
start, no text column) is a DataError at once, before any model loads. bytes_read (of the file as stored: compressed bytes for .gz) gives the progress line its ETA.

    stream = RowStream("notes.csv.gz", "text")
    stream.columns          -> the header (CSV/TSV), the first record's fields (JSONL), [text] (TXT)
    for row in stream: ...  -> Row(number, line, record, problem); iterating again reads the file again
"""
import codecs
import gzip
import itertools
import os
import zlib
from dataclasses import dataclass

from data import DataError, csv_rows, file_format, file_not_found, jsonl_rows, require_columns, text_problem

UTF8_CHECK_BYTES = 1 << 16  # a file whose first 64 KiB are not UTF-8 is refused whole; later bad bytes, a bad row


@dataclass
class Row:
    number: int  # data row, from 1; bad rows count too, so numbers match the file
    line: int  # the file line the row starts on
    record: dict | None  # column -> value; None when the line could not be parsed
    problem: str | None = None  # why the row cannot be labelled, or None


class RowStream:
    """The rows of a CSV, TSV, JSONL or TXT file (each may be .gz) with their text in text_column (and a second
    text in pair_column)."""

    def __init__(self, path, text_column="text", pair_column=None):
        self.path, self.text_column, self.pair_column = str(path), text_column, pair_column
        self.delimiter, self.compressed = file_format(path)
        if not os.path.isfile(self.path):
            raise file_not_found(path)
        self.size, self._raw, self.header = os.path.getsize(self.path), None, None
        check_start(self.path, self.compressed)
        self.columns = self._columns()

    def __iter__(self):
        with open(self.path, "rb") as raw:
            self._raw = raw
            lines = self._lines(gzip.GzipFile(fileobj=raw) if self.compressed else raw)
            text_lines = (line.removesuffix("\n").removesuffix("\r") for line in lines)
            if self.delimiter == "lines":  # every line a row, a blank one set aside: row i stays line i
                parsed = ((n, n, {self.text_column: line}, None) for n, line in enumerate(text_lines, 1))
            elif self.delimiter is None:
                parsed = jsonl_rows(text_lines)
            else:
                self.header, parsed = csv_rows(self.path, lines, self.delimiter)
            for number, line, record, problem in parsed:
                yield Row(number, line, record, problem or self._problem(line, record))

    def bytes_read(self):
        """How far into the file (as stored) the rows read so far reach; 0 before reading."""
        return self._raw.tell() if self._raw is not None and not self._raw.closed else 0

    def _lines(self, binary):
        """The file's lines as text, line endings kept (CSV fields may span lines). A line that is not UTF-8 is
        decoded with replacement characters and remembered in _bad_lines: its row is set aside, not labelled."""
        self._bad_lines, self._lines_read = {}, 0
        try:
            for number, raw in enumerate(binary, 1):
                self._lines_read = number
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad_lines[number] = f"line {number}: byte 0x{raw[e.start]:02x} is not valid UTF-8"
                    line = raw.decode("utf-8", "replace")
                yield line.removeprefix("\ufeff") if number == 1 else line
        except (OSError, EOFError, zlib.error) as e:  # a truncated or damaged .gz
            raise DataError(f"{self.path}: cannot read on after line {self._lines_read}: {e}") from None

    def _problem(self, line, record):
        """Why a parsed row cannot be labelled: bytes that are not UTF-8 on its lines, no text, no pair."""
        bad = [reason for number, reason in self._bad_lines.items() if line <= number <= self._lines_read]
        self._bad_lines = {n: r for n, r in self._bad_lines.items() if n > self._lines_read}
        if bad:
            return bad[0]
        for column in (self.text_column, self.pair_column):
            problem = column and text_problem(record, column)
            if problem:
                return problem
        return None

    def _columns(self):
        """The columns, checked for the text (and pair) column; a file without data rows is refused."""
        wanted = [self.text_column, *([self.pair_column] if self.pair_column else [])]
        rows = iter(self)
        first = next(rows, None)
        if self.delimiter == "lines":
            columns = [self.text_column]
        elif self.delimiter is None:  # JSONL has no header: the first record that parses stands for one
            record = next((row.record for row in itertools.chain([first], rows) if row and row.record), None)
            columns = list(record or {})
            missing = [c for c in wanted if c not in columns]
            if missing:
                raise DataError(f"{self.path}: the first record has no field {missing}; its fields are {columns}")
        else:
            columns = self.header  # read by iter(self)'s first step
            require_columns(self.path, columns, wanted, self.delimiter)
        rows.close()
        if first is None:
            raise DataError(f"{self.path}: no data rows{' after the header' * bool(self.delimiter)}")
        return columns


def check_start(path, compressed):
    """The file is refused whole when its beginning is not UTF-8 text (another encoding, a binary file)."""
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            head = f.read(UTF8_CHECK_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read it as {'gzip' if compressed else 'a file'} ({e})") from None
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < UTF8_CHECK_BYTES)
    except UnicodeDecodeError as e:
        line = head.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line} (byte offset {e.start}): byte 0x{head[e.start]:02x} is not "
                        "valid UTF-8; re-save the file as UTF-8") from None
    if not text.removeprefix("\ufeff").strip():
        raise DataError(f"{path}: file is empty")


class TextRows:
    """Texts given on the command line (predict.py --text) as a stream of rows."""

    def __init__(self, texts, text_column="text"):
        self.texts, self.text_column, self.columns, self.size = texts, text_column, [text_column], 0

    def __iter__(self):
        for number, text in enumerate(self.texts, 1):
            yield Row(number, number, {self.text_column: text}, text_problem({self.text_column: text},
                                                                              self.text_column))

    def bytes_read(self):
        return 0
