"""Benchmarks where every query ranks its own candidate list (MMDialog, MMEB) instead of a whole pool."""

from __future__ import annotations

import os

import numpy as np
import xxhash

from unimm.data.benchmark import EvaluationSpec, load_benchmark
from unimm.eval.per_query import PerQueryWriter
from unimm.eval.retrieval import RetrievalEvaluator
from unimm.utils.progress import is_rank_zero


def canonical_rows(vectors: np.ndarray) -> np.ndarray:
    """``[N]`` int64: for every row of ``vectors`` ``[N, D]``, the index of the first row with the same bytes.

    Rows are grouped by a 64-bit xxh3 of their bytes and confirmed equal element by element (a hash collision of
    different rows keeps them apart); linear time, unlike sorting the rows.
    """
    rows = np.ascontiguousarray(vectors)
    first: dict[int, list[int]] = {}
    canon = np.arange(len(rows), dtype=np.int64)
    for i in range(len(rows)):
        bucket = first.setdefault(xxhash.xxh3_64_intdigest(rows[i].tobytes()), [])
        same = next((j for j in bucket if np.array_equal(rows[i], rows[j])), None)
        if same is None:
            bucket.append(i)
        else:
            canon[i] = same
    return canon


def list_scores(query_vector: np.ndarray, cand_vectors: np.ndarray, canonical: np.ndarray | None = None) -> np.ndarray:
    """Inner products ``[C]`` (float64) of one query ``[D]`` with its candidates ``[C, D]``; identical candidate
    vectors get bit-identical scores.

    A BLAS matrix-vector product does not promise that: it sums rows in different orders depending on their
    position (blocks of rows, then a tail kernel), so two identical fp16 vectors can score 1 ulp apart and a
    duplicate of the positive beat it (issue 14). Here each distinct vector is scored once and its score copied to
    its duplicates, in float64 (fp16 / fp32 inputs lose nothing in the products).

    Args:
        canonical: ``[C]`` ids equal exactly for identical rows (e.g. :func:`canonical_rows` of the pool, indexed
            by the candidates' pool rows); computed from ``cand_vectors`` when None.
    """
    cands = np.asarray(cand_vectors)
    canonical = canonical_rows(cands) if canonical is None else np.asarray(canonical)
    distinct, first, back = np.unique(canonical, return_index=True, return_inverse=True)
    scores = cands[first].astype(np.float64) @ np.asarray(query_vector, np.float64)
    return scores[back.reshape(-1)]


def predicted_index(scores: np.ndarray, ties_to_positive: bool) -> int:
    """The candidate a protocol picks from ``scores`` ``[C]`` (positive first): the best score, ties to the lower index
    (``argmax``); without ``ties_to_positive`` a negative tied with the positive (index 0) is picked instead of it."""
    best = int(np.argmax(scores))
    if best == 0 and not ties_to_positive:
        tied = np.flatnonzero(scores[1:] >= scores[0])
        if len(tied):
            return int(tied[0]) + 1
    return best


def candidate_list_recall(query_vectors, query_metas, pool_vectors, pool_metas, ks,
                          ties_to_positive: bool = False, query_keys=None, pool_keys=None,
                          per_query: list | None = None, stats: dict | None = None) -> dict[str, float]:
    """Recall@k (%) where query i ranks only ``query_metas[i]["candidates"]``; the first candidate is the positive.

    A negative that scores as high as the positive ranks before it, unless ``ties_to_positive`` (the positive is
    candidate 0 and wins ties, as an ``argmax`` over the list does). Queries with the same ``meta["response"]``
    are the elements of one response: their hits are averaged first, then the responses are averaged (a query
    without ``response`` is a response of its own). No queries: no metrics.

    A candidate missing from the pool (its shard lost samples: the evaluation's accounting reports it) is left out
    of its list; a query whose positive is missing counts as a miss. ``stats`` (a dict), when given, receives
    ``queries_missing_candidates`` and ``queries_missing_positive``.

    Args:
        query_vectors: ``[Q, D]``; pool_vectors: ``[N, D]`` (rows named by ``pool_metas[j]["did"]``).
        query_keys, pool_keys: record keys (``__key__``) of the queries and pool rows, for ``per_query``.
        per_query: when a list, one dict per query is appended (see docs/per_query_outputs.md): ``qid``,
            ``candidates`` (pool record keys), ``positive`` ([0]), ``predicted``, ``scores``, ``correct``.
    """
    row_of = {m["did"]: j for j, m in enumerate(pool_metas)}
    canonical = canonical_rows(pool_vectors)  # identical pool vectors (other dids, same pair) score identically
    hits: dict[str, list[np.ndarray]] = {}  # response -> [hit per k] of each of its elements
    missing_cands = missing_pos = 0
    for q, meta in enumerate(query_metas):
        listed = meta["candidates"]
        cands = [row_of[d] for d in listed if d in row_of]
        if len(cands) < len(listed):
            missing_cands += 1
        if not listed or listed[0] not in row_of:
            missing_pos += 1
            hits.setdefault(meta.get("response", f"#{q}"), []).append(np.zeros(len(ks)))
            if per_query is not None:
                per_query.append({"qid": query_keys[q] if query_keys else meta.get("qid", str(q)),
                                  "candidates": [pool_keys[c] if pool_keys else pool_metas[c]["did"] for c in cands],
                                  "positive": [], "predicted": -1, "scores": [], "correct": False})
            continue
        # each distinct vector scored once (float64), copied to its duplicates: see list_scores
        distinct, back = np.unique(canonical[cands], return_inverse=True)
        scores = (np.asarray(pool_vectors[distinct], np.float64) @ np.asarray(query_vectors[q], np.float64))[back.reshape(-1)]
        if np.isnan(scores).any():
            raise ValueError(f"NaN scores for query {q}")
        # candidate 0 is the response element; a tie counts against it (a constant model must not score 100)
        rivals = int((scores[1:] > scores[0]).sum() if ties_to_positive else (scores[1:] >= scores[0]).sum())
        hits.setdefault(meta.get("response", f"#{q}"), []).append(np.array([rivals < k for k in ks], float))
        if per_query is not None:
            per_query.append({"qid": query_keys[q] if query_keys else meta.get("qid", str(q)),
                              "candidates": [pool_keys[c] if pool_keys else pool_metas[c]["did"] for c in cands],
                              "positive": [0], "predicted": predicted_index(scores, ties_to_positive),
                              "scores": [float(s) for s in scores], "correct": rivals == 0})
    if stats is not None:
        stats.update(queries_missing_candidates=missing_cands, queries_missing_positive=missing_pos)
    if not hits:
        return {}
    per_response = np.stack([np.mean(h, axis=0) for h in hits.values()])  # [R, len(ks)]
    return {f"recall@{k}": 100.0 * float(per_response[:, i].mean()) for i, k in enumerate(ks)}


class CandidateListEvaluator(RetrievalEvaluator):
    """The shared evaluator's embedding (every rank, merged by key, cached) with per-query candidate lists
    (``meta["candidates"]``: pool dids, the positive first) scored by :func:`candidate_list_recall`.

    ``ties_to_positive``: how a negative scoring exactly as the positive counts (benchmark protocols differ).
    Data accounting and per-query outputs (``per_query/<evaluation>.jsonl`` + manifest) as the base class.
    """

    ties_to_positive = False

    def main_metric(self, spec: EvaluationSpec) -> tuple[str, str]:
        """(name in the per-query manifest, key in the metrics of :func:`candidate_list_recall`)."""
        return f"recall@{spec.ks[0]}", f"recall@{spec.ks[0]}"

    def score_lists(self, module, datamodule, output_dir: str | os.PathLike, tag: str = "", logger=None
                    ) -> dict[EvaluationSpec, dict[str, float]]:
        """Recall@k of each wanted evaluation (on rank 0; empty elsewhere). All ranks must call it.

        Rank 0 also writes the per-query outputs (logged to ``logger`` as a wandb artifact when it is one) and
        keeps the data accounting in ``self.accounting`` (see :meth:`account`)."""
        bench = load_benchmark(self.benchmark)
        self.begin_run(module)
        cache = self.cache_root(output_dir)
        writer = PerQueryWriter(output_dir, bench.name, tag) if is_rank_zero() else None
        was_training = module.training
        module.eval()
        scores: dict[EvaluationSpec, dict[str, float]] = {}
        for spec in bench.evaluations:
            if self.evaluations and spec.name not in self.evaluations:
                continue
            pool = self.embed(module, datamodule, bench.pools[spec.pool], "cand", cache)
            queries = self.embed(module, datamodule, spec.queries, "query", cache)
            if is_rank_zero():
                self.account(spec.name, spec.pool, queries, pool, datamodule)
                rows: list[dict] = []
                stats: dict = {}
                scores[spec] = candidate_list_recall(queries.vectors, queries.metas, pool.vectors, pool.metas, spec.ks,
                                                     self.ties_to_positive, queries.keys, pool.keys, rows, stats)
                self.accounting[spec.name].update(stats)
                self.accounting[spec.name]["no_positive_queries"] = stats["queries_missing_positive"]
                if stats["queries_missing_candidates"]:
                    print(f"[eval] {spec.name}: {stats['queries_missing_candidates']} of {len(queries.keys)} queries "
                          f"lost candidates with the pool ({stats['queries_missing_positive']} their positive: misses)")
                name, key = self.main_metric(spec)
                writer.candidate_lists(spec.name, rows, queries_path=spec.queries, pool_path=spec.pool_path,
                                       metric=name, value=scores[spec].get(key))
        if was_training:
            module.train()
        if writer is not None:
            self.write_accounting(output_dir)
            writer.close(logger)
        return scores

    def notes_below_table(self) -> str:
        """Each evaluation whose data differ from the promise, with its note, then the footnote (or nothing)."""
        lines = [f"- {name}{self.row_note(name)}" for name in self.accounting if self.row_note(name)]
        return "\n\n" + "\n".join(lines) + self.table_footnote() if lines else ""
