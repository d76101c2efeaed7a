"""Packed batches or padded ones: the flash kernel's self-check and the decision that rests on it.

use_packing(device, amp, pack)   True / False / None (make_batch decides per batch); the first time on a device
    and dtype where the flash kernel runs, flash_check must pass
flash_check -> compare_with_sdpa / compare_dropout_with_sdpa   model.flash_varlen on a small random case
    (check_case) against SDPA with the dense mask (packed_mask); relative_error measures how far off

Entry points (train.py, predict.py, bench.py) call use_packing and hand its answer to make_batch; model.py never
imports this file. model's functions are looked up at call time (model.flash_runs): the CPU tests replace them.
"""
import itertools
import math
import warnings

import torch
import torch.nn.functional as F

import model

CHECK_LENGTHS = (1, 7, 40, 16)  # a single token; 40 > the window's 2 * 8 + 1 keys; 64 tokens = CHECK_HEAD_DIM
CHECK_WINDOW = 8
CHECK_HEAD_DIM = 64  # the dropout check reads the weights off an identity v: head_dim = tokens
CHECK_TOLERANCE = 2e-2  # largest error / largest reference value: bf16 rounds at 2^-8; a wrong mask is far off
CHECK_DROPOUT = 0.5


def flash_check(device, dtype):
    """Run the packed attention the model runs (model.flash_varlen) on a small random case, against SDPA with the
    dense mask: global and windowed, forward and backward, without dropout (varlen_attn) and with it (the
    aten op). Returns None when all agree, else "<which check>: <what went wrong>". Milliseconds; torch's
    random state is left as it was (a resumed run draws the same dropout masks as an uninterrupted one)."""
    device = torch.device(device)
    forked = [] if device.type == "cpu" else [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(forked, device_type=device.type), torch.inference_mode(False), \
            torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for window in (None, CHECK_WINDOW):
            for dropout in (0.0, CHECK_DROPOUT):
                name = f"{'global' if window is None else f'window {window}'} layer, dropout {dropout}"
                compare = compare_with_sdpa if dropout == 0 else compare_dropout_with_sdpa
                try:
                    problem = compare(device, dtype, window, dropout)
                except Exception as e:  # a missing op, a changed signature, an unsupported GPU, ...
                    problem = f"{type(e).__name__}: {e}"
                if problem:
                    return f"{name}: {problem}"
    return None


def check_case(device, window):
    g = torch.Generator().manual_seed(window or 0)
    cu = torch.tensor([0, *itertools.accumulate(CHECK_LENGTHS)], dtype=torch.int32, device=device)
    layout = model.AttentionLayout(cu_seqlens=cu, max_seqlen=max(CHECK_LENGTHS))
    return g, layout, packed_mask(cu, window)


def packed_mask(cu_seqlens, window=None):
    """Dense block-diagonal mask [1, 1, N, N] for a packed batch: the self-check's reference."""
    n = int(cu_seqlens[-1])
    seq_id = torch.searchsorted(cu_seqlens[1:], torch.arange(n, device=cu_seqlens.device), right=True)
    allowed = seq_id[:, None] == seq_id[None, :]
    if window is not None:
        pos = torch.arange(n, device=cu_seqlens.device)
        allowed &= (pos[:, None] - pos[None, :]).abs() <= window
    return allowed[None, None]  # [1, 1, N, N]


def relative_error(got, want):
    """Largest error over the reference's largest value; inf for NaN (a comparison with NaN is always False)."""
    if got.shape != want.shape:
        raise ValueError(f"output of shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    error = ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    return error if error == error else math.inf


def compare_with_sdpa(device, dtype, window, dropout):
    g, layout, mask = check_case(device, window)
    n, heads = int(layout.cu_seqlens[-1]), 2
    qkv = torch.randn(1, n, 3, heads, CHECK_HEAD_DIM, generator=g).to(device, dtype).requires_grad_()
    y = model.flash_varlen(*(t.transpose(1, 2) for t in qkv.unbind(2)), layout, window, dropout)  # as SelfAttention
    grad = torch.randn(y.shape, generator=g).to(device, dtype)
    y.backward(grad)
    exact = qkv.detach().float().requires_grad_()
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in exact.unbind(2)), attn_mask=mask)
    want.backward(grad.float())
    checks = [("forward", y, want)] + [(f"backward d{name}", qkv.grad[:, :, i], exact.grad[:, :, i])
                                       for i, name in enumerate("qkv")]
    for name, got, expected in checks:
        error = relative_error(got, expected)
        if not error <= CHECK_TOLERANCE:
            return f"{name} differs from SDPA by {error:.3g} of its scale (tolerance {CHECK_TOLERANCE})"
    return None


def compare_dropout_with_sdpa(device, dtype, window, p):
    """With v the identity, attention's output is its weights after dropout, W = A * kept / (1 - p): compare
    the kept ones with SDPA's A, count the dropped ones, and check that backward uses the forward's mask
    (dv = W^T dy): a kernel that draws another mask in backward trains on gradients of another model."""
    g, layout, mask = check_case(device, window)
    n, heads = int(layout.cu_seqlens[-1]), 2
    q, k = (torch.randn(1, heads, n, CHECK_HEAD_DIM, generator=g).to(device, dtype) for _ in range(2))
    v = torch.eye(n, dtype=dtype, device=device).expand(1, heads, n, n).clone().requires_grad_()
    weights = model.flash_varlen(q, k, v, layout, window, p)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.detach().float(), attn_mask=mask)[0]
    w = weights[0].float()
    allowed = mask[0, 0].expand_as(w)
    if (w[~allowed] != 0).any():
        return "attention reached keys outside its sequence or window"
    kept = w != 0
    dropped = 1 - kept.sum().item() / allowed.sum().item()
    if abs(dropped - p) > 0.1:
        return f"dropped {dropped:.2f} of the attention weights with dropout {p}"
    error = relative_error(w[kept], want[kept] / (1 - p))
    if not error <= CHECK_TOLERANCE:
        return f"forward: the kept weights differ from SDPA's by {error:.3g} of their scale"
    grad = torch.randn(weights.shape, generator=g).to(device, dtype)
    weights.backward(grad)
    error = relative_error(v.grad[0], torch.einsum("hij,hid->hjd", w, grad[0].float()))
    if not error <= CHECK_TOLERANCE:
        return f"backward dv does not follow the forward's dropout mask (error {error:.3g} of its scale)"
    return None


class FlashCheckError(RuntimeError):
    """--pack was asked for and the flash kernel failed its self-check."""


_flash_checks = {}  # (device, dtype) -> flash_check's answer: the self-check runs once per process


def use_packing(device, amp, pack=None):
    """Packed batches (True), padded ones (False), or None: make_batch decides per batch, packing those with
    much padding. pack None: packed where the flash kernel runs them (CUDA under autocast) and passed its
    self-check (flash_check, the first time); a failed check prints one warning and padded batches (SDPA) go
    on. Off the flash path (CPU, amp off) None: there packed attention runs on a padded copy
    (model.padded_attention), whose copies pay only where a batch has much padding. pack True: packed; a failed
    self-check is an error. False: padded."""
    dtype = model.amp_dtype(device, amp)
    if pack is False or not model.flash_runs(device, dtype):
        return pack
    key = (str(device), dtype)
    first = key not in _flash_checks
    if first:
        _flash_checks[key] = flash_check(device, dtype)
    problem = _flash_checks[key]
    if problem is None:
        return True
    message = (f"flash varlen attention failed its self-check on {device} in {dtype} with torch "
               f"{torch.__version__}: {problem}")
    if pack:
        raise FlashCheckError(f"{message}. Without --pack, training and prediction run on padded batches")
    if first:
        warnings.warn(f"{message}. Packed batches are off: running on padded batches (SDPA)", stacklevel=2)
    return False
