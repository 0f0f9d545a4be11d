"""ViLT/VLMo arrow tables (official layout, written here with pyarrow) -> shard sets and a retrieval benchmark."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from unimm.data.benchmark import load_benchmark, read_qrels
from unimm.data.convert.vlmo_arrow import (
    convert_captions,
    convert_nlvr2,
    convert_retrieval,
    convert_vqa,
    main,
)
from unimm.data.records import decode_sample
from unimm.data.shards import iter_raw_samples, read_index

pa = pytest.importorskip("pyarrow")


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def jpg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_arrow(path, columns: dict) -> str:
    """As the official make_arrow: pa.Table -> RecordBatchFileWriter."""
    table = pa.Table.from_pydict(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def records(shard_set):
    index = read_index(shard_set)
    return [decode_sample(raw, s.path) for s in index.shards for raw in iter_raw_samples(s.path)]


@pytest.fixture
def caption_file(tmp_path):
    return write_arrow(tmp_path / "coco_caption_karpathy_test.arrow", {
        "image": [png("red"), jpg("blue"), b"not an image"],
        "caption": [["a red square", "red block", "  "], ["a blue square"], ["lost"]],
        "image_id": ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg", "x.jpg"],
        "split": ["test", "test", "test"],
    })


def test_captions_to_training_pairs(caption_file, tmp_path):
    report = convert_captions([caption_file], tmp_path / "train")
    assert report["rows"] == 3 and report["kept"] == 3
    assert report["skipped"] == {"empty_text": 1, "bad_image": 1}
    recs = sorted(records(tmp_path / "train"), key=lambda r: (r.meta["image_id"], r.meta["caption_index"]))
    assert [r.sides["query"].text for r in recs] == ["a red square", "red block", "a blue square"]
    assert recs[0].sides["pos"].image.getpixel((0, 0)) == (255, 0, 0) and recs[0].sides["pos"].text is None
    assert recs[1].meta["caption_index"] == 1 and "." not in recs[0].key
    assert json.loads((tmp_path / "train" / "convert_report.json").read_text())["kept"] == 3


def test_retrieval_benchmark_tr_ir(caption_file, tmp_path):
    convert_retrieval([caption_file], tmp_path / "bench", name="coco")
    bench = load_benchmark(tmp_path / "bench")
    assert {e.name for e in bench.evaluations} == {"coco_ir", "coco_tr"}
    tr = bench.evaluation("coco_tr")
    assert tr.query_modality == "image" and tr.cand_modality == "text" and tr.ks == (1, 5, 10)
    qrels = read_qrels(tr.qrels)
    assert qrels == {"COCO_val2014_000000000001-jpg": {"COCO_val2014_000000000001-jpg#0", "COCO_val2014_000000000001-jpg#1"},
                     "COCO_val2014_000000000002-jpg": {"COCO_val2014_000000000002-jpg#0"}}
    ir = read_qrels(bench.evaluation("coco_ir").qrels)
    assert ir["COCO_val2014_000000000001-jpg#1"] == {"COCO_val2014_000000000001-jpg"} and len(ir) == 3
    assert read_index(bench.pools["coco_images"]).total == 2 and read_index(bench.pools["coco_captions"]).total == 3


def test_vqa_keeps_answer_scores(tmp_path):
    path = write_arrow(tmp_path / "vqav2_val.arrow", {
        "image": [png("green")], "questions": [["what colour?", "is it round?"]],
        "answers": [[["green", "green", "lime"], ["no"]]], "answer_labels": [[[3, 7], [1]]],
        "answer_scores": [[[1.0, 0.3], [0.9]]], "image_id": [42], "question_id": [[4200, 4201]], "split": ["val"],
    })
    report = convert_vqa([path], tmp_path / "vqa")
    assert report["kept"] == 2 and report["skipped"] == {}
    recs = {r.meta["question_id"]: r for r in records(tmp_path / "vqa")}
    assert recs[4200].meta["answer_labels"] == [3, 7] and recs[4200].meta["answer_scores"] == [1.0, 0.3]
    assert recs[4201].sides["query"].text == "is it round?" and recs[4201].sides["query"].image is not None


def test_nlvr2_pairs_and_labels(tmp_path):
    path = write_arrow(tmp_path / "nlvr2_dev.arrow", {
        "image_0": [png("red")], "image_1": [png("blue")], "questions": [["left is red", "both blue", "odd"]],
        "answers": [["True", "False", "Maybe"]], "identifier": ["dev-850-0"],
    })
    report = convert_nlvr2([path], tmp_path / "nlvr2")
    assert report["kept"] == 2 and report["skipped"] == {"bad_label": 1}
    recs = sorted(records(tmp_path / "nlvr2"), key=lambda r: r.meta["sentence_index"])
    assert [r.meta["label"] for r in recs] == [1, 0]
    assert recs[0].sides["query"].image.getpixel((0, 0)) == (255, 0, 0)
    assert recs[0].sides["image1"].image.getpixel((0, 0)) == (0, 0, 255)


def test_text_corpus_via_cli(tmp_path):
    path = write_arrow(tmp_path / "wikibk_train_0.arrow", {
        "image": ["None", "None"], "caption": [["first sentence ."], ["second one ."]],
        "source": ["wikibk", "wikibk"], "split": ["train", "train"],
    })
    main(["text", "--arrow", path, "--out", str(tmp_path / "text")])
    recs = records(tmp_path / "text")
    assert sorted(r.sides["query"].text for r in recs) == ["first sentence .", "second one ."]
    assert all(r.sides["query"].image is None for r in recs)


def test_vqa_and_nlvr2_evaluators_on_converted_shards(tmp_path):
    """Heads rigged to always answer label 3 / class 1: VQA score and NLVR2 accuracy computed by hand."""
    from functools import partial

    import torch

    from unimm.data.datamodule import ShardDataModule
    from unimm.data.mlm import VLMoCollator
    from unimm.eval.vqa import NLVR2Evaluator, VQAEvaluator
    from unimm.methods.vlmo import VLMoModule
    from unimm.models.processors import word_level_processor
    from unimm.models.vlmo import VLMo, vlmo_tiny

    vqa = write_arrow(tmp_path / "vqav2_val.arrow", {
        "image": [png("green")], "questions": [["what colour", "is it round"]], "answers": [[["green"], ["no"]]],
        "answer_labels": [[[3, 7], [1]]], "answer_scores": [[[1.0, 0.3], [0.9]]], "image_id": [1],
        "question_id": [[10, 11]], "split": ["val"]})
    nlvr2 = write_arrow(tmp_path / "nlvr2_dev.arrow", {
        "image_0": [png("red")], "image_1": [png("blue")], "questions": [["left is red", "both blue"]],
        "answers": [["True", "False"]], "identifier": ["dev-1-0"]})
    convert_vqa([vqa], tmp_path / "vqa")
    convert_nlvr2([nlvr2], tmp_path / "nlvr2")
    (tmp_path / "vocab.txt").write_text("what\ncolour\nis\nit\nround\nleft\nred\nboth\nblue\n")
    processor = word_level_processor(str(tmp_path / "vocab.txt"), image_size=32, max_length=16)
    dm = ShardDataModule({}, collator=partial(VLMoCollator, text_length=16, mlm_probability=0.0), num_workers=0, eval_batch_size=4)
    dm.attach_processor(processor)
    model = VLMo(vlmo_tiny(vocab_size=20, hidden_size=32, num_heads=2, vqa_num_answers=8, nlvr2=True, num_token_types=3, max_text_len=16,
                           max_text_len_of_initckpt=16))
    with torch.no_grad():
        for head, favoured in ((model.heads.vqa, 3), (model.heads.nlvr2, 1)):
            head[3].weight.zero_()
            head[3].bias.zero_()
            head[3].bias[favoured] = 1.0
    module = VLMoModule(model, partial(torch.optim.AdamW, lr=1e-3), stage="vqa")
    got = VQAEvaluator(str(tmp_path / "vqa"), dataset="vqav2_val").run(module, dm, tmp_path / "out")
    assert got["val/vqa/vqav2_val/score"] == pytest.approx(50.0) and got["val/vqa/vqav2_val/count"] == 2
    got = NLVR2Evaluator(str(tmp_path / "nlvr2"), dataset="dev").run(module, dm, tmp_path / "out")
    assert got["val/nlvr2/dev/accuracy"] == pytest.approx(50.0)
