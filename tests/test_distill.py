"""Smaller, faster models (issue #19): students with fewer layers (--num-layers), distillation from a teacher
(--teacher) and int8 inference (predict.py --int8). Tiny random checkpoints and tiny made-up data keep it fast."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import predict
import train
from make_golden import padded_batch, save_reference, tiny_reference_model
from model import EncoderClassifier
from side.hf import global_every, student_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from test_robustness import tiny_checkpoint, write_texts
from side import distill, infer


def reference():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


# ----------------------------------------------------------------------------- fewer layers


def test_which_layers_a_student_keeps():
    assert student_layers(6, 3) == [0, 2, 4]  # every other layer, as DistilBERT
    assert student_layers(12, 6) == [0, 2, 4, 6, 8, 10]
    assert student_layers(22, 11) == list(range(0, 22, 2))
    assert student_layers(6, 4) == [0, 1, 2, 3]  # more than half: the first K
    assert student_layers(6, 2) == [0, 3]
    assert student_layers(6, 1) == [0]
    assert student_layers(6, 6) == list(range(6))
    # ModernBERT-base (22 layers, global every 3) halved: still global every 3
    base = ["full_attention" if i % 3 == 0 else "sliding_attention" for i in range(22)]
    assert global_every([base[i] for i in student_layers(22, 11)]) == 3
    assert global_every([base[i] for i in student_layers(22, 7)]) == 1  # a step of 3 keeps only global layers
    assert global_every(["full_attention", "sliding_attention", "full_attention", "full_attention"]) is None


# arch, teacher layers, global every (ModernBERT), student layers, the student's layer types (g = global)
STUDENTS = [("bert", 6, None, 3, None), ("bert", 4, None, 1, None),
            ("modernbert", 6, 3, 3, "gll"), ("modernbert", 6, 2, 2, "gl"), ("modernbert", 6, 2, 3, "ggg")]


@pytest.mark.parametrize("arch,layers,every,keep,types", STUDENTS)
def test_student_folder_loads_in_transformers_with_our_logits(tmp_path, arch, layers, every, keep, types):
    """The kept layers' weights, renumbered, with num_hidden_layers and ModernBERT's pattern in config.json (both
    layouts: layer_types, and global_attn_every_n_layers for older readers): transformers gives our logits."""
    T = reference()
    kwargs = {"global_every": every} if every else {}
    teacher = tiny_reference_model(arch, 5, pooling="mean", layers=layers, hidden=36, heads=3, **kwargs)
    save_reference(teacher, tmp_path / "teacher")
    student = EncoderClassifier.from_pretrained(tmp_path / "teacher", num_layers=keep, verbose=False).eval()
    assert len(student.encoder.layers) == keep
    kept = student_layers(layers, keep)
    ours_by_name, theirs = student.hf_state_dict(), teacher.state_dict()
    prefix = "bert.encoder.layer." if arch == "bert" else "model.layers."
    for new, old in enumerate(kept):  # every tensor of each kept layer, renumbered
        mine = {k[len(f"{prefix}{new}."):]: v for k, v in ours_by_name.items() if k.startswith(f"{prefix}{new}.")}
        assert mine and all(torch.equal(v, theirs[f"{prefix}{old}.{k}"]) for k, v in mine.items())
    student.save_pretrained(tmp_path / "student")

    config = json.load(open(tmp_path / "student" / "config.json"))
    assert config["num_hidden_layers"] == keep
    if arch == "modernbert":
        assert [t[0] for t in config["layer_types"]] == [{"g": "f", "l": "s"}[c] for c in types]
        assert config["global_attn_every_n_layers"] == global_every(config["layer_types"])
    ref, info = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = padded_batch(3)  # rows longer than ModernBERT's window of 8
    with torch.no_grad():
        expected = ref.eval()(input_ids=ids, attention_mask=mask).logits
        logits, _ = student(ids, mask)
    assert (logits - expected).abs().max() <= 1e-5
    if arch == "modernbert":  # an older transformers reads only global_attn_every_n_layers: the same model
        del config["layer_types"]
        json.dump(config, open(tmp_path / "student" / "config.json", "w"))
        old_layout = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
        with torch.no_grad():
            assert (old_layout(input_ids=ids, attention_mask=mask).logits - expected).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- the distillation loss


def test_soft_target_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    student, teacher, T = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), 3.0
    # softmax: T^2 x KL(teacher || student) at temperature T, summed over classes, averaged over texts
    p = np.exp(teacher.numpy() / T) / np.exp(teacher.numpy() / T).sum(1, keepdims=True)
    q = np.exp(student.numpy() / T) / np.exp(student.numpy() / T).sum(1, keepdims=True)
    kl = (p * (np.log(p) - np.log(q))).sum(1).mean() * T ** 2
    assert abs(distill.distillation_loss(student, teacher, False, T).item() - kl) <= 1e-5
    # multi-label: T^2 x each label's BCE against the teacher's probability, averaged over texts and labels
    p, q = 1 / (1 + np.exp(-teacher.numpy() / T)), 1 / (1 + np.exp(-student.numpy() / T))
    bce = -(p * np.log(q) + (1 - p) * np.log(1 - q)).mean() * T ** 2
    assert abs(distill.distillation_loss(student, teacher, True, T).item() - bce) <= 1e-5
    # a student that already matches its teacher: KL 0; BCE down to the teacher's own entropy
    assert distill.distillation_loss(teacher, teacher, False, T).abs().item() <= 1e-6


@pytest.mark.parametrize("multi_label", [False, True])
def test_mix_of_hard_and_soft_losses(multi_label):
    """(1 - w) x the labels' loss + w x the soft loss, the teacher run on the same inputs; w = 0 is exactly the
    plain loss, gradient included."""
    torch.manual_seed(0)
    problem = "multi_label_classification" if multi_label else "single_label_classification"
    student = tiny_bert(num_labels=3, problem_type=problem, layers=1)
    teacher = tiny_bert(num_labels=3, problem_type=problem, layers=2).eval()
    ids, mask = padded_batch(1)
    labels = torch.tensor([[1., 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]]) if multi_label else torch.tensor([0, 2, 1, 1])
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for weight in (0.0, 0.3, 1.0):
        logits, hard = student(**inputs)
        mixed = distill.with_teacher(teacher, weight, 2.0, inputs, logits, hard)
        expected = (1 - weight) * hard + weight * distill.distillation_loss(logits, teacher(ids, mask)[0], multi_label, 2)
        assert torch.allclose(mixed, expected, atol=1e-6)
        if weight == 0:
            plain = torch.autograd.grad(hard, list(student.parameters()), retain_graph=True)
            mixed_grads = torch.autograd.grad(mixed, list(student.parameters()))
            assert torch.equal(mixed, hard) and all(torch.equal(a, b) for a, b in zip(plain, mixed_grads))
    assert all(p.grad is None for p in teacher.parameters())


def tiny_bert(num_labels, problem_type, layers):
    from side.hf import BertConfig
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=num_labels,
                        problem_type=problem_type)
    return EncoderClassifier(config)


# ----------------------------------------------------------------------------- the whole job: teacher, student

FAST = ["--max-steps", "2", "--max-length", "32", "--batch-size", "4", "--eval-every", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 2-layer BERT checkpoint, data, and a teacher fine-tuned from it (2 steps)."""
    root = tmp_path_factory.mktemp("distill")
    tiny = {"model": tiny_checkpoint(root / "model"), "train": write_texts(root / "train.csv", 24, 0),
            "val": write_texts(root / "val.csv", 6, 1), "test": write_texts(root / "test.csv", 6, 2), "root": root}
    train.main(job(tiny, root / "teacher"))
    tiny["teacher"] = str(root / "teacher")
    return tiny


def job(tiny, out, *extra, train_file=None):
    return ["--model", tiny["model"], "--train-file", train_file or tiny["train"], "--val-file", tiny["val"],
            "--test-file", "", "--out-dir", str(out), *FAST, *extra]


def test_distilled_student_sees_the_students_batches_and_saves_an_ordinary_checkpoint(tiny, tmp_path, monkeypatch):
    """Every training forward of the student is followed by the teacher's on the same inputs, in eval mode
    and without gradients; the student folder has 1 layer, loads in transformers and in predict.py."""
    calls = []
    forward = EncoderClassifier.forward

    def spy(self, input_ids, attention_mask=None, **kwargs):
        calls.append((self.config.num_hidden_layers, self.training, torch.is_grad_enabled(), input_ids.clone(),
                      None if attention_mask is None else attention_mask.clone(), "labels" in kwargs))
        return forward(self, input_ids, attention_mask, **kwargs)

    monkeypatch.setattr(EncoderClassifier, "forward", spy)
    out = tmp_path / "student"
    train.main(job(tiny, out, "--teacher", tiny["teacher"], "--num-layers", "1", "--batch-size", "3"))
    monkeypatch.undo()
    steps = [i for i, c in enumerate(calls) if c[1] and c[0] == 1]  # the student's training forwards
    assert len(steps) == 2
    for i in steps:
        layers, training, grad, ids, mask, _ = calls[i + 1]
        assert (layers, training, grad) == (2, False, False)
        assert torch.equal(ids, calls[i][3]) and torch.equal(mask, calls[i][4])
    assert sum(c[0] == 2 for c in calls) == 2  # the teacher runs in training steps only: no pass over the data

    config = json.load(open(out / "config.json"))
    assert config["num_hidden_layers"] == 1
    options = json.load(open(out / "train_config.json"))
    assert (options["teacher"], options["num_layers"]) == (tiny["teacher"], 1)
    texts = ["w1 w2 w3", "w40 w41 w50 w7"]
    predictions = predict.Predictor(str(out), device="cpu").predict(texts)
    assert len(predictions) == 2
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    ref = T.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    assert ref.config.num_hidden_layers == 1


def test_distill_weight_zero_trains_exactly_as_without_a_teacher(tiny, tmp_path):
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    train.main(job(tiny, plain, "--num-layers", "1"))
    train.main(job(tiny, zero, "--num-layers", "1", "--teacher", tiny["teacher"], "--distill-weight", "0"))
    from safetensors.torch import load_file
    a, b = load_file(plain / "model.safetensors"), load_file(zero / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def no_model_load(monkeypatch):
    """The case must end before any checkpoint's weights are read (student's or teacher's)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the problem was found")
    monkeypatch.setattr(train.EncoderClassifier, "from_pretrained", refuse)


def test_options_are_checked_first(tiny, tmp_path, no_model_load):
    cases = [(["--num-layers", "-1"], r"--num-layers -1 must be >= 0"),
             (["--num-layers", "3"], r"--num-layers 3: the checkpoint has only 2 layers"),
             (["--distill-weight", "1.5"], r"--distill-weight 1.5 must be between 0 and 1"),
             (["--distill-temperature", "0"], r"--distill-temperature 0.0 must be a number > 0"),
             (["--teacher", str(tmp_path / "nothing")], r"--teacher .*nothing: no such folder"),
             (["--distill-temperature", "4"], r"--distill-weight and --distill-temperature .*: give --teacher")]
    for options, message in cases:
        with pytest.raises(SystemExit, match=message):
            train.main(job(tiny, tmp_path / "out", *options))


@pytest.mark.filterwarnings("ignore:.*not seen in training")  # the other labels' validation file, ignored
def test_a_teacher_that_cannot_teach_this_run_is_refused_before_loading(tiny, tmp_path, no_model_load):
    other_labels = write_texts(tmp_path / "other.csv", 24, 0, labels=("c0", "c1", "d2"))
    other_vocab = tiny_checkpoint(tmp_path / "other_vocab", vocab_words=[f"v{i}" for i in range(60)])
    cases = [(["--unknown-labels", "ignore"], {"train_file": other_labels},
              r"its labels \(single-label, 3: c0, c1, c2\) are not the training data's \(single-label, 3: c0, c1, d2\)"),
             (["--max-length", "24"], {}, r"trained on head at --max-length 32, the student reads head at 24"),
             (["--long-docs", "tail"], {}, r"trained on head at --max-length 32, the student reads tail at 32"),
             (["--model", other_vocab], {}, r"its tokenizer is not the student's")]
    for options, files, message in cases:
        with pytest.raises(SystemExit, match=r"--teacher .* cannot teach this run: .*" + message):
            train.main(job(tiny, tmp_path / "out", "--teacher", tiny["teacher"], *options, **files))
    with pytest.raises(SystemExit, match=r"--out-dir .* is the --teacher"):
        train.main(job(tiny, tiny["teacher"], "--teacher", tiny["teacher"], "--overwrite"))
    assert os.path.isfile(os.path.join(tiny["teacher"], "model.safetensors"))  # untouched


# ----------------------------------------------------------------------------- int8 inference


def test_int8_copy_quantizes_the_encoder_and_agrees_with_fp32(tiny, capsys):
    predictor = predict.Predictor(tiny["teacher"], int8=True)
    assert predictor.device.type == "cpu"
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    kinds = lambda model: {type(m) for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))}
    assert kinds(predictor.model.encoder) == {Int8Linear} and kinds(predictor.fp32.encoder) == {torch.nn.Linear}
    assert kinds(predictor.model.head) == {torch.nn.Linear}
    texts = [f"w{i} w{i + 1} w{(7 * i) % 60} w{(3 * i) % 60}" for i in range(40)]
    int8, fp32 = predictor.logits(texts), predictor.score(predictor.encoder.encode(texts), predictor.fp32)
    assert np.abs(int8 - fp32).max() < 0.05 and not np.array_equal(int8, fp32)

    predict.main(["--model", tiny["teacher"], "--int8", *sum((["--text", t] for t in texts), [])])
    report = capsys.readouterr().err
    agreement = infer.int8_agreement(int8, fp32, False, predictor.thresholds)
    assert f"scored 40 texts in" in report and "texts/s (int8) on cpu" in report
    assert f"int8 against fp32 on these 40 texts: the same label for {agreement['same_prediction']:.2%}" in report
    with pytest.raises(SystemExit, match="--int8 runs on the CPU only"):
        predict.main(["--model", tiny["teacher"], "--int8", "--device", "cuda", "--text", "w1"])


def test_int8_checks_agreement_on_a_bounded_sample(tiny, capsys, monkeypatch):
    """--int8 scores the first INT8_SAMPLE texts in fp32 (and again in int8), not its whole first chunk."""
    import side.infer
    monkeypatch.setattr(side.infer, "INT8_SAMPLE", 8)
    scored = []
    original = predict.Predictor.score
    monkeypatch.setattr(predict.Predictor, "score", lambda self, seqs, model=None: scored.append(
        (len(seqs), model is self.fp32)) or original(self, seqs, model))
    texts = [f"w{i} w{i + 1} w{(7 * i) % 60}" for i in range(40)]
    predict.main(["--model", tiny["teacher"], "--int8", *sum((["--text", t] for t in texts), [])])
    assert scored == [(40, False), (8, True), (8, False)]  # the run, then the sample in fp32 and in int8
    assert "int8 against fp32 on the first 8 (of 40) texts: the same label for" in capsys.readouterr().err


def test_int8_agreement_counts_labels_and_label_sets():
    a = np.array([[2.0, 0.0, -1.0], [0.1, 0.2, 0.0]], np.float32)
    b = np.array([[2.0, 0.0, -1.0], [0.3, 0.2, 0.0]], np.float32)
    single = infer.int8_agreement(a, b, False, 0.5)
    assert single["same_prediction"] == 0.5 and single["max_probability_difference"] > 0
    multi = infer.int8_agreement(a, b, True, np.array([0.5, 0.5, 0.5]))  # row 2: 0.1 -> 0.3 stays above 0.5
    assert multi["same_prediction"] == 1.0
    multi = infer.int8_agreement(a, b, True, np.array([0.56, 0.5, 0.5]))  # sigmoid 0.525 vs 0.574 straddle 0.56
    assert multi["same_prediction"] == 0.5


def test_student_speed_script_times_all_four_in_alternating_order(tiny, tmp_path, capsys, monkeypatch):
    """scripts/student_speed.py: teacher and student, fp32 and int8, every round in one order then the reverse."""
    spec = importlib.util.spec_from_file_location("student_speed", os.path.join(ROOT, "scripts", "student_speed.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"w{i % 60} w{(i + 1) % 60} w{(7 * i) % 60}\n" for i in range(70)))
    order, score = [], script.Predictor.score
    monkeypatch.setattr(script.Predictor, "score", lambda self, seqs, model=None: (
        order.append((self.model_dir, self.fp32 is not None, len(seqs))), score(self, seqs, model))[1])
    seconds = script.main(["--teacher", tiny["teacher"], "--student", tiny["teacher"], "--input", str(texts),
                           "--rounds", "2"])
    assert list(seconds) == ["teacher fp32", "teacher int8", "student fp32", "student int8"]
    assert all(len(t) == 2 and min(t) > 0 for t in seconds.values())
    assert [n for _, _, n in order[:4]] == [64] * 4  # the warm-ups
    timed = [(int8, n) for _, int8, n in order[4:]]
    assert all(n == 70 for _, n in timed)
    assert [int8 for int8, _ in timed] == [False, True, False, True, True, False, True, False]
    assert "70 texts of" in capsys.readouterr().out
