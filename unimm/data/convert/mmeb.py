"""MMEB (VLM2Vec v1): MMEB-eval -> a unimm benchmark folder (one evaluation per dataset); MMEB-train -> shards.

Input (the Hugging Face dataset folder, split ``test``): ``<root>/<Dataset>/*.parquet`` (or ``*.jsonl`` /
``*.json``), one row per query with ``qry_text``, ``qry_img_path``, ``tgt_text`` (list) and ``tgt_img_path``
(list, same length); **index 0 is the positive**, the rest are the row's own negatives (1,000 candidates for VQA,
retrieval and grounding; the label set for classification). Image paths are relative to ``--images`` (the
unzipped ``images.zip``); an empty path means no image. Texts keep MMEB's instructions and the ``<|image_1|>``
token (the VLM collator swaps it per backbone).

Output, per dataset ``D``: pool ``D`` (each distinct (text, image path) of the candidate lists once; ``did`` =
hash of the pair, as VLM2Vec encodes unique pairs), queries ``D`` (meta ``candidates`` = the row's dids in
order, positive first) and qrels (the positive). A row whose query or positive cannot be read is skipped; a
negative whose image is missing is dropped from its row (the row is kept: the score stays comparable only if
there are few; the count is in ``convert_report.json``). ``--strict`` stops at the first problem instead.
Images are checked at the ``--verify-images`` level (:mod:`unimm.data.image_files`).
Each evaluation records the most common modality of its queries and of its pool (``query_modality``,
``cand_modality``): the MMEB evaluator groups datasets by that (query, target) pair, as UniMoCo's table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import Counter
from functools import partial
from pathlib import Path

from unimm.data.benchmark import BenchmarkWriter
from unimm.data.convert.cc3m import REPORT_FILE
from unimm.data.convert.parallel import input_mtime, parallel_map, write_shard_set
from unimm.data.image_files import (
    DEFAULT_VERIFY,
    ImageFileError,
    add_verify_argument,
    check_image,
    check_verify,
)
from unimm.data.records import IMAGE_EXTS, make_sample

# The 36 MMEB datasets by meta-task, in the order of VLM2Vec's table; IND = also in MMEB-train.
META_TASKS: dict[str, tuple[str, ...]] = {
    "classification": ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                       "ImageNet-R", "ObjectNet", "Country211"),
    "vqa": ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
            "TextVQA"),
    "retrieval": ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
                  "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"),
    "grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}
IND = frozenset({"ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA", "DocVQA",
                 "InfographicsVQA", "ChartQA", "Visual7W", "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t",
                 "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA", "MSCOCO"})
META_TASK_OF = {d: task for task, names in META_TASKS.items() for d in names}


class MMEBError(ValueError):
    """A problem in strict mode, naming the file and row."""


EVAL_FIELDS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


def image_format(path: str) -> str:
    """The record extension of an image file (its own: the bytes are stored as they are)."""
    ext = Path(path).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def pair_id(text: str, image_path: str) -> str:
    """Stable id of a (text, image path) pair: the same candidate in two rows is one pool entry."""
    return hashlib.sha1(f"{text}\x00{image_path}".encode()).hexdigest()[:20]


def modality(pairs: list[tuple[str, str]]) -> str:
    """M-BEIR modality string of a set of (text, image path) pairs (the most common one)."""
    kinds = Counter(",".join(k for k, present in (("image", bool(i)), ("text", bool(t))) if present) for t, i in pairs)
    return kinds.most_common(1)[0][0]


def _check(images: str, verify: str, rel: str) -> tuple[bytes | None, ImageFileError | None]:
    """(bytes, None) of a usable image, (None, error) otherwise; ``error.reason`` is ``missing_image``,
    ``bad_image`` or ``unsupported_image_format`` (runs in a conversion worker)."""
    path = os.path.join(images, rel)
    if image_format(rel) not in IMAGE_EXTS:
        return None, ImageFileError("unsupported_image_format", path, f"not one of {', '.join(IMAGE_EXTS)}")
    return check_image(path, verify)


def convert_dataset(name: str, rows: list[dict], images: Path, bench: BenchmarkWriter, strict: bool = False,
                    shard_size: int = 1000, workers: int | None = None, verify_images: str = DEFAULT_VERIFY) -> dict:
    """Write pool, queries and qrels of one MMEB dataset into ``bench``; returns its skip counts.

    Every image the rows name is read and checked first (at level ``verify_images``), in ``workers`` processes
    (default: the cores)."""
    skipped: Counter = Counter()
    paths = sorted({p for row in rows for p in [row["qry_img_path"], *(row["tgt_img_path"] or [])] if p})
    check = partial(_check, str(images), verify_images)
    cache: dict[str, tuple[bytes | None, ImageFileError | None]] = dict(
        zip(paths, parallel_map(check, paths, workers, label=f"{name} images")))

    def image(rel: str, where: str) -> str | None:
        """The reason an image cannot be used, or None."""
        if rel not in cache:
            cache[rel] = check(rel)
        error = cache[rel][1]
        if error and strict:
            raise MMEBError(f"{name} {where}: {error.reason}: {error}")
        return error.reason if error else None

    pool: dict[str, tuple[str, str]] = {}
    queries = []
    for index, row in enumerate(rows):
        texts, paths = list(row["tgt_text"]), list(row["tgt_img_path"])
        if len(texts) != len(paths) or not texts:
            if strict:
                raise MMEBError(f"{name} row {index}: {len(texts)} tgt_text but {len(paths)} tgt_img_path")
            skipped["malformed_row"] += 1
            continue
        query_path = row["qry_img_path"] or ""
        reason = image(query_path, f"row {index} query") if query_path else None
        if reason:
            skipped[f"query_image_{reason}"] += 1
            continue
        candidates = []
        for j, (text, path) in enumerate(zip(texts, paths)):
            text, path = text or "", path or ""
            if path and image(path, f"row {index} candidate {j}"):
                if j == 0:
                    break
                skipped["negative_dropped"] += 1
                continue
            did = pair_id(text, path)
            pool[did] = (text, path)
            candidates.append(did)
        if not candidates:
            skipped["positive_image_unusable"] += 1
            continue
        queries.append((f"{name}_{index:06d}", row["qry_text"] or "", query_path, candidates))

    def item(text: str, path: str) -> tuple[str | None, bytes | None]:
        return text or None, cache[path][0] if path else None

    with bench.pool_writer(name, max_count=shard_size, converter="mmeb") as w:
        for did in sorted(pool):
            text, path = pool[did]
            w.write(make_sample(f"c{did}", {"did": did, "modality": modality([pool[did]]), "dataset": name},
                                image_format=image_format(path) if path else "jpg", cand=item(text, path)))
    with bench.query_writer(name, max_count=shard_size, converter="mmeb") as w:
        for qid, text, path, candidates in queries:
            w.write(make_sample(qid, {"qid": qid, "dataset": name, "task": META_TASK_OF.get(name, "other"),
                                      "candidates": candidates, "pos_cand_list": [candidates[0]]},
                                image_format=image_format(path) if path else "jpg", query=item(text, path)))
    bench.write_qrels(name, [f"{qid} 0 {cands[0]} 1 0" for qid, _, _, cands in queries])
    bench.add_evaluation(name, dataset=name, task=META_TASK_OF.get(name, "other"),
                         query_modality=modality([(t, p) for _, t, p, _ in queries]) if queries else "text",
                         cand_modality=modality(list(pool.values())) if pool else "text", pool=name,
                         ks=(1,), report_k=1)
    return {"rows": len(rows), "kept": len(queries), "skipped": dict(skipped), "verify_images": verify_images}


def convert_mmeb(root: str | Path, images: str | Path, out: str | Path, datasets: list[str] | None = None,
                 strict: bool = False, shard_size: int = 1000, workers: int | None = None,
                 verify_images: str = DEFAULT_VERIFY) -> dict:
    """Convert the dataset folders under ``root`` (default: every folder that holds data files).

    Returns the report also written to ``<out>/convert_report.json``. ``verify_images``: how image files are
    checked (:mod:`unimm.data.image_files`).
    """
    check_verify(verify_images)
    root, images = Path(root), Path(images)
    names = datasets or sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                               and any(f.suffix in (".parquet", ".jsonl", ".json") for f in p.iterdir()))
    bench = BenchmarkWriter(out, name="mmeb")
    report = {}
    for name in names:
        report[name] = convert_dataset(name, read_rows_fields(root / name, EVAL_FIELDS), images, bench, strict,
                                       shard_size, workers, verify_images)
        if name not in META_TASK_OF:
            report[name]["note"] = "not one of the 36 MMEB datasets: reported under meta-task 'other'"
        print(f"[mmeb] {name}: {report[name]}")
    bench.save()
    (Path(out) / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


TRAIN_FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path")


def _build_train(context: tuple[str, str], items: list[tuple], write) -> dict:
    """Write the MMEB-train records of one shard (runs in a conversion worker); returns its counts.
    ``context``: (image folder, verification level)."""
    images, verify = context
    skipped: Counter = Counter()

    def side(text: str | None, path: str | None) -> tuple[str | None, bytes | None] | None:
        if not path:
            return text or None, None
        data, error = _check(images, verify, path)
        if error:
            skipped[f"image_{error.reason}"] += 1
            return None
        return text or None, data

    kept = 0
    for name, index, row in items:
        query, pos = side(row["qry"], row["qry_image_path"]), side(row["pos_text"], row["pos_image_path"])
        if query is None or pos is None:
            continue
        # one sample has one image extension: the query's, else the positive's (the other is re-read by it)
        fmt = image_format(row["qry_image_path"] or row["pos_image_path"] or "x.jpg")
        if query[1] is not None and pos[1] is not None and image_format(row["pos_image_path"]) != fmt:
            skipped["mixed_image_formats"] += 1
            continue
        write(make_sample(f"{name}_{index:07d}", {"dataset": name, "task": META_TASK_OF.get(name)},
                          image_format=fmt, query=query, pos=pos))
        kept += 1
    return {"kept": kept, "skipped": dict(skipped)}


def convert_mmeb_train(root: str | Path, images: str | Path, out: str | Path, datasets: list[str],
                       per_dataset: int | None = None, shard_size: int = 1000, workers: int | None = None,
                       verify_images: str = DEFAULT_VERIFY) -> dict:
    """MMEB-train (``<root>/<Dataset>/*.parquet`` with ``qry``, ``qry_image_path``, ``pos_text``,
    ``pos_image_path``) -> one training shard set (sides ``query`` and ``pos``), datasets interleaved row by row.

    ``per_dataset`` keeps the first N rows of each dataset (VLM2Vec ``num_sample_per_subset``: 100K; UniMoCo:
    50K). Negatives (``neg_text``/``neg_image_path``) are not written: VLM2Vec v1 reads them but never uses them.
    Rows with an unreadable image are skipped and counted in ``<out>/convert_report.json``. ``workers``
    processes read the images and write the shards (default: the cores); the output is the same bytes whatever
    their number and an interrupted run resumes (:mod:`unimm.data.convert.parallel`). ``verify_images``: how
    image files are checked (:mod:`unimm.data.image_files`); part of what identifies the conversion.
    """
    check_verify(verify_images)
    root, images, out = Path(root), Path(images), Path(out)
    tables = {}
    for name in datasets:
        rows = read_rows_fields(root / name, TRAIN_FIELDS)
        tables[name] = rows[:per_dataset] if per_dataset else rows
    items = [(name, index, rows[index]) for index in range(max(len(rows) for rows in tables.values()))
             for name, rows in tables.items() if index < len(rows)]
    files = [f for name in datasets for f in _data_files(root / name)]
    source = f"{root} datasets={','.join(datasets)} per_dataset={per_dataset} verify_images={verify_images} " + (
        " ".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files))
    result = write_shard_set(out, items, partial(_build_train, (str(images), verify_images)), shard_size=shard_size,
                             mtime=input_mtime(*files), source=source, converter="mmeb_train", workers=workers,
                             label=f"mmeb_train {len(datasets)} datasets", total=len(items))
    skipped: Counter = Counter()
    for accounting in result.accounting:
        skipped.update(accounting["skipped"])
    report = {"datasets": {n: len(r) for n, r in tables.items()}, "kept": result.total, "skipped": dict(skipped),
              "resumed_shards": result.resumed_shards, "verify_images": verify_images}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(f"[mmeb_train] {report}")
    return report


def _data_files(dataset_dir: Path) -> list[Path]:
    return sorted(p for p in dataset_dir.iterdir() if p.suffix in (".parquet", ".jsonl", ".json"))


def read_rows_fields(dataset_dir: Path, fields: tuple[str, ...]) -> list[dict]:
    """Rows of one dataset folder restricted to ``fields`` (parquet columns are read selectively)."""
    files = _data_files(dataset_dir)
    if not files:
        raise FileNotFoundError(f"no .parquet/.jsonl/.json file in {dataset_dir}")
    rows: list[dict] = []
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows += pq.read_table(path, columns=list(fields)).to_pylist()
        elif path.suffix == ".jsonl":
            rows += [{f: r.get(f) for f in fields} for r in map(json.loads, path.read_text().splitlines()) if r]
        else:
            rows += [{f: r.get(f) for f in fields} for r in json.loads(path.read_text())]
    return rows


# `all`: the folders of the two HF datasets under --root, as their READMEs unpack them, and what is written
EVAL_DIR, EVAL_IMAGES = "MMEB-eval", "MMEB-eval/eval_images"
TRAIN_DIR, TRAIN_IMAGES = "MMEB-train", "MMEB-train/images"
# MMEB-train's six VQA subsets: E5-V / UniMoCo stage-2 pairs (conf/data/e5v_vqa.yaml)
VQA = ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W")


def convert_all(root: str | Path, out: str | Path, only: list[str] | None = None, per_dataset: int | None = 100000,
                strict: bool = False, shard_size: int = 1000, workers: int | None = None,
                verify_images: str = DEFAULT_VERIFY) -> dict:
    """Prepare MMEB in one command from ``root`` holding ``MMEB-eval/`` (with ``eval_images/``) and
    ``MMEB-train/`` (with ``images/``): ``out/mmeb`` (the 36 evaluations, ``eval=mmeb``), ``out/mmeb_train``
    (the 20 IND training sets, first ``per_dataset`` rows each: VLM2Vec 100000, UniMoCo 50000) and
    ``out/mmeb_vqa`` (the six VQA training sets, every row). ``only``: a subset of ``eval``, ``train``, ``vqa``.
    Every input folder is checked before anything is written. Returns ``{part: report}``.
    """
    root, out = Path(root), Path(out)
    check_verify(verify_images)
    parts = {"eval": (EVAL_DIR, EVAL_IMAGES), "train": (TRAIN_DIR, TRAIN_IMAGES), "vqa": (TRAIN_DIR, TRAIN_IMAGES)}
    wanted = list(only) if only else list(parts)
    unknown = [w for w in wanted if w not in parts]
    if unknown:
        raise ValueError(f"unknown MMEB part(s) {unknown}; valid: {list(parts)}")
    needed = {d for w in wanted for d in parts[w]}
    if "train" in wanted:
        needed |= {f"{TRAIN_DIR}/{name}" for name in sorted(IND)}
    if "vqa" in wanted:
        needed |= {f"{TRAIN_DIR}/{name}" for name in VQA}
    missing = sorted(str(root / d) for d in needed if not (root / d).is_dir())
    if missing:
        raise FileNotFoundError(f"{root} lacks {len(missing)} folder(s) of the MMEB layout (TIGER-Lab/MMEB-eval and "
                                f"MMEB-train with their images unzipped): {missing[:8]}")
    reports = {}
    if "eval" in wanted:
        reports["eval"] = convert_mmeb(root / EVAL_DIR, root / EVAL_IMAGES, out / "mmeb", None, strict, shard_size,
                                       workers, verify_images)
    if "train" in wanted:
        reports["train"] = convert_mmeb_train(root / TRAIN_DIR, root / TRAIN_IMAGES, out / "mmeb_train",
                                              sorted(IND), per_dataset, shard_size, workers, verify_images)
    if "vqa" in wanted:
        reports["vqa"] = convert_mmeb_train(root / TRAIN_DIR, root / TRAIN_IMAGES, out / "mmeb_vqa", list(VQA),
                                            None, shard_size, workers, verify_images)
    return reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unimm.data.convert.mmeb",
                                     description="MMEB (VLM2Vec) -> unimm: eval = benchmark folder, train = shards")
    modes = parser.add_subparsers(dest="mode", required=True)
    evaluation = modes.add_parser("eval", help="MMEB-eval -> benchmark folder (one evaluation per dataset)")
    train = modes.add_parser("train", help="MMEB-train -> one training shard set")
    everything = modes.add_parser(
        "all", help="everything in one command: <out>/mmeb, <out>/mmeb_train, <out>/mmeb_vqa",
        description=f"--root holds {EVAL_DIR}/ (with eval_images/) and {TRAIN_DIR}/ (with images/); writes "
        "<out>/mmeb (eval=mmeb), <out>/mmeb_train (20 IND sets) and <out>/mmeb_vqa (the six VQA sets).")
    everything.add_argument("--root", required=True, help=f"folder with {EVAL_DIR}/ and {TRAIN_DIR}/")
    everything.add_argument("--out", required=True, help="data folder (= ${paths.data_dir})")
    everything.add_argument("--per-dataset", type=int, default=100000,
                            help="MMEB-train rows per IND dataset (VLM2Vec: 100000, the default; UniMoCo: 50000)")
    everything.add_argument("--only", type=lambda t: t.split(","), default=None,
                            help="comma-separated subset of eval,train,vqa")
    everything.add_argument("--strict", action="store_true", help="stop at the first unreadable image or bad row")
    everything.add_argument("--shard-size", type=int, default=1000)
    for sub in (evaluation, train, everything):
        sub.add_argument("--workers", type=int, default=None,
                         help="processes that read the images (default: the cores); the same bytes whatever the number")
        add_verify_argument(sub)
    for sub in (evaluation, train):
        sub.add_argument("--root", required=True, help="folder with one sub-folder of parquet/JSON per dataset")
        sub.add_argument("--images", required=True, help="folder the image paths of the rows are relative to")
        sub.add_argument("--out", required=True)
        sub.add_argument("--shard-size", type=int, default=1000)
    evaluation.add_argument("--datasets", nargs="*", default=None, help="dataset folder names (default: all)")
    evaluation.add_argument("--strict", action="store_true", help="stop at the first unreadable image or bad row")
    train.add_argument("--datasets", nargs="+", default=sorted(IND), help="default: the 20 IND datasets")
    train.add_argument("--per-dataset", type=int, default=None, help="first N rows per dataset (VLM2Vec: 100000)")
    args = parser.parse_args(argv)
    try:
        if args.mode == "all":
            convert_all(args.root, args.out, args.only, args.per_dataset, args.strict, args.shard_size, args.workers,
                        args.verify_images)
        elif args.mode == "eval":
            convert_mmeb(args.root, args.images, args.out, args.datasets, args.strict, args.shard_size, args.workers,
                         args.verify_images)
        else:
            convert_mmeb_train(args.root, args.images, args.out, args.datasets, args.per_dataset, args.shard_size,
                               args.workers, args.verify_images)
    except (MMEBError, FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
