"""Retrieval metrics over ranked candidate lists.

Definitions (values in percent, as papers report them):

- ``hit@k``: share of queries with at least one relevant candidate in their top k. M-BEIR / UniIR call this
  "Recall@k" (``common/mbeir_retriever.py`` counts a query as 1 as soon as any positive is retrieved); unimm
  keeps the honest name and tables print it as ``R@k`` only where a paper's layout is reproduced.
- ``recall@k``: classic recall, the mean over queries of |relevant in top k| / |relevant|. Equal to hit@k
  when every query has exactly one positive.
- ``precision@1`` (MMEB / VLM2Vec): share of rows whose best-scoring candidate is the positive at index 0.

Ties are broken by the lower candidate index everywhere (ranking, precision@1, the faiss index), so a
ranking is a function of the scores alone. A query without any relevant candidate in the pool (all its
positives are outside it, or it has no qrels): with ``no_positive="miss"`` it counts as a miss (0 for every
k), as UniIR's ``compute_recall_at_k`` does (``if not relevant_docs: return 0.0``; a positive outside the pool
is never retrieved); the evaluators use this and report how many such queries there were. The default
``no_positive="raise"`` raises :class:`NoPositiveError` instead, for callers that never expect one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NoPositiveError(ValueError):
    """A query has no relevant candidate in the pool: its metric would be undefined, not zero."""


def rank_candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` candidate indices per query, best first, ties broken by the lower index.

    Args:
        scores: ``[Q, N]`` similarity scores (no NaN).
        k: how many to keep; clipped to N.
    Returns:
        ``[Q, min(k, N)]`` int64 candidate indices.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [Q, N], got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; a NaN embedding would make the ranking meaningless")
    q, n = scores.shape
    k = min(k, n)
    if k <= 0 or q == 0:
        return np.zeros((q, max(k, 0)), np.int64)
    if k == n:
        part = np.broadcast_to(np.arange(n), (q, n))
    else:
        # argpartition picks *some* top-k set: candidates tied with the k-th score may be chosen arbitrarily
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -part_scores), axis=1)  # primary: score desc, secondary: index asc
    out = np.take_along_axis(part, order, 1).astype(np.int64)
    if k < n:
        # boundary fix: a row is ambiguous when more candidates equal the k-th score than the partition kept
        kth = part_scores.min(axis=1, keepdims=True)
        ambiguous = np.flatnonzero((scores == kth).sum(1) > (part_scores == kth).sum(1))
        for r in ambiguous:
            cand = np.flatnonzero(scores[r] >= kth[r])  # every candidate that could be in the top k
            out[r] = cand[np.lexsort((cand, -scores[r, cand]))[:k]]
    return out


def retrieval_metrics(
    ranked: np.ndarray,
    positives: Sequence[set[int]],
    ks: Sequence[int],
    query_ids: Sequence[str] | None = None,
    pool_size: int | None = None,
    no_positive: str = "raise",
) -> dict[str, float]:
    """``hit@k`` and ``recall@k`` (percent) for every k in ``ks``.

    Args:
        ranked: ``[Q, K]`` candidate indices, best first, no duplicates in a row; -1 = no result (faiss pads
            with -1 when the pool is smaller than K).
        positives: Q sets of the pool indices relevant to each query.
        ks: cutoffs, each <= K.
        query_ids: Q names, used in error messages (defaults to row numbers).
        pool_size: N, used in error messages and to check that positives are valid pool indices.
        no_positive: a query with an empty positive set: ``raise`` (:class:`NoPositiveError`) or ``miss``
            (counts 0 in hit@k and recall@k, UniIR's rule; see :func:`count_no_positive` to report them).
    Returns:
        ``{"hit@k": float, "recall@k": float}`` for each k.
    Raises:
        NoPositiveError: some query has no relevant candidate in the pool.
    """
    ranked = np.asarray(ranked, dtype=np.int64)
    if ranked.ndim != 2 or len(positives) != len(ranked):
        raise ValueError(f"ranked must be [Q, K] with Q = len(positives); got {ranked.shape} and {len(positives)} sets")
    if len(ranked) == 0:
        raise ValueError("no queries to evaluate")
    if no_positive not in ("raise", "miss"):
        raise ValueError(f"no_positive={no_positive!r}; valid: 'raise', 'miss'")
    empty = [i for i, p in enumerate(positives) if not p]
    pool = f"a pool of {pool_size} candidates" if pool_size is not None else "the pool"
    if empty and no_positive == "raise":
        names = [str(query_ids[i]) if query_ids is not None else f"row {i}" for i in empty[:5]]
        raise NoPositiveError(f"{len(empty)} of {len(ranked)} queries have no relevant candidate in {pool}, "
                              f"e.g. {names}")
    if pool_size is not None and any(c < 0 or c >= pool_size for p in positives for c in p):
        raise ValueError(f"positives hold indices outside {pool}")
    if ks and max(ks) > ranked.shape[1]:
        raise ValueError(f"ranked lists of depth {ranked.shape[1]} cannot give metrics at k={max(ks)}")
    # relevant[q, j]: is ranked[q, j] a positive of q. Vectorised as a membership test of (query, candidate)
    # pairs encoded as one int64 each, so Q in the millions stays fast.
    width = max(int(ranked.max()), max((max(p) for p in positives if p), default=0)) + 2
    pairs = np.array([q * width + c for q, p in enumerate(positives) for c in p], dtype=np.int64)
    keys = np.arange(len(ranked), dtype=np.int64)[:, None] * width + ranked
    relevant = np.isin(keys, pairs) & (ranked >= 0)
    found = np.cumsum(relevant, axis=1)  # found[q, k-1] = positives of q within its top k
    n_pos = np.array([max(len(p), 1) for p in positives], dtype=np.float64)  # an empty set: 0 found of "1" -> 0
    out: dict[str, float] = {}
    for k in ks:
        hits = found[:, k - 1] if k > 0 else np.zeros(len(ranked))
        out[f"hit@{k}"] = 100.0 * float(np.mean(hits > 0))
        out[f"recall@{k}"] = 100.0 * float(np.mean(hits / n_pos))
    return out


def count_no_positive(positives: Sequence[set[int]]) -> int:
    """How many queries have no relevant candidate in the pool (they count as misses with ``no_positive="miss"``)."""
    return sum(1 for p in positives if not p)


def precision_at_1(scores_per_row: Sequence[np.ndarray]) -> float:
    """MMEB's score (percent): share of rows whose top-scoring candidate is index 0, the positive.

    Args:
        scores_per_row: one ``[C_i]`` score vector per row (rows may differ in length), positive first.
    Ties go to the lower index, as in :func:`rank_candidates` (and as VLM2Vec's ``np.argmax`` does), so the
    positive wins a tie with a negative.
    """
    if len(scores_per_row) == 0:
        raise ValueError("no rows to evaluate")
    return 100.0 * float(np.mean([int(np.argmax(np.asarray(row))) == 0 for row in scores_per_row]))
