"""
Speed and memory of our encoders against the transformers reference, side by side in one process.

    python bench.py                                   # the standard workload below, both models, train + infer
    python bench.py --model bert --mode train --compile
    python bench.py --model modernbert --max-len 2048
    python bench.py --model modernbert --mode train --fixed-len 2048 4096 8192 --grad-checkpointing
    python bench.py --tiny --steps 3                  # a small smoke run that works on a CPU

The workload (so numbers compare between runs and machines): random weights of the base configs
(bert-base 12x768; ModernBERT-base 22x768, intermediate 1152), 24 labels, lengths drawn from a lognormal
with median 300 tokens and sigma 0.7, clipped to [16, max_len]; 32 sequences per training batch, 128 per
inference batch; bf16 autocast on CUDA. Only real (non-pad) tokens are counted. MFU is useful FLOPs
(no padding, ModernBERT's local layers counted over their window) over the bf16 matmul peak measured here.
"""
import argparse
import contextlib
import importlib.util
import time

import numpy as np
import torch

from data import make_batch, pad_batch, to_device
from model import EncoderClassifier, config_from_hf

NUM_LABELS = 24
BASE = {
    "bert": dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                 initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0),
    "modernbert": dict(model_type="modernbert", vocab_size=50368, hidden_size=768, num_hidden_layers=22,
                       num_attention_heads=12, intermediate_size=1152, hidden_activation="gelu",
                       max_position_embeddings=8192, global_attn_every_n_layers=3, local_attention=128,
                       global_rope_theta=160000.0, local_rope_theta=10000.0, attention_bias=False,
                       mlp_bias=False, norm_bias=False, norm_eps=1e-5, classifier_pooling="mean",
                       classifier_activation="gelu", classifier_bias=False, pad_token_id=50283,
                       bos_token_id=50281, eos_token_id=50282, cls_token_id=50281, sep_token_id=50282,
                       initializer_range=0.02, initializer_cutoff_factor=2.0, tie_word_embeddings=True),
}
TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, vocab_size=1000,
            local_attention=16, pad_token_id=0, cls_token_id=1, bos_token_id=1, sep_token_id=2, eos_token_id=2)


def hf_config(name, tiny):
    cfg = dict(BASE[name], num_labels=NUM_LABELS)
    if tiny:
        cfg.update({k: v for k, v in TINY.items() if k in cfg})
    return cfg


def workload(n_batches, batch_size, max_len, vocab, seed, fixed_len=None):
    """Token lists: lognormal lengths (median 300, sigma 0.7) clipped to [16, max_len], or all fixed_len."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        if fixed_len:
            lengths = np.full(batch_size, fixed_len)
        else:
            lengths = np.clip(np.round(rng.lognormal(np.log(300), 0.7, batch_size)), 16, max_len).astype(int)
        seqs = [rng.integers(5, vocab, n).tolist() for n in lengths]
        batches.append((seqs, rng.integers(0, NUM_LABELS, batch_size).tolist()))
    return batches


def measured_peak_flops(device):
    """Dense matmul FLOP/s (bf16 on CUDA, fp32 on CPU): the roof MFU is measured against."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t, reps = time.perf_counter(), 20 if device.type == "cuda" else 3
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def useful_flops(model, lengths, train):
    """Forward (+ backward) FLOPs spent on real tokens only."""
    per_token = np.array([model.flops_per_token(n) for n in lengths])
    return float((per_token * np.array(lengths)).sum()) / (1 if train else 3)


# --- the two implementations behind one interface: batch -> device tensors, and a step


class Ours:
    name = "ours"

    def __init__(self, hf, device, packed, grad_checkpointing):
        self.model = EncoderClassifier(config_from_hf(hf)).to(device)
        self.model.encoder.grad_checkpointing = grad_checkpointing
        self.packed, self.device = packed, device
        self.bert = hf["model_type"] == "bert"
        if packed:
            self.name = "ours (packed)"

    def inputs(self, seqs, labels):
        out = to_device(make_batch(seqs, labels, 0, packed=self.packed), self.device)
        if not self.bert:
            out.pop("token_type_ids")
        return out

    def loss(self, batch):
        return self.model(**batch)[1]

    def logits(self, batch):
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return self.model(**batch)[0]


class Reference:
    name = "transformers (sdpa)"

    def __init__(self, hf, device):
        import transformers
        config = transformers.AutoConfig.for_model(**hf)
        config.problem_type = "single_label_classification"
        self.model = transformers.AutoModelForSequenceClassification.from_config(
            config, attn_implementation="sdpa").to(device)
        self.device = device

    def inputs(self, seqs, labels):
        batch = pad_batch(seqs, labels, 0)
        return {"input_ids": batch["input_ids"].to(self.device),
                "attention_mask": batch["attention_mask"].to(self.device),
                "labels": batch["labels"].to(self.device)}

    def loss(self, batch):
        return self.model(**batch).loss

    def logits(self, batch):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def run(impl, batches, mode, device, steps, warmup, compile_model, counter):
    """Times `steps` steps after `warmup` ones; returns real tokens/s, sequences/s, useful FLOP/s, peak bytes.
    counter: our model of the same config, which counts the FLOPs for either implementation."""
    model = impl.model
    forward = impl.loss if mode == "train" else impl.logits
    if compile_model:
        model.compile(dynamic=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01,
                                      fused=device.type in ("cuda", "cpu"))
    else:
        model.eval()
    inputs = [impl.inputs(seqs, labels) for seqs, labels in batches]
    lengths = [[len(s) for s in seqs] for seqs, _ in batches]

    def step(batch):
        if mode == "train":
            with amp:
                loss = forward(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), amp:
                forward(batch)

    for i in range(warmup):
        step(inputs[i % len(inputs)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    timed = [i % len(inputs) for i in range(warmup, warmup + steps)]
    for i in timed:
        step(inputs[i])
    sync(device)
    seconds = time.perf_counter() - t
    tokens = sum(sum(lengths[i]) for i in timed)
    flops = sum(useful_flops(counter, lengths[i], mode == "train") for i in timed)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    return dict(tokens_per_s=tokens / seconds, seqs_per_s=len(timed) * len(batches[0][0]) / seconds,
                flops_per_s=flops / seconds, peak_bytes=peak)


def compare(name, mode, args, device, peak_flops):
    hf = hf_config(name, args.tiny)
    with torch.device("meta"):  # shapes only: it counts FLOPs
        counter = EncoderClassifier(config_from_hf(hf))
    for fixed_len in args.fixed_len or [None]:
        batch_size = args.batch_size or (32 if mode == "train" else 128)
        if fixed_len:  # long documents: about 16k tokens per batch
            batch_size = args.batch_size or max(1, 16384 // fixed_len)
        max_len = fixed_len or args.max_len
        batches = workload(args.batches, batch_size, max_len, hf["vocab_size"], args.seed, fixed_len)
        impls = [lambda: Ours(hf, device, packed=False, grad_checkpointing=args.grad_checkpointing),
                 lambda: Ours(hf, device, packed=True, grad_checkpointing=args.grad_checkpointing)]
        if not args.no_reference and reference_available():
            impls.append(lambda: Reference(hf, device))
        rows = []
        for make in impls:
            impl = make()
            try:
                result = run(impl, batches, mode, device, args.steps, args.warmup, args.compile, counter)
            except torch.OutOfMemoryError:
                result = None
            rows.append((impl.name, result))
            del impl
            if device.type == "cuda":
                torch.cuda.empty_cache()
        shape = f"fixed {fixed_len}" if fixed_len else f"lognormal, max_len {max_len}"
        print(f"\n{name} {mode}: batch {batch_size}, {shape}{', compiled' if args.compile else ''}")
        report(rows, peak_flops)


def report(rows, peak_flops):
    reference = next((r for n, r in rows if n.startswith("transformers") and r), None)
    print(f"{'implementation':22s} {'tokens/s':>11s} {'seqs/s':>9s} {'MFU':>6s} {'peak GiB':>9s} {'x ref':>6s}")
    for name, r in rows:
        if r is None:
            print(f"{name:22s} out of memory")
            continue
        ratio = f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}" if reference else "-"
        memory = "-" if np.isnan(r["peak_bytes"]) else f"{r['peak_bytes'] / 2 ** 30:.2f}"  # CUDA only
        print(f"{name:22s} {r['tokens_per_s']:11,.0f} {r['seqs_per_s']:9.1f} {r['flops_per_s'] / peak_flops:6.1%} "
              f"{memory:>9s} {ratio:>6s}")


def reference_available():
    if importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: the reference is skipped")
        return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["bert", "modernbert", "both"], default="both")
    p.add_argument("--mode", choices=["train", "infer", "both"], default="both")
    p.add_argument("--max-len", type=int, default=512, help="longest sequence (64 with --tiny)")
    p.add_argument("--fixed-len", type=int, nargs="*", default=None,
                   help="instead of lognormal lengths, every sequence this long (one run per value)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 train, 128 infer")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--batches", type=int, default=10, help="distinct batches, cycled")
    p.add_argument("--compile", action="store_true", help="torch.compile both implementations")
    p.add_argument("--grad-checkpointing", action="store_true", help="ours only")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--tiny", action="store_true", help="small configs and lengths: a smoke run for CPUs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.max_len = min(args.max_len, 64)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    peak = measured_peak_flops(device)
    print(f"device {device}: measured matmul peak {peak / 1e12:.3g} TFLOP/s")
    for name in (["bert", "modernbert"] if args.model == "both" else [args.model]):
        for mode in (["train", "infer"] if args.mode == "both" else [args.mode]):
            compare(name, mode, args, device, peak)


if __name__ == "__main__":
    main()
