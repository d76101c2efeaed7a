"""Which chunks of the input a predict.py process labels, and how the processes of a torchrun job meet.

One process labels every chunk. Under torchrun (WORLD_SIZE > 1) the ranks take the chunks in turns, `world` at a
time (rank r the r-th of each step), and rank 0 gathers each step's results over torch.distributed (gloo on CPUs,
nccl on GPUs) and writes them in order: the same file, byte for byte, as one process. With --shard K/N the
processes do not talk: shard K labels the K-th of N runs of consecutive chunks into its own output, so the N
outputs, concatenated in order, are the file one process writes (shard 0 holds the CSV header).
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Plan:
    """Chunks first..stop (stop None: to the end of the file) are labelled; in each step of `world` of them this
    rank takes the rank-th. chunk_rows: input rows per chunk (the last may hold fewer)."""
    chunk_rows: int
    first: int = 0
    stop: int | None = None
    rank: int = 0
    world: int = 1

    def mine(self, index):
        return (index - self.first) % self.world == self.rank

    def step_ends(self, index):
        return (index - self.first) % self.world == self.world - 1


def parse_shard(text):
    """'K/N' -> (K, N) with 0 <= K < N; a ValueError says what is wrong."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text}: write K/N, e.g. 0/4 (shard K of N, counted from 0)") from None
    if not 0 <= k < n:
        raise ValueError(f"--shard {text}: K must be between 0 and N - 1 (shards are counted from 0)")
    return k, n


def shard_chunks(rows, chunk_rows, k, n):
    """(first, stop): shard k's run of consecutive chunks, when the file has `rows` rows and N shards share them."""
    chunks = math.ceil(rows / chunk_rows)
    return k * chunks // n, (k + 1) * chunks // n


def torchrun_world():
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_ranks(device):
    """(rank, world, device) under torchrun: the process group (gloo on the CPU, nccl on GPUs, each rank its own
    GPU); (0, 1, device) for one process. A group that cannot start is a RuntimeError saying why."""
    world = torchrun_world()
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: run one process, or use --shard K/N")
    dist.init_process_group(backend)
    return dist.get_rank(), world, device


def gather_step(payload, rank, world):
    """Every rank's payload of one step, on rank 0 (in rank order); [] elsewhere."""
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    return gathered if rank == 0 else []


def from_first(value, rank, world):
    """Rank 0's value on every rank (where a resumed run starts; an error all ranks must stop on)."""
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def leave_ranks(wait=True):
    """The end of a torchrun process: all ranks meet (wait), then the group is closed."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
