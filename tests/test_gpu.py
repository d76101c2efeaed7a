"""GPU numerics: the packed bf16 path (flash varlen attention) against the fp32 padded path, which the CPU
tests prove exact against transformers. Skipped without CUDA."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import model as M
import train
from data import make_batch, pack_batch, pad_batch, to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LENGTHS = (300, 37, 5, 130, 64)  # longer and shorter than ModernBERT's window below
CONFIGS = {
    "bert": dict(model_type="bert", vocab_size=500, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=256, max_position_embeddings=512, num_labels=5),
    "modernbert": dict(model_type="modernbert", vocab_size=500, hidden_size=128, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=192, max_position_embeddings=1024,
                       global_attn_every_n_layers=2, local_attention=32, classifier_pooling="mean",
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                       num_labels=5),
}


def random_texts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in LENGTHS], [0, 1, 2, 3, 4]


def setup(arch):
    torch.manual_seed(0)
    model = M.EncoderClassifier(M.config_from_hf(CONFIGS[arch])).cuda().eval()
    seqs, labels = random_texts()
    padded = {k: v.cuda() for k, v in pad_batch(seqs, labels, 0).items()}
    packed = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in pack_batch(seqs, labels).items()}
    if arch == "modernbert":
        padded.pop("token_type_ids"), packed.pop("token_type_ids")
    return model, padded, packed


def no_dense_mask(*args):
    raise AssertionError("the packed bf16 path built a dense mask instead of using varlen attention")


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_packed_bf16_matches_fp32_padded(arch, monkeypatch):
    model, padded, packed = setup(arch)
    with torch.no_grad():
        reference, _ = model(**padded)
        monkeypatch.setattr(M, "packed_mask", no_dense_mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(**packed)
    scale = reference.abs().max().item()
    torch.testing.assert_close(logits.float(), reference, atol=2e-2 * max(scale, 1.0), rtol=2e-2)


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_packed_bf16_gradients_follow_fp32(arch, monkeypatch):
    model, padded, packed = setup(arch)
    model.train()
    for module in model.modules():  # compare deterministic passes
        if isinstance(module, M.SelfAttention):
            module.dropout = 0.0
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model(**padded)[1].backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr(M, "packed_mask", no_dense_mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**packed)[1]
    loss.backward()
    for name, grad in reference.items():
        got = dict(model.named_parameters())[name].grad
        if grad.norm() < 1e-6:
            continue
        cosine = torch.nn.functional.cosine_similarity(got.flatten().float(), grad.flatten(), dim=0)
        assert cosine > 0.99, f"{name}: cosine {cosine:.4f} between bf16 packed and fp32 padded gradients"


def test_packed_attention_dropout_follows_the_seed():
    """BERT trains with attention dropout 0.1 on the packed path too (flash draws the mask). One seed gives
    one mask: the same loss twice; another seed, another loss. Hidden dropout is off so only attention
    dropout varies."""
    model, _, packed = setup("bert")
    model.train()
    for module in model.modules():
        if isinstance(module, M.SelfAttention):
            module.dropout = 0.1
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0

    def loss(seed):
        torch.cuda.manual_seed(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(**packed)[1].item()

    assert loss(0) == loss(0) != loss(1)


def check_dropout_replay(attention, window, device="cuda", lengths=(40, 24), heads=2, p=0.5):
    """Attention's dropout mask, read off its output, must be the one its backward uses. With k = 0 every
    score is equal, and v is the identity (head_dim = tokens), so y[i, j] is query i's weight on key j
    after dropout: A[i, j]. Then y = A v, and the gradient of sum(y * g) with respect to v is A^T g: a
    backward that drew another mask, or forgot the window, gives another gradient."""
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    n = int(cu[-1])
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    allowed = seq[:, None] == seq[None, :]
    if window is not None:
        pos = torch.arange(n, device=device)
        allowed &= (pos[:, None] - pos[None, :]).abs() <= window
    q = torch.randn(1, heads, n, n, device=device, dtype=torch.bfloat16)
    v = torch.eye(n, device=device, dtype=q.dtype).expand(1, heads, n, n).clone().requires_grad_()
    layout = M.AttentionLayout(cu_seqlens=cu, max_seqlen=max(lengths))
    y = attention(q, torch.zeros_like(q), v, layout, window, p)
    weights = y[0].float()  # [H, N, N]: A, per head
    assert (weights[:, ~allowed] == 0).all(), "attention reached a key outside its sequence or window"
    kept = weights > 0
    dropped = 1 - kept.sum() / (allowed.sum() * heads)
    assert abs(dropped - p) < 0.1, f"{dropped:.2f} of the weights dropped, dropout_p {p}"
    kept_weight = 1 / (allowed.sum(1) * (1 - p))  # uniform over the row's keys, scaled by 1 / (1 - p)
    torch.testing.assert_close(weights, kept_weight[:, None] * kept, rtol=1e-2, atol=0)
    g = torch.randn(y.shape, device=device)
    (y.float() * g).sum().backward()
    want = torch.einsum("hij,hid->hjd", weights, g[0])
    error = (v.grad[0].float() - want).norm() / want.norm()
    assert error < 0.02, f"the gradient does not follow the forward's dropout mask (relative error {error:.3f})"


@pytest.mark.parametrize("window", [None, 8])
def test_flash_replays_its_dropout_mask_in_backward(window):
    torch.manual_seed(0)
    check_dropout_replay(M.flash_varlen, window)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_training_step_never_waits_for_the_gpu(arch, packed):
    """train.py's step between two log lines: the batch moved to the GPU, forward and backward under bf16,
    clipping, fused AdamW (which skips a non-finite step on the device) and the bad-step count. None of it
    may make the host wait for the GPU: with sync debug mode "error", torch raises at any call that does."""
    model, _, _ = setup(arch)
    model.train()
    optimizer = model.configure_optimizers(0.01, 1e-4, device_type="cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train.linear_schedule(2, 10))
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16: no loss scaling
    counts = torch.zeros(3, dtype=torch.long, device="cuda")
    batch = make_batch(*random_texts(), pad_id=0, packed=packed)
    if arch == "modernbert":
        batch.pop("token_type_ids")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(**to_device(batch, "cuda"))
        loss.backward()
        _, bad = train.optimizer_step(model, optimizer, scheduler, scaler, clip=1.0)
        train.count_bad_step(counts, bad)

    step()  # the first step creates the optimizer state and the kernels' handles
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counts.tolist() == [0, 0, 0]
