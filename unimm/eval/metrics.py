"""Retrieval metrics over ranked candidate lists.

Definitions (values in percent, as papers report them):

- ``hit@k``: share of queries with at least one relevant candidate in their top k. M-BEIR/UniIR call this
  "Recall@k" (``common/mbeir_retriever.py``); unimm keeps the honest name and reports it as R@k in tables.
- ``recall@k``: mean over queries of (relevant candidates in the top k) / (relevant candidates).
- ``precision@1`` (MMEB): share of rows whose best-scoring candidate is the positive at index 0.

Ties are broken by the lower candidate index everywhere, so a ranking is a function of the scores alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NoPositiveError(ValueError):
    """A query has no relevant candidate in the pool: its metric would be undefined, not zero."""


def rank_candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` candidate indices per query, best first, ties broken by lower index.

    Args:
        scores: ``[Q, N]`` similarity scores.
        k: how many to keep (clipped to N).
    Returns:
        ``[Q, min(k, N)]`` int64 indices.
    """
    scores = np.asarray(scores)
    n = scores.shape[1]
    k = min(k, n)
    if k < n:
        # everything scoring at least the k-th best score is a candidate (all boundary ties included)
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
        out = np.empty((scores.shape[0], k), dtype=np.int64)
        for q in range(scores.shape[0]):
            cand = np.flatnonzero(scores[q] >= kth[q])
            order = np.lexsort((cand, -scores[q, cand]))  # primary: score desc, secondary: index asc
            out[q] = cand[order[:k]]
        return out
    idx = np.arange(n)
    return np.stack([np.lexsort((idx, -row)) for row in scores]).astype(np.int64) if len(scores) else np.zeros((0, 0), np.int64)


def retrieval_metrics(
    ranked: np.ndarray, positives: Sequence[set[int]], ks: Sequence[int], query_ids: Sequence[str] | None = None
) -> dict[str, float]:
    """``hit@k`` and ``recall@k`` for every k.

    Args:
        ranked: ``[Q, K]`` candidate indices, best first (-1 = no result, as faiss pads).
        positives: for each query, the indices of its relevant candidates in the pool.
        ks: cutoffs; each must be <= K.
        query_ids: names used in the error message.
    Raises:
        NoPositiveError: some query has no relevant candidate in the pool.
    """
    ranked = np.asarray(ranked)
    if len(positives) != len(ranked):
        raise ValueError(f"{len(ranked)} ranked rows but {len(positives)} positive sets")
    empty = [i for i, p in enumerate(positives) if not p]
    if empty:
        names = [query_ids[i] if query_ids is not None else str(i) for i in empty[:5]]
        raise NoPositiveError(f"{len(empty)} queries have no relevant candidate in the pool, e.g. {names}")
    if ranked.ndim != 2 or (ks and max(ks) > ranked.shape[1]):
        raise ValueError(f"ranked lists of depth {ranked.shape[-1]} cannot give metrics at k={max(ks)}")
    out: dict[str, float] = {}
    for k in ks:
        found = [len(positives[q] & set(ranked[q, :k].tolist())) for q in range(len(ranked))]
        out[f"hit@{k}"] = 100.0 * float(np.mean([f > 0 for f in found]))
        out[f"recall@{k}"] = 100.0 * float(np.mean([f / len(p) for f, p in zip(found, positives)]))
    return out


def precision_at_1(scores_per_row: Sequence[np.ndarray]) -> float:
    """MMEB's score: % of rows whose top candidate is index 0 (the positive); a tie goes to the lower index."""
    return 100.0 * float(np.mean([int(np.argmax(np.asarray(row))) == 0 for row in scores_per_row]))
