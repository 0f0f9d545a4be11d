"""Leaderboard build time for 1,000 results files and results-browser page size for 1,000 queries x top-10.

    python experiments/benchmarks/bench_leaderboard.py [--files 1000] [--queries 1000] [--k 10]

1. 1,000 results.json files (200 models x 5 benchmarks, 16 result rows each, as M-BEIR writes) in nested run
   folders; the leaderboard build (find files, DuckDB query, Markdown + CSV + HTML) is timed against a baseline
   measured in the same run: reading the same files with ``json.load`` in a Python loop (no layout, no output).
2. A pool of 5,000 candidates (half 64 px images, half captions) and 1,000 queries (half text, half image) as
   shard sets, per-query outputs with top-k; ``write_run_pages`` is timed and the page, the thumbnails and the pool
   are measured on disk (the page must not grow with the pool).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from PIL import Image

from unimm.data.records import Item, make_sample
from unimm.data.shards import ShardSetWriter
from unimm.eval.results_record import write_record
from unimm.leaderboard.browser import write_run_pages
from unimm.leaderboard.gather import build_board
from unimm.leaderboard.render import write_all

FAMILIES = ["uniir", "vlm_embed", "frozen_llm", "vlmo", "cluster_disc"]
BENCHMARKS = [("toy", "local"), ("eval_local", "local"), ("eval_local", "global"), ("mmeb", "local"), ("coco", "local")]


def make_records(root: Path, n_files: int, rng: random.Random) -> None:
    for i in range(n_files):
        model, (bench, pool) = divmod(i, len(BENCHMARKS))[0], BENCHMARKS[i % len(BENCHMARKS)]
        rows = [{"evaluation": f"task{j}", "task": "t2i", "dataset": f"d{j}", "metric": "hit@5",
                 "value": rng.uniform(0, 100), "n_queries": 1000, "reported": True} for j in range(16)]
        write_record(root / f"m{model:04d}" / f"{bench}_{pool}", {
            "schema": "unimm.results/1", "model_family": FAMILIES[model % 5], "experiment": f"exp{model % 37}",
            "checkpoint_sha256": f"{model:064x}", "step": 1000, "benchmark": bench, "pool": pool,
            "headline_metric": "average", "headline_value": sum(r["value"] for r in rows) / 16, "results": rows,
            "date": "2026-12-01T00:00:00+00:00", "run_dir": str(root / f"m{model:04d}"), "hardware": "8 x H100",
            "git_commit": "0" * 40, "config_hash": "1" * 64, "wall_time_s": 100.0})


def baseline_read(root: Path) -> float:
    started = time.perf_counter()
    records = [json.loads(p.read_text()) for p in root.rglob("results.json")]
    assert records
    return time.perf_counter() - started


def make_browser_run(root: Path, n_queries: int, k: int, pool_size: int, rng: random.Random) -> Path:
    pool, queries = root / "data" / "pool", root / "data" / "queries"
    with ShardSetWriter(pool, max_count=1000) as w:
        for i in range(pool_size):
            if i % 2:
                w.write(make_sample(f"c{i:06d}", {"did": f"c{i:06d}"}, cand=Item(text=f"a caption of candidate {i} " * 3)))
            else:
                colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
                w.write(make_sample(f"c{i:06d}", {"did": f"c{i:06d}"}, image_format="jpg",
                                    cand=Item(image=Image.new("RGB", (64, 64), colour))))
    with ShardSetWriter(queries, max_count=1000) as w:
        for q in range(n_queries):
            item = Item(text=f"query number {q} about something") if q % 2 else Item(image=Image.new("RGB", (64, 64), (q % 256, 0, 0)))
            w.write(make_sample(f"q{q:06d}", {"qid": f"q{q:06d}"}, image_format="jpg", query=item))
    run = root / "run"
    (run / "per_query").mkdir(parents=True)
    with open(run / "per_query" / "bench.jsonl", "w") as f:
        for q in range(n_queries):
            ranked = rng.sample(range(pool_size), k)
            pos = f"c{ranked[0]:06d}" if q % 3 else f"c{rng.randrange(pool_size):06d}"
            f.write(json.dumps({"qid": f"q{q:06d}", "dataset": "bench", "task": "t2i" if q % 2 else "i2i",
                                "query_modality": "text" if q % 2 else "image", "positives": [pos],
                                "ranked": [f"c{c:06d}" for c in ranked], "scores": sorted((rng.random() for _ in ranked), reverse=True),
                                "hit": {str(c): pos in [f"c{x:06d}" for x in ranked[:c]] for c in (1, 5, 10)}}) + "\n")
    (run / "per_query" / "manifest.json").write_text(json.dumps({"evaluations": {"bench": {
        "benchmark": "bench", "protocol": "pool", "queries": str(queries), "pool": str(pool), "trec": None,
        "jsonl": "bench.jsonl", "k": k, "metric": "hit@5", "value": 0.0}}}))
    return run


def size(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--pool", type=int, default=5000)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_records(tmp / "outputs", args.files, rng)
        base = baseline_read(tmp / "outputs")
        started = time.perf_counter()
        board = build_board([tmp / "outputs"])
        gathered = time.perf_counter() - started
        paths = write_all(board, tmp / "board")
        total = time.perf_counter() - started
        print(f"leaderboard: {board.n_files} results files, {sum(r.kind == 'measured' for r in board.rows)} runs x "
              f"{len(board.columns)} columns: gather (DuckDB) {gathered:.2f} s, build incl. md/csv/html {total:.2f} s; "
              f"baseline json.load loop {base:.2f} s (ratio {total / base:.1f}x); "
              f"html {paths['html'].stat().st_size / 1e3:.0f} kB")

        run = make_browser_run(tmp / "browser", args.queries, args.k, args.pool, rng)
        started = time.perf_counter()
        _, page = write_run_pages(run, k=args.k)
        built = time.perf_counter() - started
        thumbs = list((run / "browser" / "thumbs").glob("*.jpg"))
        pool_bytes = size((tmp / "browser" / "data" / "pool").glob("*.tar"))
        print(f"browser: {args.queries} queries x top-{args.k} over a {args.pool}-candidate pool: page "
              f"{page.stat().st_size / 1e6:.2f} MB, {len(thumbs)} thumbnails {size(thumbs) / 1e6:.2f} MB "
              f"(pool shards {pool_bytes / 1e6:.2f} MB), built in {built:.1f} s")


if __name__ == "__main__":
    main()
