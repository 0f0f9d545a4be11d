"""Write a tiny M-BEIR folder in the official layout (UniIR / HF TIGER-Lab/M-BEIR) for converter tests.

::

    <root>/mbeir_images/mscoco_images/val2014/*.png     tiny solid-colour PNGs (one JPEG)
    <root>/mbeir_images/cirr_images/*.png
    <root>/query/train/mbeir_union_up_train.jsonl       every query (text, image and image+text queries)
    <root>/query/test/mbeir_mscoco_task0_test.jsonl     text -> image
    <root>/query/test/mbeir_mscoco_task3_test.jsonl     image -> text
    <root>/query/test/mbeir_cirr_task7_test.jsonl       image+text -> image
    <root>/cand_pool/global/mbeir_union_test_cand_pool.jsonl
    <root>/qrels/test/mbeir_<dataset>_task<k>_test_qrels.txt

Nothing binary is committed: the images are drawn here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

# (did, txt, image file or None, colour of the image)
CANDIDATES = [
    ("9:1001", None, "mbeir_images/mscoco_images/val2014/COCO_val2014_000001.png", (255, 0, 0)),
    ("9:1002", None, "mbeir_images/mscoco_images/val2014/COCO_val2014_000002.png", (0, 255, 0)),
    ("9:1003", None, "mbeir_images/mscoco_images/val2014/COCO_val2014_000003.jpg", (0, 0, 255)),
    ("9:1004", "A red bus parked by the road.", None, None),
    ("9:1005", "Two dogs playing in the snow.", None, None),
    ("8:2001", None, "mbeir_images/cirr_images/dev-1-0-img0.png", (255, 255, 0)),
    ("8:2002", None, "mbeir_images/cirr_images/dev-1-0-img1.png", (0, 255, 255)),
]
# (qid, query_txt, image file or None, colour, query_modality, pos_cand_list, neg_cand_list, task id)
QUERIES = {
    "mbeir_mscoco_task0_test": [
        ("9:1", "A red square.", None, None, "text", ["9:1001"], [], 0),
        ("9:2", "Something blue.", None, None, "text", ["9:1003", "9:1002"], ["9:1001"], 0),
    ],
    "mbeir_mscoco_task3_test": [
        (
            "9:3",
            None,
            "mbeir_images/mscoco_images/val2014/COCO_val2014_000101.png",
            (200, 10, 10),
            "image",
            ["9:1004"],
            [],
            3,
        ),
        (
            "9:4",
            None,
            "mbeir_images/mscoco_images/val2014/COCO_val2014_000102.png",
            (10, 10, 200),
            "image",
            ["9:1005"],
            ["9:1004"],
            3,
        ),
    ],
    "mbeir_cirr_task7_test": [
        (
            "8:5",
            "is cyan instead",
            "mbeir_images/cirr_images/dev-1-0-ref.png",
            (250, 250, 5),
            "image,text",
            ["8:2002"],
            [],
            7,
        ),
    ],
}


@dataclass
class MBEIRFixture:
    root: Path  # the M-BEIR root: image paths in the JSONL files are relative to it
    pool: Path
    train_queries: Path
    test_queries: dict[str, Path]  # "mbeir_mscoco_task0_test" -> query JSONL
    qrels: dict[str, Path]  # same keys -> qrels file
    candidates: dict[str, dict] = field(default_factory=dict)  # did -> pool JSONL row
    queries: dict[str, dict] = field(default_factory=dict)  # qid -> query JSONL row
    task_ids: dict[str, int] = field(default_factory=dict)  # qid -> M-BEIR task id written in the qrels

    def image_bytes(self, rel_path: str) -> bytes:
        return (self.root / rel_path).read_bytes()


def _draw(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 4), colour).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_mbeir_fixture(root: Path) -> MBEIRFixture:
    root = Path(root)
    fixture = MBEIRFixture(
        root,
        root / "cand_pool/global/mbeir_union_test_cand_pool.jsonl",
        root / "query/train/mbeir_union_up_train.jsonl",
        {},
        {},
    )
    for did, txt, img, colour in CANDIDATES:
        if img:
            _draw(root / img, colour)
        modality = "image,text" if txt and img else "image" if img else "text"
        fixture.candidates[did] = {
            "did": did,
            "txt": txt,
            "img_path": img,
            "modality": modality,
            "src_content": json.dumps({"id": did}),
        }
    _write_jsonl(fixture.pool, list(fixture.candidates.values()))
    for name, rows in QUERIES.items():
        lines, qrels = [], []
        for qid, txt, img, colour, modality, pos, neg, task_id in rows:
            if img:
                _draw(root / img, colour)
            row = {
                "qid": qid,
                "query_txt": txt,
                "query_img_path": img,
                "query_modality": modality,
                "query_src_content": None,
                "pos_cand_list": pos,
                "neg_cand_list": neg,
            }
            fixture.queries[qid] = row
            fixture.task_ids[qid] = task_id
            lines.append(row)
            qrels += [f"{qid} 0 {did} 1 {task_id}\n" for did in pos]
        fixture.test_queries[name] = root / f"query/test/{name}.jsonl"
        _write_jsonl(fixture.test_queries[name], lines)
        fixture.qrels[name] = root / f"qrels/test/{name}_qrels.txt"
        fixture.qrels[name].parent.mkdir(parents=True, exist_ok=True)
        fixture.qrels[name].write_text("".join(qrels))
    _write_jsonl(fixture.train_queries, list(fixture.queries.values()))
    return fixture
