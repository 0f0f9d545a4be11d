"""MMEB evaluation (VLM2Vec v1 ``eval.py``): Precision@1 of each query over its **own** candidate list.

For every dataset converted by :mod:`unimm.data.convert.mmeb`: the pool's unique (text, image) pairs and the
queries are embedded once by the shared :class:`~unimm.eval.retrieval.RetrievalEvaluator` machinery (same
rank-independent merging), each query scores its listed candidates by cosine, and the query counts when the
best is the positive (index 0; ties go to the lower index, as ``argmax``). The report averages datasets per
meta-task (classification 10, VQA 10, retrieval 12, grounding 4), per modality pair (query, target) as UniMoCo's
table ((T+I,T) 22, (T,T+I) 6, (T+I,T+I) 8), IND (20) / OOD (16) and overall (36), each heading with the number of
datasets it averages.

A dataset's pair comes from its data: the modalities the converter recorded for its queries and its candidate
pool (``query_modality`` / ``cand_modality`` of the benchmark, the most common one of each side). A side that
carries an image is ``T+I`` (MMEB's image sides always carry instruction text too), ``I`` if it has no text, else
``T``.
"""

from __future__ import annotations

import os

import numpy as np

from unimm.data.benchmark import load_benchmark
from unimm.data.convert.mmeb import IND, META_TASK_OF, META_TASKS
from unimm.eval.candidate_lists import CandidateListEvaluator
from unimm.eval.report import markdown_table, publish
from unimm.utils.progress import is_rank_zero

META = ("classification", "vqa", "retrieval", "grounding")
PAIRS = ("TI_T", "T_TI", "TI_TI")  # UniMoCo's three (query, target) columns; metric-name safe spelling
SUMMARY = (*META, *PAIRS, "IND", "OOD", "overall")
HEADINGS = {"classification": "Classification", "vqa": "VQA", "retrieval": "Retrieval", "grounding": "Grounding",
            "IND": "IND", "OOD": "OOD", "overall": "Overall"}


def side_kind(modality: str) -> str:
    """A benchmark modality (``text``, ``image``, ``image,text``) -> ``T``, ``I`` or ``TI`` (read "T+I")."""
    parts = set(modality.split(","))
    kind = ("T" if "text" in parts else "") + ("I" if "image" in parts else "")
    if not kind:
        raise ValueError(f"modality {modality!r} has neither text nor image")
    return kind


def modality_pair(query_modality: str, cand_modality: str) -> str:
    """The group key of a dataset's (query, target) pair, e.g. ``TI_T`` for image+text queries -> text targets."""
    return f"{side_kind(query_modality)}_{side_kind(cand_modality)}"


def heading(group: str) -> str:
    """``TI_T`` -> ``(T+I,T)``; the other groups by :data:`HEADINGS`."""
    if group in HEADINGS:
        return HEADINGS[group]
    query, target = group.split("_")
    return f"({query.replace('TI', 'T+I')},{target.replace('TI', 'T+I')})"


def summarize(per_dataset: dict[str, float], pairs: dict[str, str] | None = None) -> dict[str, tuple[float, int]]:
    """``{dataset: P@1}`` -> ``{group: (mean, n datasets)}`` for the meta-tasks, the modality pairs (``pairs``:
    ``{dataset: pair key}`` from :func:`modality_pair`), IND, OOD and overall, in the order of :data:`SUMMARY`
    (a pair outside UniMoCo's three comes after them).

    Groups with no dataset are left out; a dataset outside the 36 counts in its pair and in ``overall`` only."""
    pairs = pairs or {}
    extra = sorted(set(pairs.values()) - set(PAIRS))
    groups: dict[str, list[float]] = {g: [] for g in (*META, *PAIRS, *extra, "IND", "OOD", "overall")}
    for name, value in per_dataset.items():
        if name in META_TASK_OF:
            groups[META_TASK_OF[name]].append(value)
            groups["IND" if name in IND else "OOD"].append(value)
        if name in pairs:
            groups[pairs[name]].append(value)
        groups["overall"].append(value)
    return {g: (float(np.mean(v)), len(v)) for g, v in groups.items() if v}


class MMEBEvaluator(CandidateListEvaluator):
    """Precision@1 per MMEB dataset over each query's candidate list (``meta["candidates"]``).

    Metric names: ``<prefix>/mmeb/<dataset>/precision@1`` and ``<prefix>/mmeb/<group>`` for the averages
    (``classification``, ``vqa``, ``retrieval``, ``grounding``; the pairs ``TI_T``, ``T_TI``, ``TI_TI`` = UniMoCo's
    (T+I,T), (T,T+I), (T+I,T+I); ``IND``, ``OOD``, ``overall``), in percent.
    """

    ties_to_positive = True  # VLM2Vec scores argmax over the list == 0: the positive (index 0) wins ties

    def main_metric(self, spec) -> tuple[str, str]:
        return "precision@1", "recall@1"  # over one list with one positive, recall@1 is MMEB's precision@1

    def run(self, module, datamodule, output_dir: str | os.PathLike, logger=None, tag: str = "") -> dict[str, float]:
        bench = load_benchmark(self.benchmark)
        scores = self.score_lists(module, datamodule, output_dir, tag, logger=logger)
        per_dataset = {spec.dataset: metrics["recall@1"] for spec, metrics in scores.items()}
        pairs = {spec.dataset: modality_pair(spec.query_modality, spec.cand_modality) for spec in scores}
        results: dict[str, float] = {}
        if is_rank_zero():
            prefix = f"{self.prefix}/{bench.name}"
            results.update({f"{prefix}/{d}/precision@1": v for d, v in per_dataset.items()})
            summary = summarize(per_dataset, pairs)
            results.update({f"{prefix}/{g}": mean for g, (mean, _) in summary.items()})
            results.update(self.accounting_metrics(bench.name))
            text = self.table(per_dataset, summary, pairs) + self.notes_below_table()
            publish(output_dir, f"mmeb_{bench.name}", text, results, logger)
        return self._broadcast(results)

    @staticmethod
    def table(per_dataset: dict[str, float], summary: dict[str, tuple[float, int]],
              pairs: dict[str, str] | None = None) -> str:
        """Two Markdown tables: the summary row in the layout of UniMoCo's table (VLM2Vec's Table 2 + the modality
        pairs), then every dataset by meta-task with its pair."""
        groups = list(summary)  # already in SUMMARY order
        columns = [f"{heading(g)} ({summary[g][1]})" for g in groups]
        head = markdown_table(["model"], columns, {("model", c): summary[g][0] for g, c in zip(groups, columns)},
                              title="MMEB (Precision@1, %; datasets averaged in brackets)", average_row=False)
        order = {d: i for i, d in enumerate(d for names in META_TASKS.values() for d in names)}
        rows, values = [], {}
        for name in sorted(per_dataset, key=lambda d: (order.get(d, len(order)), d)):
            row = f"{HEADINGS.get(META_TASK_OF.get(name, ''), 'Other')} / {name}"
            row += f" {heading(pairs[name])}" if pairs and name in pairs else ""
            row += " (OOD)" if name in META_TASK_OF and name not in IND else ""
            rows.append(row)
            values[(row, "P@1")] = per_dataset[name]
        body = markdown_table(rows, ["P@1"], values, title="MMEB per dataset", row_header="meta-task / dataset",
                              average_row=False)
        return head + "\n\n" + body
