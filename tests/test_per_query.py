"""Per-query outputs (issue 14): TREC run files and per-query JSONL for pool retrieval, JSONL for candidate lists, one
manifest; answers known by construction; `make train` (the default toy experiment) leaves them beside metrics.json."""

from __future__ import annotations

import functools
import glob
import json
from pathlib import Path

import pytest
import torch

from tests._word_modules import FixedEncoder, OneHotWordModule, word_datamodule, write_text_benchmark
from tests.conftest import run_cli, single_run_dir
from unimm.data.datamodule import ShardDataModule
from unimm.eval.per_query import read_trec
from unimm.eval.retrieval import RetrievalEvaluator
from unimm.models.processors import word_level_processor

WORDS = [f"w{i}" for i in range(6)]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Pool c0..c5 = "w0".."w5" (dids d0..d5). Queries (one-hot of the first word ranks its word first, then the
    zero-score rest by index): qa "w1" -> {d1, d2}: hit@1; qb "w3" -> d9, outside the pool: a miss everywhere;
    qc "w5" -> d0: ranked second, a hit at 5 only."""
    return write_text_benchmark(
        tmp_path_factory.mktemp("pq"), WORDS, [(f"c{i}", f"d{i}", word) for i, word in enumerate(WORDS)],
        [(key, key, text) for key, text in (("qa", "w1"), ("qb", "w3"), ("qc", "w5"))],
        ["qa 0 d1 1 0", "qa 0 d2 1 0", "qb 0 d9 1 0", "qc 0 d0 1 0"])


def _evaluate(bench, out, **kwargs):
    dm = word_datamodule(bench / "vocab.txt", 2)
    return RetrievalEvaluator(str(bench / "eval"), grid_queries=0, **kwargs).run(OneHotWordModule(4 + len(WORDS)), dm,
                                                                                 out, tag="step7")


def test_pool_retrieval_writes_trec_jsonl_and_manifest(bench, tmp_path):
    metrics = _evaluate(bench, tmp_path)
    folder = tmp_path / "per_query"
    run = read_trec(folder / "t2t.trec")
    assert sorted(run) == ["qa", "qb", "qc"]
    # top k = max(reported k, 10) = 10, of a pool of 6: every candidate, ranks 1.., record keys as ids
    assert [(d, r) for d, r, _ in run["qa"]] == [("c1", 1), ("c0", 2), ("c2", 3), ("c3", 4), ("c4", 5), ("c5", 6)]
    assert [d for d, _, _ in run["qc"]][:2] == ["c5", "c0"]
    assert run["qa"][0][2] == pytest.approx(1.0) and run["qa"][1][2] == pytest.approx(0.0)
    first = (folder / "t2t.trec").read_text().splitlines()[0]
    assert first == "qa Q0 c1 1 1.000000 step7"  # UniIR's columns: qid Q0 did rank score run_id
    rows = {r["qid"]: r for r in map(json.loads, (folder / "t2t.jsonl").read_text().splitlines())}
    assert rows["qa"] == {"qid": "qa", "dataset": "toy", "task": "t2t", "query_modality": "text",
                          "positives": ["c1", "c2"], "ranked": ["c1", "c0", "c2", "c3", "c4", "c5"],
                          "scores": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], "hit": {"1": True, "5": True, "10": True}}
    assert rows["qb"]["positives"] == [] and not any(rows["qb"]["hit"].values())
    assert rows["qc"]["hit"] == {"1": False, "5": True, "10": True}
    for k in (1, 5, 10):  # the per-query hits are the metric
        assert 100 * sum(r["hit"][str(k)] for r in rows.values()) / 3 == pytest.approx(metrics[f"val/toy/t2t/hit@{k}"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["evaluations"]["t2t"] == {
        "benchmark": "toy", "protocol": "pool", "queries": str((bench / "eval" / "queries" / "t2t").resolve()),
        "pool": str((bench / "eval" / "pools" / "pool").resolve()), "trec": "t2t.trec", "jsonl": "t2t.jsonl", "k": 10,
        "metric": "hit@5", "value": pytest.approx(metrics["val/toy/t2t/hit@5"])}
    assert not list(folder.glob(".*tmp"))  # written through temporary files, none left


def test_per_query_top_k_and_manifest_merge(bench, tmp_path):
    _evaluate(bench, tmp_path, per_query_top_k=2)
    assert len(read_trec(tmp_path / "per_query" / "t2t.trec")["qa"]) == 2
    manifest = tmp_path / "per_query" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["evaluations"]["other"] = {"benchmark": "x"}  # an entry of another evaluator run in this folder is kept
    manifest.write_text(json.dumps(data))
    _evaluate(bench, tmp_path)
    assert set(json.loads(manifest.read_text())["evaluations"]) == {"t2t", "other"}


def test_candidate_lists_write_jsonl(tmp_path):
    """MMEB: one line per query with its candidates (pool record keys), the positive index, the prediction."""
    from tests.test_mmeb import WORDS as MMEB_WORDS
    from tests.test_mmeb import write_fixture
    from unimm.data.convert.mmeb import convert_mmeb
    from unimm.eval.mmeb import MMEBEvaluator

    eval_dir, images = write_fixture(tmp_path / "src")
    convert_mmeb(eval_dir, images, tmp_path / "bench")
    (tmp_path / "vocab.txt").write_text("\n".join(MMEB_WORDS + ["represent", "the", "given", "image", "for", "find", "an"]))
    dm = word_datamodule(tmp_path / "vocab.txt", 2)
    metrics = MMEBEvaluator(str(tmp_path / "bench"), grid_queries=0).run(
        OneHotWordModule(4 + len(MMEB_WORDS) + 7, word="last"), dm, tmp_path / "out")
    folder = tmp_path / "out" / "per_query"
    manifest = json.loads((folder / "manifest.json").read_text())["evaluations"]
    assert set(manifest) == {"CIRR", "ImageNet-1K", "MSCOCO_t2i"}
    entry = manifest["ImageNet-1K"]
    assert (entry["protocol"], entry["trec"], entry["jsonl"], entry["metric"]) == \
        ("candidate_list", None, "ImageNet-1K.jsonl", "precision@1")
    assert entry["value"] == pytest.approx(metrics["val/mmeb/ImageNet-1K/precision@1"])
    rows = [json.loads(line) for line in (folder / "ImageNet-1K.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, True]  # the fixture's answers (2/3)
    assert all(r["positive"] == [0] and len(r["scores"]) == len(r["candidates"]) == 3 for r in rows)
    assert [r["predicted"] == 0 for r in rows] == [r["correct"] for r in rows]
    assert rows[1]["predicted"] == 1  # "dog" is the second candidate of the second row
    # ids are the record keys of the query and pool shard sets the manifest names
    from unimm.data.shards import iter_raw_samples, read_index

    pool_keys = {s["__key__"] for sh in read_index(entry["pool"]).shards for s in iter_raw_samples(sh.path)}
    query_keys = {s["__key__"] for sh in read_index(entry["queries"]).shards for s in iter_raw_samples(sh.path)}
    assert {c for r in rows for c in r["candidates"]} <= pool_keys and {r["qid"] for r in rows} == query_keys


def test_make_train_leaves_run_files_beside_metrics_json(toy_data_dir, tmp_path):
    """`make train` is `python -m unimm.train` (the default toy experiment): two steps suffice to check its outputs."""
    run_cli("unimm.train", f"paths.data_dir={toy_data_dir}", f"paths.log_dir={tmp_path}", "trainer.max_steps=2",
            "eval.grid_queries=0", "data.num_workers=0", cwd=tmp_path)
    run_dir = single_run_dir(tmp_path, "train")
    assert (run_dir / "metrics.json").is_file()
    folder = run_dir / "per_query"
    manifest = json.loads((folder / "manifest.json").read_text())["evaluations"]
    assert set(manifest) == {"toy_t2i", "toy_i2t", "toy_it2i"}
    for entry in manifest.values():
        run = read_trec(folder / entry["trec"])
        rows = (folder / entry["jsonl"]).read_text().splitlines()
        assert len(run) == len(rows) == 200 and all(len(v) == entry["k"] == 10 for v in run.values())
    # logged to wandb (the default logger, offline) as an artifact
    wandb_files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert wandb_files and b"per_query-toy" in Path(wandb_files[0]).read_bytes()


class PixelEncoder(FixedEncoder):
    """The first 48 pixel values of an image as its embedding: a fixed encoder whose neighbours are known."""

    def encode_query(self, side):
        return side["pixel_values"].flatten(1)[:, :48]


def test_image_retrieval_writes_per_query_outputs(toy_data_dir, tmp_path):
    """Leave-one-out label retrieval (UNICOM / MLCD protocol): positives are the same-label images, never the query."""
    from unimm.eval.probe import ImageRetrievalEvaluator

    dm = word_datamodule(toy_data_dir / "toy" / "vocab.txt", 64)
    pool = toy_data_dir / "toy" / "eval" / "pools" / "toy_images"
    metrics = ImageRetrievalEvaluator("toy_digits", {"path": str(pool), "sides": ["cand"]}, ks=[1, 5]).run(
        PixelEncoder(), dm, tmp_path, tag="step0")
    folder = tmp_path / "per_query"
    entry = json.loads((folder / "manifest.json").read_text())["evaluations"]["toy_digits"]
    assert (entry["metric"], entry["k"], entry["pool"]) == ("retrieval/recall@1", 10, str(pool))
    rows = [json.loads(line) for line in (folder / "toy_digits.jsonl").read_text().splitlines()]
    assert all(r["qid"] not in r["ranked"] and r["qid"] not in r["positives"] for r in rows)
    for k in (1, 5):
        assert 100 * sum(r["hit"][str(k)] for r in rows) / len(rows) == \
            pytest.approx(metrics[f"val/toy_digits/retrieval/recall@{k}"])
    assert len(read_trec(folder / "toy_digits.trec")) == len(rows)


def test_vqa_and_nlvr2_write_candidate_list_rows(tmp_path):
    """Heads rigged to answer VQA label 3 and NLVR2 class 1 (as tests/test_vlmo_arrow.py): the rows say so."""
    from tests.test_vlmo_arrow import png, write_arrow
    from unimm.data.convert.vlmo_arrow import convert_nlvr2, convert_vqa
    from unimm.data.mlm import VLMoCollator
    from unimm.eval.vqa import NLVR2Evaluator, VQAEvaluator
    from unimm.methods.vlmo import VLMoModule
    from unimm.models.vlmo import VLMo, vlmo_tiny

    convert_vqa([write_arrow(tmp_path / "vqav2_val.arrow", {
        "image": [png("green")], "questions": [["what colour", "is it round"]], "answers": [[["green"], ["no"]]],
        "answer_labels": [[[3, 7], [1]]], "answer_scores": [[[1.0, 0.3], [0.9]]], "image_id": [1],
        "question_id": [[10, 11]], "split": ["val"]})], tmp_path / "vqa")
    convert_nlvr2([write_arrow(tmp_path / "nlvr2_dev.arrow", {
        "image_0": [png("red")], "image_1": [png("blue")], "questions": [["left is red", "both blue"]],
        "answers": [["True", "False"]], "identifier": ["dev-1-0"]})], tmp_path / "nlvr2")
    (tmp_path / "vocab.txt").write_text("what\ncolour\nis\nit\nround\nleft\nred\nboth\nblue\n")
    dm = ShardDataModule({}, collator=functools.partial(VLMoCollator, text_length=16, mlm_probability=0.0),
                         num_workers=0, eval_batch_size=4)
    dm.attach_processor(word_level_processor(str(tmp_path / "vocab.txt"), image_size=32, max_length=16))
    model = VLMo(vlmo_tiny(vocab_size=20, hidden_size=32, num_heads=2, vqa_num_answers=8, nlvr2=True, num_token_types=3,
                           max_text_len=16, max_text_len_of_initckpt=16))
    with torch.no_grad():
        for head, favoured in ((model.heads.vqa, 3), (model.heads.nlvr2, 1)):
            head[3].weight.zero_()
            head[3].bias.zero_()
            head[3].bias[favoured] = 1.0
    module = VLMoModule(model, functools.partial(torch.optim.AdamW, lr=1e-3), stage="vqa")
    VQAEvaluator(str(tmp_path / "vqa"), dataset="vqav2_val").run(module, dm, tmp_path / "out")
    NLVR2Evaluator(str(tmp_path / "nlvr2"), dataset="dev").run(module, dm, tmp_path / "out")
    folder = tmp_path / "out" / "per_query"
    vqa = [json.loads(line) for line in (folder / "vqav2_val.jsonl").read_text().splitlines()]
    assert [r["candidates"][0] for r in vqa] == ["3", "3"] and len(vqa[0]["candidates"]) == 8
    # question 10: gold labels 3 and 7, predicted 3 (correct); question 11: gold 1, listed but not predicted
    assert [(r["positive"], r["correct"]) for r in vqa] == [([0, vqa[0]["candidates"].index("7")], True),
                                                            ([vqa[1]["candidates"].index("1")], False)]
    nlvr2 = [json.loads(line) for line in (folder / "dev.jsonl").read_text().splitlines()]
    assert [(r["candidates"], r["predicted"], r["positive"], r["correct"]) for r in nlvr2] == \
        [(["False", "True"], 1, [1], True), (["False", "True"], 1, [0], False)]
    manifest = json.loads((folder / "manifest.json").read_text())["evaluations"]
    assert (manifest["vqav2_val"]["metric"], manifest["vqav2_val"]["value"]) == ("score", 50.0)
    assert (manifest["dev"]["metric"], manifest["dev"]["protocol"]) == ("accuracy", "candidate_list")
