"""UniRAG output: top-k candidates per query with scores, and UniIR's complement retrieval, on a bench whose
rankings are known by construction (a text embeds as the one-hot of its first word, an image as the one-hot of
its colour's word), in 1 and 2 processes."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests._dist import run_distributed
from tests._word_modules import FixedEncoder, word_datamodule
from unimm.data.benchmark import BenchmarkWriter
from unimm.data.mbeir_collate import MBEIRCollator
from unimm.data.records import Item, make_sample
from unimm.eval.unirag import UniRAGEvaluator

WORDS = ["red", "green", "blue", "cat", "dog"]  # token ids 4..8
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourWordModule(FixedEncoder):
    """Text row -> one-hot of its first word; image row -> one-hot of its colour's word (red/green/blue)."""

    dim = 4 + len(WORDS)

    def encode_query(self, side):
        out = torch.zeros(side["size"], self.dim)
        if len(side["text_rows"]):
            out[side["text_rows"]] += torch.nn.functional.one_hot(side["input_ids"][:, 1], self.dim).float()
        if len(side["image_rows"]):
            channel = side["pixel_values"].mean(dim=(2, 3)).argmax(dim=1)  # CLIP-normalised: the dominant colour
            out[side["image_rows"]] += torch.nn.functional.one_hot(channel + 4, self.dim).float()
        return out


def _image(colour):
    return Image.new("RGB", (8, 8), COLOURS[colour])


# did -> (text, colour of the image, img_path)
POOL = {
    "9:1": ("red", None, None),
    "9:2": (None, "red", "mbeir_images/red.png"),
    "9:3": (None, "blue", "mbeir_images/blue.png"),
    "9:4": ("blue", None, None),
    "9:5": ("cat", "green", "mbeir_images/cat.png"),
    "9:6": ("dog", None, None),
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("unirag")
    (root / "vocab.txt").write_text("\n".join(WORDS))
    writer = BenchmarkWriter(root / "eval", name="mbeir")
    with writer.pool_writer("coco") as w:
        for did, (text, colour, path) in POOL.items():
            modality = "image,text" if text and colour else "image" if colour else "text"
            w.write(make_sample(f"mbeir_{did.replace(':', '_')}", {"did": did, "modality": modality, "img_path": path},
                                cand=Item(text, _image(colour) if colour else None)))
    # t2i: "red" -> 9:2; i2t: a blue image whose path is 9:3's -> 9:4
    for name, task, qid, item, meta, qrels in [
        ("mscoco_task0", "t2i", "9:10", Item("red"), {"query_modality": "text", "query_img_path": None}, "9:2"),
        ("mscoco_task3", "i2t", "9:20", Item(None, _image("blue")),
         {"query_modality": "image", "query_img_path": "mbeir_images/blue.png"}, "9:4"),
    ]:
        with writer.query_writer(name) as w:
            w.write(make_sample(f"mbeir_{qid.replace(':', '_')}", {"qid": qid, **meta, "pos_cand_list": [qrels]},
                                query=item))
        writer.write_qrels(name, [f"{qid} 0 {qrels} 1 0"])
        writer.add_evaluation(name, dataset="MSCOCO", task=task, query_modality=meta["query_modality"],
                              cand_modality="image" if task == "t2i" else "text", pool="coco")
    writer.save()
    return root


def _run(bench, out_dir, **kwargs):
    datamodule = word_datamodule(bench / "vocab.txt", 2, collator=MBEIRCollator)
    evaluator = UniRAGEvaluator(str(bench / "eval"), grid_queries=0, **kwargs)
    metrics = evaluator.run(ColourWordModule(), datamodule, out_dir)
    rows = {name: [json.loads(line) for line in open(out_dir / "unirag" / f"{name}_retrieved.jsonl")]
            for name in ("mscoco_task0", "mscoco_task3")} if (out_dir / "unirag").exists() else None
    return metrics, rows


def test_candidates_scores_and_complements(bench, tmp_path):
    metrics, rows = _run(bench, tmp_path)
    assert metrics["val/mbeir/mscoco_task0/hit@1"] == 0.0 and metrics["val/mbeir/mscoco_task0/hit@5"] == 100.0
    [t2i] = rows["mscoco_task0"]
    assert t2i["query"] == {"qid": "9:10", "query_txt": "red", "query_img_path": None, "query_modality": "text",
                            "pos_cand_list": ["9:2"]}
    # "red" ties 9:1 (text) and 9:2 (red image) at 1, then the zero scores in pool order; k = max(ks) = 10 > pool
    assert [c["did"] for c in t2i["candidates"]] == ["9:1", "9:2", "9:3", "9:4", "9:5", "9:6"]
    assert [c["score"] for c in t2i["candidates"]] == pytest.approx([1, 1, 0, 0, 0, 0], abs=1e-3)
    assert t2i["candidates"][0] == {"did": "9:1", "txt": "red", "img_path": None, "modality": "text",
                                    "score": pytest.approx(1, abs=1e-3)}
    assert t2i["candidates"][4]["txt"] == "cat" and t2i["candidates"][4]["img_path"] == "mbeir_images/cat.png"
    # complements of the text-only / image-only candidates 9:1, 9:2, 9:3, 9:4, 9:6 (9:5 is image+text):
    # 9:1 "red" -> red image 9:2; 9:2 red image -> text "red" (9:1) equals the query's text, so the next text in
    # order, 9:4; 9:3 -> "blue" 9:4; 9:4 -> blue image 9:3; 9:6 "dog" (no match) -> the first image, 9:2
    assert [c["did"] for c in t2i["complement_candidates"]] == ["9:2", "9:4", "9:4", "9:3", "9:2"]
    [i2t] = rows["mscoco_task3"]
    assert [c["did"] for c in i2t["candidates"][:2]] == ["9:3", "9:4"]
    # 9:4 "blue" -> its blue image 9:3 is the query's own image (same path): skipped for the red one, 9:2
    comp = dict(zip([c["did"] for c in i2t["candidates"] if c["modality"] != "image,text"],
                    [c["did"] for c in i2t["complement_candidates"]]))
    assert comp["9:3"] == "9:4" and comp["9:4"] == "9:2"


def test_k_and_no_complement(bench, tmp_path):
    _, rows = _run(bench, tmp_path, k=2, complement=False)
    [t2i] = rows["mscoco_task0"]
    assert [c["did"] for c in t2i["candidates"]] == ["9:1", "9:2"] and "complement_candidates" not in t2i


def _distributed(rank, world_size, bench, out_dir):
    metrics, rows = _run(bench, out_dir)
    return json.dumps([metrics, rows], sort_keys=True)


@pytest.mark.slow  # two spawned processes: ~30 s on a busy 2-core machine
def test_same_output_with_two_processes(bench, tmp_path):
    one = json.dumps(list(_run(bench, tmp_path / "one")), sort_keys=True)
    two = run_distributed(_distributed, 2, bench, tmp_path / "two")
    assert two[0] == one
