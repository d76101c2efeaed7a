"""BERT and ModernBERT encoders with sequence-classification and masked-LM heads, written from scratch: numerically
the same as transformers' Bert/ModernBert ForSequenceClassification and ForMaskedLM, whose checkpoints they load and
save (configs: side/hf.py; weight names and folders: side/weights.py).

padded_layout / packed_layout -> AttentionLayout   padded: input_ids [B, T] + attention_mask; packed: input_ids [N]
    (the sequences one after another) + cu_seqlens [B+1], no FLOPs on padding
attend   SDPA (padded), flash_varlen -> varlen_kernel (the one call into torch's flash kernels, which
    side/packing.py checks before packed batches use it), or padded_attention (packed, off the flash path)
SelfAttention + RoPE -> BertLayer / BertEncoder / BertHead, ModernBertLayer / ModernBertEncoder / ModernBertHead
amp_dtype / autocast   the precision a device runs in
POOLINGS -> pool_tokens, MULTI_LABEL_LOSSES   one function and one table entry per pooling, per loss
    (a long document's windows -> one row: side/windows.py; a learned mix of all layers, read by the pooling:
    side/layer_mix.py)
EncoderModel   encode (either layout), the reference's init, AdamW groups, load / save_pretrained
EncoderClassifier, MaskedLM   the two heads and their losses; from_pretrained loads a checkpoint folder
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from side.hf import BertConfig, ModernBertConfig
from side.layer_mix import LayerMix
from side.windows import per_document, window_aggregation
from side.weights import brief_name, hf_tensors, load_hf_weights, read_config, read_weights, save_folder

ACTIVATIONS = {
    "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}

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
    # a pad query far from any real token sees no key (NaN): let it see itself (not torch.eye: ORT lacks bool EyeLike)
    local = (keys & near) | (pos[:, None] == pos[None, :])
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


def attend(q, k, v, layout, window, dropout):
    """q, k, v: padded [B, H, T, D] or packed [1, H, N, D]; window: None (global) or the half-width."""
    if layout.cu_seqlens is None:
        mask = layout.mask if window is None else layout.local_mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    if layout.pad_index is None:  # packed_layout found the flash kernel runs here
        return flash_varlen(q, k, v, layout, window, dropout)
    return padded_attention(q, k, v, layout, window, dropout)


# -----------------------------------------------------------------------------
# packed attention on a GPU: torch's flash varlen kernel, checked once per process before it is trusted
# (side/packing.py). The CPU tests run all of this: they make flash_runs true and put a reference in varlen_kernel's
# place.


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
    Returns [N, H, D]. Written against torch 2.13: flash_check() (side/packing.py) runs it before the first packed
    batch, so a torch that changed these calls costs a warning and padded batches, not a wrong model (the calls'
    history: docs/gpu.md)."""
    if dropout == 0:  # the public API, for ModernBERT (no attention dropout) and all inference
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                           window_size=(-1, -1) if window is None else (window, window))
    # BERT trains with attention dropout, which varlen_attn lacks: the private aten op. Autograd knows its
    # backward, which replays the forward's dropout mask from the rng state the op returns.
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout, False, False,
        window_size_left=window, window_size_right=window)[0]  # window None = global


class SelfAttention(nn.Module):
    """Multi-head self-attention; optional RoPE and sliding window (ModernBERT). Query, key and value are three
    matmuls, not one of thrice the width: MKL runs three [M, H] x [H, H] faster than one [M, H] x [H, 3H] on a CPU
    (docs/benchmarks.md)."""

    def __init__(self, hidden, heads, bias, dropout, window=None):
        super().__init__()
        assert hidden % heads == 0, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        self.heads, self.dropout, self.window = heads, dropout, window
        self.query, self.key, self.value = (nn.Linear(hidden, hidden, bias=bias) for _ in range(3))

    def forward(self, x, layout, rope=None):
        *lead, hidden = x.shape
        if len(lead) == 1:  # packed: one long "batch" of N tokens
            x = x[None]
        q, k, v = (project(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for project in (self.query, self.key, self.value))
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        dropout = self.dropout if self.training else 0.0
        y = attend(q, k, v, layout, self.window, dropout)
        return y.transpose(1, 2).reshape(*lead[:-1], y.shape[2], hidden)


def first_token(attention_mask):
    """[B]: each text's first real token, its [CLS] (0 if right padded)."""
    return attention_mask.long().argmax(dim=1)


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
        attended = self.attn_out(self.attn(x, layout))
        x = self.attn_norm(x + self.drop(attended))
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

    def forward(self, input_ids, layout, position_ids, token_type_ids=None, all_states=False):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)
        x = self.drop(self.embed_norm(x))
        states = [x] if all_states else None  # kept only when asked: each holds a whole [.., T, H]
        for layer in self.layers:
            x = run_layer(layer, self.grad_checkpointing, x, layout, None)
            if all_states:
                states.append(x)
        return states if all_states else x


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
        attended = self.attn_out(self.attn(self.attn_norm(x), layout, rope))
        x = x + self.attn_drop(attended)
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

    def forward(self, input_ids, layout, position_ids, token_type_ids=None, all_states=False):
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads
        rope_global = rope_cos_sin(position_ids, head_dim, c.global_rope_theta)
        rope_local = rope_cos_sin(position_ids, head_dim, c.local_rope_theta)
        x = self.drop(self.embed_norm(self.word(input_ids)))
        states = [x] if all_states else None  # kept only when asked: each holds a whole [.., T, H]
        for layer in self.layers:
            x = run_layer(layer, self.grad_checkpointing, x, layout, rope_local if layer.local else rope_global)
            if all_states:
                states.append(x)
        # a pre-LN stream: each state is read through the final norm, as the last one always is
        return [self.final_norm(state) for state in states] if all_states else self.final_norm(x)


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
# running the model on a device: precision (train.py and predict.py alike)


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


# -----------------------------------------------------------------------------
# the classifier: pooling, the shared EncoderModel, then encoder + pooling + head + loss


def asymmetric_loss(logits, targets, gamma_neg=4.0, gamma_pos=0.0, margin=0.05):
    """Asymmetric loss (Ridnik et al., ICCV 2021), averaged like BCE over texts and labels. A label's negatives
    far outnumber its positives: easy negatives (probability below `margin`) count nothing, the rest are
    down-weighted by p^gamma_neg; positives keep BCE's log p (gamma_pos 0). gamma_neg = margin = 0 is BCE."""
    p = torch.sigmoid(logits)
    positive = F.logsigmoid(logits) * (1 - p) ** gamma_pos
    shifted = (p - margin).clamp(min=0)
    negative = torch.log1p(-shifted) * shifted ** gamma_neg  # 1 - shifted >= margin > 0, or 1: finite
    return -(targets * positive + (1 - targets) * negative).mean()


def bce_loss(logits, targets):
    """Binary cross-entropy of each label, averaged over texts and labels."""
    return F.binary_cross_entropy_with_logits(logits, targets)


# multi-label losses: config.json's multi_label_loss, train.py --loss (its -h and checks) and EncoderClassifier.loss
# all read this table; the first is the default. A loss maps (logits [B, L], float multi-hot targets) to the mean
MULTI_LABEL_LOSSES = {"bce": bce_loss, "asl": asymmetric_loss}


def unpack(hidden, cu_seqlens, max_seqlen):
    """Packed token vectors [N, H] -> right-padded [B, max_seqlen, H] and their mask [B, max_seqlen]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_id = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths,
                                     output_size=hidden.shape[0])
    position = torch.arange(hidden.shape[0], device=hidden.device) - cu_seqlens[:-1].long()[seq_id]
    padded = hidden.new_zeros(len(lengths), max_seqlen, hidden.shape[-1]).index_put_((seq_id, position), hidden)
    mask = torch.zeros(len(lengths), max_seqlen, dtype=torch.bool, device=hidden.device)
    return padded, mask.index_put_((seq_id, position), torch.ones_like(seq_id, dtype=torch.bool))


def head_options(c):
    """The classifier's pooling and window aggregation (window_aggregation: how a long document's windows make one
    prediction), refused when config c asks for what this model cannot do."""
    if c.classifier_pooling not in POOLINGS:
        raise ValueError(f"classifier_pooling {c.classifier_pooling!r} is not supported; use one of "
                         f"{tuple(POOLINGS)}")
    if c.multi_label_loss not in MULTI_LABEL_LOSSES:
        raise ValueError(f"multi_label_loss {c.multi_label_loss!r} is not supported; use one of "
                         f"{tuple(MULTI_LABEL_LOSSES)}")
    aggregation = window_aggregation((c.long_document or {}).get("strategy", "head"))
    if aggregation == "attention" and c.classifier_pooling == "label_attention":
        raise ValueError("windows_attention weighs one vector per window; label_attention pools one per label: "
                         "use windows_max or windows_mean with it")
    return c.classifier_pooling, aggregation


def cls_pooling(hidden, mask, label_attention=None):
    """Each text's first real token, its [CLS]: position 0 when right padded, not when left padded."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first_token(mask)]


def mean_pooling(hidden, mask, label_attention=None):
    """The mean of each text's real token vectors."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(dim=1) / m.sum(dim=1)


def max_pooling(hidden, mask, label_attention=None):
    """The largest value of each feature over a text's real tokens."""
    return hidden.masked_fill(~mask[..., None], -math.inf).amax(dim=1)


def label_attention_pooling(hidden, mask, label_attention):
    """[B, L, H]: one vector per label, each label's softmax over the text's tokens weighing their vectors
    (label_attention: the model's Linear of one query per label)."""
    weights = label_weights(label_attention(hidden), mask)
    return torch.einsum("btl,bth->blh", weights.to(hidden.dtype), hidden)


# how token vectors become the head's input: config.json's classifier_pooling, train.py --pooling (its -h and
# checks) and the model all read this table. A pooling maps padded token vectors [B, T, H], their mask [B, T] bool
# and the model's label_attention (or None) to [B, H], or [B, L, H] with one vector per label
POOLINGS = {"cls": cls_pooling, "mean": mean_pooling, "max": max_pooling, "label_attention": label_attention_pooling}


def pool_tokens(hidden, pooling, attention_mask=None, cu_seqlens=None, max_seqlen=None, label_attention=None):
    """Token vectors (padded, or packed with cu_seqlens) -> [B, H] per text, or [B, L, H] per label, by the POOLINGS
    entry named pooling."""
    if cu_seqlens is not None:
        hidden, attention_mask = unpack(hidden, cu_seqlens, max_seqlen)
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    return POOLINGS[pooling](hidden, attention_mask.bool(), label_attention)


def label_weights(scores, mask):
    """Each label's softmax over a text's real tokens: scores [B, T, L] (label_attention's) and mask [B, T] bool
    -> float32 weights [B, T, L] (float: a stable softmax under autocast). side/explain.py shows them as evidence."""
    return scores.float().masked_fill(~mask[..., None], -math.inf).softmax(dim=1)


@torch.no_grad()
def init_weights(module, c, modernbert_std):
    """Fresh weights for module as the reference initialises them, for config c. modernbert_std(module): ModernBERT's
    std of a Linear or Embedding (EncoderModel.modernbert_init_std)."""
    if isinstance(c, BertConfig):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, c.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, (nn.Linear, nn.Embedding)):
        std = modernbert_std(module)
        cut = c.initializer_cutoff_factor * std
        nn.init.trunc_normal_(module.weight, 0.0, std, -cut, cut)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
    if isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        if module.bias is not None:
            module.bias.zero_()


class EncoderModel(nn.Module):
    """What the classifier and the masked LM share: the encoder and its two input layouts, the reference's weight
    init, AdamW groups, and Hugging Face folders. Each subclass says which reference class it matches (HEAD), which
    checkpoint weights it leaves behind as that class does (LEFT_BEHIND), which of its own may start afresh when a
    checkpoint lacks them (NEW_WHEN_MISSING; every other weight must be there), and how it reports those; and which
    weights it leaves behind are said, not silently dropped (SAID_WHEN_LEFT: their prefix and why)."""
    HEAD = ""
    LEFT_BEHIND = ()
    NEW_WHEN_MISSING = ("head.",)
    FRESH_NOTE = ""
    SAID_WHEN_LEFT = {}

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               cu_seqlens=None, max_seqlen=None, all_states=False):
        """Last hidden states: [B, T, H] padded, or [N, H] packed; all_states: a list of the embedding output's and
        every layer's, shaped so, as transformers' hidden_states (ModernBERT's through its final norm: LayerMix)."""
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
        return self.encoder(input_ids, layout, position_ids, token_type_ids, all_states)

    def modernbert_init_std(self, module):
        """ModernBERT's init std of a Linear or Embedding, as the reference's: its "out" std for the projections
        that write into the residual stream and for the head's dense layer, else initializer_range."""
        c = self.config
        outs = [m for layer in self.encoder.layers for m in (layer.attn_out, layer.wo)]
        if any(module is m for m in outs) or module is getattr(self.head, "dense", None):
            return c.initializer_range / math.sqrt(2.0 * c.num_hidden_layers)
        return c.initializer_range

    def _init_weights(self, module):
        """Fresh weights as the reference initialises them (used for a new head): init_weights."""
        init_weights(module, self.config, self.modernbert_init_std)

    # --- training helpers, as in nanoGPT

    def configure_optimizers(self, weight_decay, learning_rate, head_lr=None, betas=(0.9, 0.999), eps=1e-8,
                             device_type="cpu", layer_decay=1.0):
        """AdamW with decay on matrices and embeddings only: biases and norm weights are not decayed.
        head_lr: the peak lr of everything above the encoder (head, label or window attention), which starts
        from scratch; None = learning_rate. layer_decay < 1: each encoder layer's lr is that many times the one
        above's, from learning_rate at the top layer down to the embeddings (layer-wise lr decay)."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        head_lr = learning_rate if head_lr is None else head_lr
        lr_of = {n: learning_rate * layer_decay ** self.layers_above(n) if n.startswith("encoder.") else head_lr
                 for n, _ in named}
        encoder_lrs = sorted({lr for n, lr in lr_of.items() if n.startswith("encoder.")}, reverse=True)
        groups = []
        for in_encoder, lr in [(True, lr) for lr in encoder_lrs] + [(False, head_lr)]:  # the top layer's first
            mine = [p for n, p in named if n.startswith("encoder.") == in_encoder and lr_of[n] == lr]
            groups += [{"params": [p for p in mine if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr},
                       {"params": [p for p in mine if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
        # fused also takes a found_inf flag: train.py skips non-finite steps on the device with it
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, eps=eps,
                                 fused=fused)

    def layers_above(self, name):
        """How many encoder layers lie above the encoder parameter `name`: 0 for the top layer (and ModernBERT's
        final norm), the number of layers for the embeddings."""
        parts = name.split(".")
        if parts[1] == "layers":
            return self.config.num_hidden_layers - 1 - int(parts[2])
        return 0 if parts[1] == "final_norm" else self.config.num_hidden_layers

    def reinit_top_layers(self, count):
        """Give the top `count` encoder layers fresh weights, as the reference initialises a new model: the
        pretraining objective shaped the top layers most, and a classifier may do better relearning them
        (Zhang et al., Revisiting Few-sample BERT Fine-tuning, ICLR 2021)."""
        for layer in self.encoder.layers[len(self.encoder.layers) - count:]:
            layer.apply(self._init_weights)

    # --- checkpoints: Hugging Face folders (read_config, load_hf_weights, hf_names: side/weights.py)

    @classmethod
    def load(cls, model_dir, config, dtype=None, device=None, verbose=True, num_layers=None):
        """The model of config with a checkpoint folder's weights; weights it lacks (NEW_WHEN_MISSING) are
        initialised fresh and reported. num_layers: a student of that many of the layers (keep_layers)."""
        config, state = read_weights(model_dir, config, num_layers, verbose)
        model = cls(config)
        fresh, left = load_hf_weights(model, state)
        model.fresh_weights = tuple(fresh)  # the head weights started afresh (empty: all from the checkpoint)
        if fresh and verbose:  # a fact of the run, said once: which model, and which of its weights start afresh
            print(f"model: {brief_name(model_dir)} with {cls.FRESH_NOTE} ({', '.join(fresh)})")
        for prefix, why in cls.SAID_WHEN_LEFT.items():
            dropped = [k for k in left if k.startswith(prefix)]
            if dropped and verbose:
                print(f"model: {brief_name(model_dir)}'s {', '.join(dropped)} left behind: {why}")
        return model.to(device=device, dtype=dtype)

    def hf_state_dict(self):
        """Our weights under the reference's names (ModernBERT's query, key and value fused back into Wqkv)."""
        return hf_tensors(self.config, self.state_dict())

    def save_pretrained(self, out_dir):
        """A Hugging Face checkpoint folder that transformers loads back (config.json, model.safetensors)."""
        save_folder(out_dir, self.config, self.HEAD, self.state_dict())


class EncoderClassifier(EncoderModel):
    HEAD = "SequenceClassification"
    # pretraining heads a classifier leaves behind, as the reference does; and window or label attention weights
    # when the model is loaded with another long-document strategy or pooling, or a layer mix without one (said)
    LEFT_BEHIND = ("cls.", "decoder.", "window_attention.", "label_attention.", "layer_mix.")
    NEW_WHEN_MISSING = ("head.", "label_attention.", "layer_mix.")
    FRESH_NOTE = "a new classifier head initialised for this run"
    SAID_WHEN_LEFT = {"layer_mix.": "this model has no layer mix (train.py --layer-mix keeps it)",
                      "label_attention.": "this model pools otherwise (--pooling label_attention keeps it)",
                      "window_attention.": "this model reads windows otherwise (--long-docs windows_attention)"}

    def __init__(self, config):
        super().__init__()
        self.config = config
        bert = isinstance(config, BertConfig)
        self.encoder = BertEncoder(config) if bert else ModernBertEncoder(config)
        self.head = BertHead(config) if bert else ModernBertHead(config)
        self.pooling, self.aggregation = head_options(config)
        if self.pooling == "label_attention":  # one learned query per label over the tokens
            self.label_attention = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        if self.aggregation == "attention":  # one score per window; no bias: a softmax ignores it
            self.window_attention = nn.Linear(config.hidden_size, 1, bias=False)
        if config.layer_mix:  # the embedding output and each layer's
            self.layer_mix = LayerMix(config.num_hidden_layers + 1)
        self.apply(self._init_weights)
        if self.aggregation == "attention":  # equal weights at first: training starts from the windows' mean
            nn.init.zeros_(self.window_attention.weight)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                position_ids=None, cu_seqlens=None, max_seqlen=None, doc_index=None, num_docs=None):
        """Padded: input_ids [B, T] (+ attention_mask [B, T], right or left padded). Packed: input_ids [N] with
        cu_seqlens [B+1] (position_ids restart at 0 per sequence). doc_index [B] int64, sorted: the sequences are
        windows and this is each one's document; the logits (and labels) are then one row per document (per_document).
        num_docs: from make_batch, else len(labels), else doc_index[-1] + 1 (waits). Returns (logits, loss or None)."""
        pooled = self.pool(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen)
        if doc_index is None:
            logits = self.head(pooled)
        elif self.aggregation is None:
            raise ValueError("doc_index needs a windows_* strategy in config.long_document")
        else:
            num_docs = len(labels) if num_docs is None and labels is not None else num_docs
            window_attention = getattr(self, "window_attention", None)
            logits = per_document(pooled, doc_index, num_docs, self.aggregation, window_attention, self.head)
        return logits, (None if labels is None else self.loss(logits, labels))

    def embed(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, cu_seqlens=None,
              max_seqlen=None, doc_index=None, num_docs=None, pooling=None):
        """The vector of each text that the head reads (predict.py --embeddings): its pooled token vectors [B, H]
        ([B, L, H] with label_attention); pooling replaces the model's (a bare encoder: "mean"). A long document's
        windows make one vector, as the head reads them: their attention-weighted sum (windows_attention), else
        their mean (windows_mean) or max (windows_max)."""
        pooled = self.pool(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen, pooling)
        if doc_index is None:
            return pooled
        return per_document(pooled, doc_index, num_docs, self.aggregation, getattr(self, "window_attention", None))

    def pool(self, input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen, pooling=None):
        """encode (then LayerMix), pool_tokens: [B, H] per text, or [B, L, H] per label. pooling: None = the model's."""
        pooling = pooling or self.pooling
        mix = getattr(self, "layer_mix", None)
        hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen,
                             all_states=mix is not None)
        if mix is not None:
            hidden = mix(hidden)
        return pool_tokens(hidden, pooling, attention_mask, cu_seqlens, max_seqlen,
                           getattr(self, "label_attention", None))

    def loss(self, logits, labels):
        if self.config.multi_label:
            return MULTI_LABEL_LOSSES[self.config.multi_label_loss](logits, labels.to(logits.dtype))
        return F.cross_entropy(logits.view(-1, self.config.num_labels), labels.view(-1))

    def modernbert_init_std(self, module):
        if module is self.head.classifier:
            return self.config.hidden_size ** -0.5  # the reference's classifier init
        return super().modernbert_init_std(module)

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
                   "window_attention.", "label_attention.", "layer_mix.")
    NEW_WHEN_MISSING = ("head.", "pooler.")
    FRESH_NOTE = "its MLM head (or pooler) initialised as the reference does: the checkpoint has none"

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

    @classmethod
    def from_pretrained(cls, model_dir, dtype=None, device=None, overrides=None, verbose=True, num_layers=None):
        """Load a checkpoint folder: an MLM checkpoint, a bare encoder or a classifier (its head left behind). An MLM
        head it lacks (all-MiniLM-L6-v2 has none) is initialised as the reference does, and reported."""
        return cls.load(model_dir, read_config(model_dir, overrides=overrides), dtype, device, verbose, num_layers)
