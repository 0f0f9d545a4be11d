"""Cluster assignment throughput on CPU: faiss (chunked IndexFlatIP search) vs naive torch matmul + topk.

The issue's size is 1M x 512 features against 100k centroids (``--n 1000000 --k 100000``: ~5e13 multiply-adds
per method, far past 5 minutes on 2 cores). The default is scaled down (``--n 100000 --k 10000``) so the whole
script finishes in well under 5 minutes on 2 cores; both methods run on the same data in the same run and the
last line printed is one JSON object with the throughputs and their ratio.

    python experiments/benchmarks/bench_cluster_assign.py [--n N] [--k K] [--dim 512] [--top-l 8]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import faiss
import numpy as np
import torch

from unimm.clustering.kmeans import centroid_index, top_l


def naive_torch(features: np.ndarray, centroids: np.ndarray, num: int, chunk: int) -> np.ndarray:
    """The baseline: ``features @ centroids.T`` then ``topk``, chunked only so the score matrix fits in memory."""
    cents = torch.from_numpy(centroids)
    out = []
    for start in range(0, len(features), chunk):
        scores = torch.from_numpy(features[start:start + chunk]) @ cents.T
        out.append(scores.topk(num, dim=1).indices.numpy())
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="features to assign (issue: 1000000)")
    p.add_argument("--k", type=int, default=10_000, help="centroids (issue: 100000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--top-l", type=int, default=8)
    p.add_argument("--chunk", type=int, default=16_384, help="rows per search / matmul chunk")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(args.seed)
    features = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    centroids = rng.standard_normal((args.k, args.dim), dtype=np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)

    started = time.perf_counter()
    ours = top_l(centroid_index(centroids), features, args.top_l, chunk_size=args.chunk)
    faiss_s = time.perf_counter() - started
    started = time.perf_counter()
    naive = naive_torch(features, centroids, args.top_l, args.chunk)
    torch_s = time.perf_counter() - started
    agree = float((ours[:, 0] == naive[:, 0]).mean())  # ties aside, both find the same nearest centre
    print(json.dumps({
        "bench": "cluster_assign", "n": args.n, "k": args.k, "dim": args.dim, "top_l": args.top_l, "threads": threads,
        "faiss_s": round(faiss_s, 3), "torch_s": round(torch_s, 3),
        "faiss_rows_per_s": round(args.n / faiss_s, 1), "torch_rows_per_s": round(args.n / torch_s, 1),
        "speedup_faiss_over_torch": round(torch_s / faiss_s, 3), "top1_agreement": agree,
    }))


if __name__ == "__main__":
    main()
