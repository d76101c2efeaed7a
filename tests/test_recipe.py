"""The recipe's options beyond the reference's: layer-wise learning-rate decay (--layer-lr-decay) and top layers
started afresh (--reinit-layers)."""
import math

import pytest
import torch
from safetensors.torch import load_file

from model import EncoderClassifier
from side.hf import BertConfig, ModernBertConfig


def tiny(arch, layers=3, hidden=24, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=99, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=3,
                  intermediate_size=37, max_position_embeddings=64, num_labels=4, classifier_pooling="mean",
                  problem_type="multi_label_classification")
    if arch == "bert":
        return EncoderClassifier(BertConfig(**common))
    types = ["full_attention", "sliding_attention"] * layers
    return EncoderClassifier(ModernBertConfig(**common, local_attention=8, pad_token_id=0, layer_types=types[:layers]))


def layers_above_by_name(name, layers):
    """The number of encoder layers above a parameter, read from its name alone."""
    parts = name.split(".")
    if parts[1] == "layers":
        return layers - 1 - int(parts[2])
    return 0 if parts[1] == "final_norm" else layers  # the embeddings sit below every layer


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_layer_lr_decay_gives_each_layer_the_lr_of_the_one_above_times_the_decay(arch):
    model = tiny(arch)
    optimizer = model.configure_optimizers(0.01, 1e-4, head_lr=1e-3, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    seen = set()
    for name, p in model.named_parameters():
        lr, decay = lr_of[id(p)]
        expected = 1e-4 * 0.5 ** layers_above_by_name(name, 3) if name.startswith("encoder.") else 1e-3
        assert lr == pytest.approx(expected, rel=1e-12), name
        assert decay == (0.01 if p.dim() >= 2 else 0.0), name
        seen.add(lr)
    assert len(seen) == 5  # the embeddings, three layers, the head
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_without_layer_decay_the_groups_are_as_before():
    """Two groups for the encoder, two for the head: a --resume of an earlier run's optimizer state still fits."""
    groups = tiny("bert").configure_optimizers(0.01, 1e-4, head_lr=1e-3).param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-4, 0.01), (1e-4, 0.0), (1e-3, 0.01), (1e-3, 0.0)]


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_reinit_replaces_the_top_layers_and_nothing_else(arch):
    model = tiny(arch)
    with torch.no_grad():  # a "pretrained" model: no weight is at its fresh value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1 + 0.5)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.reinit_top_layers(2)
    for name, p in model.named_parameters():
        if name.startswith(("encoder.layers.1.", "encoder.layers.2.")):
            assert not torch.equal(p, before[name]), name
            if p.dim() == 1:  # biases zero, norm weights one: a fresh layer
                assert torch.all((p == 0) | (p == 1)), name
        else:
            assert torch.equal(p, before[name]), name
    model.reinit_top_layers(0)
    assert all(torch.equal(p, model.state_dict()[n]) for n, p in model.named_parameters())


def truncated_std(std, cutoff):
    """The std of a normal(0, std) cut at +-cutoff x std."""
    density = math.exp(-cutoff ** 2 / 2) / math.sqrt(2 * math.pi)
    return std * math.sqrt(1 - 2 * cutoff * density / math.erf(cutoff / math.sqrt(2)))


def test_a_fresh_modernbert_layer_has_the_reference_stds():
    """transformers' ModernBERT init: a normal cut at initializer_cutoff_factor stds, std initializer_range for the
    input projections, and that / sqrt(2 x layers) for the two that write into the residual stream."""
    model = tiny("modernbert", layers=4, hidden=96)
    model.reinit_top_layers(1)
    top, c = model.encoder.layers[-1], model.config
    std, out_std = c.initializer_range, c.initializer_range / math.sqrt(2 * 4)
    for linear, expected in ((top.attn.query, std), (top.wi, std), (top.attn_out, out_std), (top.wo, out_std)):
        assert linear.weight.std().item() == pytest.approx(truncated_std(expected, c.initializer_cutoff_factor),
                                                           rel=0.05)
        assert linear.weight.abs().max().item() <= c.initializer_cutoff_factor * expected + 1e-9


@pytest.mark.parametrize("argv,message", [
    (["--layer-lr-decay", "0"], r"--layer-lr-decay 0.0 must be in \(0, 1\]"),
    (["--layer-lr-decay", "1.5"], r"--layer-lr-decay 1.5 must be in \(0, 1\]"),
    (["--reinit-layers", "-1"], "--reinit-layers -1 must be >= 0"),
    (["--task", "mlm", "--reinit-layers", "1"], "--reinit-layers 1 must be 0 with --task mlm"),
])
def test_recipe_options_are_checked_before_anything_loads(tmp_path, argv, message):
    import train
    with pytest.raises(SystemExit, match=message):
        train.main(["--out-dir", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


def test_a_run_with_both_options_reinits_the_top_layer_and_decays_the_lower_lrs(tmp_path):
    from test_robustness import tiny_checkpoint, write_texts
    from train import TrainConfig
    from train import train as run
    model = tiny_checkpoint(tmp_path / "model")
    data = {name: write_texts(tmp_path / f"{name}.csv", rows, seed) for name, rows, seed in
            (("train", 24, 0), ("val", 6, 1))}
    start = load_file(f"{model}/model.safetensors")
    layers = sum(1 for k in start if k.endswith("attention.output.dense.weight"))
    with pytest.raises(SystemExit, match=f"--reinit-layers {layers + 1}: the model has only {layers} layers"):
        run(TrainConfig(model=model, train_file=data["train"], val_file=data["val"], test_file="",
                        reinit_layers=layers + 1, out_dir=str(tmp_path / "refused")))
    with pytest.raises(SystemExit, match=r"--reinit-layers 2: the model has only 1 layer \(--num-layers 1\)$"):
        run(TrainConfig(model=model, train_file=data["train"], val_file=data["val"], test_file="", num_layers=1,
                        reinit_layers=2, out_dir=str(tmp_path / "refused")))
    run(TrainConfig(model=model, train_file=data["train"], val_file=data["val"], test_file="", max_steps=2,
                    max_length=32, batch_size=4, lr=1e-4, layer_lr_decay=0.5, reinit_layers=1,
                    out_dir=str(tmp_path / "out")))
    end = load_file(tmp_path / "out" / "model.safetensors")
    key = "bert.encoder.layer.{}.attention.output.dense.weight"
    moved = [(end[key.format(i)] - start[key.format(i)]).abs().max().item() for i in range(layers)]
    scale = start[key.format(layers - 1)].abs().max().item()
    assert moved[-1] > 0.2 * scale  # a new layer, not the checkpoint's after two small steps
    assert max(moved[:-1]) < 2 * 2e-4 + 1e-7  # AdamW moves a weight by at most ~lr per step: the lower layers kept


def test_layer_probe_pools_each_state_and_scores_every_layer(tmp_path):
    """scripts/layer_probe.py: state 0 is the embedding output, the last is what encode() gives, each pooled over a
    text's real tokens; the table has a row per state with F1s in [0, 1]."""
    pytest.importorskip("sklearn")
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import layer_probe
    from data import TextEncoder, make_batch
    from test_robustness import tiny_checkpoint, write_texts
    model_dir = tiny_checkpoint(tmp_path / "model")
    model = EncoderClassifier.from_pretrained(model_dir, num_labels=2, verbose=False).eval()
    encoder = TextEncoder(model_dir, 32)
    texts = ["alpha beta", "gamma delta epsilon zeta eta"]  # two lengths: padding must not count
    states = layer_probe.hidden_states(model, encoder, texts, "mean")
    assert states.shape == (model.config.num_hidden_layers + 1, 2, model.config.hidden_size)
    batch = make_batch(encoder.encode(texts), None, encoder.pad_id)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        last = model.encode(batch["input_ids"], batch["attention_mask"])
        e = model.encoder
        first = e.embed_norm(e.word(batch["input_ids"]) + e.token_type(batch["token_type_ids"])
                             + e.position(torch.arange(mask.shape[1])[None]))
    for index, hidden in ((0, first), (-1, last)):
        for row in range(2):
            by_hand = hidden[row, mask[row]].mean(0).numpy()
            assert abs(states[index, row] - by_hand).max() <= 1e-5
    data = {name: write_texts(tmp_path / f"{name}.csv", rows, seed) for name, rows, seed in
            (("train", 30, 0), ("test", 9, 2))}
    out = tmp_path / "probe.md"
    layer_probe.main(["--model", model_dir, "--train-file", data["train"], "--test-file", data["test"],
                      "--max-length", "32", "--val-fraction", "0.3", "--out", str(out)])
    rows = open(out).read().splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| embeddings"] + [f"| layer {i}" for i in
                                                                      range(1, model.config.num_hidden_layers + 1)]
    assert all(0 <= float(x) <= 1 for r in rows for x in r.strip("| ").split(" | ")[1:])
