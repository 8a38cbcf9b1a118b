"""Across processes: torchrun's environment, its process group, and the few collectives the project
needs. Extraction spreads shards over the ranks; training shards the seen users (each rank holds a
contiguous block of them) and sums V's data gradient and the loss across ranks; the unseen users'
fits stay whole on every rank. One process (no torchrun) is the degenerate case of every function."""
import atexit
import datetime
import os
from dataclasses import replace

import torch
import torch.distributed as dist


def torchrun_env():
    """-> (rank, world_size, local_rank). Only WORLD_SIZE > 1 with MASTER_ADDR set, as torchrun sets them,
    is a multi-process run: a stray RANK (left in a shell, set by a scheduler) must not make a lone
    process skip saving its results or wait forever for peers."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) <= 1 or not os.environ.get("MASTER_ADDR"):
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), int(world), int(os.environ.get("LOCAL_RANK", "0"))


def distributed():
    """-> (rank, world_size, local_rank), joining the torchrun process group if there is one
    (gloo on CPU, NCCL on CUDA)."""
    rank, world, local_rank = torchrun_env()
    if world > 1 and not dist.is_initialized():
        # A long timeout: ranks wait at a barrier until the slowest one has finished its shards.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(hours=12))
        atexit.register(dist.destroy_process_group)
    return rank, world, local_rank


def is_main_process():
    """True unless this process is a torchrun worker of rank > 0: print and save results only when True."""
    return torchrun_env()[0] == 0


def barrier(world, local_rank):
    if world > 1:
        dist.barrier(device_ids=[local_rank] if dist.get_backend() == "nccl" else None)


def all_ranks(ok, world, local_rank):
    """True when `ok` holds on every torchrun rank, so that all of them stop together."""
    if world == 1:
        return ok
    flag = torch.tensor([int(ok)], device=f"cuda:{local_rank}" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def shard_users(pairs, rank, world):
    """The pairs of rank's users out of `world` ranks: a contiguous block of about N / world
    users (the pairs of a user are contiguous), still indexed among all N (W keeps N rows; the
    other ranks' users get no gradient here), marked as a shard so that training sums V's gradient
    across the ranks."""
    lo_hi = torch.tensor([pairs.n_users * rank // world, pairs.n_users * (rank + 1) // world], device=pairs.device)
    start, end = torch.searchsorted(pairs.user, lo_hi.to(pairs.user.dtype)).tolist()
    return replace(pairs.select(slice(start, end)), shard=True)


def shard_seen(sets):
    """Under torchrun (WORLD_SIZE > 1), the seen users' sets sharded across the ranks (joining the
    process group). The unseen users' sets stay whole on every rank: their fits are small, and so
    every rank draws the same shots as one process would."""
    rank, world, _ = distributed()
    if world == 1:
        return sets
    return {name: shard_users(p, rank, world) if name.startswith("seen") else p for name, p in sets.items()}


def sum_over_shards(value, shard):
    """value summed in place over the torchrun ranks when it was computed on one rank's shard."""
    if shard:
        dist.all_reduce(value)
    return value


def shard_span(n, shard):
    """-> (offset, total): where a rank's n pairs start among every rank's, and how many there are
    in all (ranks hold contiguous blocks of the users in rank order); (0, n) for one process."""
    if not shard:
        return 0, n
    counts = torch.zeros(dist.get_world_size(), dtype=torch.int64)
    counts[dist.get_rank()] = n
    dist.all_reduce(counts)
    return int(counts[:dist.get_rank()].sum()), int(counts.sum())


def gather_users(W, pairs):
    """Rows [N, ...] (a tensor or numpy) of which a shard has only its own users' (the others kept
    their start, or are 0/0): every rank gets every user's row, from the rank that holds its pairs."""
    if not pairs.shard:
        return W
    t = torch.as_tensor(W, device=pairs.device)
    own = (pairs.counts() > 0).view(-1, *[1] * (t.dim() - 1))                     # [N, 1]
    t = torch.where(own, t, torch.zeros((), dtype=t.dtype, device=t.device))      # [N, K]: own users only
    dist.all_reduce(t)
    return t if isinstance(W, torch.Tensor) else t.cpu().numpy()
