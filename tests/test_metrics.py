"""Ranking and retrieval metrics against hand-computed values (score matrices with ties, several positives)."""

import numpy as np
import pytest

from unimm.eval.metrics import NoPositiveError, precision_at_1, rank_candidates, retrieval_metrics

# Two queries over five candidates, with ties.
#            c0   c1   c2   c3   c4
SCORES = np.array([
    [0.5, 0.9, 0.5, 0.1, 0.9],  # by (score desc, index asc): c1, c4, c0, c2, c3
    [0.2, 0.2, 0.2, 0.2, 0.3],  # c4, c0, c1, c2, c3
], dtype=np.float32)


def test_rank_candidates_ties_by_lower_index():
    assert rank_candidates(SCORES, 5).tolist() == [[1, 4, 0, 2, 3], [4, 0, 1, 2, 3]]
    # k=3 cuts through the 0.5 tie (row 0) and the 0.2 tie (row 1): the lower indices stay
    assert rank_candidates(SCORES, 3).tolist() == [[1, 4, 0], [4, 0, 1]]
    assert rank_candidates(SCORES, 1).tolist() == [[1], [4]]


def test_rank_candidates_clips_k():
    assert rank_candidates(SCORES, 50).shape == (2, 5)


def test_rank_candidates_many_ties_at_boundary():
    # 1000 candidates: 3 strictly best ones at known places, then 997 all tied at 0.
    n = 1000
    row = np.zeros(n, np.float32)
    row[[700, 20, 999]] = [3.0, 2.0, 1.0]
    scores = np.stack([row, row[::-1].copy()])
    # row 0: 700, 20, 999, then the tied zeros in index order 0, 1, 2, ... (skipping 20)
    assert rank_candidates(scores, 8)[0].tolist() == [700, 20, 999, 0, 1, 2, 3, 4]
    # row 1 (reversed): the best ones move to 1000-1-i = 299, 979, 0; zeros then start at 1
    assert rank_candidates(scores, 8)[1].tolist() == [299, 979, 0, 1, 2, 3, 4, 5]
    # all tied: plain index order whatever k
    assert rank_candidates(np.ones((1, n)), 10)[0].tolist() == list(range(10))


def test_rank_candidates_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        rank_candidates(np.array([[0.1, np.nan]]), 1)


def test_retrieval_metrics_by_hand():
    ranked = np.array([
        [3, 1, 2, 0],   # positives {1, 2}: first hit at rank 2, both by rank 3
        [0, 1, 2, 3],   # positives {3}: hit only at rank 4
        [2, -1, -1, -1],  # faiss padding; positives {2, 0}: one of two found at rank 1
    ])
    positives = [{1, 2}, {3}, {2, 0}]
    m = retrieval_metrics(ranked, positives, ks=[1, 2, 3, 4])
    # hit@k: queries with >= 1 positive in top k
    assert m["hit@1"] == pytest.approx(100 * 1 / 3)  # only query 2
    assert m["hit@2"] == pytest.approx(100 * 2 / 3)  # queries 0 and 2
    assert m["hit@3"] == pytest.approx(100 * 2 / 3)
    assert m["hit@4"] == pytest.approx(100.0)
    # recall@k: mean of found / |positives|
    assert m["recall@1"] == pytest.approx(100 * (0 + 0 + 1 / 2) / 3)
    assert m["recall@2"] == pytest.approx(100 * (1 / 2 + 0 + 1 / 2) / 3)
    assert m["recall@3"] == pytest.approx(100 * (1 + 0 + 1 / 2) / 3)
    assert m["recall@4"] == pytest.approx(100 * (1 + 1 + 1 / 2) / 3)


def test_no_positive_names_queries_and_pool():
    with pytest.raises(NoPositiveError, match=r"1 of 2 queries.*pool of 7 candidates.*'q-b'"):
        retrieval_metrics(np.array([[0], [1]]), [{0}, set()], ks=[1], query_ids=["q-a", "q-b"], pool_size=7)
    assert issubclass(NoPositiveError, ValueError)


def test_k_deeper_than_ranking_is_an_error():
    with pytest.raises(ValueError, match="depth 2"):
        retrieval_metrics(np.array([[0, 1]]), [{0}], ks=[5])


def test_precision_at_1():
    rows = [
        np.array([0.9, 0.1, 0.3]),  # positive best
        np.array([0.2, 0.5]),       # negative best
        np.array([0.4, 0.4, 0.1]),  # tie with the positive: lower index (the positive) wins
        np.array([0.3, 0.1, 0.3, 0.8]),
    ]
    assert precision_at_1(rows) == pytest.approx(50.0)


def test_no_positive_counts_as_a_miss_when_asked():
    """UniIR's rule (compute_recall_at_k: no relevant doc -> 0): the query stays in the denominator."""
    from unimm.eval.metrics import count_no_positive

    m = retrieval_metrics(np.array([[0, 1], [1, 0]]), [{0}, set()], ks=[1, 2], no_positive="miss")
    assert m == {"hit@1": 50.0, "recall@1": 50.0, "hit@2": 50.0, "recall@2": 50.0}
    assert count_no_positive([{0}, set(), set()]) == 2
    with pytest.raises(ValueError, match="no_positive"):
        retrieval_metrics(np.array([[0]]), [{0}], ks=[1], no_positive="skip")
