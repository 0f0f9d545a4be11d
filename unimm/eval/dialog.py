"""Dialogue benchmarks of the frozen-LLM family: VisDial rounds and MMDialog image- and text-response retrieval.

``VisDialEvaluator`` runs the shared :class:`~unimm.eval.retrieval.RetrievalEvaluator` over the benchmark written
by :mod:`unimm.data.convert.visdial` and adds a table with rounds as rows and R@1/5/10 per direction:
``d2i`` = dialogue -> image (the true direction; the numbers UNIMUR's Table 3 / FROMAGe's VisDial table label
"text-to-image"), ``i2d`` = image -> dialogue, which is what FROMAGe's ``eval_visdial_retrieval.py`` actually
computes (its score matrix is images x dialogues with top-k per image row). Which of the two the papers' numbers
come from cannot be settled from the public code: FROMAGe's script gives i2d, so its published numbers are most
likely i2d; UNIMUR's script is not public.

``MMDialogEvaluator``: every query (one element of a response, asked with the dialogue context) ranks only its
own 1,000 candidates (the element + the 999 ``negative_candidate_media_keys`` or ``negative_candidate_texts``).
Recall@k follows the official definition (MMDialog ``EvaluationExample.md``): per response, the mean over its
ground-truth elements of that modality of "the element is in the top k"; then the mean over responses (a
response without an element of that modality does not count for it).
"""

from __future__ import annotations

import os
from pathlib import Path

from unimm.data.benchmark import load_benchmark
from unimm.eval.candidate_lists import CandidateListEvaluator
from unimm.eval.report import markdown_table, publish
from unimm.eval.retrieval import RetrievalEvaluator
from unimm.utils.progress import is_rank_zero


class VisDialEvaluator(RetrievalEvaluator):
    """The shared evaluator plus a rounds x R@k table (``visdial_rounds.md``)."""

    def run(self, module, datamodule, output_dir: str | os.PathLike, logger=None, tag: str = "") -> dict[str, float]:
        results = super().run(module, datamodule, output_dir, logger=logger, tag=tag)
        if is_rank_zero():
            bench = load_benchmark(self.benchmark)
            rows, table = [], {}
            for spec in bench.evaluations:
                if self.evaluations and spec.name not in self.evaluations:
                    continue
                direction, _, rnd = spec.task.partition("_r")
                row = f"round {rnd}"
                if row not in rows:
                    rows.append(row)
                for k in spec.ks:
                    table[(row, f"{direction} R@{k}")] = results[f"{self.prefix}/{bench.name}/{spec.name}/hit@{k}"]
            columns = sorted({c for _, c in table})
            text = markdown_table(rows, columns, table, title="VisDial retrieval by dialogue rounds (d2i = dialogue->image; "
                                  "i2d = image->dialogue, the direction of FROMAGe's script)", row_header="rounds")
            Path(output_dir, "visdial_rounds.md").write_text(text + "\n")
            print(text)
        return results


class MMDialogEvaluator(CandidateListEvaluator):
    """Per-query candidate lists (``meta["candidates"]``, dids of the pool) instead of the whole pool."""

    def run(self, module, datamodule, output_dir: str | os.PathLike, logger=None, tag: str = "") -> dict[str, float]:
        bench = load_benchmark(self.benchmark)
        results: dict[str, float] = {}
        for spec, metrics in self.score_lists(module, datamodule, output_dir, tag, logger=logger).items():
            for name, value in metrics.items():
                results[f"{self.prefix}/{bench.name}/{spec.name}/{name}"] = value
        if is_rank_zero():
            rows = sorted({k.split("/")[2] for k in results})
            table = {(k.split("/")[2], k.split("/")[3].replace("recall", "R")): v for k, v in results.items()}
            text = markdown_table(rows, sorted({c for _, c in table}), table,
                                  title=f"{bench.name}: response retrieval (official per-element recall), "
                                        "1,000 candidates per response element",
                                  row_header="evaluation")
            results.update(self.accounting_metrics(bench.name))
            publish(output_dir, f"retrieval_{bench.name}", text + self.notes_below_table(), results, logger)
        return self._broadcast(results)
