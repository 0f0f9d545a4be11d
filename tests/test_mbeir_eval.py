"""M-BEIR evaluator: the OVEN/InfoSeek positive rule, local vs global pools, k per dataset, the paper table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests._word_modules import OneHotWordModule, word_datamodule
from unimm.data.benchmark import BenchmarkWriter
from unimm.data.mbeir_collate import MBEIRCollator
from unimm.data.records import Item, make_sample
from unimm.eval.index import EmbeddingIndex
from unimm.eval.mbeir import MBEIREvaluator, main, paper_table, report_k, same_dataset_qrels, union_embeddings
from unimm.eval.retrieval import Embeddings

WORDS = [f"w{i}" for i in range(8)]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """OVEN pool {5:1 "w1", 5:2 "w2"}, InfoSeek pool {6:1 "w3", 6:2 "w4"}; InfoSeek query 6:100 "w1" whose qrels
    also name the OVEN candidate 5:1 (the cross-pool quirk); OVEN query 5:100 "w2" -> 5:2."""
    root = tmp_path_factory.mktemp("mbeir")
    (root / "vocab.txt").write_text("\n".join(WORDS))
    writer = BenchmarkWriter(root / "eval", name="mbeir")
    for pool, items in {"oven_pool": {"5:1": "w1", "5:2": "w2"}, "infoseek_pool": {"6:1": "w3", "6:2": "w4"}}.items():
        with writer.pool_writer(pool) as w:
            for did, text in items.items():
                w.write(make_sample(f"mbeir_{did.replace(':', '_')}", {"did": did, "modality": "text"},
                                    cand=Item(text=text)))
    for name, dataset, pool, qid, text, qrels in [
        ("infoseek_task6", "INFOSEEK", "infoseek_pool", "6:100", "w1", ["6:100 0 5:1 1 6", "6:100 0 6:1 1 6"]),
        ("oven_task6", "OVEN", "oven_pool", "5:100", "w2", ["5:100 0 5:2 1 6"]),
    ]:
        with writer.query_writer(name) as w:
            w.write(make_sample(f"mbeir_{qid.replace(':', '_')}", {"qid": qid, "task_id": 6}, query=Item(text=text)))
        writer.write_qrels(name, qrels)
        writer.add_evaluation(name, dataset=dataset, task="it2t", query_modality="image,text", cand_modality="text",
                              pool=pool)
    writer.save()
    return root


def _run(bench, tmp_path, **kwargs):
    datamodule = word_datamodule(bench / "vocab.txt", 4, collator=MBEIRCollator)
    evaluator = MBEIREvaluator(str(bench / "eval"), grid_queries=0, **kwargs)
    return evaluator.run(OneHotWordModule(4 + len(WORDS)), datamodule, tmp_path)


def test_local_pools(bench, tmp_path):
    metrics = _run(bench, tmp_path, pool_mode="local")
    # InfoSeek: 5:1 is not in its local pool; 6:1 wins the all-zero tie by index
    assert metrics["val/mbeir/infoseek_task6/hit@1"] == 100.0
    assert metrics["val/mbeir/oven_task6/hit@1"] == 100.0
    rows = json.loads((tmp_path / "mbeir_results.json").read_text())["rows"]
    assert {(r["dataset"], r["k"]) for r in rows} == {("INFOSEEK", 5), ("OVEN", 5)}
    table = (tmp_path / "mbeir_local.md").read_text()
    assert table.index("6. (qi,qt) → ct / OVEN") < table.index("6. (qi,qt) → ct / InfoSeek")


def test_global_pool_applies_the_same_dataset_rule(bench, tmp_path):
    metrics = _run(bench, tmp_path / "a", pool_mode="global")
    # the OVEN candidate 5:1 ranks first for the InfoSeek query but is not its positive under UniIR's rule
    assert metrics["val/mbeir/infoseek_task6/hit@1"] == 0.0
    assert metrics["val/mbeir/infoseek_task6/hit@5"] == 100.0
    rows = json.loads((tmp_path / "a" / "mbeir_results.json").read_text())["rows"]
    assert {r["dataset"]: r["pool_size"] for r in rows} == {"INFOSEEK": 4, "OVEN": 4}
    assert {r["dataset"]: r["dropped_cross_dataset_qrels"] for r in rows} == {"INFOSEEK": 1, "OVEN": 0}
    without_rule = _run(bench, tmp_path / "b", pool_mode="global", same_dataset_positives=False)
    assert without_rule["val/mbeir/infoseek_task6/hit@1"] == 100.0


def test_same_dataset_qrels_and_k_per_dataset():
    kept, dropped = same_dataset_qrels({"6:1": {"5:3", "6:4"}, "5:2": {"6:9"}, "toy_q": {"toy_d"}})
    assert kept == {"6:1": {"6:4"}, "toy_q": {"toy_d"}} and dropped == 2
    assert (report_k("Fashion200K"), report_k("FashionIQ"), report_k("MSCOCO")) == (10, 10, 5)


def test_paper_table_orders_rows_and_averages(tmp_path, capsys):
    models = {"A": {("i2t", "MSCOCO"): 80.0, ("t2i", "MSCOCO"): 60.0}, "B": {("t2i", "MSCOCO"): 50.0}}
    text = paper_table(models)
    assert text.index("1. qt → ci / MSCOCO") < text.index("4. qi → ct / MSCOCO")
    assert "| **Average (1/2 rows)** | 60.0 | 50.0 |" in text
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"rows": [{"task": "t2i", "dataset": "MSCOCO", "value": 42.0}]}))
    main(["table", f"M={path}"])
    assert "| 1. qt → ci / MSCOCO | 42.0 |" in capsys.readouterr().out


def test_union_keeps_a_shared_did_once():
    a = Embeddings(np.eye(2, dtype=np.float16), ["k1", "k2"], [{"did": "1:1"}, {"did": "1:2"}], ["s", "s"])
    b = Embeddings(np.eye(2, dtype=np.float16)[::-1], ["k2", "k3"], [{"did": "1:2"}, {"did": "1:3"}], ["t", "t"])
    union = union_embeddings([a, b])
    assert union.keys == ["k1", "k2", "k3"]
    np.testing.assert_array_equal(union.vectors, np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float16))


class CountingModule(OneHotWordModule):
    """OneHotWordModule (first word) that counts the candidate rows it encodes."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.cand_rows = 0

    def encode_candidate(self, side):
        self.cand_rows += side["size"]
        return self.encode_query(side)


@pytest.fixture(scope="module")
def shared_bench(tmp_path_factory):
    """Pool "coco" {9:1 w1, 9:2 w2, 9:3 w3} shared by three evaluations, pool "cirr" {8:1 w4} by one.
    Queries of t2i: 9:10 "w2" and 9:11 "w3", both with the two positives {9:1, 9:2} (qrels)."""
    root = tmp_path_factory.mktemp("shared")
    (root / "vocab.txt").write_text("\n".join(WORDS))
    writer = BenchmarkWriter(root / "eval", name="mbeir")
    for pool, items in {"coco": {"9:1": "w1", "9:2": "w2", "9:3": "w3"}, "cirr": {"8:1": "w4"}}.items():
        with writer.pool_writer(pool) as w:
            for did, text in items.items():
                w.write(make_sample(f"mbeir_{did.replace(':', '_')}", {"did": did, "modality": "text"},
                                    cand=Item(text=text)))
    evaluations = [
        ("mscoco_task0", "MSCOCO", "t2i", "coco", [("9:10", "w2"), ("9:11", "w3")],
         ["9:10 0 9:1 1 0", "9:10 0 9:2 1 0", "9:11 0 9:1 1 0", "9:11 0 9:2 1 0"]),
        ("mscoco_task3", "MSCOCO", "i2t", "coco", [("9:12", "w3")], ["9:12 0 9:3 1 3"]),
        ("visualnews_task0", "VisualNews", "t2i", "coco", [("9:13", "w1")], ["9:13 0 9:2 1 0"]),
        ("cirr_task7", "CIRR", "it2i", "cirr", [("8:10", "w4")], ["8:10 0 8:1 1 7"]),
    ]
    for name, dataset, task, pool, queries, qrels in evaluations:
        with writer.query_writer(name) as w:
            for qid, text in queries:
                w.write(make_sample(f"mbeir_{qid.replace(':', '_')}", {"qid": qid}, query=Item(text=text)))
        writer.write_qrels(name, qrels)
        writer.add_evaluation(name, dataset=dataset, task=task, query_modality="text", cand_modality="text", pool=pool)
    writer.save()
    return root


def _run_counting(bench, tmp_path, pool_mode):
    datamodule = word_datamodule(bench / "vocab.txt", 2, collator=MBEIRCollator)
    module = CountingModule(4 + len(WORDS))
    metrics = MBEIREvaluator(str(bench / "eval"), grid_queries=0, pool_mode=pool_mode).run(module, datamodule, tmp_path)
    return metrics, module.cand_rows


@pytest.mark.parametrize("pool_mode", ["local", "global"])
def test_each_pool_is_embedded_once_and_any_positive_is_a_hit(shared_bench, tmp_path, pool_mode, monkeypatch):
    builds = []
    real_add = EmbeddingIndex.add
    monkeypatch.setattr(EmbeddingIndex, "add", lambda self, *a, **k: (builds.append(1), real_add(self, *a, **k))[1])
    metrics, cand_rows = _run_counting(shared_bench, tmp_path, pool_mode)
    assert cand_rows == 4  # 3 coco + 1 cirr candidates, although coco serves three evaluations
    # one faiss index per pool: coco's serves its three evaluations; the global union serves all four
    assert len(builds) == {"local": 2, "global": 1}[pool_mode]
    # 9:10 "w2" ranks its second positive 9:2 first: a hit at 1; 9:11 "w3" ranks 9:3 (not a positive) first,
    # then the all-zero ties 9:1 (a positive) by index: a miss at 1, a hit at 5
    assert metrics["val/mbeir/mscoco_task0/hit@1"] == 50.0
    assert metrics["val/mbeir/mscoco_task0/hit@5"] == 100.0
    assert metrics["val/mbeir/mscoco_task3/hit@1"] == 100.0
    # 9:13 "w1" ranks 9:1 first; its positive 9:2 follows among the zero-score ties (local: 2nd of 3)
    assert metrics["val/mbeir/visualnews_task0/hit@1"] == 0.0 and metrics["val/mbeir/visualnews_task0/hit@5"] == 100.0
    assert metrics["val/mbeir/cirr_task7/hit@1"] == 100.0
    again, rows_again = _run_counting(shared_bench, tmp_path, pool_mode)  # the on-disk cache: nothing re-encoded
    assert rows_again == 0 and again == metrics


@pytest.fixture(scope="module")
def outside_bench(tmp_path_factory):
    """Pool {9:1 w1, 9:2 w2}; queries 9:10 "w1" -> 9:1 (in the pool) and 9:11 "w2" -> 9:99 (a did the pool lacks)."""
    root = tmp_path_factory.mktemp("outside")
    (root / "vocab.txt").write_text("\n".join(WORDS))
    writer = BenchmarkWriter(root / "eval", name="mbeir")
    with writer.pool_writer("coco") as w:
        for did, text in {"9:1": "w1", "9:2": "w2"}.items():
            w.write(make_sample(f"mbeir_{did.replace(':', '_')}", {"did": did, "modality": "text"}, cand=Item(text=text)))
    with writer.query_writer("mscoco_task0") as w:
        for qid, text in (("9:10", "w1"), ("9:11", "w2")):
            w.write(make_sample(f"mbeir_{qid.replace(':', '_')}", {"qid": qid}, query=Item(text=text)))
    writer.write_qrels("mscoco_task0", ["9:10 0 9:1 1 0", "9:11 0 9:99 1 0"])
    writer.add_evaluation("mscoco_task0", dataset="MSCOCO", task="t2i", query_modality="text", cand_modality="text",
                          pool="coco")
    writer.save()
    return root


def test_queries_whose_positives_are_outside_the_pool_count_as_misses(outside_bench, tmp_path, capsys):
    """Issue 14 item 7: UniIR's compute_recall_at_k returns 0 for them; unimm raised NoPositiveError."""
    metrics = _run(outside_bench, tmp_path, pool_mode="local")
    # 9:10 finds 9:1 first; 9:11's only positive is not in the pool: a miss at every k
    assert metrics["val/mbeir/mscoco_task0/hit@1"] == 50.0
    assert metrics["val/mbeir/mscoco_task0/hit@10"] == 50.0
    assert "1 of 2 queries have no positive in the pool; counted as misses" in capsys.readouterr().out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["accounting/mbeir/mscoco_task0/no_positive_queries"] == 1.0
    assert json.loads((tmp_path / "mbeir_results.json").read_text())["rows"][0]["no_positive_queries"] == 1
    assert "1. qt → ci / MSCOCO (1 queries without positive in pool)" in (tmp_path / "mbeir_local.md").read_text()
