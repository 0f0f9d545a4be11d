"""M-BEIR conversion with 2 workers vs 1 worker, and vs `cp -r` of the same corpus (issue 17, item 3).

The corpus is in the M-BEIR layout: a candidate pool JSONL of N image+text candidates (64x64 JPEGs, one file
each, as the data-loader benchmark; ``--photos 500x375``: real photographs of that size, whose bytes
dominate as in M-BEIR), a few queries and their qrels. Timed, from a warm page cache, in one run:
``cp -r`` of the corpus folder, ``convert mbeir eval`` with ``--workers 1`` and with ``--workers 2`` (pool +
queries + qrels + benchmark.json) at the image verification level ``--verify`` (default ``structure``), and
with ``--workers 2`` at ``decode`` (each image decoded by PIL, the thorough level). Prints one JSON line with
the times, records/s and the ratios; the conversions with 1 and 2 workers must write the same bytes, and the
two levels the same shards (the corpus has no damaged image) (checked). The CPU seconds of each (this process +
its workers) are printed too, with the wall time the 2-worker run would take on 2 otherwise idle cores,
max(main, workers / 2, all / 2): on a shared machine the measured wall-clock ratios say more about the
neighbours than about the converter. ``cp -r`` is timed ``--cp-runs`` times (into fresh folders) and the
ratios use the fastest run: creating 20,000 files took 1.0 to 9.9 s back to back on the development VM.

``--catch-rates`` measures instead what each verification level catches (``unimm.data.image_files``): 200
damaged copies per kind of damage of real photos (scikit-image's astronaut, coffee, chelsea and rocket, at most
512 px, as baseline JPEG, progressive JPEG and PNG), and the time per image of each level.

    python experiments/benchmarks/bench_convert.py [--n 20000] [--workers 2] [--verify structure] [--photos 500x375]
    python experiments/benchmarks/bench_convert.py --catch-rates
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
from unimm.data.image_files import VERIFY_LEVELS, ImageFileError, check_image_bytes  # noqa: E402


def photo_jpegs(width: int, height: int, variants: int = 70) -> list[bytes]:
    """JPEGs (quality 90) of scikit-image's photographs at ``width x height``, each variant a shifted crop."""
    from skimage import data

    photos = [getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "camera")]
    photos = [np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3] for a in photos]
    out = []
    for v in range(variants):
        a = photos[v % len(photos)]
        shift = 4 * (v // len(photos))
        image = Image.fromarray(a[shift:, shift:]).resize((width, height), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_corpus(root: Path, n: int, photo_size: tuple[int, int] | None = None) -> None:
    """``photo_size``: real photographs of that size (a few variants, repeated); None: 64x64 noise JPEGs."""
    rng = np.random.default_rng(0)
    photos = photo_jpegs(*photo_size) if photo_size else None
    images = root / "mbeir_images" / "bench"
    images.mkdir(parents=True)
    pool, queries, qrels = [], [], []
    for i in range(n):
        if photos:
            data = photos[i % len(photos)]
        else:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
        (images / f"{i:07d}.jpg").write_bytes(data)
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


def digest(root: Path, pattern: str = "*") -> str:
    """Hash of the written pools, queries and qrels (benchmark.json names its folder; the report has times);
    ``pattern="*.tar"``: of the shards only (index.json names the verification level)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob(pattern)):
        if p.is_file() and p.relative_to(root).parts[0] in ("pools", "queries", "qrels"):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def convert(root: Path, out: Path, workers: int, verify: str) -> tuple[float, float, float]:
    """(wall s, CPU s of this process, CPU s of the worker processes)."""
    start, main0, children0 = time.perf_counter(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    mbeir.convert_eval("bench", root / "query/test/mbeir_bench_test.jsonl",
                       root / "cand_pool/local/mbeir_bench_cand_pool.jsonl",
                       root / "qrels/test/mbeir_bench_test_qrels.txt", root, out, workers=workers,
                       verify_images=verify)
    return (time.perf_counter() - start, _cpu(resource.RUSAGE_SELF) - main0,
            _cpu(resource.RUSAGE_CHILDREN) - children0)


HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def _damaged(data: bytes, rng: np.random.Generator) -> dict[str, bytes]:
    """One damaged copy of ``data`` per kind of damage."""
    flipped = bytearray(data)
    for i in rng.choice(len(data), max(1, len(data) // 1000), replace=False):  # 0.1% of the bytes
        flipped[i] ^= int(rng.integers(1, 256))
    zeroed = bytearray(data)
    start = int(rng.integers(0, len(data) - 512))
    zeroed[start:start + 512] = bytes(512)
    return {"truncated": data[: int(rng.integers(1, len(data) - 1))], "html_page": HTML, "empty": b"",
            "bytes_flipped_0.1%": bytes(flipped), "block_of_512_zeroed": bytes(zeroed)}


def catch_rates(copies: int = 200) -> dict:
    """What each verification level catches on ``copies`` damaged copies per kind of damage and format."""
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    encodings = {"jpeg_baseline": {"format": "JPEG", "quality": 90},
                 "jpeg_progressive": {"format": "JPEG", "quality": 90, "progressive": True},
                 "png": {"format": "PNG"}}
    rng = np.random.default_rng(0)
    out: dict = {"copies": copies}
    for name, options in encodings.items():
        files = []
        for photo in photos:
            image = Image.fromarray(photo)
            image.thumbnail((512, 512))
            buf = io.BytesIO()
            image.save(buf, **options)
            files.append(buf.getvalue())
        caught: dict[str, dict[str, int]] = {}
        for i in range(copies):
            for damage, data in _damaged(files[i % len(files)], rng).items():
                for verify in VERIFY_LEVELS:
                    try:
                        check_image_bytes(data, verify)
                    except ImageFileError:
                        caught.setdefault(damage, dict.fromkeys(VERIFY_LEVELS, 0))[verify] += 1
                    else:
                        caught.setdefault(damage, dict.fromkeys(VERIFY_LEVELS, 0))
        ms = {}
        for verify in VERIFY_LEVELS:
            start = time.perf_counter()
            for _ in range(25):
                for data in files:
                    check_image_bytes(data, verify)
            ms[verify] = round((time.perf_counter() - start) / (25 * len(files)) * 1e3, 3)
        out[name] = {"caught": caught, "ms_per_image": ms, "mean_bytes": round(np.mean([len(f) for f in files]))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--verify", choices=VERIFY_LEVELS, default="structure",
                        help="image verification level of the 1- and N-worker runs (an N-worker 'decode' run "
                        "is timed as well)")
    parser.add_argument("--catch-rates", action="store_true", help="measure what each verification level catches")
    parser.add_argument("--cp-runs", type=int, default=3, help="cp -r runs; the ratios use the fastest (default 3)")
    parser.add_argument("--photos", metavar="WxH", default=None,
                        help="candidate images: real photographs of this size (e.g. 500x375, about 50 KB each) "
                        "instead of 64x64 noise JPEGs")
    args = parser.parse_args()
    if args.catch_rates:
        print(json.dumps(catch_rates()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "M-BEIR"
        photo_size = tuple(int(v) for v in args.photos.lower().split("x")) if args.photos else None
        make_corpus(corpus, args.n, photo_size)
        corpus_mb = round(sum(f.stat().st_size for f in corpus.rglob("*") if f.is_file()) / 2**20)
        subprocess.run(["cp", "-r", str(corpus), str(tmp / "warm")], check=True)  # warm the page cache
        shutil.rmtree(tmp / "warm")
        copies = []  # (wall s, CPU s) of each cp -r
        for i in range(args.cp_runs):
            start, cp0 = time.perf_counter(), _cpu(resource.RUSAGE_CHILDREN)
            subprocess.run(["cp", "-r", str(corpus), str(tmp / f"copy{i}")], check=True)
            copies.append((time.perf_counter() - start, _cpu(resource.RUSAGE_CHILDREN) - cp0))
            shutil.rmtree(tmp / f"copy{i}")
        copy_s, copy_cpu = min(copies)
        one_s, one_main, _ = convert(corpus, tmp / "one", 1, args.verify)
        many_s, many_main, many_workers = convert(corpus, tmp / "many", args.workers, args.verify)
        same = digest(tmp / "one") == digest(tmp / "many")
        decode_s, decode_main, decode_workers = convert(corpus, tmp / "decode", args.workers, "decode")
        same_shards = digest(tmp / "many", "*.tar") == digest(tmp / "decode", "*.tar")
    w = args.workers
    idle_s = max(many_main, many_workers / w, (many_main + many_workers) / len(os.sched_getaffinity(0)))
    print(json.dumps({
        "records": args.n, "images": args.photos or "64x64 noise",
        "corpus_mb": corpus_mb, "cores": len(os.sched_getaffinity(0)), "load_avg_1min": os.getloadavg()[0],
        "verify_images": args.verify,
        "cp_r_s": round(copy_s, 2), "cp_r_runs_s": [round(c[0], 2) for c in copies], "convert_1_worker_s": round(one_s, 2), f"convert_{w}_workers_s": round(many_s, 2),
        "records_per_s_1": round(args.n / one_s), f"records_per_s_{w}": round(args.n / many_s),
        f"speedup_{w}_vs_1": round(one_s / many_s, 2), f"convert_{w}_vs_cp_r": round(copy_s / many_s, 2),
        f"convert_{w}_workers_decode_s": round(decode_s, 2), f"convert_{w}_decode_vs_cp_r": round(copy_s / decode_s, 2),
        "cpu_s": {"cp_r": round(copy_cpu, 2), "convert_1": round(one_main, 2),
                  f"convert_{w}_main": round(many_main, 2), f"convert_{w}_workers": round(many_workers, 2),
                  f"convert_{w}_decode_main": round(decode_main, 2),
                  f"convert_{w}_decode_workers": round(decode_workers, 2)},
        f"idle_cores_estimate_{w}_workers_s": round(idle_s, 2),
        f"idle_cores_estimate_speedup_{w}_vs_1": round(one_main / idle_s, 2),
        "same_bytes": same, "same_shards_structure_decode": same_shards,
    }))
    if not same:
        raise SystemExit("the conversions with 1 and several workers differ")
    if not same_shards:
        raise SystemExit("the conversions at the two verification levels wrote different shards")


if __name__ == "__main__":
    main()
