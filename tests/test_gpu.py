"""GPU numerics: the packed bf16 path (flash varlen attention) against the fp32 padded path, which the CPU
tests prove exact against transformers. Skipped without CUDA."""
import pytest
import torch

import model as M
from data import pack_batch, pad_batch

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


def setup(arch):
    torch.manual_seed(0)
    model = M.EncoderClassifier(M.config_from_hf(CONFIGS[arch])).cuda().eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 500, (n,), generator=g).tolist() for n in LENGTHS]
    labels = [0, 1, 2, 3, 4]
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


def test_packed_attention_dropout_is_active_and_replayed_in_backward():
    """BERT trains with attention dropout 0.1 on the packed path too (flash draws the mask). One seed gives
    one mask: the same loss and gradients twice; another seed, another loss. Hidden dropout is off so
    only attention dropout varies."""
    model, _, packed = setup("bert")
    model.train()
    for module in model.modules():
        if isinstance(module, M.SelfAttention):
            module.dropout = 0.1
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0

    def loss_and_grad(seed):
        torch.cuda.manual_seed(seed)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**packed)[1]
        loss.backward()
        return loss.item(), model.encoder.layers[0].attn.qkv.weight.grad.flatten().float()

    loss_a, grad_a = loss_and_grad(0)
    loss_b, grad_b = loss_and_grad(0)
    loss_c, _ = loss_and_grad(1)
    assert loss_a == loss_b and loss_a != loss_c
    assert torch.isfinite(grad_a).all()
    # flash's backward may sum in another order from run to run: equal up to rounding, not bit for bit
    assert torch.nn.functional.cosine_similarity(grad_a, grad_b, dim=0) > 0.9999
