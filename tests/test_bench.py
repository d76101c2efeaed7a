"""bench.py stays runnable (a tiny CPU run) and counts FLOPs as documented."""
import pytest
import torch

import bench
from model import EncoderClassifier, config_from_hf


def test_tiny_bench_runs_every_implementation(capsys):
    bench.main(["--tiny", "--steps", "1", "--warmup", "1", "--batches", "1", "--batch-size", "4",
                "--no-reference"])
    out = capsys.readouterr().out
    for name in ("bert", "modernbert"):
        for mode in ("train", "infer"):
            assert f"{name} {mode}: batch" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("ours")]
    assert len(rows) == 8  # padded and packed, 2 models x 2 modes
    assert all(float(row[-5].replace(",", "")) > 0 for row in rows)  # tokens/s


def test_flops_count_bert_base_by_hand():
    with torch.device("meta"):
        model = EncoderClassifier(config_from_hf(bench.hf_config("bert", tiny=False)))
    h, layers, inner, labels = 768, 12, 3072, bench.NUM_LABELS
    per_layer = 4 * h * h + 2 * h * inner  # q, k, v, output; two MLP matrices
    matrices = layers * per_layer + h * h + h * labels  # + pooler + classifier
    assert model.flops_per_token(300) == 6 * matrices + 12 * layers * h * 300


def test_flops_modernbert_local_layers_see_only_their_window():
    with torch.device("meta"):
        model = EncoderClassifier(config_from_hf(bench.hf_config("modernbert", tiny=False)))
    c = model.config
    local = sum(t == "sliding_attention" for t in c.layer_types)
    assert local == 14  # 22 layers, every third global
    base = model.flops_per_token(1) - 12 * c.hidden_size * 22  # the weights' share: one key per layer
    for n in (50, 65, 66, 100, 200, 300, 4096):
        pos = torch.arange(n)
        window_keys = ((pos[:, None] - pos[None, :]).abs() <= c.local_attention // 2).sum().item() / n
        expected = base + 12 * c.hidden_size * ((22 - local) * n + local * window_keys)
        assert model.flops_per_token(n) == pytest.approx(expected, rel=1e-12), n
