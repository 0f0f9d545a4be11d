"""M-BEIR conversion with 2 workers vs 1 worker, and vs `cp -r` of the same corpus (issue 17, item 3).

The corpus is in the M-BEIR layout: a candidate pool JSONL of N image+text candidates (64x64 JPEGs, one file
each, as the data-loader benchmark), a few queries and their qrels. Timed, from a warm page cache, in one run:
``cp -r`` of the corpus folder, ``convert mbeir eval`` with ``--workers 1`` and with ``--workers 2`` (pool +
queries + qrels + benchmark.json). Prints one JSON line with the times, records/s and both ratios; the two
conversions must write the same bytes (checked). The CPU seconds of each (this process + its workers) are
printed too, with the wall time the 2-worker run would take on 2 otherwise idle cores,
max(main, workers / 2, all / 2): on a shared machine the measured wall-clock ratios say more about the
neighbours than about the converter.

    python experiments/benchmarks/bench_convert.py [--n 20000] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("UNIMM_PROGRESS", "0")

from unimm.data.convert import mbeir  # noqa: E402


def make_corpus(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    images = root / "mbeir_images" / "bench"
    images.mkdir(parents=True)
    pool, queries, qrels = [], [], []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        (images / f"{i:07d}.jpg").write_bytes(buf.getvalue())
        pool.append({"did": f"9:{i}", "txt": f"a photo number {i} of something", "modality": "image,text",
                     "img_path": f"mbeir_images/bench/{i:07d}.jpg"})
    for q in range(100):
        queries.append({"qid": f"9:{q}", "query_txt": f"query {q}", "query_img_path": None,
                        "query_modality": "text", "pos_cand_list": [f"9:{q}"], "neg_cand_list": []})
        qrels.append(f"9:{q} 0 9:{q} 1 2\n")
    for rel, rows in (("cand_pool/local/mbeir_bench_cand_pool.jsonl", pool),
                      ("query/test/mbeir_bench_test.jsonl", queries)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "qrels/test").mkdir(parents=True)
    (root / "qrels/test/mbeir_bench_test_qrels.txt").write_text("".join(qrels))


def digest(root: Path) -> str:
    """Hash of the written pools, queries and qrels (benchmark.json names its folder; the report has times)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).parts[0] in ("pools", "queries", "qrels"):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def convert(root: Path, out: Path, workers: int) -> tuple[float, float, float]:
    """(wall s, CPU s of this process, CPU s of the worker processes)."""
    start, main0, children0 = time.perf_counter(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    mbeir.convert_eval("bench", root / "query/test/mbeir_bench_test.jsonl",
                       root / "cand_pool/local/mbeir_bench_cand_pool.jsonl",
                       root / "qrels/test/mbeir_bench_test_qrels.txt", root, out, workers=workers)
    return (time.perf_counter() - start, _cpu(resource.RUSAGE_SELF) - main0,
            _cpu(resource.RUSAGE_CHILDREN) - children0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "M-BEIR"
        make_corpus(corpus, args.n)
        subprocess.run(["cp", "-r", str(corpus), str(tmp / "warm")], check=True)  # warm the page cache
        shutil.rmtree(tmp / "warm")
        start, cp0 = time.perf_counter(), _cpu(resource.RUSAGE_CHILDREN)
        subprocess.run(["cp", "-r", str(corpus), str(tmp / "copy")], check=True)
        copy_s, copy_cpu = time.perf_counter() - start, _cpu(resource.RUSAGE_CHILDREN) - cp0
        one_s, one_main, _ = convert(corpus, tmp / "one", 1)
        many_s, many_main, many_workers = convert(corpus, tmp / "many", args.workers)
        same = digest(tmp / "one") == digest(tmp / "many")
    w = args.workers
    idle_s = max(many_main, many_workers / w, (many_main + many_workers) / len(os.sched_getaffinity(0)))
    print(json.dumps({
        "records": args.n, "cores": len(os.sched_getaffinity(0)), "load_avg_1min": os.getloadavg()[0],
        "cp_r_s": round(copy_s, 2), "convert_1_worker_s": round(one_s, 2), f"convert_{w}_workers_s": round(many_s, 2),
        "records_per_s_1": round(args.n / one_s), f"records_per_s_{w}": round(args.n / many_s),
        f"speedup_{w}_vs_1": round(one_s / many_s, 2), f"convert_{w}_vs_cp_r": round(copy_s / many_s, 2),
        "cpu_s": {"cp_r": round(copy_cpu, 2), "convert_1": round(one_main, 2),
                  f"convert_{w}_main": round(many_main, 2), f"convert_{w}_workers": round(many_workers, 2)},
        f"idle_cores_estimate_{w}_workers_s": round(idle_s, 2),
        f"idle_cores_estimate_speedup_{w}_vs_1": round(one_main / idle_s, 2),
        "same_bytes": same,
    }))
    if not same:
        raise SystemExit("the conversions with 1 and several workers differ")


if __name__ == "__main__":
    main()
