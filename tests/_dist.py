"""Run a function in several CPU processes joined by a gloo process group (for distributed tests).

Usage::

    results = run_distributed(fn, 2, arg1, arg2)   # fn(rank, world_size, arg1, arg2) in each process

``fn`` must be a module-level function (the spawned children import it by name). Its return value
comes back to the parent, one per rank, through ``torch.save`` / ``torch.load(weights_only=True)``,
so return tensors, numbers, strings and containers of them. An exception in any child fails the
parent with the child's traceback (torch.multiprocessing.spawn's ProcessRaisedException).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, timeout_s, fn, args):
    torch.set_num_threads(1)  # the test machine has few cores and runs other tests alongside
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        # A rank stuck in a collective (the peer died) fails after this instead of hanging the suite.
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 60.0) -> list:
    """Spawns ``world_size`` processes running ``fn(rank, world_size, *args)`` in a gloo group.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        # join=True re-raises the first child failure (exception or non-zero exit) in the parent and
        # terminates the other children.
        mp.spawn(
            _worker,
            args=(world_size, free_port(), out_dir, timeout_s, fn, args),
            nprocs=world_size,
            join=True,
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)
        ]
