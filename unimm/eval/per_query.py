"""Per-query outputs: what each query retrieved, for run comparison and the results browser.

Written by rank 0 into ``<output_dir>/per_query/`` (format: docs/per_query_outputs.md):

- pool retrieval: ``<evaluation>.trec`` (UniIR's run-file columns ``qid Q0 did rank score run_id``, top k per
  query) and ``<evaluation>.jsonl`` (one line per query: qid, dataset, task, query_modality, positives, ranked,
  scores, hit@k);
- candidate lists (MMEB, MMDialog): ``<evaluation>.jsonl`` (qid, candidates, positive, predicted, scores,
  correct);
- ``manifest.json``: one entry per evaluation (benchmark, protocol, query / pool shard sets, files, k, main
  metric and value), merged with the entries already there, replaced atomically.

Query and candidate ids are the record keys (``__key__``) of the shard sets the manifest names, so a reader can
fetch their text and image. Every file is written to a temporary name and moved into place (``os.replace``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PER_QUERY_DIR = "per_query"
MANIFEST = "manifest.json"


def _atomic_lines(path: Path, lines) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            for line in lines:
                f.write(line)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def safe_name(name: str) -> str:
    """An evaluation name usable as a file name (``/`` and spaces replaced)."""
    return "".join(c if c.isalnum() or c in "-_.@+" else "_" for c in name)


def trec_lines(qids: Sequence[str], dids: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], run_id: str):
    """UniIR's run-file lines ``qid Q0 did rank score run_id`` (rank from 1, best first)."""
    for qid, row_dids, row_scores in zip(qids, dids, scores, strict=True):
        for rank, (did, score) in enumerate(zip(row_dids, row_scores, strict=True), start=1):
            yield f"{qid} Q0 {did} {rank} {float(score):.6f} {run_id}\n"


def read_trec(path: str | os.PathLike) -> dict[str, list[tuple[str, int, float]]]:
    """``{qid: [(did, rank, score), ...]}`` of a run file (for tests and readers)."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    with open(path) as f:
        for line in f:
            qid, q0, did, rank, score, _run = line.split()
            if q0 != "Q0":
                raise ValueError(f"{path}: not a TREC run line: {line.strip()!r}")
            out.setdefault(qid, []).append((did, int(rank), float(score)))
    return out


class PerQueryWriter:
    """Collects the per-query files of one evaluator run and writes the manifest on :meth:`close`.

    Args:
        output_dir: the evaluation's output folder (files go to ``<output_dir>/per_query``).
        benchmark: benchmark name, recorded in the manifest.
        run_id: the last column of the TREC lines (the run's tag, e.g. ``step300``).
    """

    def __init__(self, output_dir: str | os.PathLike, benchmark: str, run_id: str = "unimm"):
        self.output_dir = Path(output_dir)
        self.dir = self.output_dir / PER_QUERY_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.benchmark = benchmark
        self.run_id = safe_name(run_id or "unimm")
        self.entries: dict[str, dict[str, Any]] = {}

    def pool(self, evaluation: str, *, dataset: str, task: str | None, query_modality: str, query_keys: Sequence[str],
             query_metas: Sequence[dict], pool_keys: Sequence[str], ranked: np.ndarray, scores: np.ndarray,
             positives: Sequence[set[int]], ks: Sequence[int], k: int, queries_path: str, pool_path: str | None,
             metric: str, value: float, extra: dict[str, Any] | None = None) -> None:
        """Write ``<evaluation>.trec`` and ``<evaluation>.jsonl`` of a pool retrieval.

        Args:
            ranked: ``[Q, K]`` pool rows best first (-1 = none), K >= k; scores: ``[Q, K]`` aligned with it.
            positives: pool rows relevant to each query (in the pool only).
            ks: the reported cutoffs (keys of ``hit``); k: how many results per query to write.
        """
        name = safe_name(evaluation)
        top_dids, top_scores, lines = [], [], []
        for q, qid in enumerate(query_keys):
            rows = [int(c) for c in ranked[q, :k] if c >= 0]
            dids = [pool_keys[c] for c in rows]
            row_scores = [round(float(s), 6) for c, s in zip(ranked[q, :k], scores[q, :k]) if c >= 0]
            top_dids.append(dids)
            top_scores.append(row_scores)
            found = [c in positives[q] for c in ranked[q]]  # whole depth: hit@k may go past the written k
            meta = query_metas[q]
            lines.append(json.dumps({
                "qid": qid, "dataset": dataset, "task": task or None,
                "query_modality": meta.get("query_modality") or query_modality,
                "positives": sorted(pool_keys[c] for c in positives[q]),
                "ranked": dids, "scores": row_scores,
                "hit": {str(kk): bool(any(found[:kk])) for kk in ks},
            }) + "\n")
        _atomic_lines(self.dir / f"{name}.trec", trec_lines(query_keys, top_dids, top_scores, self.run_id))
        _atomic_lines(self.dir / f"{name}.jsonl", lines)
        self.entries[evaluation] = {
            "benchmark": self.benchmark, "protocol": "pool", "queries": queries_path, "pool": pool_path,
            "trec": f"{name}.trec", "jsonl": f"{name}.jsonl", "k": int(k), "metric": metric, "value": float(value),
            **(extra or {}),
        }

    def candidate_lists(self, evaluation: str, rows: Sequence[dict], *, queries_path: str, pool_path: str | None,
                        metric: str, value: float | None) -> None:
        """Write ``<evaluation>.jsonl`` of a candidate-list protocol (rows from
        :func:`unimm.eval.candidate_lists.candidate_list_recall`)."""
        name = safe_name(evaluation)
        _atomic_lines(self.dir / f"{name}.jsonl", (json.dumps(row) + "\n" for row in rows))
        longest = max((len(r["candidates"]) for r in rows), default=0)
        self.entries[evaluation] = {
            "benchmark": self.benchmark, "protocol": "candidate_list", "queries": queries_path, "pool": pool_path,
            "trec": None, "jsonl": f"{name}.jsonl", "k": longest, "metric": metric,
            "value": float(value) if value is not None else None,
        }

    def close(self, logger=None) -> Path:
        """Merge this run's entries into ``manifest.json`` (atomically) and log the folder to wandb as an artifact
        when ``logger`` is a wandb logger. Returns the manifest path."""
        path = self.dir / MANIFEST
        manifest: dict[str, Any] = {"evaluations": {}}
        if path.is_file():
            try:
                manifest = json.loads(path.read_text())
                manifest.setdefault("evaluations", {})
            except ValueError:
                manifest = {"evaluations": {}}  # a damaged manifest is rewritten from this run's entries
        manifest["evaluations"].update(self.entries)
        _atomic_lines(path, [json.dumps(manifest, indent=1, sort_keys=True) + "\n"])
        if logger is not None and self.entries:
            log_artifact(logger, self.dir, f"per_query-{safe_name(self.benchmark)}")
        return path


def log_artifact(logger, folder: Path, name: str) -> None:
    """Log ``folder`` as a wandb artifact of type ``per_query`` when ``logger`` wraps a wandb run (else nothing)."""
    run = getattr(logger, "experiment", None)
    if run is None or not hasattr(run, "log_artifact"):
        return
    import wandb

    artifact = wandb.Artifact(name=name, type="per_query",
                              description="per-query retrieval outputs (docs/per_query_outputs.md)")
    artifact.add_dir(str(folder))
    run.log_artifact(artifact)
