"""What a caller hands predict.py or its Python API (Predictor), checked by one set of rules, so that the command
line and the API refuse the same things with the same words, and name positions in the whole input.

NUMBERS / number_problems(values, api)   sizes and counts: chunk_rows, batch_size, top (--explain-top), ...
checked_texts(texts, pairs, first)   a list of non-blank strings (not one string, not None), pairs as many
checked_items(items)   an iterable of texts or rows for Predictor.stream (not one string, not one row)
check_arguments(args)   predict.py's options before the model loads: numbers, paths (output_problem, and
    files.collisions over every_output), combinations
"""
import os

from data import DataError, is_blank_text
from side import files
from side.explain import option_problems
from side.infer import device_problem
from side.output import output_format, planned_outputs
from side.shards import parse_shard, torchrun_world

# name: (the least allowed, None allowed (the default), what is allowed). The command line's --explain-top is
# the API's top.
NUMBERS = {"batch_size": (1, False, ">= 1"), "batch_tokens": (0, True, ">= 0 (0 = no cap)"),
           "max_length": (0, True, ">= 0 (0 = as trained)"), "window_stride": (0, True, ">= 0 (0 = as trained)"),
           "chunk_rows": (1, False, ">= 1"), "top": (1, False, ">= 1"), "progress_every": (0, True, ">= 0")}
FLAGS = {"top": "--explain-top"}


def number_problems(values, api=False):
    """One line per value ({name: value}) its rule refuses: `--chunk-rows 0 must be >= 1` on the command line,
    `chunk_rows=0 must be >= 1` from Python (where a float, a bool or None where a number is meant is refused
    too: argparse refuses those on the command line)."""
    bad = []
    for name, value in values.items():
        least, optional, what = NUMBERS[name]
        if value is None and optional:
            continue
        kinds = (int, float) if name == "progress_every" else int
        if not isinstance(value, kinds) or isinstance(value, bool):
            bad.append(f"{name}={value!r} must be {'a number' if kinds != int else 'an integer'} {what}")
        elif value < least:
            bad.append(f"{name}={value!r} must be {what}" if api else
                       f"{FLAGS.get(name, '--' + name.replace('_', '-'))} {value} must be {what}")
    return bad


def check_numbers(**values):
    """The API's check: a ValueError with every problem (a TypeError when one is not a number at all)."""
    bad = number_problems(values, api=True)
    if bad:
        raise (TypeError if "must be a" in bad[0] else ValueError)("; ".join(bad))


def checked_texts(texts, pairs=None, first=1, total=None):
    """(texts, pairs) as lists, or a TypeError / ValueError saying what is wrong: one string instead of a list
    (each character would be a text), None, an item that is not text or is empty, fewer or more pairs than texts.
    first: the position of texts[0] in the whole input (a chunk of a stream); total: the input's length, when
    known."""
    for name, given in (("texts", texts), ("pairs", pairs)):
        if isinstance(given, (str, bytes)):
            raise TypeError(f"give a list of {name}, not one string (each character would be labelled): "
                            f"predict([text])")
        if given is None and name == "texts":
            raise TypeError("give a list of texts, not None")
    texts, pairs = list(texts), None if pairs is None else list(pairs)
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs: give each text its pair")
    total = len(texts) if total is None and first == 1 else total
    of = f" (of {total})" if total is not None else ""
    for name, values in (("text", texts), ("pair", pairs or [])):
        for i, value in enumerate(values, first):
            if not isinstance(value, str):
                raise TypeError(f"{name} {i}{of} is {type(value).__name__}, not a string")
            if is_blank_text(value):  # a DataError (a ValueError), as the same text in a training file
                raise DataError(f"{name} {i}{of}: empty, or only spaces and invisible characters; there is "
                                "nothing to read")
    return texts, pairs


def checked_items(items):
    """An iterator over a stream's items; one string or one row (a dict) instead of an iterable of them is a
    TypeError (each character, or each key, would be labelled)."""
    if isinstance(items, (str, bytes)):
        raise TypeError("give an iterable of texts or rows, not one string (each character would be labelled): "
                        "stream([text])")
    if isinstance(items, dict):
        raise TypeError("give an iterable of rows, not one row (each key would be labelled): stream([row])")
    if items is None:
        raise TypeError("give an iterable of texts or rows, not None")
    return iter(items)


# ----------------------------------------------------------------------------- predict.py's command line

def check_arguments(args):
    """What can be wrong before the model loads: numbers out of range, an empty --text, a --model folder that
    is not there, a --device this torch cannot use, a file the run would write that cannot be written, or that is
    a file it reads or another of its outputs (files.collisions), options that do not go together."""
    bad = number_problems({name: getattr(args, name) for name in ("batch_size", "batch_tokens", "max_length",
                                                                  "window_stride", "chunk_rows", "progress_every")})
    bad += number_problems({"top": args.explain_top})
    bad += [f"--text number {i} is empty (or only spaces and invisible characters): there is nothing to label"
            for i, text in enumerate(args.text or [], 1) if is_blank_text(text)]
    if not os.path.isdir(args.model):
        bad.append(f"--model {args.model}: no such folder (train.py writes one to its --out-dir)")
    bad += [problem for problem in [device_problem(args.device)] if problem]
    if args.int8 and args.device and args.device.split(":")[0] != "cpu":
        bad.append(f"--int8 runs on the CPU only: leave out --device {args.device}, or pass --device cpu")
    for flag, path in (("--output", args.output), ("--embeddings", args.embeddings), ("--explain-html",
                                                                                       args.explain_html)):
        problem = path and output_problem(path, flag)
        bad += [f"{flag} {path}: {problem}"] if problem else []
    if args.label_names and not os.path.isfile(args.label_names):
        bad.append(f"--label-names {args.label_names}: no such file (a CSV of code,name rows)")
    collision = files.collisions(every_output(args), {"--input file": args.input, "--model folder": args.model,
                                                      "--label-names file": args.label_names})
    bad += [collision] if collision else []
    bad += combination_problems(args)
    if bad:
        raise SystemExit("; ".join(bad))


def combination_problems(args):
    """Options that need another, or exclude one."""
    writes = args.output or args.embeddings
    bad = [] if writes or not args.resume else ["--resume continues a file: give --output or --embeddings"]
    if args.shard:
        try:
            parse_shard(args.shard)
        except ValueError as e:
            bad.append(str(e))
        if not (args.input and writes) or args.label_column or torchrun_world() > 1:
            bad.append("--shard K/N labels part of an --input file into its own --output (or --embeddings); not "
                       "with --label-column, nor under torchrun (which splits the file itself)")
    if args.label_column and torchrun_world() > 1:
        bad.append("--label-column scores in one process: run it without torchrun")
    not_predictions = args.embeddings or (args.label_column and not args.explain_html)  # metrics, and a page
    return bad + option_problems(args.explain, args.explain_html, not_predictions,
                                 args.text_pair_column, args.resume or args.shard or torchrun_world() > 1)


def output_problem(output, flag):
    """Why output cannot be written (before any work): a name whose format is not written, no such folder, no
    permission. What it must not be (the input, another output) is files.collisions'."""
    folder = os.path.dirname(os.path.abspath(output))
    if flag == "--output" and not output_format(output):
        return ("write .csv, .tsv or .jsonl (the format follows the name; a compressed or .parquet output is not "
                "written: compress the file afterwards)")
    if flag == "--embeddings" and not output.endswith(".npy"):
        return "name a .npy file (numpy.load reads it)"
    if flag == "--explain-html" and not output.lower().endswith((".html", ".htm")):
        return "name an .html file (the page opens in a browser)"
    if os.path.isdir(output) or output == "-":
        return None  # files.collisions says so
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(output) and not os.access(output, os.W_OK)):
        return "cannot write there (permission denied)"
    return None


def every_output(args):
    """{what: path} of every file this run writes: --output or --embeddings with the files beside it, the page."""
    written = {}
    for flag, path in (("--output", args.output), ("--embeddings", args.embeddings)):
        written.update(planned_outputs(path, flag) if path else {})
    return {**written, "--explain-html": args.explain_html}
