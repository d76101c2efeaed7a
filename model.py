"""
BERT and ModernBERT encoders with sequence-classification heads (EncoderClassifier) and masked-LM heads
(MaskedLM), written from scratch.

Loads Hugging Face checkpoints (config.json + model.safetensors / pytorch_model.bin) and saves
checkpoints that `transformers` loads back. Numerically the same as transformers'
BertForSequenceClassification and ModernBertForSequenceClassification, BertForMaskedLM and ModernBertForMaskedLM.

Attention runs on one of two layouts, chosen by the inputs to forward():
- padded: input_ids [B, T] with attention_mask [B, T]  -> SDPA with a boolean mask
- packed: input_ids [N] (all sequences concatenated) with cu_seqlens [B+1] -> no FLOPs on padding
With doc_index, the sequences are windows of long documents and forward() returns one prediction per document.
"""
import contextlib
import itertools
import json
import math
import os
import pickle
import stat
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
POOLINGS = ("cls", "mean", "max", "label_attention")
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# -----------------------------------------------------------------------------
# configs: one dataclass per architecture; defaults are the reference's class defaults, used only
# for keys that config.json leaves out


@dataclass
class LabelsConfig:
    num_labels: int = 2
    id2label: dict = None
    problem_type: str = SINGLE_LABEL
    thresholds: list = None  # multi-label decision thresholds, one per label (tuned on validation data)
    long_document: dict = None  # {"strategy", "max_length"[, "stride"]}: see data.TextEncoder; train.py records it
    # how the token vectors become the head's input (POOLINGS); "cls" is the reference's for both architectures.
    # ModernBERT's config.json has this key; for BERT it is ours (transformers ignores it and uses [CLS])
    classifier_pooling: str = "cls"
    multi_label_loss: str = "bce"  # bce | asl (asymmetric_loss); ours, as the pooling options beyond cls/mean
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, written back on save

    @property
    def multi_label(self):
        return self.problem_type == MULTI_LABEL


@dataclass
class BertConfig(LabelsConfig):
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float = None
    position_embedding_type: str = "absolute"


@dataclass
class ModernBertConfig(LabelsConfig):
    vocab_size: int = 50368
    hidden_size: int = 768
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    intermediate_size: int = 1152
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int = 50283
    attention_bias: bool = False
    attention_dropout: float = 0.0
    layer_types: list = None  # "full_attention" / "sliding_attention" per layer
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    local_attention: int = 128  # total window: a token sees |i - j| <= local_attention // 2
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    classifier_dropout: float = 0.0
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    decoder_bias: bool = True  # the MLM decoder's


CONFIGS = {"bert": BertConfig, "modernbert": ModernBertConfig}


def config_from_hf(hf):
    """Our config from a config.json dict. Every option comes from the file when it has it."""
    model_type = hf.get("model_type")
    if model_type not in CONFIGS:
        raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {sorted(CONFIGS)}")
    cls = CONFIGS[model_type]
    known = {f.name for f in fields(cls)} - {"hf", "num_labels", "id2label", "problem_type"}
    kw = {k: v for k, v in hf.items() if k in known}
    if model_type == "modernbert":
        kw.update(_modernbert_layout(hf))
    if model_type == "bert" and hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported (only 'absolute')")
    id2label = {int(k): v for k, v in hf["id2label"].items()} if hf.get("id2label") else None
    num_labels = len(id2label) if id2label else hf.get("num_labels", 2)
    problem_type = hf.get("problem_type") or SINGLE_LABEL
    if problem_type not in (SINGLE_LABEL, MULTI_LABEL):
        raise ValueError(f"problem_type {problem_type!r} is not supported; use {SINGLE_LABEL!r} or {MULTI_LABEL!r}")
    return cls(num_labels=num_labels, id2label=id2label, problem_type=problem_type, hf=dict(hf), **kw)


def _modernbert_layout(hf):
    """Layer types and RoPE thetas, from either the original (answerdotai) or the newer config layout."""
    n = hf.get("num_hidden_layers", 22)
    every = hf.get("global_attn_every_n_layers", 3)
    layer_types = hf.get("layer_types") or ["sliding_attention" if i % every else "full_attention" for i in range(n)]
    rope = hf.get("rope_parameters") or {}
    for params in rope.values():
        if params and params.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {params['rope_type']!r} is not supported (only 'default')")
    if hf.get("rope_scaling"):
        raise ValueError("rope_scaling is not supported")
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    return dict(
        layer_types=list(layer_types),
        global_rope_theta=full.get("rope_theta", hf.get("global_rope_theta", 160000.0)),
        local_rope_theta=local.get("rope_theta", hf.get("local_rope_theta", 10000.0)),
    )


LABEL_KEYS = ("num_labels", "id2label", "label2id", "problem_type", "thresholds", "long_document")


def config_to_hf(config, head="SequenceClassification"):
    """config.json dict: the original file updated with every option we hold. head: the reference class's name after
    the architecture's (BertFor..., ModernBertFor...); a MaskedLM folder has no labels (a classifier sets its own)."""
    hf = dict(config.hf)
    ours = {k: v for k, v in asdict(config).items() if k not in ("hf", "id2label", "thresholds", "long_document")}
    hf.update(ours)
    model_type = "bert" if isinstance(config, BertConfig) else "modernbert"
    hf.update(model_type=model_type, architectures=[("Bert" if model_type == "bert" else "ModernBert") + "For" + head])
    if head == "MaskedLM":
        for key in LABEL_KEYS:
            hf.pop(key, None)
    else:
        id2label = config.id2label or {i: f"LABEL_{i}" for i in range(config.num_labels)}
        hf["id2label"] = {str(i): name for i, name in id2label.items()}
        hf["label2id"] = {name: i for i, name in id2label.items()}
        for key in ("thresholds", "long_document"):
            if getattr(config, key) is not None:
                hf[key] = getattr(config, key)
    if model_type == "modernbert":  # written in both layouts so old and new transformers read the same model
        hf.pop("global_attn_every_n_layers", None)
        every = global_every(config.layer_types)
        if every:  # the old layout's only pattern; a list it cannot express is left to layer_types
            hf["global_attn_every_n_layers"] = every
        hf["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": config.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta},
        }
    return hf


def global_every(layer_types):
    """n where layer i is global exactly when i % n == 0 (global_attn_every_n_layers, the pattern of the
    original config layout); None for a list that follows no such n."""
    for n in range(1, len(layer_types) + 1):
        if all((kind == "full_attention") == (i % n == 0) for i, kind in enumerate(layer_types)):
            return n
    return None


# -----------------------------------------------------------------------------
# smaller students: a checkpoint loaded with fewer of its encoder layers (--num-layers)


def student_layers(num_layers, keep):
    """The layers a student of `keep` layers takes: every s-th from the first, s = num_layers // keep. Half the
    layers: every other one, as DistilBERT was initialised; more than half: the first `keep`. Layer 0 is always
    kept (ModernBERT's first layer is the one without an attention norm), and a constant step keeps ModernBERT's
    pattern regular: layer i*s of "global every n" is global when i is a multiple of n / gcd(n, s)."""
    step = num_layers // keep
    return [i * step for i in range(keep)]


def keep_layers(config, hf_state, keep):
    """config and checkpoint tensors (normalised names) of the student with `keep` of the encoder's layers
    (student_layers), renumbered 0..keep-1. Each layer keeps its attention type (ModernBERT: global or local,
    with its RoPE base): its weights run as they were trained."""
    if not 1 <= keep <= config.num_hidden_layers:
        raise ValueError(f"cannot keep {keep} layers: the checkpoint has {config.num_hidden_layers}")
    kept = student_layers(config.num_hidden_layers, keep)
    prefix = "bert.encoder.layer." if isinstance(config, BertConfig) else "model.layers."
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, tensor in hf_state.items():
        if not key.startswith(prefix):
            state[key] = tensor
            continue
        index, rest = key[len(prefix):].split(".", 1)
        if int(index) in new_index:
            state[f"{prefix}{new_index[int(index)]}.{rest}"] = tensor
    changes = {"num_hidden_layers": keep}
    if isinstance(config, ModernBertConfig):
        changes["layer_types"] = [config.layer_types[i] for i in kept]
    return replace(config, **changes), state


# -----------------------------------------------------------------------------
# attention: the one place that knows about the two input layouts


@dataclass
class AttentionLayout:
    """Everything attention needs besides q, k, v. Built once per forward, shared by all layers."""
    mask: torch.Tensor = None        # padded: [B, 1, T, T] or [B, 1, 1, T] bool, True = may attend
    local_mask: torch.Tensor = None  # padded: the same with ModernBERT's sliding window applied
    cu_seqlens: torch.Tensor = None  # packed: [B+1] int32 sequence starts in the flat token axis
    max_seqlen: int = 0
    pad_index: tuple = None          # packed off the flash path: each token's (row, position) in a padded copy


def padded_layout(attention_mask, window=None):
    keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]: padding is masked as a key only
    if window is None:
        return AttentionLayout(mask=keys)
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device)
    near = (pos[:, None] - pos[None, :]).abs() <= window
    # a pad query far from any real token would see no key at all (NaN); let it see itself
    local = (keys & near) | torch.eye(T, dtype=torch.bool, device=pos.device)
    return AttentionLayout(mask=keys, local_mask=local)


def packed_layout(cu_seqlens, max_seqlen, n_tokens, window, weight_dtype):
    """Packed inputs' layout. Where flash runs (flash_runs, for the dtype attention will compute in) the kernel
    needs cu_seqlens only. Elsewhere attention runs on a padded copy of q, k, v, with that copy's masks and
    pad_index, while the layers' matmuls stay packed: none is spent on padding either way."""
    device = cu_seqlens.device
    autocast_on = device.type == "cuda" and torch.is_autocast_enabled("cuda")
    layout = AttentionLayout(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if flash_runs(device, torch.get_autocast_dtype("cuda") if autocast_on else weight_dtype):
        return layout
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=n_tokens)
    position = torch.arange(n_tokens, device=device) - cu_seqlens[:-1].long()[seq_id]
    padded = padded_layout(torch.arange(max_seqlen, device=device) < lengths[:, None], window)
    layout.mask, layout.local_mask, layout.pad_index = padded.mask, padded.local_mask, (seq_id, position)
    return layout


def padded_attention(q, k, v, layout, window, dropout):
    """Packed attention off the flash path: q, k, v [1, H, N, D] copied into a padded [B, H, T, D] (at the
    places pad_index names; zeros elsewhere), SDPA with the padded masks, the real tokens taken back. It costs
    what padded attention costs, where a dense [N, N] mask would grow with the whole batch's tokens squared."""
    batch, longest = layout.mask.shape[0], layout.max_seqlen
    heads, n, dim = q.shape[1:]

    def pad(t):
        padded = t.new_zeros(batch, longest, heads, dim)
        padded[layout.pad_index] = t.squeeze(0).transpose(0, 1)  # in place: no copy of the zeros
        return padded.transpose(1, 2)

    mask = layout.mask if window is None else layout.local_mask
    y = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, dropout_p=dropout)
    return y.transpose(1, 2)[layout.pad_index].transpose(0, 1)[None]  # [N, H, D] -> [1, H, N, D]


def packed_mask(cu_seqlens, window=None):
    """Dense block-diagonal mask [1, 1, N, N] for a packed batch: the self-check's reference."""
    n = int(cu_seqlens[-1])
    seq_id = torch.searchsorted(cu_seqlens[1:], torch.arange(n, device=cu_seqlens.device), right=True)
    allowed = seq_id[:, None] == seq_id[None, :]
    if window is not None:
        pos = torch.arange(n, device=cu_seqlens.device)
        allowed &= (pos[:, None] - pos[None, :]).abs() <= window
    return allowed[None, None]  # [1, 1, N, N]


def attend(q, k, v, layout, window, dropout):
    """q, k, v: padded [B, H, T, D] or packed [1, H, N, D]; window: None (global) or the half-width."""
    if layout.cu_seqlens is None:
        mask = layout.mask if window is None else layout.local_mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    if layout.pad_index is None:  # packed_layout found the flash kernel runs here
        return flash_varlen(q, k, v, layout, window, dropout)
    return padded_attention(q, k, v, layout, window, dropout)


# -----------------------------------------------------------------------------
# packed attention on a GPU: torch's flash varlen kernel, checked once per process before it is trusted.
# The CPU tests run all of this: they make flash_runs true and put a reference in varlen_kernel's place.


def flash_runs(device, dtype):
    """Whether packed attention goes to varlen_kernel: torch has flash kernels for CUDA fp16/bf16 only.
    Elsewhere it runs on a padded copy (padded_attention)."""
    return torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def flash_varlen(q, k, v, layout, window, dropout):
    """Packed attention through varlen_kernel: [1, H, N, D] in and out, [N, H, D] views for the kernel."""
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (q, k, v))  # squeeze: a view both ways, [0] copies in backward
    y = varlen_kernel(q, k, v, layout.cu_seqlens, layout.max_seqlen, window, dropout)
    return y.transpose(0, 1)[None]


def varlen_kernel(q, k, v, cu_seqlens, max_seqlen, window, dropout):
    """The one call into torch's flash kernels. q, k, v [N, H, D] (fp16/bf16, CUDA) hold the sequences one
    after another; cu_seqlens (int32 [B+1]) are their starts, max_seqlen the longest. Query i attends to the
    keys j of its own sequence, only those with |i - j| <= window unless window is None (flash's window is
    inclusive on both sides, like ModernBERT's), with scores scaled by 1/sqrt(D) and dropout on the weights.
    Returns [N, H, D]. Written against torch 2.13: flash_check() runs it before the first packed batch, so
    a torch that changed these calls costs a warning and padded batches, not a wrong model."""
    if dropout == 0:
        # the public API, for ModernBERT (no attention dropout) and all inference. Its window_size replaced
        # is_causal in January 2026 (pytorch#172238, #172245): an older torch fails the self-check
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                           window_size=(-1, -1) if window is None else (window, window))
    # BERT trains with attention dropout (0.1), which varlen_attn lacks: the private aten op, as of torch
    # 2.13 (its window keywords are recent). Autograd knows its backward, which replays the forward's dropout
    # mask from the rng state the op returns.
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout, False, False,
        window_size_left=window, window_size_right=window)[0]  # window None = global


CHECK_LENGTHS = (1, 7, 40, 16)  # a single token; 40 > the window's 2 * 8 + 1 keys; 64 tokens = CHECK_HEAD_DIM
CHECK_WINDOW = 8
CHECK_HEAD_DIM = 64  # the dropout check reads the weights off an identity v: head_dim = tokens
CHECK_TOLERANCE = 2e-2  # largest error / largest reference value: bf16 rounds at 2^-8; a wrong mask is far off
CHECK_DROPOUT = 0.5


def flash_check(device, dtype):
    """Run the packed attention the model runs (flash_varlen) on a small random case, against SDPA with the
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
    layout = AttentionLayout(cu_seqlens=cu, max_seqlen=max(CHECK_LENGTHS))
    return g, layout, packed_mask(cu, window)


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
    y = flash_varlen(*(t.transpose(1, 2) for t in qkv.unbind(2)), layout, window, dropout)  # as SelfAttention
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
    weights = flash_varlen(q, k, v, layout, window, p)
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


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused qkv; optional RoPE and sliding window (ModernBERT)."""

    def __init__(self, hidden, heads, bias, dropout, window=None):
        super().__init__()
        assert hidden % heads == 0, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        self.heads, self.dropout, self.window = heads, dropout, window
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)

    def forward(self, x, layout, rope=None):
        *lead, hidden = x.shape
        if len(lead) == 1:  # packed: one long "batch" of N tokens
            x = x[None]
        B, T, _ = x.shape
        # unbind the qkv axis in place: backward stacks the gradients straight into the matmul's layout
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(B, T, 3, self.heads, hidden // self.heads).unbind(2))
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        dropout = self.dropout if self.training else 0.0
        y = attend(q, k, v, layout, self.window, dropout)
        return y.transpose(1, 2).reshape(*lead, hidden)


def rope_cos_sin(position_ids, head_dim, theta):
    """cos, sin [.., T, D] for positions [.., T]; float32 like the reference, whatever the model dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos()[..., None, :, :], angles.sin()[..., None, :, :]  # broadcast over heads


def apply_rope(q, k, cos, sin):
    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return (x.float() * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)
    return rotate(q), rotate(k)


def run_layer(layer, checkpointing, *args):
    """One encoder layer. Activation checkpointing keeps only the layer's input and recomputes the rest in
    backward: memory for long sequences grows with one layer's activations instead of all of them."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


# -----------------------------------------------------------------------------
# BERT: post-LN, learned absolute positions, token types, pooler


class BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attn = SelfAttention(c.hidden_size, c.num_attention_heads, True, c.attention_probs_dropout_prob)
        self.attn_out = nn.Linear(c.hidden_size, c.hidden_size)
        self.attn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.up = nn.Linear(c.hidden_size, c.intermediate_size)
        self.down = nn.Linear(c.intermediate_size, c.hidden_size)
        self.mlp_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.act = ACTIVATIONS[c.hidden_act]
        self.drop = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x, layout, rope=None):
        x = self.attn_norm(x + self.drop(self.attn_out(self.attn(x, layout))))
        return self.mlp_norm(x + self.drop(self.down(self.act(self.up(x)))))


class BertEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.word = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))
        self.grad_checkpointing = False

    def forward(self, input_ids, layout, position_ids, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)
        x = self.drop(self.embed_norm(x))
        for layer in self.layers:
            x = run_layer(layer, self.grad_checkpointing, x, layout)
        return x


class BertHead(nn.Module):
    """The pooler (dense + tanh) on the [CLS] vector, dropout, then the linear classifier. The pooler was
    pretrained on [CLS] alone (next-sentence prediction), so other poolings skip it; its weights stay in
    the checkpoint all the same."""

    def __init__(self, c):
        super().__init__()
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
        self.use_pooler = c.classifier_pooling == "cls"
        p = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        self.drop = nn.Dropout(p)
        self.classifier = nn.Linear(c.hidden_size, c.num_labels)

    def forward(self, pooled):
        if self.use_pooler:
            pooled = torch.tanh(self.pooler(pooled))
        return classify(self.classifier, self.drop(pooled))


def classify(classifier, pooled):
    """Logits from pooled [B, H] (one vector per text), or [B, L, H] (label_attention: one vector per label,
    each scored by its own row of the classifier)."""
    if pooled.dim() == 2:
        return classifier(pooled)
    return (pooled * classifier.weight).sum(-1) + classifier.bias


# -----------------------------------------------------------------------------
# ModernBERT: pre-LN, RoPE, alternating global / sliding-window attention, GeGLU, no biases by default


class ModernBertLayer(nn.Module):
    def __init__(self, c, index):
        super().__init__()
        self.local = c.layer_types[index] == "sliding_attention"
        window = c.local_attention // 2 if self.local else None
        norm = lambda: nn.LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)
        # the embedding norm already normalises the first layer's input
        self.attn_norm = norm() if index > 0 else nn.Identity()
        self.attn = SelfAttention(c.hidden_size, c.num_attention_heads, c.attention_bias, c.attention_dropout, window)
        self.attn_out = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias)
        self.attn_drop = nn.Dropout(c.attention_dropout)
        self.mlp_norm = norm()
        self.wi = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        self.wo = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = ACTIVATIONS[c.hidden_activation]
        self.mlp_drop = nn.Dropout(c.mlp_dropout)

    def forward(self, x, layout, rope):
        x = x + self.attn_drop(self.attn_out(self.attn(self.attn_norm(x), layout, rope)))
        h, gate = self.wi(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.wo(self.mlp_drop(self.act(h) * gate))


class ModernBertEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.word = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)
        self.drop = nn.Dropout(c.embedding_dropout)
        self.layers = nn.ModuleList(ModernBertLayer(c, i) for i in range(c.num_hidden_layers))
        self.final_norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)
        self.grad_checkpointing = False

    def forward(self, input_ids, layout, position_ids, token_type_ids=None):
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads
        rope_global = rope_cos_sin(position_ids, head_dim, c.global_rope_theta)
        rope_local = rope_cos_sin(position_ids, head_dim, c.local_rope_theta)
        x = self.drop(self.embed_norm(self.word(input_ids)))
        for layer in self.layers:
            x = run_layer(layer, self.grad_checkpointing, x, layout, rope_local if layer.local else rope_global)
        return self.final_norm(x)


class ModernBertHead(nn.Module):
    """dense -> activation -> norm on the pooled vector, dropout, then the linear classifier."""

    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size, bias=c.classifier_bias)
        self.act = ACTIVATIONS[c.classifier_activation]
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)
        self.drop = nn.Dropout(c.classifier_dropout)
        self.classifier = nn.Linear(c.hidden_size, c.num_labels)

    def forward(self, pooled):
        return classify(self.classifier, self.drop(self.norm(self.act(self.dense(pooled)))))


# -----------------------------------------------------------------------------
# running the model on a device: precision and input layout (train.py and predict.py alike)


def amp_dtype(device, amp):
    """The dtype autocast computes in: float32 off CUDA or with amp off; fp16 or bf16 when asked for; auto:
    bf16 where the GPU has it natively, else fp16 (which train.py runs with a grad scaler)."""
    if torch.device(device).type != "cuda" or amp == "off":
        return torch.float32
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    # is_bf16_supported() alone also says yes where bf16 is only emulated (V100, T4): slow, and no flash kernel
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device, amp):
    """Autocast to amp_dtype on CUDA; plain fp32 elsewhere or when amp is off."""
    dtype = amp_dtype(device, amp)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cuda", dtype=dtype)


class FlashCheckError(RuntimeError):
    """--pack was asked for and the flash kernel failed its self-check."""


_flash_checks = {}  # (device, dtype) -> flash_check's answer: the self-check runs once per process


def use_packing(device, amp, pack=None):
    """Packed batches (True), padded ones (False), or None: make_batch decides per batch, packing those with
    much padding. pack None: packed where the flash kernel runs them (CUDA under autocast) and passed its
    self-check (flash_check, the first time); a failed check prints one warning and padded batches (SDPA) go
    on. Off the flash path (CPU, amp off) None: there packed attention runs on a padded copy
    (padded_attention), whose copies pay only where a batch has much padding. pack True: packed; a failed
    self-check is an error. False: padded."""
    dtype = amp_dtype(device, amp)
    if pack is False or not flash_runs(device, dtype):
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


# -----------------------------------------------------------------------------
# the classifier: encoder + pooling + head + loss; loading and saving


def asymmetric_loss(logits, targets, gamma_neg=4.0, gamma_pos=0.0, margin=0.05):
    """Asymmetric loss (Ridnik et al., ICCV 2021), averaged like BCE over texts and labels. A label's negatives
    far outnumber its positives: easy negatives (probability below `margin`) count nothing, the rest are
    down-weighted by p^gamma_neg; positives keep BCE's log p (gamma_pos 0). gamma_neg = margin = 0 is BCE."""
    p = torch.sigmoid(logits)
    positive = F.logsigmoid(logits) * (1 - p) ** gamma_pos
    shifted = (p - margin).clamp(min=0)
    negative = torch.log1p(-shifted) * shifted ** gamma_neg  # 1 - shifted >= margin > 0, or 1: finite
    return -(targets * positive + (1 - targets) * negative).mean()


def packed_mean(hidden, cu_seqlens):
    """Mean of each packed sequence's token vectors [N, H] -> [B, H]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths,
                                     output_size=hidden.shape[0])  # known size: no host sync
    sums = torch.zeros(len(lengths), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    return sums.index_add_(0, seq_id, hidden) / lengths[:, None].to(hidden.dtype)


def unpack(hidden, cu_seqlens, max_seqlen):
    """Packed token vectors [N, H] -> right-padded [B, max_seqlen, H] and their mask [B, max_seqlen]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths,
                                     output_size=hidden.shape[0])
    position = torch.arange(hidden.shape[0], device=hidden.device) - cu_seqlens[:-1].long()[seq_id]
    padded = hidden.new_zeros(len(lengths), max_seqlen, hidden.shape[-1]).index_put_((seq_id, position), hidden)
    mask = torch.zeros(len(lengths), max_seqlen, dtype=torch.bool, device=hidden.device)
    return padded, mask.index_put_((seq_id, position), torch.ones_like(seq_id, dtype=torch.bool))


def window_aggregation(strategy):
    """windows_max / windows_mean / windows_attention -> "max" / "mean" / "attention"; None for the
    strategies that truncate (one sequence per text)."""
    if not strategy.startswith("windows_"):
        return None
    if strategy not in ("windows_max", "windows_mean", "windows_attention"):
        raise ValueError(f"long-document strategy {strategy!r} is not supported")
    return strategy.removeprefix("windows_")


def segment_reduce(values, doc_index, num_docs, how):
    """Rows of values [W, ...] -> [num_docs, ...]: the max ("max") or mean ("mean") of each document's rows, with a
    segment op (no loop over documents)."""
    out = values.new_zeros(num_docs, *values.shape[1:])
    index = doc_index.view(-1, *[1] * (values.dim() - 1)).expand_as(values)
    return out.scatter_reduce(0, index, values, "amax" if how == "max" else "mean", include_self=False)


class EncoderModel(nn.Module):
    """What the classifier and the masked LM share: the encoder and its two input layouts, the reference's weight
    init, AdamW groups, and Hugging Face folders. Each subclass says which reference class it matches (HEAD), which
    checkpoint weights it leaves behind as that class does (LEFT_BEHIND), which of its own may start afresh when a
    checkpoint lacks them (NEW_WHEN_MISSING; every other weight must be there), and how it reports those."""
    HEAD = ""
    LEFT_BEHIND = ()
    NEW_WHEN_MISSING = ("head.",)
    FRESH_NOTE = ""

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               cu_seqlens=None, max_seqlen=None):
        """Last hidden states: [B, T, H] padded, or [N, H] packed."""
        c = self.config
        window = c.local_attention // 2 if isinstance(c, ModernBertConfig) else None
        if cu_seqlens is not None:
            layout = packed_layout(cu_seqlens, max_seqlen, len(input_ids), window, self.encoder.word.weight.dtype)
            assert position_ids is not None, "packed inputs need position_ids (restarting at 0 per sequence)"
            longest = max_seqlen
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            layout = padded_layout(attention_mask, window)
            longest = input_ids.shape[1]
            if position_ids is None:
                position_ids = torch.arange(longest, device=input_ids.device)[None]
        if longest is not None and longest > c.max_position_embeddings:
            raise ValueError(f"sequence of {longest} tokens is longer than the model's "
                             f"max_position_embeddings ({c.max_position_embeddings}); truncate or split it")
        return self.encoder(input_ids, layout, position_ids, token_type_ids)

    def modernbert_init_std(self, module):
        """ModernBERT's init std of a Linear or Embedding: initializer_range unless a subclass says otherwise."""
        return self.config.initializer_range

    @torch.no_grad()
    def _init_weights(self, module):
        """Fresh weights as the reference initialises them (used for a new head)."""
        c = self.config
        if isinstance(c, BertConfig):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, c.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            std = self.modernbert_init_std(module)
            cut = c.initializer_cutoff_factor * std
            nn.init.trunc_normal_(module.weight, 0.0, std, -cut, cut)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()

    # --- training helpers, as in nanoGPT

    def configure_optimizers(self, weight_decay, learning_rate, head_lr=None, betas=(0.9, 0.999), eps=1e-8,
                             device_type="cpu"):
        """AdamW with decay on matrices and embeddings only: biases and norm weights are not decayed.
        head_lr: the peak lr of everything above the encoder (head, label or window attention), which starts
        from scratch; None = learning_rate."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = []
        for part, lr in (("encoder", learning_rate), ("head", learning_rate if head_lr is None else head_lr)):
            mine = [p for n, p in named if n.startswith("encoder.") == (part == "encoder")]
            groups += [{"params": [p for p in mine if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr},
                       {"params": [p for p in mine if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
        # fused also takes a found_inf flag: train.py skips non-finite steps on the device with it
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, eps=eps,
                                 fused=fused)

    # --- checkpoints: Hugging Face folders (read_config, load_hf_weights, hf_names below)

    @classmethod
    def load(cls, model_dir, config, dtype=None, device=None, verbose=True, num_layers=None):
        """The model of config with a checkpoint folder's weights; weights it lacks (NEW_WHEN_MISSING) are
        initialised fresh and reported. num_layers: a student of that many of the layers (keep_layers)."""
        state = load_state_dict(model_dir)
        if num_layers:
            if verbose and num_layers < config.num_hidden_layers:
                print(f"{model_dir}: a student of {num_layers} of its {config.num_hidden_layers} layers "
                      f"({', '.join(map(str, student_layers(config.num_hidden_layers, num_layers)))})")
            config, state = keep_layers(config, normalise_keys(state, config), num_layers)
        model = cls(config)
        fresh = load_hf_weights(model, state)
        model.fresh_head = bool(fresh)
        if fresh and verbose:
            print(f"{model_dir}: {cls.FRESH_NOTE} ({', '.join(fresh)}); train it before use")
        return model.to(device=device, dtype=dtype)

    def hf_state_dict(self):
        """Our weights under the reference's names (qkv split back into query/key/value for BERT)."""
        ours = self.state_dict()
        out = {}
        for key, sources in hf_names(self.config, ours).items():
            parts = ours[key].chunk(len(sources)) if len(sources) > 1 else [ours[key]]
            for name, part in zip(sources, parts):
                out[name] = part.contiguous()
        return out

    def save_pretrained(self, out_dir):
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config_to_hf(self.config, self.HEAD), f, indent=2, sort_keys=True)
        state = {k: v.detach().cpu() for k, v in self.hf_state_dict().items()}
        weights = os.path.join(out_dir, "model.safetensors")
        save_file(state, weights, metadata={"format": "pt"})
        # safetensors creates the file 0600: give it the mode config.json got from the umask, as the other files have
        os.chmod(weights, stat.S_IMODE(os.stat(os.path.join(out_dir, "config.json")).st_mode))


class EncoderClassifier(EncoderModel):
    HEAD = "SequenceClassification"
    # pretraining heads a classifier leaves behind, as the reference does; and window or label attention weights
    # when the model is loaded with another long-document strategy or pooling
    LEFT_BEHIND = ("cls.", "decoder.", "window_attention.", "label_attention.")
    NEW_WHEN_MISSING = ("head.", "label_attention.")
    FRESH_NOTE = "new classifier head initialised"

    def __init__(self, config):
        super().__init__()
        self.config = config
        bert = isinstance(config, BertConfig)
        self.encoder = BertEncoder(config) if bert else ModernBertEncoder(config)
        self.head = BertHead(config) if bert else ModernBertHead(config)
        self.pooling = config.classifier_pooling
        if self.pooling not in POOLINGS:
            raise ValueError(f"classifier_pooling {self.pooling!r} is not supported; use one of {POOLINGS}")
        if config.multi_label_loss not in ("bce", "asl"):
            raise ValueError(f"multi_label_loss {config.multi_label_loss!r} is not supported; use 'bce' or 'asl'")
        if self.pooling == "label_attention":  # one learned query per label over the tokens
            self.label_attention = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        # windows_max / windows_mean / windows_attention: how a long document's windows make one prediction
        self.aggregation = window_aggregation((config.long_document or {}).get("strategy", "head"))
        if self.aggregation == "attention" and self.pooling == "label_attention":
            raise ValueError("windows_attention weighs one vector per window; label_attention pools one per label: "
                             "use windows_max or windows_mean with it")
        if self.aggregation == "attention":  # one score per window; no bias: a softmax ignores it
            self.window_attention = nn.Linear(config.hidden_size, 1, bias=False)
        self.apply(self._init_weights)
        if self.aggregation == "attention":  # equal weights at first: training starts from the windows' mean
            nn.init.zeros_(self.window_attention.weight)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                position_ids=None, cu_seqlens=None, max_seqlen=None, doc_index=None, num_docs=None):
        """Padded: input_ids [B, T] (+ attention_mask [B, T], right or left padded).
        Packed: input_ids [N] with cu_seqlens [B+1] (position_ids restart at 0 per sequence).
        doc_index [B] int64, sorted: the sequences are windows and this is each one's document; the logits
        (and labels) are then one row per document, aggregated as in aggregate(). num_docs: how many documents
        (make_batch gives it; else len(labels), else doc_index[-1] + 1, which waits for the device).
        Returns (logits [B or documents, num_labels], loss or None)."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen)
        pooled = self.pool(hidden, attention_mask, cu_seqlens, max_seqlen)
        if doc_index is None:
            logits = self.head(pooled)
        else:
            if num_docs is None:
                num_docs = len(labels) if labels is not None else int(doc_index[-1]) + 1
            logits = self.aggregate(pooled, doc_index, num_docs)
        return logits, (None if labels is None else self.loss(logits, labels))

    def embed(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, cu_seqlens=None,
              max_seqlen=None, doc_index=None, num_docs=None, pooling=None):
        """The vector of each text that the head reads (predict.py --embeddings): its pooled token vectors [B, H]
        ([B, L, H] with label_attention); pooling replaces the model's (a bare encoder: "mean"). A long document's
        windows make one vector, as the head reads them: their attention-weighted sum (windows_attention), else
        their mean (windows_mean) or max (windows_max)."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen)
        pooled = self.pool(hidden, attention_mask, cu_seqlens, max_seqlen, pooling)
        if doc_index is None:
            return pooled
        num_docs = int(doc_index[-1]) + 1 if num_docs is None else num_docs
        if self.aggregation == "attention":
            return self.weigh_windows(pooled, doc_index, num_docs)
        return segment_reduce(pooled, doc_index, num_docs, self.aggregation)

    def aggregate(self, pooled, doc_index, num_docs):
        """Window vectors [W, H] -> document logits [num_docs, num_labels], with segment ops (no loop over
        documents). max / mean: of the windows' logits. attention: the head classifies the windows' vectors
        weighed by weigh_windows."""
        if self.aggregation is None:
            raise ValueError("doc_index needs a windows_* strategy in config.long_document")
        if self.aggregation != "attention":
            return segment_reduce(self.head(pooled), doc_index, num_docs, self.aggregation)
        return self.head(self.weigh_windows(pooled, doc_index, num_docs))

    def weigh_windows(self, pooled, doc_index, num_docs):
        """A softmax over each document's windows weighs their vectors: [W, H] -> [num_docs, H]."""
        scores = self.window_attention(pooled).squeeze(-1).float()  # float: a stable softmax under autocast
        top = scores.new_full((num_docs,), -math.inf).scatter_reduce(0, doc_index, scores.detach(), "amax")
        e = (scores - top[doc_index]).exp()
        weights = e / e.new_zeros(num_docs).index_add(0, doc_index, e)[doc_index]
        weighted = weights[:, None].to(pooled.dtype) * pooled
        return pooled.new_zeros(num_docs, pooled.shape[-1]).index_add(0, doc_index, weighted)

    def pool(self, hidden, attention_mask=None, cu_seqlens=None, max_seqlen=None, pooling=None):
        """Token vectors -> [B, H] per text, or [B, L, H] per label (label_attention). pooling: None = the model's."""
        pooling = pooling or self.pooling
        if cu_seqlens is not None:
            if pooling == "cls":
                return hidden[cu_seqlens[:-1].long()]
            if pooling == "mean":
                return packed_mean(hidden, cu_seqlens)
            hidden, attention_mask = unpack(hidden, cu_seqlens, max_seqlen)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = attention_mask.bool()
        if pooling == "cls":  # the first real token: position 0 when right padded, not when left padded
            first = mask.long().argmax(dim=1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
        if pooling == "mean":
            m = mask.to(hidden.dtype)[..., None]
            return (hidden * m).sum(dim=1) / m.sum(dim=1)
        if pooling == "max":
            return hidden.masked_fill(~mask[..., None], -math.inf).amax(dim=1)
        # label_attention: each label's softmax over the text's tokens weighs their vectors
        scores = self.label_attention(hidden).float().masked_fill(~mask[..., None], -math.inf)  # [B, T, L]
        return torch.einsum("btl,bth->blh", scores.softmax(dim=1).to(hidden.dtype), hidden)

    def loss(self, logits, labels):
        if self.config.multi_label and self.config.multi_label_loss == "asl":
            return asymmetric_loss(logits, labels.to(logits.dtype))
        if self.config.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))

    def modernbert_init_std(self, module):
        if module is self.head.classifier:
            return self.config.hidden_size ** -0.5  # the reference's classifier init
        return self.config.initializer_range

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per real token: 6 per weight plus attention scores."""
        c = self.config
        lookups = ("encoder.word.weight", "encoder.position.weight", "encoder.token_type.weight")
        matrix_params = sum(p.numel() for n, p in self.named_parameters() if p.dim() >= 2 and n not in lookups)
        # QK^T and AV, forward + backward, over the keys each query sees on average (a local layer: those
        # in its window; the (n - w - 1)(n - w) pairs further apart than w are not computed)
        keys = c.num_hidden_layers * seq_len
        if isinstance(c, ModernBertConfig):
            local, w = sum(layer.local for layer in self.encoder.layers), c.local_attention // 2
            keys -= local * max(0, seq_len - w - 1) * (seq_len - w) / seq_len
        return 6 * matrix_params + 12 * c.hidden_size * keys

    @classmethod
    def from_pretrained(cls, model_dir, num_labels=None, id2label=None, problem_type=None,
                        dtype=None, device=None, overrides=None, verbose=True, num_layers=None):
        """Load a Hugging Face checkpoint folder. Label options replace the checkpoint's; a classifier
        head that is missing or has another number of labels is initialised fresh and reported.
        num_layers: keep only that many of the encoder's layers (keep_layers); None = all."""
        config = read_config(model_dir, num_labels, id2label, problem_type, overrides)
        return cls.load(model_dir, config, dtype, device, verbose, num_layers)


# -----------------------------------------------------------------------------
# the masked language model (continued pretraining: train.py --task mlm)


class MLMHead(nn.Module):
    """The reference's masked-LM head: dense -> activation -> norm, then the decoder, whose weight is the word
    embedding table (tied), plus a bias per token. BERT: BertForMaskedLM's cls.predictions (activation hidden_act);
    ModernBERT: ModernBertForMaskedLM's head (classifier_activation, classifier_bias) and decoder (decoder_bias)."""

    def __init__(self, c):
        super().__init__()
        bert = isinstance(c, BertConfig)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size, bias=bert or c.classifier_bias)
        self.act = ACTIVATIONS[c.hidden_act if bert else c.classifier_activation]
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps if bert else c.norm_eps, bias=bert or c.norm_bias)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size)) if bert or c.decoder_bias else None

    def forward(self, hidden, word_embeddings):
        return F.linear(self.norm(self.act(self.dense(hidden))), word_embeddings, self.bias)


class MaskedLM(EncoderModel):
    """The encoder with the reference's MLM head: BertForMaskedLM / ModernBertForMaskedLM. A BERT checkpoint's pooler
    (which BertForMaskedLM drops) is kept as it was, frozen, since MLM does not use it, and saved back: a classifier
    fine-tuned from this model then starts from the pooler the checkpoint had, as one fine-tuned from the checkpoint
    does."""
    HEAD = "MaskedLM"
    # a classifier's head, BERT's next-sentence head, and the decoder's copies of tied weights
    LEFT_BEHIND = ("classifier.", "cls.seq_relationship.", "cls.predictions.decoder.", "decoder.weight",
                   "window_attention.", "label_attention.")
    NEW_WHEN_MISSING = ("head.", "pooler.")
    FRESH_NOTE = "MLM head (or pooler) not in the checkpoint, initialised as the reference does"

    def __init__(self, config):
        super().__init__()
        if not config.hf.get("tie_word_embeddings", True):
            raise ValueError("tie_word_embeddings is false: only a decoder tied to the word embeddings is supported")
        self.config = config
        bert = isinstance(config, BertConfig)
        self.encoder = BertEncoder(config) if bert else ModernBertEncoder(config)
        self.head = MLMHead(config)
        if bert:
            self.pooler = nn.Linear(config.hidden_size, config.hidden_size).requires_grad_(False)
        self.apply(self._init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, position_ids=None,
                cu_seqlens=None, max_seqlen=None, masked_index=None):
        """Inputs as EncoderClassifier.forward's. labels, shaped like input_ids: the token to predict at each masked
        position, -100 (the reference's ignore_index) elsewhere.
        Without labels: (logits [B, T, vocab] padded or [N, vocab] packed, None).
        With labels: (logits [M, vocab] of the M masked positions only, in flat order, and the mean cross-entropy
        over them): the decoder, the largest matmul, skips the rest (ModernBERT's sparse_prediction).
        masked_index [M]: the masked positions' indices in the flattened labels (make_mlm_batch gives them; else
        they are found here, which waits for the device)."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen)
        if labels is None:
            return self.head(hidden, self.encoder.word.weight), None
        labels = labels.flatten()
        if masked_index is None:
            masked_index = (labels != -100).nonzero().squeeze(1)
        logits = self.head(hidden.flatten(0, -2).index_select(0, masked_index), self.encoder.word.weight)
        targets = labels.index_select(0, masked_index)
        # sum / count is the reference's mean; a batch with no masked token gives 0 rather than its nan (0 / 0)
        return logits, F.cross_entropy(logits.float(), targets, reduction="sum") / max(len(targets), 1)

    def modernbert_init_std(self, module):
        c = self.config
        if module is self.head.dense:  # the reference's "out" std for the prediction head
            return c.initializer_range / math.sqrt(2.0 * c.num_hidden_layers)
        return c.initializer_range

    @classmethod
    def from_pretrained(cls, model_dir, dtype=None, device=None, overrides=None, verbose=True, num_layers=None):
        """Load a checkpoint folder: an MLM checkpoint, a bare encoder or a classifier (its head left behind). An MLM
        head it lacks (all-MiniLM-L6-v2 has none) is initialised as the reference does, and reported."""
        return cls.load(model_dir, read_config(model_dir, overrides=overrides), dtype, device, verbose, num_layers)


# -----------------------------------------------------------------------------
# Hugging Face weight names


def hf_names(c, model_keys):
    """Our state-dict key -> the reference's key(s); several keys are concatenated along dim 0."""
    if isinstance(c, BertConfig):
        table = {
            "encoder.word.weight": "bert.embeddings.word_embeddings.weight",
            "encoder.position.weight": "bert.embeddings.position_embeddings.weight",
            "encoder.token_type.weight": "bert.embeddings.token_type_embeddings.weight",
            "encoder.embed_norm.*": "bert.embeddings.LayerNorm.*",
            "head.pooler.*": "bert.pooler.dense.*",
            "head.classifier.*": "classifier.*",
            # MaskedLM: BertForMaskedLM's head, and the pooler it carries
            "head.dense.*": "cls.predictions.transform.dense.*",
            "head.norm.*": "cls.predictions.transform.LayerNorm.*",
            "head.bias": "cls.predictions.bias",
            "pooler.*": "bert.pooler.dense.*",
        }
        for i in range(c.num_hidden_layers):
            ours, hf = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
            table.update({
                ours + "attn.qkv.*": [hf + f"attention.self.{p}.*" for p in ("query", "key", "value")],
                ours + "attn_out.*": hf + "attention.output.dense.*",
                ours + "attn_norm.*": hf + "attention.output.LayerNorm.*",
                ours + "up.*": hf + "intermediate.dense.*",
                ours + "down.*": hf + "output.dense.*",
                ours + "mlp_norm.*": hf + "output.LayerNorm.*",
            })
    else:
        table = {
            "encoder.word.weight": "model.embeddings.tok_embeddings.weight",
            "encoder.embed_norm.*": "model.embeddings.norm.*",
            "encoder.final_norm.*": "model.final_norm.*",
            "head.dense.*": "head.dense.*",  # the classifier's head and MaskedLM's alike
            "head.norm.*": "head.norm.*",
            "head.classifier.*": "classifier.*",
            "head.bias": "decoder.bias",  # MaskedLM
        }
        for i in range(c.num_hidden_layers):
            ours, hf = f"encoder.layers.{i}.", f"model.layers.{i}."
            for a, b in [("attn_norm", "attn_norm"), ("attn.qkv", "attn.Wqkv"), ("attn_out", "attn.Wo"),
                         ("mlp_norm", "mlp_norm"), ("wi", "mlp.Wi"), ("wo", "mlp.Wo")]:
                table[ours + a + ".*"] = hf + b + ".*"
    table["window_attention.*"] = "window_attention.*"  # windows_attention only; transformers ignores it
    table["label_attention.*"] = "label_attention.*"  # classifier_pooling label_attention only; likewise
    names = {}  # a pattern without "*" names one tensor
    for pattern, hf in table.items():
        hf = hf if isinstance(hf, list) else [hf]
        for suffix in ("weight", "bias"):
            key = pattern.replace("*", suffix)
            if key in model_keys:
                names[key] = [h.replace("*", suffix) for h in hf]
    return names


def load_hf_weights(model, hf_state):
    """Copy a checkpoint's tensors (Hugging Face names) into model; returns the head weights that were
    initialised fresh instead (none in the checkpoint, or another number of labels: model.NEW_WHEN_MISSING)."""
    ours = model.state_dict()
    names = hf_names(model.config, ours)
    state = normalise_keys(hf_state, model.config)
    missing, fresh, wrong_shape = [], [], []
    for key, sources in names.items():
        if not all(s in state for s in sources):
            if not key.startswith("window_attention."):  # a new one keeps its zeros: the windows' mean
                (fresh if key.startswith(model.NEW_WHEN_MISSING) else missing).append(sources[0])
            continue
        tensor = torch.cat([state[s] for s in sources]) if len(sources) > 1 else state[sources[0]]
        if tensor.shape != ours[key].shape:
            if key.startswith(("head.classifier.", "label_attention.")):  # another number of labels: a new head
                fresh.append(sources[0])
                continue
            wrong_shape.append(f"{sources[0]}: checkpoint {tuple(tensor.shape)}, model {tuple(ours[key].shape)}")
            continue
        ours[key].copy_(tensor)
    used = {s for sources in names.values() for s in sources}
    unexpected = sorted(k for k in state if k not in used and not ignorable(k, model.LEFT_BEHIND))
    problems = []
    if wrong_shape:
        problems.append("weights with the wrong shape (does config.json match the weights?):\n  "
                        + "\n  ".join(wrong_shape))
    if missing:
        problems.append("encoder weights missing from the checkpoint:\n  " + "\n  ".join(missing))
    if unexpected:
        problems.append("weights in the checkpoint that this model does not have:\n  " + "\n  ".join(unexpected))
    if problems:
        raise ValueError("cannot load checkpoint: " + "\n".join(problems))
    return fresh


def normalise_keys(state, c):
    """Accept checkpoints with or without the `bert.`/`model.` prefix and with legacy LayerNorm names."""
    prefix = "bert." if isinstance(c, BertConfig) else "model."
    out = {}
    for key, tensor in state.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        top_level = ("classifier.", "head.", "cls.", "decoder.", "window_attention.", "label_attention.")
        bare = not key.startswith(prefix) and not key.startswith(top_level)
        out[prefix + key if bare else key] = tensor
    return out


def ignorable(key, left_behind):
    """Weights the model leaves behind (its LEFT_BEHIND prefixes), and buffers."""
    return key.startswith(left_behind) or key.endswith("position_ids")


# -----------------------------------------------------------------------------
# checkpoint folders: config.json, the weights, and the tokenizer that goes with them


def read_config(model_dir, num_labels=None, id2label=None, problem_type=None, overrides=None):
    """A checkpoint folder's config.json as our config. Label options replace the checkpoint's; overrides
    set any other field (train.py: dropout, long_document)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {model_dir!r}: not a Hugging Face checkpoint folder")
    with open(path) as f:
        config = config_from_hf(json.load(f))
    if id2label is not None:
        config.id2label = {int(k): v for k, v in id2label.items()}
        config.num_labels = len(config.id2label)
    elif num_labels is not None and num_labels != config.num_labels:
        config.num_labels, config.id2label = num_labels, None
    if problem_type is not None:
        config.problem_type = problem_type
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return config


def load_state_dict(model_dir):
    """All tensors of a checkpoint folder: model.safetensors (single or sharded) or pytorch_model.bin."""
    def load_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except SafetensorError as e:
            raise ValueError(f"{path} is damaged or incomplete ({e}); copy it again") from None

    def load_bin(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path} is damaged, incomplete or not a weights file ({e}); copy it again") from None

    for name, loader in [("model.safetensors", load_safetensors), ("pytorch_model.bin", load_bin)]:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return loader(path)
        index = path + ".index.json"
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(loader(os.path.join(model_dir, shard)))
            return state
    raise FileNotFoundError(f"no weights in {model_dir!r}: expected model.safetensors, "
                            f"model.safetensors.index.json or pytorch_model.bin")


def check_vocab(tokenizer, vocab_size, model_dir):
    """Refuse, once at load, a tokenizer that can emit ids past the model's embedding table: they would
    fail deep inside the forward pass (on CUDA as an opaque device-side assert)."""
    top = max(tokenizer.get_vocab(with_added_tokens=True).values())
    if top >= vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has token ids up to {top} but the model's vocab_size is "
                         f"{vocab_size}; the tokenizer files belong to another model")
