"""GPU numerics: the packed bf16 path (flash varlen attention) against the fp32 padded path, which the CPU
tests prove exact against transformers (tests/test_packed.py runs this path on the CPU, a reference in the
kernel's place). Skipped without CUDA."""
import pytest
import torch

import bench
import model as M
from side.hf import config_from_hf
from side.packing import flash_check
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
    model = M.EncoderClassifier(config_from_hf(CONFIGS[arch])).cuda().eval()
    seqs, labels = random_texts()
    padded = {k: v.cuda() for k, v in pad_batch(seqs, labels, 0).items()}
    packed = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in pack_batch(seqs, labels).items()}
    if arch == "modernbert":
        padded.pop("token_type_ids"), packed.pop("token_type_ids")
    return model, padded, packed


def test_acceptance_check_passes():
    """python bench.py --check: the flash kernel passes its self-check, batches are packed, and packed and
    padded training steps under autocast agree with fp32 padded ones, both architectures."""
    assert bench.check(torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_passes_its_self_check(dtype):
    """Global and windowed, forward and backward, through varlen_attn and (with dropout: its mask replayed
    in backward) the aten op; see side/packing.flash_check."""
    assert flash_check("cuda", dtype) is None


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
