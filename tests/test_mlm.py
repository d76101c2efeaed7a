"""Masked-LM pretraining (train.py --task mlm): MaskedLM against BertForMaskedLM / ModernBertForMaskedLM (live and
golden), the masking recipe, and the job: resume, transformers loading its output, a classifier fine-tuned from it."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import train
from data import IGNORE_INDEX, TextEncoder
from make_golden import GOLDEN, masked_labels, padded_batch, save_reference, tiny_reference_mlm
from model import EncoderClassifier, MaskedLM
from side.weights import hf_tensors
from test_model import minilm_dir, reference
from test_robustness import SPECIAL, WORDS, log_rows, write_texts
from side import options
from side.mlm import Masking, make_mlm_batch

FAST = ["--max-length", "32", "--batch-size", "4", "--log-every", "1", "--lr", "2e-3"]



# ----------------------------------------------------------------------------- parity with the reference

CASES = [  # arch, seed, hidden, heads, config options (odd sizes; the heads' optional biases both ways)
    ("bert", 0, 45, 5, {}),
    ("bert", 1, 32, 4, {"hidden_act": "gelu_new"}),
    ("modernbert", 0, 42, 3, {}),
    ("modernbert", 1, 30, 5, {"decoder_bias": False, "classifier_bias": True, "norm_bias": True}),
]


@pytest.mark.parametrize("arch,seed,hidden,heads,options", CASES)
def test_mlm_logits_loss_gradients_match_reference(tmp_path, arch, seed, hidden, heads, options):
    reference()
    ref = tiny_reference_mlm(arch, seed, hidden, heads, **options)
    save_reference(ref, tmp_path)
    ours = MaskedLM.from_pretrained(tmp_path, verbose=False)
    ref.eval(), ours.eval()
    ids, mask = padded_batch(seed)  # rows of 20, 13, 5 and 9 tokens: longer than ModernBERT's window of 8
    labels = masked_labels(ids, mask, seed)
    real = mask.bool()

    out = ref(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        logits, _ = ours(ids, mask)  # every position, as the reference gives them (pad positions aside)
    assert (logits[real] - out.logits[real]).abs().max() <= 1e-5
    masked_logits, loss = ours(ids, mask, labels=labels)  # the masked positions only
    assert (masked_logits - out.logits[labels != -100]).abs().max() <= 1e-5
    assert (loss - out.loss).abs() <= 1e-5

    out.loss.backward()
    loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}  # the tied decoder weight is the embeddings'
    our_grads = hf_tensors(ours.config, {key: p.grad for key, p in ours.named_parameters() if p.requires_grad})
    assert set(our_grads) == set(ref_grads)
    for name, g in our_grads.items():
        scale = max(ref_grads[name].abs().max().item(), 1e-6)
        assert (g - ref_grads[name]).abs().max().item() / scale <= 1e-4, name


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_mlm_golden_logits_and_loss(arch):
    """Runs without transformers: what the reference computed in tests/make_golden.py."""
    folder = os.path.join(GOLDEN, f"{arch}_mlm")
    expected = torch.load(os.path.join(folder, "expected.pt"), weights_only=True)
    model = MaskedLM.from_pretrained(folder, verbose=False).eval()
    ids, mask, labels = expected["input_ids"], expected["attention_mask"], expected["labels"]
    with torch.no_grad():
        logits, _ = model(ids, mask)
        masked_logits, loss = model(ids, mask, labels=labels)
    real = mask.bool()
    assert (logits[real] - expected["logits"][real]).abs().max() <= 1e-5
    assert (masked_logits - expected["logits"][labels != -100]).abs().max() <= 1e-5
    assert (loss - expected["loss"]).abs() <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_packed_mlm_batch_gives_the_padded_loss(arch):
    """make_mlm_batch's two layouts: the same masked positions, in the same order, and the same loss."""
    model = MaskedLM.from_pretrained(os.path.join(GOLDEN, f"{arch}_mlm"), verbose=False).eval()
    ids, mask = padded_batch(2)
    labels = masked_labels(ids, mask, 2)
    seqs = [row[:n].tolist() for row, n in zip(ids, mask.sum(1).tolist())]
    targets = [row[:n].numpy() for row, n in zip(labels, mask.sum(1).tolist())]
    with torch.no_grad():
        padded = model(**make_mlm_batch(seqs, targets, pad_id=0, packed=False))
        packed = model(**make_mlm_batch(seqs, targets, pad_id=0, packed=True))
        reference_layout = model(ids, mask, labels=labels)  # masked_index found by the model itself
    for logits, loss in (packed, reference_layout):
        assert (logits - padded[0]).abs().max() <= 1e-5 and (loss - padded[1]).abs() <= 1e-6


def test_mlm_batch_chosen_per_batch_keeps_labels_on_their_tokens():
    """packed=None (the CPU default): make_batch packs a batch with much padding; the labels must follow."""
    model = MaskedLM.from_pretrained(os.path.join(GOLDEN, "bert_mlm"), verbose=False).eval()
    ids, mask = padded_batch(2)
    labels = masked_labels(ids, mask, 2)
    n = mask.sum(1).tolist()
    seqs = [ids[0, :n[0]].tolist(), ids[1, :4].tolist()]  # a long and a short one: much padding
    targets = [labels[0, :n[0]].numpy(), labels[1, :4].numpy()]
    chosen = make_mlm_batch(seqs, targets, pad_id=0, packed=None)
    assert "cu_seqlens" in chosen
    with torch.no_grad():
        want = model(**make_mlm_batch(seqs, targets, pad_id=0, packed=False))
        got = model(**chosen)
    assert (got[0] - want[0]).abs().max() <= 1e-5 and (got[1] - want[1]).abs() <= 1e-6


def test_minilm_head_is_initialised_as_the_reference_does(tmp_path, capsys):
    """all-MiniLM-L6-v2 has no MLM head. The reference's (AutoModelForMaskedLM) initialised head, saved, gives the same
    logits and loss in ours on real text; our own initialisation draws from the same distribution, is reported, and
    keeps the checkpoint's pooler."""
    T = reference()
    folder = minilm_dir()
    torch.manual_seed(0)
    ref = T.AutoModelForMaskedLM.from_pretrained(folder).eval()
    ref.save_pretrained(tmp_path)
    ours = MaskedLM.from_pretrained(tmp_path, verbose=False).eval()
    tok = T.AutoTokenizer.from_pretrained(folder)
    texts = ["Axial CT shows a 3 cm mass in the right upper lobe.", "Chest radiograph: no acute findings.",
             "MRI of the brain with contrast demonstrates a ring-enhancing lesion in the left parietal lobe."]
    batch = tok(texts, padding=True, return_tensors="pt")
    labels = masked_labels(batch["input_ids"], batch["attention_mask"], 0, rate=0.2)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        out = ref(**batch, labels=labels)
        logits, _ = ours(**batch)
        _, loss = ours(**batch, labels=labels)
    assert (logits[real] - out.logits[real]).abs().max() <= 1e-5
    assert (loss - out.loss).abs() <= 1e-5

    fresh = MaskedLM.from_pretrained(folder)
    assert "MLM head (or pooler) initialised as the reference does" in capsys.readouterr().out and fresh.fresh_weights
    theirs = ref.cls.predictions
    for dense, norm, bias in ((fresh.head.dense, fresh.head.norm, fresh.head.bias),
                              (theirs.transform.dense, theirs.transform.LayerNorm, theirs.bias)):
        assert abs(dense.weight.std().item() - 0.02) < 0.001 and not dense.bias.any()
        assert torch.equal(norm.weight, torch.ones(384)) and not norm.bias.any() and not bias.any()
    from safetensors.torch import load_file
    pooler = load_file(os.path.join(folder, "model.safetensors"))["pooler.dense.weight"]
    assert torch.equal(fresh.pooler.weight, pooler) and not fresh.pooler.weight.requires_grad


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_our_mlm_save_loads_in_reference_and_as_a_classifier(tmp_path, arch):
    T = reference()
    save_reference(tiny_reference_mlm(arch, 7), tmp_path / "ref")
    ours = MaskedLM.from_pretrained(tmp_path / "ref", verbose=False).eval()
    with torch.no_grad():
        for p in ours.parameters():  # weights of our own, not the reference's
            p.add_(torch.randn_like(p) * 0.01)
    ours.save_pretrained(tmp_path / "ours")
    config = json.load(open(tmp_path / "ours" / "config.json"))
    assert config["architectures"] == [("Bert" if arch == "bert" else "ModernBert") + "ForMaskedLM"]
    assert "id2label" not in config and "problem_type" not in config
    back = T.AutoModelForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    ids, mask = padded_batch(4)
    real = mask.bool()
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=mask).logits[real] - ours(ids, mask)[0][real]).abs().max() <= 1e-5
    # a classifier from it: the encoder kept, the MLM head left behind (ModernBERT's head.dense/norm serve both)
    classifier = EncoderClassifier.from_pretrained(tmp_path / "ours", num_labels=3, verbose=False)
    theirs = classifier.encoder.state_dict()
    assert all(torch.equal(w, theirs[k]) for k, w in ours.encoder.state_dict().items())
    if arch == "bert":
        assert torch.equal(classifier.head.pooler.weight, ours.pooler.weight)


# ----------------------------------------------------------------------------- masking

def test_masking_follows_the_recipe_and_its_keys():
    encoder = TextEncoder(minilm_dir(), 512)
    masking = Masking.for_encoder(encoder, 0.15, seed=0)
    assert masking.mask_id == 103 and set(masking.special_ids) == {0, 100, 101, 102, 103}
    assert masking.vocab_size == 30522
    rng = np.random.default_rng(0)
    seqs = [[101, *rng.integers(1000, 30000, 200), 102] for _ in range(200)]  # 40,400 tokens
    masked = [masking(seq, (1, row)) for row, seq in enumerate(seqs)]
    ids, inputs, labels = (np.concatenate(x) for x in (seqs, [m[0] for m in masked], [m[1] for m in masked]))
    chosen = labels != IGNORE_INDEX
    assert not chosen[np.isin(ids, [101, 102])].any(), "special tokens are never masked"
    assert np.array_equal(labels[chosen], ids[chosen]) and abs(chosen.mean() - 0.15 * 200 / 202) < 0.006
    as_mask, kept = inputs[chosen] == 103, inputs[chosen] == ids[chosen]
    assert abs(as_mask.mean() - 0.8) < 0.02 and abs(kept.mean() - 0.1) < 0.015  # random tokens: the other ~10%
    assert np.array_equal(inputs[~chosen], ids[~chosen])
    again = masking(seqs[5], (1, 5))
    assert np.array_equal(again[0], masked[5][0]) and np.array_equal(again[1], masked[5][1])
    assert not np.array_equal(masking(seqs[5], (2, 5))[1], masked[5][1]), "another epoch masks anew"


# ----------------------------------------------------------------------------- the job

def tiny_mlm_checkpoint(folder, arch):
    """The golden tiny masked LM (vocab_size 99) with a WordPiece vocab.txt of the test words."""
    shutil.copytree(os.path.join(GOLDEN, f"{arch}_mlm"), folder, ignore=shutil.ignore_patterns("expected.pt"))
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(SPECIAL + WORDS) + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm")
    train_txt = root / "notes.txt"  # one text per line
    rows = open(write_texts(root / "train.csv", 30, 0)).read().splitlines()[1:]
    train_txt.write_text("\n".join(row.rsplit(",", 1)[0] for row in rows) + "\n")
    return {"train": str(train_txt), "test": write_texts(root / "test.csv", 8, 1), "labelled": str(root / "train.csv"),
            "root": root}


def mlm_job(model, texts, out, *extra):
    return ["--task", "mlm", "--model", model, "--train-file", texts["train"], "--test-file", texts["test"],
            "--out-dir", str(out), *FAST, *extra]


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_mlm_job_output_loads_in_transformers_and_fine_tunes(tmp_path, texts, arch, capsys):
    T = reference()
    model = tiny_mlm_checkpoint(tmp_path / "model", arch)
    out = tmp_path / "mlm"
    result = train.main(mlm_job(model, texts, out, "--max-steps", "4", "--eval-every", "2"))
    config = json.load(open(out / "train_config.json"))
    assert config["mlm_probability"] == (0.15 if arch == "bert" else 0.3) and config["metric"] == "loss"
    assert not options.greater_is_better(config["greater_is_better"], config["metric"])
    evals = log_rows(out, "eval")
    assert [e["step"] for e in evals] == [2, 4] and all(e["metric"] == "loss" and e["masked_tokens"] > 0 for e in evals)
    assert result["test"]["loss"] == pytest.approx(json.load(open(out / "test_metrics.json"))["loss"])
    assert "start" in result and "masked-token prediction" in (out / "report.txt").read_text()

    ours = MaskedLM.from_pretrained(out, verbose=False).eval()
    back = T.AutoModelForMaskedLM.from_pretrained(out).eval()
    ids, mask = padded_batch(5, vocab=60)
    with torch.no_grad():
        assert (back(input_ids=ids, attention_mask=mask).logits[mask.bool()] -
                ours(ids, mask)[0][mask.bool()]).abs().max() <= 1e-5

    capsys.readouterr()
    train.main(["--model", str(out), "--train-file", texts["labelled"], "--test-file", "", "--out-dir",
                str(tmp_path / "classifier"), "--max-steps", "1", *FAST])
    said = capsys.readouterr().out
    assert "with a new classifier head initialised for this run (classifier.weight, classifier.bias)" in said


def test_mlm_resumes_to_the_same_weights(tmp_path, texts, monkeypatch):
    """Dropout on, masks drawn per (epoch, row): a run stopped after its first evaluation and resumed ends as one
    that ran through."""
    model = tiny_mlm_checkpoint(tmp_path / "model", "bert")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    job = lambda out, *extra: mlm_job(model, texts, out, "--epochs", "2", "--eval-every", "3", "--keep-state", *extra)
    train.main(job(whole))
    real_step, calls = train.optimizer_step, []

    def dies_at_step_5(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real_step(*args)

    monkeypatch.setattr(train, "optimizer_step", dies_at_step_5)
    with pytest.raises(SystemExit) as stop:
        train.main(job(stopped))
    assert stop.value.code == 130  # its one line (on stderr) is side/signals.py's, tested in test_signals.py
    monkeypatch.setattr(train, "optimizer_step", real_step)
    assert torch.load(stopped / "last" / "state.pt", weights_only=True)["step"] == 3
    train.main(job(stopped, "--resume"))
    ours = torch.load(stopped / "last" / "state.pt", weights_only=True)["model"]
    theirs = torch.load(whole / "last" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert open(stopped / "metrics.jsonl").read() == open(whole / "metrics.jsonl").read()


@pytest.mark.parametrize("extra,message", [
    (["--mlm-probability", "1.5"], r"--mlm-probability 1.5 must be between 0 and 1"),
    (["--long-docs", "windows_mean"], r"--long-docs 'windows_mean' must be head with --task mlm"),
    (["--metric", "macro_f1"], r"--metric 'macro_f1' must be auto or loss with --task mlm"),
    (["--text-pair-column", "b"], r"--text-pair-column 'b' must be a column name, .* not with --task mlm"),
    (["--teacher", "runs/any"], r"--teacher 'runs/any' must be a fine-tuned classifier, .* not with --task mlm"),
    (["--layer-mix"], r"--layer-mix True must be off with --task mlm"),
])
def test_mlm_options_are_checked_before_anything_loads(tmp_path, texts, extra, message, monkeypatch):
    monkeypatch.setattr(MaskedLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=message):
        train.main(mlm_job("", texts, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()
