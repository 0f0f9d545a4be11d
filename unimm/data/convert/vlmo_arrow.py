"""ViLT / VLMo arrow tables -> unimm shard sets (and a retrieval benchmark from caption tables).

The official data (``DATA.md`` of ViLT, used unchanged by VLMo) are pyarrow IPC files written with
``RecordBatchFileWriter``; each row holds raw image bytes and lists of texts:

- captions (``coco_caption_karpathy_*``, ``f30k_caption_karpathy_*``, ``conceptual_caption_train_*``, ``sbu_*``,
  ``vg``): ``image`` (bytes), ``caption`` (list[str]), ``image_id``, ``split``;
- VQAv2 (``vqav2_*``): ``image``, ``questions`` (list[str]), ``answers`` (list[list[str]]), ``answer_labels``
  (list[list[int]]), ``answer_scores`` (list[list[float]]), ``image_id``, ``question_id`` (list[int]), ``split``;
- NLVR2 (``nlvr2_*``): ``image_0``, ``image_1``, ``questions`` (list[str]), ``answers`` (list of "True"/"False"),
  ``identifier``;
- text corpus (``wikibk_train_*``): ``image`` ("None"), ``caption`` (list with one sentence), ``source``, ``split``.

Records (one per text, as the official datasets index them):

- ``captions``: ``query.txt`` caption, ``pos.<jpg|png>`` image; meta {dataset, image_id, caption_index, split}.
- ``vqa``: ``query.txt`` question + ``query.<ext>`` image; meta {question_id, answers, answer_labels,
  answer_scores, image_id}.
- ``nlvr2``: ``query.txt`` sentence + ``query.<ext>`` image_0, ``image1.<ext>`` image_1; meta {identifier,
  label (1 = True)}.
- ``text``: ``query.txt`` only; meta {source}.
- ``retrieval`` (benchmark folder): pools ``<name>_images`` (did = image id) and ``<name>_captions``
  (did = ``<image id>#<j>``); evaluations ``<name>_ir`` (caption -> image, IR@k) and ``<name>_tr`` (image -> its
  captions, TR@k = hit@k: any of the ~5 captions in the top k).

Nothing is dropped silently: skipped rows/texts are counted by reason in ``<out>/convert_report.json``.
Run ``python -m unimm.data.convert.vlmo_arrow KIND --arrow FILE [FILE ...] --out DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from unimm.data.benchmark import BenchmarkWriter
from unimm.data.records import Item, make_sample
from unimm.data.shards import ShardSetWriter

CONVERTER = "unimm.data.convert.vlmo_arrow"
REPORT_FILE = "convert_report.json"
KINDS = ("captions", "vqa", "nlvr2", "text", "retrieval")
MAX_EXAMPLES = 5


def read_rows(paths: Sequence[str | Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(file stem, row dict)`` of every row of the arrow files, reading them memory-mapped."""
    import pyarrow as pa

    for path in paths:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.RecordBatchFileReader(source).read_all()
        for row in table.to_pylist():
            yield Path(path).stem, row


def image_format(data: bytes) -> str:
    """File extension of encoded image bytes (png or jpg); raises ValueError for anything else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"\xff\xd8":
        return "jpg"
    raise ValueError("not a PNG or JPEG")


def safe_key(*parts: Any) -> str:
    """A webdataset-safe key (no dots or slashes) that stays stable for the same source ids."""
    raw = "_".join(str(p) for p in parts)
    clean = "".join(c if c.isalnum() or c in "-_" else "-" for c in raw)
    return clean if len(clean) <= 120 else clean[:80] + "_" + hashlib.sha1(raw.encode()).hexdigest()[:16]


class _Report:
    def __init__(self):
        self.skipped: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.rows = 0
        self.kept = 0

    def skip(self, reason: str, what: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append(what)

    def write(self, out: Path, kind: str, files: Sequence[str | Path]) -> dict[str, Any]:
        report = {"kind": kind, "files": [str(f) for f in files], "rows": self.rows, "kept": self.kept,
                  "skipped": dict(self.skipped), "examples": self.examples}
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        print(f"[vlmo_arrow] {kind}: {self.rows} rows, {self.kept} records, {sum(self.skipped.values())} skipped "
              f"{dict(self.skipped)}")
        return report


def _checked_image(data: Any, report: _Report, what: str) -> tuple[bytes, str] | None:
    if not isinstance(data, bytes | bytearray) or not data:
        report.skip("missing_image", what)
        return None
    try:
        fmt = image_format(data)
        Image.open(io.BytesIO(data)).verify()
    except Exception:  # PIL raises many types for broken files
        report.skip("bad_image", what)
        return None
    return bytes(data), fmt


def _texts(row: dict[str, Any], column: str, report: _Report, what: str) -> list[tuple[int, str]]:
    values = row.get(column) or []
    out = []
    for j, text in enumerate(values):
        if not isinstance(text, str) or not text.strip():
            report.skip("empty_text", f"{what}#{j}")
            continue
        out.append((j, text.strip()))
    return out


def convert_captions(files: Sequence[str | Path], out: str | Path, shard_size: int = 1000) -> dict[str, Any]:
    """Caption tables -> a training shard set of (caption, image) records."""
    out, report = Path(out), _Report()
    with ShardSetWriter(out, max_count=shard_size, source=",".join(map(str, files)), converter=CONVERTER) as w:
        for stem, row in read_rows(files):
            report.rows += 1
            what = f"{stem}:{row.get('image_id')}"
            image = _checked_image(row.get("image"), report, what)
            if image is None:
                continue
            for j, text in _texts(row, "caption", report, what):
                meta = {"dataset": stem, "image_id": row.get("image_id"), "caption_index": j, "split": row.get("split")}
                w.write(make_sample(safe_key(stem, row.get("image_id"), j), meta, image_format=image[1],
                                    query=Item(text=text), pos=(None, image[0])))
                report.kept += 1
    return report.write(out, "captions", files)


def convert_vqa(files: Sequence[str | Path], out: str | Path, shard_size: int = 1000) -> dict[str, Any]:
    """VQAv2 tables -> one (question + image) record per question with its answer labels and soft scores."""
    out, report = Path(out), _Report()
    with ShardSetWriter(out, max_count=shard_size, source=",".join(map(str, files)), converter=CONVERTER) as w:
        for stem, row in read_rows(files):
            report.rows += 1
            what = f"{stem}:{row.get('image_id')}"
            image = _checked_image(row.get("image"), report, what)
            if image is None:
                continue
            qids = row.get("question_id") or []
            answers, labels, scores = (row.get(c) or [] for c in ("answers", "answer_labels", "answer_scores"))
            for j, question in _texts(row, "questions", report, what):
                if j >= len(qids):
                    report.skip("no_question_id", f"{what}#{j}")
                    continue
                meta = {"dataset": stem, "image_id": row.get("image_id"), "question_id": qids[j],
                        "answers": answers[j] if j < len(answers) else None,
                        "answer_labels": list(labels[j]) if j < len(labels) and labels[j] is not None else [],
                        "answer_scores": list(scores[j]) if j < len(scores) and scores[j] is not None else []}
                w.write(make_sample(safe_key(stem, qids[j]), meta, image_format=image[1],
                                    query=(question, image[0])))
                report.kept += 1
    return report.write(out, "vqa", files)


def _nlvr2_label(answer: Any) -> int | None:
    if answer in (True, "True", "true", 1):
        return 1
    if answer in (False, "False", "false", 0):
        return 0
    return None


def convert_nlvr2(files: Sequence[str | Path], out: str | Path, shard_size: int = 1000) -> dict[str, Any]:
    """NLVR2 tables -> one (sentence + image 0, image 1) record per sentence with its True/False label."""
    out, report = Path(out), _Report()
    with ShardSetWriter(out, max_count=shard_size, source=",".join(map(str, files)), converter=CONVERTER) as w:
        for stem, row in read_rows(files):
            report.rows += 1
            what = f"{stem}:{row.get('identifier')}"
            left = _checked_image(row.get("image_0"), report, what)
            right = _checked_image(row.get("image_1"), report, what)
            if left is None or right is None:
                continue
            if left[1] != right[1]:
                report.skip("mixed_image_formats", what)
                continue
            answers = row.get("answers") or []
            for j, sentence in _texts(row, "questions", report, what):
                label = _nlvr2_label(answers[j]) if j < len(answers) else None
                if label is None:
                    report.skip("bad_label", f"{what}#{j}")
                    continue
                meta = {"dataset": stem, "identifier": row.get("identifier"), "sentence_index": j, "label": label}
                w.write(make_sample(safe_key(stem, row.get("identifier"), j), meta, image_format=left[1],
                                    query=(sentence, left[0]), image1=(None, right[0])))
                report.kept += 1
    return report.write(out, "nlvr2", files)


def convert_text(files: Sequence[str | Path], out: str | Path, shard_size: int = 1000) -> dict[str, Any]:
    """Text corpus tables (WikiBK) -> text-only records for stage-2 MLM."""
    out, report = Path(out), _Report()
    with ShardSetWriter(out, max_count=shard_size, source=",".join(map(str, files)), converter=CONVERTER) as w:
        for stem, row in read_rows(files):
            report.rows += 1
            for j, text in _texts(row, "caption", report, f"{stem}:{report.rows - 1}"):
                w.write(make_sample(safe_key(stem, report.rows - 1, j), {"dataset": stem, "source": row.get("source")},
                                    query=Item(text=text)))
                report.kept += 1
    return report.write(out, "text", files)


def convert_retrieval(files: Sequence[str | Path], out: str | Path, name: str, shard_size: int = 1000) -> dict[str, Any]:
    """A Karpathy test split -> benchmark ``<name>_ir`` (caption -> image) and ``<name>_tr`` (image -> captions)."""
    out, report = Path(out), _Report()
    rows: list[tuple[str, bytes, str, list[tuple[int, str]]]] = []  # (image did, bytes, ext, captions)
    for stem, row in read_rows(files):
        report.rows += 1
        what = f"{stem}:{row.get('image_id')}"
        image = _checked_image(row.get("image"), report, what)
        captions = _texts(row, "caption", report, what)
        if image is None:
            continue
        if not captions:
            report.skip("no_caption", what)
            continue
        rows.append((safe_key(row.get("image_id")), image[0], image[1], captions))
    bench = BenchmarkWriter(out, name=name)
    images, captions = f"{name}_images", f"{name}_captions"
    kw = {"max_count": shard_size, "source": ",".join(map(str, files)), "converter": CONVERTER}
    with bench.pool_writer(images, **kw) as w:
        for did, data, fmt, _ in rows:
            w.write(make_sample(did, {"did": did, "modality": "image", "dataset": name}, image_format=fmt, cand=(None, data)))
    with bench.pool_writer(captions, **kw) as w:
        for did, _, _, caps in rows:
            for j, text in caps:
                w.write(make_sample(f"{did}-{j}", {"did": f"{did}#{j}", "modality": "text", "dataset": name},
                                    cand=Item(text=text)))
    ir, tr = [], []
    with bench.query_writer(f"{name}_ir", **kw) as w:
        for did, _, _, caps in rows:
            for j, text in caps:
                qid = f"{did}#{j}"
                w.write(make_sample(f"{did}-{j}", {"qid": qid, "dataset": name, "task": "ir", "query_modality": "text",
                                                   "pos_cand_list": [did]}, query=Item(text=text)))
                ir.append(f"{qid} 0 {did} 1 0")
    with bench.query_writer(f"{name}_tr", **kw) as w:
        for did, data, fmt, caps in rows:
            positives = [f"{did}#{j}" for j, _ in caps]
            w.write(make_sample(did, {"qid": did, "dataset": name, "task": "tr", "query_modality": "image",
                                      "pos_cand_list": positives}, image_format=fmt, query=(None, data)))
            tr += [f"{did} 0 {p} 1 0" for p in positives]
    bench.write_qrels(f"{name}_ir", ir)
    bench.write_qrels(f"{name}_tr", tr)
    bench.add_evaluation(f"{name}_ir", dataset=name, task="ir", query_modality="text", cand_modality="image",
                         pool=images, ks=(1, 5, 10), report_k=1)
    bench.add_evaluation(f"{name}_tr", dataset=name, task="tr", query_modality="image", cand_modality="text",
                         pool=captions, ks=(1, 5, 10), report_k=1)
    bench.save()
    report.kept = len(rows)
    return report.write(out, "retrieval", files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {CONVERTER}", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--arrow", nargs="+", required=True, help="arrow files (official ViLT layout)")
    parser.add_argument("--out", required=True, help="shard set folder (benchmark folder for 'retrieval')")
    parser.add_argument("--name", default=None, help="benchmark/dataset name for 'retrieval' (e.g. coco, f30k)")
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.kind == "retrieval":
        if not args.name:
            parser.error("retrieval needs --name")
        convert_retrieval(args.arrow, args.out, args.name, args.shard_size)
        return
    {"captions": convert_captions, "vqa": convert_vqa, "nlvr2": convert_nlvr2, "text": convert_text}[args.kind](
        args.arrow, args.out, args.shard_size)


if __name__ == "__main__":
    main()
