"""Contrastive loss memory across ranks: local loss + gather-with-grad (unimm.losses.InfoNCE) vs the full
global logit matrix on every rank (VLM2Vec style: all-gather without grad, own slot put back, loss x world).

2 CPU processes (gloo), global batch 4096, D=512. Each variant runs in fresh processes; peak resident memory
growth of the step (forward + backward) is read from the OS. Prints one JSON line with the ratio.

    python experiments/benchmarks/bench_contrastive_memory.py [--global-batch 4096] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from unimm.losses import InfoNCE


def global_matrix_loss(q: torch.Tensor, c: torch.Tensor, temperature: float) -> torch.Tensor:
    """The baseline: every rank builds the [B_global, B_global] logits."""
    rank, world = dist.get_rank(), dist.get_world_size()
    qs, cs = [torch.empty_like(q) for _ in range(world)], [torch.empty_like(c) for _ in range(world)]
    dist.all_gather(qs, q.detach())
    dist.all_gather(cs, c.detach())
    qs[rank], cs[rank] = q, c
    q_all, c_all = torch.cat(qs), torch.cat(cs)
    logits = q_all @ c_all.T / temperature
    return F.cross_entropy(logits, torch.arange(len(q_all))) * world


def worker(rank: int, world: int, port: int, variant: str, batch: int, dim: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    q = F.normalize(torch.randn(batch // world, dim, generator=gen), dim=-1).requires_grad_()
    c = F.normalize(torch.randn(batch // world, dim, generator=gen), dim=-1).requires_grad_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "local":
        loss = InfoNCE(temperature=0.02, symmetric=False, gather=True)(q, c).loss
    else:
        loss = global_matrix_loss(q, c, 0.02)
    loss.backward()
    seconds = time.perf_counter() - start
    out[(variant, rank)] = ((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, seconds)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    results = mp.Manager().dict()
    for variant in ("global", "local"):
        mp.spawn(worker, args=(2, _free_port(), variant, args.global_batch, args.dim, results), nprocs=2)
    peak = {v: max(results[(v, r)][0] for r in range(2)) for v in ("global", "local")}
    secs = {v: max(results[(v, r)][1] for r in range(2)) for v in ("global", "local")}
    print(json.dumps({
        "benchmark": "contrastive_memory", "global_batch": args.global_batch, "dim": args.dim, "processes": 2,
        "peak_rss_growth_mib": {k: round(v, 1) for k, v in peak.items()},
        "memory_ratio_local_vs_global": round(peak["local"] / peak["global"], 3),
        "step_seconds": {k: round(v, 3) for k, v in secs.items()},
        "logit_matrix_mib_per_rank": {"global": round(args.global_batch**2 * 4 / 2**20, 1),
                                      "local": round(args.global_batch**2 / 2 * 4 / 2**20, 1)},
    }))


if __name__ == "__main__":
    main()
