"""Convert M-BEIR (UniIR) query files, candidate pools and qrels into unimm shards.

Official formats (UniIR, HF dataset card TIGER-Lab/M-BEIR):

    query JSONL   {"qid": "9:1", "query_txt": str|null, "query_img_path": "mbeir_images/..."|null,
                   "query_modality": "text"|"image"|"image,text", "query_src_content": ...,
                   "pos_cand_list": ["9:2", ...], "neg_cand_list": [...]}
    pool JSONL    {"did": "9:2", "txt": str|null, "img_path": str|null, "modality": ..., "src_content": ...}
    qrels         "qid 0 did rel task_id" per line

Image paths are relative to the M-BEIR root. The dataset id is the prefix of a qid/did before ":"; the task is
derived from (query modality, positive candidate modality), as M-BEIR has no task field in its queries.

``train`` writes one record per query: side ``query``, sides ``pos``, ``pos.1`` ... = the positives found in the pool.
``eval`` writes a benchmark (unimm.data.benchmark): the pool, the queries, the qrels and the evaluation entry.
Every skipped line or sample is counted by reason in ``<out>/convert_report.json``; ``strict`` raises instead.
Image files are checked at the ``verify_images`` level (``--verify-images``: ``structure``, the default, or
``decode``; see :mod:`unimm.data.image_files`), recorded in the report and part of what identifies a conversion.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from unimm.data.benchmark import BenchmarkWriter, read_qrels
from unimm.data.convert.parallel import input_mtime, write_shard_set
from unimm.data.image_files import DEFAULT_VERIFY, ImageFileError, check_verify, read_image
from unimm.data.records import make_sample
from unimm.data.shards import TruncatedShard, iter_raw_samples, read_index

DATASETS = {
    0: "VisualNews",
    1: "Fashion200K",
    2: "WebQA",
    3: "EDIS",
    4: "NIGHTS",
    5: "OVEN",
    6: "INFOSEEK",
    7: "FashionIQ",
    8: "CIRR",
    9: "MSCOCO",
}
# (query modality, candidate modality) -> M-BEIR task id; 5 is unused in UniIR's code
TASK_IDS = {
    ("text", "image"): 0,
    ("text", "text"): 1,
    ("text", "image,text"): 2,
    ("image", "text"): 3,
    ("image", "image"): 4,
    ("image,text", "text"): 6,
    ("image,text", "image"): 7,
    ("image,text", "image,text"): 8,
}
_SHORT = {"text": "t", "image": "i", "image,text": "it"}
MAX_EXAMPLES = 5
REPORT_FILE = "convert_report.json"

_console = Console(stderr=True)


class ConversionError(ValueError):
    """Raised in strict mode at the first problem; the message names the file, the line and the qid/did."""


def task_name(query_modality: str, cand_modality: str) -> str:
    """``("image,text", "image") -> "it2i"``."""
    return f"{_SHORT[query_modality]}2{_SHORT[cand_modality]}"


def dataset_id(mbeir_id: str) -> int | None:
    """The M-BEIR dataset id of a qid/did (``"9:1" -> 9``), None when the prefix is not a number."""
    prefix = mbeir_id.partition(":")[0]
    return int(prefix) if prefix.isdigit() else None


def dataset_name(mbeir_id: str) -> str:
    ds = dataset_id(mbeir_id)
    return DATASETS.get(ds, f"dataset{ds}" if ds is not None else "unknown")


def sample_key(mbeir_id: str) -> str:
    """A webdataset key for a qid/did: ``"9:1" -> "mbeir_9_1"`` (no dots, no path separators)."""
    return "mbeir_" + re.sub(r"[^A-Za-z0-9_-]", "_", mbeir_id)


def _clean_text(text: Any) -> str | None:
    # M-BEIR writes null for "no text"; a blank string carries no text either
    return text if isinstance(text, str) and text.strip() else None


def _modality(text: str | None, image: Any) -> str | None:
    if text is not None and image is not None:
        return "image,text"
    return "image" if image is not None else "text" if text is not None else None


class _Part:
    """Accounting for one input file: lines read, samples kept (written or indexed) or skipped, problems by reason."""

    def __init__(self, path: str | os.PathLike, strict: bool):
        self.path = str(path)
        self.strict = strict
        self.lines = self.kept = self.skipped = 0
        self.problems: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.notes: dict[str, Any] = {}

    def problem(self, reason: str, where: str, detail: str = "") -> None:
        message = f"{self.path}:{where}" + (f": {detail}" if detail else "")
        if self.strict:
            raise ConversionError(f"{reason}: {message}")
        self.problems[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(message)

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "lines": self.lines,
            "kept": self.kept,
            "skipped": self.skipped,
            "problems": dict(self.problems),
            "examples": self.examples,
            **self.notes,
        }


def _iter_jsonl(part: _Part, label: str, progress_bar: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for every non-blank line; malformed lines are counted as ``bad_json``.

    ``progress_bar=False`` when the caller draws its own (rich shows one live display at a time)."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    # the switch of unimm.utils.progress.track
    disable = not progress_bar or os.environ.get("UNIMM_PROGRESS", "1") == "0"
    with (
        open(part.path, "rb") as f,
        Progress(*columns, console=_console, transient=True, disable=disable) as progress,
    ):
        task = progress.add_task(label, total=os.fstat(f.fileno()).st_size)
        unreported = 0  # bytes read since the bar last advanced (once per 1 MiB: not a lock per line)
        for lineno, line in enumerate(f, 1):
            unreported += len(line)
            if unreported >= 1 << 20:
                progress.advance(task, unreported)
                unreported = 0
            if not line.strip():
                continue
            part.lines += 1
            try:
                obj = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                obj, detail = None, str(err)
            else:
                detail = f"expected a JSON object, got {type(obj).__name__}"
            if not isinstance(obj, dict):
                part.problem("bad_json", f"{lineno}", detail)
                part.skipped += 1
                continue
            yield lineno, obj


class _Images:
    """The M-BEIR root the image paths are relative to, and the level its files are checked at
    (:mod:`unimm.data.image_files`); picklable, sent to the conversion workers."""

    def __init__(self, root: str | os.PathLike, verify: str):
        self.root, self.verify = os.fspath(root), check_verify(verify)

    def load(self, rel_path: str, part: _Part, where: str) -> tuple[bytes, str] | None:
        """(bytes, ext) of a checked image, JPEG/PNG kept as they are, other formats re-encoded as PNG; None
        (problem counted: ``missing_image`` or ``bad_image``, with the path and what failed) otherwise."""
        try:
            image = read_image(os.path.join(self.root, rel_path), self.verify)
        except ImageFileError as err:
            part.problem(err.reason, where, str(err))
            return None
        if image.format == "JPEG":
            return image.data, "jpg"
        if image.format == "PNG":
            return image.data, "png"
        buf = io.BytesIO()
        image.image.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"


class _Side:
    """One side read from M-BEIR fields: text (None when null or blank) and an image as (bytes, ext)."""

    def __init__(self, text: str | None, image: tuple[bytes, str] | None):
        self.text = _clean_text(text)
        self.image = image

    @property
    def modality(self) -> str | None:
        return _modality(self.text, self.image)

    def fields(self, name: str) -> dict[str, bytes]:
        out = {}
        if self.text is not None:
            out[f"{name}.txt"] = self.text.encode("utf-8")
        if self.image is not None:
            out[f"{name}.{self.image[1]}"] = self.image[0]
        return out


def _read_side(text: Any, img_path: Any, images: _Images, part: _Part, where: str, what: str) -> _Side | None:
    """Build a side; None (problem counted) when its image fails or it has neither text nor image."""
    image = None
    if img_path:
        image = images.load(str(img_path), part, where)
        if image is None:
            return None
    side = _Side(text, image)
    if side.modality is None:
        part.problem(f"empty_{what}", where, "neither text nor image")
        return None
    return side


def _sample(key: str, meta: dict[str, Any], **sides: _Side) -> dict[str, Any]:
    # make_sample gives every image one extension; M-BEIR mixes JPEG and PNG, so image fields are added here
    sample = make_sample(key, meta)
    for name, side in sides.items():
        sample.update(side.fields(name))
    return sample


def _id_field(obj: dict[str, Any], field: str, part: _Part, lineno: int) -> str | None:
    value = obj.get(field)
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not value:
        part.problem("bad_record", f"{lineno}", f"no {field!r} field")
        part.skipped += 1
        return None
    return value


def _read_pool_index(pool: _Part) -> dict[str, tuple[Any, Any]]:
    """did -> (txt, img_path) for every well-formed pool line."""
    candidates: dict[str, tuple[Any, Any]] = {}
    for lineno, obj in _iter_jsonl(pool, f"pool {Path(pool.path).name}"):
        did = _id_field(obj, "did", pool, lineno)
        if did is None:
            continue
        if did in candidates:
            pool.problem("duplicate_did", f"{lineno} did={did}")
            pool.skipped += 1
            continue
        candidates[did] = (obj.get("txt"), obj.get("img_path"))
    return candidates


def _positives(
    pos: list[tuple[str, Any, Any] | tuple[str]], images: _Images, part: _Part, where: str, pos_cand_list: Any
) -> list[tuple[str, _Side]]:
    """Every did of ``pos`` (``pos_cand_list`` in order, repeats once; ``(did, txt, img_path)`` when the did is
    in the pool, ``(did,)`` when not) whose side loads; problems counted."""
    found: list[tuple[str, _Side]] = []
    for entry in pos:
        did = entry[0]
        if len(entry) == 1:
            part.problem("pos_not_in_pool", where, f"positive did={did} is not in the pool")
            continue
        side = _read_side(entry[1], entry[2], images, part, f"{where} did={did}", "candidate")
        if side is not None:
            found.append((did, side))
    if not found:
        part.problem("no_usable_positive", where, f"pos_cand_list={pos_cand_list}")
    return found


def _part_accounting(part: _Part, **extra: Any) -> dict[str, Any]:
    """What a worker sends back for one shard (merged by :func:`_merge_accounting` in shard order)."""
    return {"kept": part.kept, "skipped": part.skipped, "problems": dict(part.problems),
            "examples": part.examples, **extra}


def _merge_accounting(part: _Part, accounting: dict[str, Any]) -> None:
    part.kept += accounting["kept"]
    part.skipped += accounting["skipped"]
    part.problems.update(accounting["problems"])
    for reason, examples in accounting["examples"].items():
        mine = part.examples.setdefault(reason, [])
        mine.extend(examples[: MAX_EXAMPLES - len(mine)])


def _build_train(context: tuple[str, _Images, bool], items: list[tuple], write) -> dict[str, Any]:
    """Write the training records of one shard's queries (runs in a conversion worker)."""
    queries, images, strict = context
    part = _Part(queries, strict)
    for lineno, qid, key, q in items:
        where = f"{lineno} qid={qid}"
        query = _read_side(q["query_txt"], q["query_img_path"], images, part, where, "query")
        if query is None:
            part.skipped += 1
            continue
        positives = _positives(q["pos"], images, part, where, q["pos_cand_list"])
        if not positives:
            part.skipped += 1
            continue
        pos_did, pos = positives[0]
        meta = {
            "qid": qid,
            "dataset": dataset_name(qid),
            "dataset_id": dataset_id(qid),
            "task": task_name(query.modality, pos.modality),
            "task_id": TASK_IDS.get((query.modality, pos.modality)),
            "query_modality": query.modality,
            "pos_modality": pos.modality,
            "pos_did": pos_did,
            "pos_dids": [did for did, _ in positives],
            "pos_cand_list": q["pos_cand_list"],
            "neg_cand_list": q["neg_cand_list"],
        }
        sides = {("pos" if i == 0 else f"pos.{i}"): side for i, (_, side) in enumerate(positives)}
        write(_sample(key, meta, query=query, **sides))
        part.kept += 1
    return _part_accounting(part)


def _count_lines(path: str | os.PathLike) -> int:
    """Lines of a text file (the progress bar's total), counted in 1 MiB blocks."""
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
    return n


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()} size={st.st_size} mtime_ns={st.st_mtime_ns}"


# What identifies a conversion (index.json "source"; a partial folder or a finished set of another source is
# written again): the input files and the image verification level, which decides which images are kept.


def _train_source(queries: str | os.PathLike, pool: str | os.PathLike, verify_images: str) -> str:
    return f"M-BEIR queries {_file_id(Path(queries))} pool {_file_id(Path(pool))} verify_images={verify_images}"


def _queries_source(queries: str | os.PathLike, verify_images: str) -> str:
    return f"M-BEIR queries {_file_id(Path(queries))} verify_images={verify_images}"


def _pool_source(pool: Path, images: Path, verify_images: str) -> str:
    """Same pool file (path, size, mtime), same image root and same verification level means same shards."""
    return f"M-BEIR pool {_file_id(pool)} images={images.resolve()} verify_images={verify_images}"


def convert_train(
    queries: str | os.PathLike,
    pool: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    strict: bool = False,
    shard_size: int = 1000,
    workers: int | None = None,
    verify_images: str = DEFAULT_VERIFY,
) -> dict[str, Any]:
    """Write one training record per query into the shard set ``out`` (replaced); returns the report.

    Record: ``query`` side (text and/or image of the query) and one side per positive of ``pos_cand_list``
    found in the pool whose image loads, in list order: ``pos``, ``pos.1``, ``pos.2`` ... (UniIR draws one
    positive per access; :class:`~unimm.data.mbeir_collate.MBEIRCollator` does the same). Meta {"qid",
    "dataset", "dataset_id", "task", "task_id", "query_modality", "pos_modality", "pos_did", "pos_dids",
    "pos_cand_list", "neg_cand_list"}: ``pos_dids`` are the dids of the written positive sides, aligned with
    them; ``pos_did``, ``pos_modality`` and the task belong to the first.
    Key ``sample_key(qid)``; a repeated qid (UniIR's upsampled files repeat queries) gets ``_dupN`` (N counts
    the earlier lines with that qid, kept or skipped).

    ``workers`` processes load the images and write the shards (default: the cores); shard ``i`` holds the
    queries of lines ``i * shard_size ...`` (fewer when some are skipped), so the output is the same bytes
    whatever the worker count, and an interrupted run resumes (``unimm.data.convert.parallel``).
    ``verify_images``: how image files are checked, ``"structure"`` or ``"decode"`` (:mod:`unimm.data.image_files`).
    """
    start = time.perf_counter()
    images, out = _Images(images, verify_images), Path(out)
    pool_part, query_part = _Part(pool, strict), _Part(queries, strict)
    candidates = _read_pool_index(pool_part)
    pool_part.kept = len(candidates)
    seen: Counter[str] = Counter()

    def items() -> Iterator[tuple]:
        for lineno, q in _iter_jsonl(query_part, f"queries {Path(queries).name}", progress_bar=False):
            qid = _id_field(q, "qid", query_part, lineno)
            if qid is None:
                continue
            key = sample_key(qid)
            seen[key] += 1
            if seen[key] > 1:
                key = f"{key}_dup{seen[key] - 1}"
            pos = [(did, *candidates[did]) if did in candidates else (did,)
                   for did in dict.fromkeys(q.get("pos_cand_list") or [])]
            yield lineno, qid, key, {
                "query_txt": q.get("query_txt"), "query_img_path": q.get("query_img_path"), "pos": pos,
                "pos_cand_list": list(q.get("pos_cand_list") or []),
                "neg_cand_list": list(q.get("neg_cand_list") or []),
            }

    source = _train_source(queries, pool, verify_images)
    result = write_shard_set(
        out, items(), partial(_build_train, (str(queries), images, strict)), shard_size=shard_size,
        mtime=input_mtime(queries, pool), source=source, converter="unimm.data.convert.mbeir train",
        workers=workers, label=f"train {Path(queries).name}", total=_count_lines(queries),
    )
    for accounting in result.accounting:
        _merge_accounting(query_part, accounting)
    query_part.notes["repeated_qids"] = sum(n - 1 for n in seen.values())
    report = {
        "mode": "train",
        "out": str(out),
        "strict": strict,
        "verify_images": verify_images,
        "seconds": round(time.perf_counter() - start, 2),
        "resumed_shards": result.resumed_shards,
        "queries": query_part.as_dict(),
        "pool": pool_part.as_dict(),
    }
    _save_report(out, "train", report)
    return report


def _build_pool(context: tuple[str, _Images, bool], items: list[tuple], write) -> dict[str, Any]:
    """Write the candidates of one pool shard (runs in a conversion worker); accounting with ``modalities``
    (did -> modality of every written candidate)."""
    pool, images, strict = context
    part = _Part(pool, strict)
    modalities: dict[str, str] = {}
    for lineno, did, txt, img_path in items:
        where = f"{lineno} did={did}"
        cand = _read_side(txt, img_path, images, part, where, "candidate")
        if cand is None:
            part.skipped += 1
            continue
        meta = {
            "did": did,
            "modality": cand.modality,
            "dataset": dataset_name(did),
            "dataset_id": dataset_id(did),
            "img_path": img_path or None,  # M-BEIR's relative path, for UniRAG output
        }
        write(_sample(sample_key(did), meta, cand=cand))
        modalities[did] = cand.modality
        part.kept += 1
    return _part_accounting(part, modalities=modalities)


def _write_pool(
    bench: BenchmarkWriter, name: str, part: _Part, images: _Images, source: str, shard_size: int,
    workers: int | None = None,
) -> dict[str, str]:
    """Write the pool shard set; returns did -> modality of every written candidate. A did repeated in the
    pool file is kept at its first line."""
    dids: set[str] = set()

    def items() -> Iterator[tuple]:
        for lineno, c in _iter_jsonl(part, f"pool {Path(part.path).name}", progress_bar=False):
            did = _id_field(c, "did", part, lineno)
            if did is None:
                continue
            if did in dids:
                part.problem("duplicate_did", f"{lineno} did={did}")
                part.skipped += 1
                continue
            dids.add(did)
            yield lineno, did, c.get("txt"), c.get("img_path")

    result = write_shard_set(
        bench.pool_path(name), items(), partial(_build_pool, (part.path, images, part.strict)),
        shard_size=shard_size, mtime=input_mtime(part.path), source=source,
        converter="unimm.data.convert.mbeir eval", workers=workers, label=f"pool {name}",
        total=_count_lines(part.path),
    )
    bench.add_pool(name)
    modalities: dict[str, str] = {}
    for accounting in result.accounting:
        modalities.update(accounting.pop("modalities"))
        _merge_accounting(part, accounting)
    return modalities


def _build_queries(context: tuple[str, _Images, str, str, bool], items: list[tuple], write) -> dict[str, Any]:
    """Write the evaluation queries of one shard (runs in a conversion worker); accounting with ``columns``:
    (dataset, task, query modality, candidate modality) of every written query."""
    queries, images, qrels, pool_name, strict = context
    part = _Part(queries, strict)
    columns = []
    for lineno, qid, key, q in items:
        where = f"{lineno} qid={qid}"
        query = _read_side(q["query_txt"], q["query_img_path"], images, part, where, "query")
        if query is None:
            part.skipped += 1
            continue
        if not q["relevant"]:
            part.problem("no_qrels", where, f"no relevant did in {qrels}")
        for did in q["not_in_pool"]:
            part.problem("qrel_not_in_pool", where, f"relevant did={did} is not in pool {pool_name}")
        cand_modality = q["cand_modality"]
        task = task_name(query.modality, cand_modality) if cand_modality else "unknown"
        meta = {
            "qid": qid,
            "dataset": dataset_name(qid),
            "dataset_id": dataset_id(qid),
            "task": task,
            "task_id": TASK_IDS.get((query.modality, cand_modality)),
            "query_modality": query.modality,
            "query_img_path": q["query_img_path"] or None,
            "pos_cand_list": q["pos_cand_list"],
        }
        write(_sample(key, meta, query=query))
        part.kept += 1
        columns.append((meta["dataset"], task, query.modality, cand_modality or "unknown"))
    return _part_accounting(part, columns=columns)


def _reusable_pool(path: Path, source: str) -> dict[str, str] | None:
    """did -> modality of every candidate held by the pool shard set at ``path`` when it was written from
    ``source``; None when it must be (re)written (absent, other source, or its shards no longer hold what
    index.json promises).

    Read from the shards themselves, not from the pool file: candidates skipped when the pool was written (a
    missing image, ...) are not in the pool, and queries relevant to them must count as ``qrel_not_in_pool``.
    """
    try:
        index = read_index(path)
    except FileNotFoundError:
        return None
    if index.source != source:
        return None
    modalities: dict[str, str] = {}
    try:
        for shard in index.shards:
            held = 0
            for raw in iter_raw_samples(shard.path):
                meta = json.loads(raw["meta.json"])
                modalities[meta["did"]] = meta["modality"]
                held += 1
            if held != shard.count:
                raise ValueError(f"{shard.path} holds {held} candidates, index.json promises {shard.count}")
    except (TruncatedShard, ValueError, KeyError) as err:
        _console.print(f"[yellow]pool {path} cannot be reused ({err}); writing it again[/yellow]")
        return None
    return modalities


def _copy_written_report(out: Path, pool_name: str, pool: Path, part: _Part) -> None:
    """Fill a reused pool's report with the lines, skips and problems reported when the pool was written (the
    latest report in ``convert_report.json`` that wrote ``pool_name`` from this file and kept as many
    candidates as the shards hold); without one, only ``kept`` is known."""
    path = out / REPORT_FILE
    reports = json.loads(path.read_text()) if path.is_file() else {}
    for name, report in reversed(list(reports.items())):
        written = report.get("pool", {})
        if (written.get("pool") == pool_name and written.get("reused") is False
                and written.get("file") == str(pool) and written.get("kept") == part.kept):
            part.lines, part.skipped = written["lines"], written["skipped"]
            part.problems.update(written.get("problems", {}))
            part.examples.update(written.get("examples", {}))
            part.notes["reported_when_written_by"] = name
            return
    part.lines = part.kept


def _summary(values: Counter[str]) -> str:
    """The single value of a column, or the values joined by '+' when an evaluation mixes several."""
    return "+".join(sorted(values)) if values else "unknown"


def convert_eval(
    name: str,
    queries: str | os.PathLike,
    pool: str | os.PathLike,
    qrels: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    pool_name: str | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    report_k: int = 5,
    strict: bool = False,
    shard_size: int = 1000,
    workers: int | None = None,
    verify_images: str = DEFAULT_VERIFY,
) -> dict[str, Any]:
    """Add evaluation ``name`` to the benchmark folder ``out``; returns the report.

    Writes ``pools/<pool_name>`` (default: the pool file's stem; kept as is when it was written from the same
    pool file and image root; meta {"did", "modality", "dataset", "dataset_id", "img_path"}), ``queries/<name>``
    (side ``query``; meta {"qid", "dataset", "dataset_id", "task", "task_id", "query_modality",
    "query_img_path", "pos_cand_list"}), ``qrels/<name>.txt`` (a copy) and the entry in
    benchmark.json. Queries whose positives are missing from the pool are kept (they count as misses, as in
    UniIR) and reported. ``verify_images``: how image files are checked, ``"structure"`` or ``"decode"``
    (:mod:`unimm.data.image_files`); part of what identifies the pool and the queries (a pool written at the
    other level is written again).
    """
    start = time.perf_counter()
    images, out, pool = _Images(images, verify_images), Path(out), Path(pool)
    pool_name = pool_name or pool.stem
    bench = BenchmarkWriter(out)
    pool_part, query_part = _Part(pool, strict), _Part(queries, strict)
    source = _pool_source(pool, Path(images.root), verify_images)
    relevant = read_qrels(qrels)  # a malformed qrels file fails here, before the long pool conversion
    modalities = _reusable_pool(bench.pool_path(pool_name), source)
    reused = modalities is not None
    if reused:
        pool_part.kept = len(modalities)
        _copy_written_report(out, pool_name, pool, pool_part)
        bench.add_pool(pool_name)
    else:
        modalities = _write_pool(bench, pool_name, pool_part, images, source, shard_size, workers)
    pool_part.notes["pool"] = pool_name
    pool_part.notes["reused"] = reused

    keys: set[str] = set()

    def items() -> Iterator[tuple]:
        for lineno, q in _iter_jsonl(query_part, f"queries {Path(queries).name}", progress_bar=False):
            qid = _id_field(q, "qid", query_part, lineno)
            if qid is None:
                continue
            key = sample_key(qid)
            if key in keys:
                query_part.problem("duplicate_qid", f"{lineno} qid={qid}")
                query_part.skipped += 1
                continue
            keys.add(key)
            positives = relevant.get(qid, set())
            # the candidate modality comes from the first positive in the pool, in pos_cand_list order
            ordered = [d for d in (q.get("pos_cand_list") or []) if d in positives] + sorted(positives)
            yield lineno, qid, key, {
                "query_txt": q.get("query_txt"), "query_img_path": q.get("query_img_path"),
                "relevant": bool(positives), "not_in_pool": sorted(positives - modalities.keys()),
                "cand_modality": next((modalities[d] for d in ordered if d in modalities), None),
                "pos_cand_list": list(q.get("pos_cand_list") or []),
            }

    result = write_shard_set(
        bench.queries_path(name), items(),
        partial(_build_queries, (str(queries), images, str(qrels), pool_name, strict)),
        shard_size=shard_size, mtime=input_mtime(queries), source=_queries_source(queries, verify_images),
        converter="unimm.data.convert.mbeir eval", workers=workers, label=f"queries {name}",
        total=_count_lines(queries),
    )
    columns: dict[str, Counter[str]] = {
        c: Counter() for c in ("dataset", "task", "query_modality", "cand_modality")
    }
    for accounting in result.accounting:
        for row in accounting.pop("columns"):
            for column, value in zip(columns, row):
                columns[column][value] += 1
        _merge_accounting(query_part, accounting)
    with open(qrels) as f:
        bench.write_qrels(name, f)
    bench.add_evaluation(
        name, pool=pool_name, ks=ks, report_k=report_k, **{c: _summary(v) for c, v in columns.items()}
    )
    bench.save()
    report = {
        "mode": "eval",
        "out": str(out),
        "strict": strict,
        "verify_images": verify_images,
        "seconds": round(time.perf_counter() - start, 2),
        "qrels": str(qrels),
        "queries": query_part.as_dict(),
        "pool": pool_part.as_dict(),
    }
    _save_report(out, name, report)
    return report


def _save_report(out: Path, name: str, report: dict[str, Any]) -> None:
    """Merge ``{name: report}`` into ``<out>/convert_report.json`` and print a summary."""
    path = out / REPORT_FILE
    reports = json.loads(path.read_text()) if path.is_file() else {}
    reports[name] = report
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(reports, indent=1) + "\n")
    os.replace(tmp, path)
    for part in ("pool", "queries"):
        r = report[part]
        problems = ", ".join(f"{reason}={n}" for reason, n in sorted(r["problems"].items())) or "none"
        print(
            f"[{name}] {part} {r['file']}: {r['lines']} lines, {r['kept']} kept, {r['skipped']} skipped; "
            f"problems: {problems}"
        )
    print(f"[{name}] report: {path}")


# The 16 M-BEIR test evaluations of the paper with their local pools (MSCOCO's are its separate test pools) and
# cutoffs, as UniIR's configs_scripts/large/eval/inbatch/{embed,retrieval}.yaml: (evaluation, pool, ks, report k)
LOCAL_EVALUATIONS: tuple[tuple[str, str, tuple[int, ...], int], ...] = tuple(
    (name, pool, (10, 20, 50) if name.startswith("fashion") else (1, 5, 10), 10 if name.startswith("fashion") else 5)
    for name, pool in (
        ("visualnews_task0", "visualnews_task0"),
        ("mscoco_task0", "mscoco_task0_test"),
        ("fashion200k_task0", "fashion200k_task0"),
        ("webqa_task1", "webqa_task1"),
        ("edis_task2", "edis_task2"),
        ("webqa_task2", "webqa_task2"),
        ("visualnews_task3", "visualnews_task3"),
        ("mscoco_task3", "mscoco_task3_test"),
        ("fashion200k_task3", "fashion200k_task3"),
        ("nights_task4", "nights_task4"),
        ("oven_task6", "oven_task6"),
        ("infoseek_task6", "infoseek_task6"),
        ("fashioniq_task7", "fashioniq_task7"),
        ("cirr_task7", "cirr_task7"),
        ("oven_task8", "oven_task8"),
        ("infoseek_task8", "infoseek_task8"),
    )
)
# the training set of every UniIR recipe (upsampled union) and its pool, relative to the M-BEIR root
TRAIN_QUERIES = "query/union_train/mbeir_union_up_train.jsonl"
TRAIN_POOL = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
INSTRUCTIONS = "instructions/query_instructions.tsv"


def release_files(name: str, pool: str) -> tuple[str, str, str]:
    """(queries, pool, qrels) of a test evaluation in the official release, relative to the M-BEIR root."""
    return (f"query/test/mbeir_{name}_test.jsonl", f"cand_pool/local/mbeir_{pool}_cand_pool.jsonl",
            f"qrels/test/mbeir_{name}_test_qrels.txt")


def _already_converted(shard_set: Path, source: str) -> bool:
    try:
        return read_index(shard_set).source == source
    except (FileNotFoundError, ValueError):
        return False


def convert_all(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    only: list[str] | None = None,
    strict: bool = False,
    shard_size: int = 1000,
    workers: int | None = None,
    verify_images: str = DEFAULT_VERIFY,
) -> dict[str, Any]:
    """Prepare the whole M-BEIR benchmark from the official release folder ``root`` into ``out``:

    - ``out/train/union_up``: the training set (:data:`TRAIN_QUERIES` with :data:`TRAIN_POOL`);
    - ``out/instructions/query_instructions.tsv``: UniIR's instruction table (copied);
    - ``out/eval_local``: the 16 evaluations of :data:`LOCAL_EVALUATIONS` with their local pools and the
      paper's cutoffs. The global pool (``eval=mbeir_global``) is the union of these pools, concatenated at
      evaluation time as UniIR concatenates the local pools' embeddings, so it needs no conversion of its own.

    ``only``: a subset of ``train`` and evaluation names. Every input file is checked before anything is
    written (a missing one is named). A part already converted from the same files (same size and mtime) is
    skipped, and an interrupted part resumes where it stopped, so the command can simply be run again.
    ``verify_images``: how image files are checked (:mod:`unimm.data.image_files`); a part converted at the
    other level is converted again. Returns ``{part: report or "already converted"}``.
    """
    root, out = Path(root), Path(out)
    check_verify(verify_images)
    names = [e[0] for e in LOCAL_EVALUATIONS]
    wanted = list(only) if only else ["train", *names]
    unknown = [w for w in wanted if w != "train" and w not in names]
    if unknown:
        raise ValueError(f"unknown M-BEIR part(s) {unknown}; valid: {['train', *names]}")
    parts = {"train": (TRAIN_QUERIES, TRAIN_POOL)} if "train" in wanted else {}
    parts.update({name: release_files(name, pool) for name, pool, _, _ in LOCAL_EVALUATIONS if name in wanted})
    missing = sorted({str(root / f) for files in parts.values() for f in files if not (root / f).is_file()})
    if missing:
        raise FileNotFoundError(f"{root} is not a complete M-BEIR release (expected the layout of the HF dataset "
                                f"TIGER-Lab/M-BEIR); missing {len(missing)} file(s): {missing[:8]}")
    reports: dict[str, Any] = {}
    if "train" in parts:
        queries, pool = (root / f for f in parts.pop("train"))
        train_out = out / "train" / "union_up"
        if _already_converted(train_out, _train_source(queries, pool, verify_images)):
            reports["train"] = "already converted"
        else:
            reports["train"] = convert_train(queries, pool, root, train_out, strict, shard_size, workers,
                                             verify_images)
        if (root / INSTRUCTIONS).is_file():
            (out / "instructions").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / INSTRUCTIONS, out / INSTRUCTIONS)
    bench = out / "eval_local"
    done = {e["name"] for e in BenchmarkWriter(bench).existing()["evaluations"]}
    for name, _, ks, report_k in LOCAL_EVALUATIONS:
        if name not in parts:
            continue
        queries, pool, qrels = (root / f for f in parts[name])
        pool_name = pool.stem
        if (name in done and _already_converted(bench / "queries" / name, _queries_source(queries, verify_images))
                and _already_converted(bench / "pools" / pool_name, _pool_source(pool, root, verify_images))):
            reports[name] = "already converted"
            continue
        reports[name] = convert_eval(name, queries, pool, qrels, root, bench, pool_name=pool_name, ks=ks,
                                     report_k=report_k, strict=strict, shard_size=shard_size, workers=workers,
                                     verify_images=verify_images)
    for part, report in reports.items():
        if report == "already converted":
            print(f"[{part}] already converted from the same files: kept")
    return reports
