"""Retrieval over a large pool: exact flat (fp32) vs flat with fp16 storage vs IVF-PQ.

A clustered synthetic pool (--n vectors of --dim, default 1M x 768, as M-BEIR-scale pools per shard) and
queries near pool vectors. For each index kind of unimm.eval.index.EmbeddingIndex: index memory, build time,
queries/s (top-10) and recall@10 against the exact flat result. Prints one JSON line with ratios vs flat.

    python experiments/benchmarks/bench_retrieval.py [--n 1000000] [--dim 768] [--queries 1000]
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from unimm.eval.index import EmbeddingIndex


def clustered(n: int, dim: int, seed: int = 0, centres: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # in chunks: bounded temporary memory
        m = min(100_000, n - start)
        out[start : start + m] = means[rng.integers(0, centres, m)] + 0.5 * rng.standard_normal((m, dim), dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--pq-m", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=32)
    args = parser.parse_args()
    pool = clustered(args.n, args.dim)
    rng = np.random.default_rng(1)
    queries = pool[rng.choice(args.n, args.queries, replace=False)] + 0.05 * rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    results, exact = {}, None
    for kind in ("flat", "flat_fp16", "ivf_pq"):
        start = time.perf_counter()
        index = EmbeddingIndex(args.dim, kind=kind, nlist=args.nlist, pq_m=args.pq_m, nprobe=args.nprobe, use_gpu=False)
        index.add(pool)
        build = time.perf_counter() - start
        start = time.perf_counter()
        _, found = index.search(queries, 10)
        qps = args.queries / (time.perf_counter() - start)
        if exact is None:
            exact = found
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))
        memory = faiss.serialize_index(index.index).nbytes / 2**20
        results[kind] = {"memory_mib": round(memory, 1), "build_s": round(build, 2), "queries_per_s": round(qps, 1),
                         "recall@10_vs_exact": round(recall, 4)}
        del index
    flat = results["flat"]
    print(json.dumps({
        "benchmark": "retrieval", "pool": args.n, "dim": args.dim, "queries": args.queries, "results": results,
        "ratios_vs_flat": {k: {"memory": round(v["memory_mib"] / flat["memory_mib"], 3),
                               "queries_per_s": round(v["queries_per_s"] / flat["queries_per_s"], 2)}
                           for k, v in results.items() if k != "flat"},
    }))


if __name__ == "__main__":
    main()
