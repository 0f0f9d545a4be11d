"""M-BEIR (UniIR): the 16 (task, dataset) evaluations in local or global pools, and the paper's table.

Protocol (UniIR ``common/mbeir_retriever.py`` and its ``configs_scripts/large/eval/inbatch/*.yaml``):

- "Recall@k" is hit@k: a query counts when any relevant candidate is in its top k. No modality filtering: a
  wrong-modality hit is a miss.
- Reported k: Recall@5, except Fashion200K and FashionIQ (Recall@10); the cutoffs computed are 1/5/10, and
  10/20/50 for those two.
- **OVEN / InfoSeek quirk**: their qrels point into each other's pools. UniIR's dataset, in eval mode, keeps only
  the positives whose did has the query's dataset prefix (``"6:..."`` for an InfoSeek qid; the "TODO hack" in
  ``data/mbeir_dataset.py``). ``same_dataset_positives=True`` (default) applies the same rule to the qrels
  before scoring, so the local and the global pool score the same relevant set; the number of dropped qrels
  per evaluation is printed and stored in ``mbeir_results.json``.
- **Local pools** (``pool_mode="local"``): each evaluation searches its own pool. **Global pool**
  (``pool_mode="global"``): every evaluation searches the union of all pools of the benchmark. As in UniIR, the
  union's embeddings are the concatenation of the per-pool embeddings (each pool is embedded once, cached);
  a did present in several pools is kept once.

Output: ``mbeir_<pool_mode>.md`` (rows = task + dataset in the paper's order, one column for this model, an
average row) and ``mbeir_results.json``; ``python -m unimm.eval.mbeir table NAME=run/mbeir_results.json ...``
puts several models side by side.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from unimm.data.benchmark import EvaluationSpec, load_benchmark, read_qrels
from unimm.eval.report import markdown_table
from unimm.eval.retrieval import Embeddings, RetrievalEvaluator
from unimm.utils.progress import is_rank_zero

# The paper's tasks in order (M-BEIR task ids 0-4, 6-8) with their labels, keyed by unimm's task names.
TASK_LABELS = {
    "t2i": "1. qt → ci", "t2t": "2. qt → ct", "t2it": "3. qt → (ci,ct)", "i2t": "4. qi → ct", "i2i": "5. qi → ci",
    "it2t": "6. (qi,qt) → ct", "it2i": "7. (qi,qt) → ci", "it2it": "8. (qi,qt) → (ci,ct)",
}
# The 16 evaluations of M-BEIR, in the paper's row order; dataset names as the converter writes them.
MBEIR_EVALUATIONS = (
    ("t2i", "VisualNews"), ("t2i", "MSCOCO"), ("t2i", "Fashion200K"), ("t2t", "WebQA"), ("t2it", "EDIS"),
    ("t2it", "WebQA"), ("i2t", "VisualNews"), ("i2t", "MSCOCO"), ("i2t", "Fashion200K"), ("i2i", "NIGHTS"),
    ("it2t", "OVEN"), ("it2t", "INFOSEEK"), ("it2i", "FashionIQ"), ("it2i", "CIRR"), ("it2it", "OVEN"),
    ("it2it", "INFOSEEK"),
)
DISPLAY_NAMES = {"INFOSEEK": "InfoSeek"}
TEN_AT_LEAST = ("Fashion200K", "FashionIQ")  # reported at Recall@10, cutoffs 10/20/50


def report_k(dataset: str) -> int:
    return 10 if dataset in TEN_AT_LEAST else 5


def cutoffs(dataset: str) -> tuple[int, ...]:
    return (10, 20, 50) if dataset in TEN_AT_LEAST else (1, 5, 10)


def row_label(task: str, dataset: str) -> str:
    return f"{TASK_LABELS.get(task, task)} / {DISPLAY_NAMES.get(dataset, dataset)}"


def _prefix(mbeir_id: str) -> str | None:
    head, sep, _ = mbeir_id.partition(":")
    return head if sep else None


def same_dataset_qrels(qrels: dict[str, set[str]]) -> tuple[dict[str, set[str]], int]:
    """Keep for each qid only the dids with its dataset prefix (ids without a prefix are kept); returns the
    filtered qrels and how many (qid, did) pairs were dropped."""
    kept, dropped = {}, 0
    for qid, dids in qrels.items():
        prefix = _prefix(qid)
        same = {d for d in dids if prefix is None or _prefix(d) in (None, prefix)}
        dropped += len(dids) - len(same)
        if same:
            kept[qid] = same
    return kept, dropped


def paper_table(models: dict[str, dict[tuple[str, str], float]], title: str | None = None,
                notes: dict[tuple[str, str], str] | None = None) -> str:
    """The paper's layout: rows = task + dataset (the 16 M-BEIR rows first, in order, then any other), columns =
    models, values = the reported R@k; an average row over the rows every model has. ``notes``: text put after
    a row's label (e.g. `` (pool: 500/600 candidates)``)."""
    notes = notes or {}
    present = {key for values in models.values() for key in values}
    keys = [k for k in MBEIR_EVALUATIONS if k in present] + sorted(present - set(MBEIR_EVALUATIONS))
    label = {k: row_label(*k) + notes.get(k, "") for k in keys}
    rows = [label[k] for k in keys]
    values = {(label[k], model): v for model, vals in models.items() for k, v in vals.items()}
    return markdown_table(rows, list(models), values, title=title, row_header="task / dataset")


class MBEIREvaluator(RetrievalEvaluator):
    """:class:`~unimm.eval.retrieval.RetrievalEvaluator` with M-BEIR's cutoffs, the OVEN/InfoSeek positive rule,
    local or global pools, and the paper's table.

    Args:
        benchmark, evaluations, index, store_dtype, autocast, grid_queries, grid_k, prefix: see the base class.
        pool_mode: ``local`` (each evaluation's own pool) or ``global`` (the union of all pools).
        same_dataset_positives: apply UniIR's same-dataset-prefix rule to the qrels (see the module doc).
        model_name: the column header of this model in the paper table.
    """

    POOL_MODES = ("local", "global")

    def __init__(self, benchmark: str, pool_mode: str = "local", same_dataset_positives: bool = True,
                 model_name: str = "model", **kwargs):
        super().__init__(benchmark, **kwargs)
        if pool_mode not in self.POOL_MODES:
            raise ValueError(f"pool_mode={pool_mode!r}; valid: {list(self.POOL_MODES)}")
        self.pool_mode = pool_mode
        self.same_dataset_positives = same_dataset_positives
        self.model_name = model_name
        self._work_dir: Path | None = None
        self._union: Embeddings | None = None
        self._rows: list[dict] = []

    # -- pools -----------------------------------------------------------------------------------------------
    def embed(self, module, datamodule, shard_set: str, side: str, cache_root: Path) -> Embeddings | None:
        if self.pool_mode == "local" or side != "cand":
            return super().embed(module, datamodule, shard_set, side, cache_root)
        if self._union is None:
            parts = [super(MBEIREvaluator, self).embed(module, datamodule, path, "cand", cache_root)
                     for _, path in sorted(load_benchmark(self.benchmark).pools.items())]
            if not is_rank_zero():
                return None
            self._union = union_embeddings(parts)
        return self._union

    # -- scoring ---------------------------------------------------------------------------------------------
    def score(self, spec: EvaluationSpec, queries: Embeddings, pool: Embeddings):
        ks = tuple(sorted(set(spec.ks) | set(cutoffs(spec.dataset))))
        dropped = 0
        if self.same_dataset_positives:
            qrels, dropped = same_dataset_qrels(read_qrels(spec.qrels))
            if dropped:
                path = self._work_dir / "qrels" / f"{spec.name}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(f"{q} 0 {d} 1\n" for q, dids in sorted(qrels.items()) for d in sorted(dids)))
                print(f"[mbeir] {spec.name}: dropped {dropped} qrels pointing to another dataset (UniIR's eval rule)")
                spec = replace(spec, qrels=str(path))
        metrics, ranked, positives = super().score(replace(spec, ks=ks), queries, pool)
        k = report_k(spec.dataset)
        acc = self.accounting.get(spec.name, {})
        self._rows.append({"evaluation": spec.name, "task": spec.task, "dataset": spec.dataset, "k": k,
                           "value": metrics[f"hit@{k}"], "dropped_cross_dataset_qrels": dropped,
                           "pool_size": len(pool.keys), "no_positive_queries": int(self._last.get("no_positive", 0)),
                           "queries": len(queries.keys),
                           "queries_promised": (acc.get("queries") or {}).get("promised"),
                           "pool_promised": (acc.get("pool") or {}).get("promised"),
                           "pool_embedded": (acc.get("pool") or {}).get("embedded")})
        return metrics, ranked, positives

    def pool_path(self, spec: EvaluationSpec) -> str | None:
        return spec.pool_path if self.pool_mode == "local" else None  # the global pool spans every pool shard set

    def run(self, module, datamodule, output_dir: str | os.PathLike, logger=None, tag: str = "") -> dict[str, float]:
        output_dir = Path(output_dir)
        self._work_dir = output_dir / f"mbeir_{self.pool_mode}"
        self._union, self._rows = None, []
        results = super().run(module, datamodule, output_dir, logger=logger, tag=tag)
        if is_rank_zero() and self._rows:
            values = {(r["task"], r["dataset"]): r["value"] for r in self._rows}
            notes = {(r["task"], r["dataset"]): self.row_note(r["evaluation"]) for r in self._rows}
            title = f"M-BEIR ({self.pool_mode} pool{'s' if self.pool_mode == 'local' else ''}), R@5 / R@10 (Fashion200K, FashionIQ)"
            text = paper_table({self.model_name: values}, title=title, notes=notes) + self.table_footnote()
            (output_dir / f"mbeir_{self.pool_mode}.md").write_text(text + "\n")
            (output_dir / "mbeir_results.json").write_text(
                json.dumps({"pool_mode": self.pool_mode, "model": self.model_name, "rows": self._rows}, indent=1) + "\n")
            print(text)
        return results


def union_accounting(parts: list[dict | None]) -> dict | None:
    """The accounting of a union of pools: promised, embedded and skipped summed, shards named by shard set."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    skipped: dict[str, int] = {}
    for p in parts:
        for reason, n in p["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {"shard_set": "+".join(p["shard_set"] for p in parts), "promised": sum(p["promised"] for p in parts),
            "embedded": sum(p["embedded"] for p in parts), "missing": sum(p["missing"] for p in parts),
            "skipped": skipped, "unexplained": sum(p["unexplained"] for p in parts),
            "shards": {f"{Path(p['shard_set']).name}/{name}": s for p in parts for name, s in p["shards"].items()}}


def union_embeddings(parts: list[Embeddings]) -> Embeddings:
    """Concatenate pool embeddings (UniIR builds its global index this way); a did seen before is skipped."""
    seen: set[str] = set()
    rows: list[tuple[int, int]] = []
    for p, part in enumerate(parts):
        for i, (key, meta) in enumerate(zip(part.keys, part.metas)):
            did = meta.get("did", key)
            if did not in seen:
                seen.add(did)
                rows.append((p, i))
    vectors = np.concatenate([np.asarray(part.vectors[[i for q, i in rows if q == p]]) for p, part in enumerate(parts)])
    return Embeddings(vectors, [parts[p].keys[i] for p, i in rows], [parts[p].metas[i] for p, i in rows],
                      [parts[p].shards[i] for p, i in rows], union_accounting([p.accounting for p in parts]))


def main(argv: list[str] | None = None) -> None:
    """``python -m unimm.eval.mbeir table NAME=path/to/mbeir_results.json ...``: several models side by side."""
    parser = argparse.ArgumentParser(prog="python -m unimm.eval.mbeir", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="print the paper-layout table of several runs")
    table.add_argument("runs", nargs="+", help="NAME=path of a run's mbeir_results.json")
    args = parser.parse_args(argv)
    models = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"expected NAME=path, got {item!r}")
        rows = json.loads(Path(path).read_text())["rows"]
        models[name] = {(r["task"], r["dataset"]): r["value"] for r in rows}
    print(paper_table(models, title="M-BEIR, R@5 / R@10 (Fashion200K, FashionIQ)"))


if __name__ == "__main__":
    main()
