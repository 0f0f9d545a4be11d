"""unimm's M-BEIR and MMEB scoring against outputs recorded from the official code (tests/golden/metrics/).

Recorded by tests/golden/scripts/metrics.py: UniIR's ``compute_recall_at_k`` and per-task means on a faiss
``IndexFlatIP`` ranking of hand-made embeddings (ties, several positives, a positive outside the pool), and
VLM2Vec v1's ``get_pred`` / ``pred == 0`` on hand-made candidate lists (exact ties, with and without
normalisation). Values are exact (binary fractions), so the comparisons are exact too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unimm.eval.candidate_lists import list_scores, predicted_index
from unimm.eval.metrics import (
    NoPositiveError,
    count_no_positive,
    precision_at_1,
    rank_candidates,
    retrieval_metrics,
)

GOLDEN = json.loads((Path(__file__).parent / "golden" / "metrics" / "metrics.json").read_text())
MBEIR = GOLDEN["mbeir"]
MMEB = GOLDEN["mmeb"]


def _normalized(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _positives(qid: str) -> set[int]:
    """Pool indices of the query's relevant ids (ids outside the pool have none)."""
    index = {did: i for i, did in enumerate(MBEIR["cand_ids"])}
    return {index[d] for d in MBEIR["qrels"][qid]["relevant"] if d in index}


def _ks() -> list[int]:
    return [int(m.split("@")[1]) for m in MBEIR["metrics"]]


def test_ranking_matches_faiss_scores_and_untied_order():
    """unimm's exact ranking gives faiss's scores; where faiss's order differs it is only inside a run of
    exactly tied scores (unimm puts the lower index first by design, faiss's heap does not promise an order)."""
    scores = _normalized(MBEIR["queries"]) @ _normalized(MBEIR["candidates"]).T
    ours = rank_candidates(scores, k=len(MBEIR["faiss_ranking"][0]))
    official = np.asarray(MBEIR["faiss_ranking"])
    np.testing.assert_allclose(np.take_along_axis(scores, ours, 1), MBEIR["faiss_scores"], rtol=0, atol=1e-6)
    for q, (mine, theirs) in enumerate(zip(ours, official)):
        for pos, (a, b) in enumerate(zip(mine, theirs)):
            if a != b:  # a swap is only allowed between candidates with the same score
                assert scores[q, a] == scores[q, b], f"query {q} rank {pos}: {a} vs {b} with different scores"


@pytest.mark.parametrize("qid", MBEIR["query_ids"])
def test_per_query_hit_equals_uniir_recall(qid):
    """UniIR's Recall@k (1 if any positive is in the top k) is unimm's hit@k, on the official faiss ranking
    (a query whose positives are all outside the pool is a miss in both)."""
    q = MBEIR["query_ids"].index(qid)
    ranked = np.asarray(MBEIR["faiss_ranking"][q : q + 1])
    ours = retrieval_metrics(ranked, [_positives(qid)], _ks(), pool_size=len(MBEIR["cand_ids"]), no_positive="miss")
    for metric in MBEIR["metrics"]:
        k = metric.split("@")[1]
        assert ours[f"hit@{k}"] == 100.0 * MBEIR["per_query"][qid][metric], (qid, metric)


def _task_means(include_outside: bool) -> dict[str, dict[str, float]]:
    out = {}
    for task in sorted({v["task"] for v in MBEIR["qrels"].values()}):
        rows = [i for i, q in enumerate(MBEIR["query_ids"]) if MBEIR["qrels"][q]["task"] == task
                and (include_outside or _positives(q))]
        ranked = np.asarray(MBEIR["faiss_ranking"])[rows]
        positives = [_positives(MBEIR["query_ids"][i]) for i in rows]
        # no_positive="miss": the evaluator's setting (unimm.eval.retrieval), UniIR's rule
        m = retrieval_metrics(ranked, positives, _ks(), pool_size=len(MBEIR["cand_ids"]), no_positive="miss")
        out[task] = {metric: round(m[f"hit@{metric.split('@')[1]}"] / 100.0, 4) for metric in MBEIR["metrics"]}
    return out


def test_task_means_without_outside_positives():
    """Task 0 has no query whose positives are all outside the pool: its means equal UniIR's exactly."""
    assert _task_means(include_outside=False)["0"] == GOLDEN["mbeir"]["task_means"]["0"]


def test_task_means_count_outside_positives_as_misses():
    """Task 3 holds a query whose only positive is not in the pool: UniIR counts it as 0 (issue 14 item 7)."""
    assert _task_means(include_outside=True) == GOLDEN["mbeir"]["task_means"]
    positives = [_positives(q) for q in MBEIR["query_ids"]]
    assert count_no_positive(positives) == 1
    with pytest.raises(NoPositiveError):
        retrieval_metrics(np.asarray(MBEIR["faiss_ranking"]), positives, _ks(), no_positive="raise")


@pytest.mark.parametrize("run", MMEB["runs"], ids=lambda r: f"normalization={r['normalization']}")
def test_mmeb_precision_at_1(run):
    """VLM2Vec v1 ``get_pred``: argmax over the row's own candidates, positive (index 0) wins exact ties."""
    per_row = []
    for row, pred in zip(MMEB["rows"], run["pred"]):
        qry, tgt = np.asarray(row["qry"], np.float32), np.asarray(row["tgt"], np.float32)
        if run["normalization"]:
            qry, tgt = qry / np.linalg.norm(qry), _normalized(tgt)
        scores = list_scores(qry, tgt)
        assert predicted_index(scores, ties_to_positive=True) == pred, row
        per_row.append(scores)
    assert precision_at_1(per_row) == pytest.approx(100.0 * run["acc"], abs=1e-9)
