"""Several processes (torchrun --nproc_per_node N train.py ...): data parallel, one process per GPU.

init_distributed -> rank_and_world   the process group, and where this process stands in it
wrap_for_ranks   DDP (a replica per rank) or FSDP2 (sharded weights) around the model to train
rank_steps / sync_gradients   each rank's share of an optimizer step's batches; all-reduce on the last only
global_mean / gather_logits   losses and evaluation logits over all ranks
"""
import contextlib
import gc
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from side.infer import predict_logits


def init_distributed(device_name):
    """(rank, world_size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; one process needs no group."""
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":  # each process its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main_rank():
    return rank_and_world()[0] == 0  # rank 0 prints and writes files


def is_sharded(fsdp):
    return fsdp and rank_and_world()[1] > 1


def wrap_for_ranks(model, fsdp, device):
    """The module to train: the model alone; DDP (a replica per rank, gradients averaged in backward);
    or with --fsdp, FSDP2 (weights, gradients and optimizer state sharded; each layer's weights are
    gathered just for its forward and backward), for models that do not fit on one GPU."""
    if not dist.is_initialized():
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.encoder.layers:
            fully_shard(layer)
        return fully_shard(model)  # shards in place: `model` is now the FSDP module too
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def rank_steps(order, grad_accum, rank, world, skip_steps=0):
    """This rank's batches of each step of an epoch, as lists of (rows, weight). A step takes the next
    grad_accum * world batches of the epoch's order (the same on every rank; the last step may be short)
    and rank r takes every world-th from the r-th, so with the gradients averaged over ranks a step is the
    one a single process makes with grad_accum * world. A rank left with no batch in a short last step
    re-runs the step's first one with weight 0: all ranks must run backward equally often or DDP's
    all-reduce hangs. skip_steps: steps of this epoch already done (--resume)."""
    size = grad_accum * world
    for start in range(skip_steps * size, len(order), size):
        yield [(rows, 1.0) for rows in order[start:start + size][rank::world]] or [(order[start], 0.0)]


def sync_gradients(model, last):
    """DDP all-reduces the gradients in every backward; only the last batch of a step needs it."""
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


def global_mean(sums):
    """[sum of losses, batches] on this rank (a device tensor) -> the mean loss over all ranks' batches."""
    sums = sums.clone()
    if dist.is_initialized():
        dist.all_reduce(sums)
    total, count = sums.tolist()
    return total / max(count, 1)


def all_reduce(tensor):
    """Sum a tensor over all ranks, in place (nothing to do in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def rank_rows(n):
    """Rows this rank scores in an evaluation: r, r + world, ... up to a multiple of world (indices >= n are
    stand-ins that the caller fills with a row that counts for nothing), so all ranks run the same batches
    (FSDP needs that)."""
    rank, world = rank_and_world()
    return np.arange(rank, math.ceil(n / world) * world, world)


def gather_logits(model, seqs, pad_id, batch_size, amp, packed):
    """predict_logits over all ranks, every row exactly once (rank_rows: the stand-ins are copies of row 0,
    dropped when each rank's logits are put back at their row indices)."""
    world = rank_and_world()[1]
    if world == 1:
        return predict_logits(model, seqs, pad_id, batch_size, amp, packed)
    n = len(seqs)
    logits = predict_logits(model, [seqs[i if i < n else 0] for i in rank_rows(n)], pad_id, batch_size, amp, packed)
    device = next(model.parameters()).device
    parts = [torch.empty(len(rank_rows(n)), logits.shape[1], device=device) for _ in range(world)]
    dist.all_gather(parts, torch.from_numpy(logits).to(device))
    out = np.empty((n, logits.shape[1]), np.float32)
    for r, part in enumerate(parts):
        rows = np.arange(r, len(part) * world, world)
        keep = rows < n
        out[rows[keep]] = part.cpu().numpy()[keep]
    return out


def leave_group():
    """Close the process group, and free what still holds it. DDP's reducer and FSDP's state keep the group alive
    in reference cycles: left to the interpreter's exit, gloo's threads are torn down too late and abort the
    process ("terminate called without an active exception"), at random. Called again once the model is gone,
    it collects them while the interpreter is whole. A process that never had a group has nothing to collect (a
    collection of a large process takes a while)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        _groups_left.append(True)
    if _groups_left:
        gc.collect()


_groups_left = []  # leave_group closed one: its cycles are collected, now and at the later call


def all_rng_gather(state):
    """Every rank's object (each rank's random generator states) in rank order; a collective."""
    states = [state] * rank_and_world()[1]
    if dist.is_initialized():
        dist.all_gather_object(states, state)
    return states
