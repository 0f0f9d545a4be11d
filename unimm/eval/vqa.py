"""VQAv2 soft-score accuracy and NLVR2 accuracy of a VLMo module, with the evaluator ``run`` signature.

VQA score (official VQA metric as ViLT/VLMo compute it during validation): the predicted answer (argmax of the
classifier) earns the soft score of that answer for the question (``min(1, #humans / 3)`` style scores stored
in ``answer_scores``: 0.3, 0.6, 0.9, 1.0), 0 when it is not among ``answer_labels``; reported in %.
NLVR2: plain accuracy of the True/False prediction, in %.

Per-query outputs (candidate-list format, docs/per_query_outputs.md) in ``per_query/<dataset>.jsonl``: VQA rows
list the classifier's top 10 answer label ids (``positive``: those with a soft score > 0 for the question;
``correct``: the predicted answer scores > 0); NLVR2 rows list ``["False", "True"]``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from unimm.eval.per_query import PerQueryWriter
from unimm.eval.report import markdown_table, publish
from unimm.utils.batches import to_device
from unimm.utils.progress import is_rank_zero


def vqa_score(logits: torch.Tensor, labels: list[list[int]], scores: list[list[float]]) -> torch.Tensor:
    """Per-question score ``[B]`` of the argmax answer."""
    pred = logits.argmax(-1).tolist()
    return torch.tensor([dict(zip(lab, sc, strict=True)).get(p, 0.0) for p, lab, sc in zip(pred, labels, scores, strict=True)])


class _TaskEvaluator:
    """Shared loop: stream a shard set once (every rank its shards), score each record, gather the (key, score)
    pairs on every rank and average them with an exactly rounded sum (identical metrics with 1 or N processes)."""

    name = ""
    sides: tuple[str, ...] = ("query",)

    def __init__(self, shard_set: str, prefix: str = "val", dataset: str | None = None):
        self.shard_set = shard_set
        self.prefix = prefix
        self.dataset = dataset or Path(shard_set).name

    top_k = 10  # answers listed per query in the per-query outputs

    def batch_scores(self, module, batch) -> tuple[torch.Tensor, list[dict]]:
        """Per-record score ``[B]`` and per-query rows (candidate-list format)."""
        raise NotImplementedError  # abstract

    @torch.no_grad()
    def run(self, module, datamodule, output_dir: str | os.PathLike, logger=None, tag: str = "") -> dict[str, float]:
        was_training = module.training
        module.eval()
        scored: list[tuple[str, float]] = []  # (record key, score) of this rank's records
        rows: list[dict] = []
        for batch in datamodule.eval_loader(self.shard_set, sides=self.sides):
            if not batch["keys"]:
                continue
            batch = {**batch, **{s: to_device(batch[s], module.device) for s in self.sides}}
            scores, batch_rows = self.batch_scores(module, batch)
            scored += zip(batch["keys"], scores.tolist())
            rows += batch_rows
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (scored, rows))
            scored = [pair for part in parts for pair in part[0]]
            rows = [row for part in parts for row in part[1]]
        if was_training:
            module.train()
        # fsum is exactly rounded, so the sum does not depend on the order (or number) of processes
        total = (math.fsum(score for _, score in scored), len(scored))
        value = 100.0 * total[0] / max(total[1], 1)
        key = f"{self.prefix}/{self.name}/{self.dataset}/{'score' if self.name == 'vqa' else 'accuracy'}"
        results = {key: value, f"{self.prefix}/{self.name}/{self.dataset}/count": float(total[1])}
        if is_rank_zero():
            text = markdown_table([self.dataset], [key.rsplit("/", 1)[1]], {(self.dataset, key.rsplit("/", 1)[1]): value},
                                  title=f"{self.name.upper()} ({tag or 'model'})", row_header="dataset", average_row=False)
            publish(output_dir, f"{self.name}_{self.dataset}", text, results, logger)
            writer = PerQueryWriter(output_dir, self.name, tag)
            writer.candidate_lists(self.dataset, sorted(rows, key=lambda r: r["qid"]), queries_path=self.shard_set,
                                   pool_path=None, metric=key.rsplit("/", 1)[1], value=value)
            writer.close(logger)
        return results


class VQAEvaluator(_TaskEvaluator):
    """VQA soft-score accuracy over a shard set written by ``vlmo_arrow vqa`` (meta: answer_labels, answer_scores).

    Args:
        shard_set: the converted split (e.g. the Karpathy-style VQAv2 minival).
        prefix: metric prefix; names are ``<prefix>/vqa/<dataset>/score``.
    """

    name = "vqa"

    def batch_scores(self, module, batch) -> tuple[torch.Tensor, list[dict]]:
        logits = module.vqa_logits(batch["query"]).float().cpu()
        labels, soft = [m["answer_labels"] for m in batch["meta"]], [m["answer_scores"] for m in batch["meta"]]
        scores = vqa_score(logits, labels, soft)
        top_scores, top_ids = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1)
        rows = []
        for key, ids, values, lab, sc, score in zip(batch["keys"], top_ids.tolist(), top_scores.tolist(), labels, soft,
                                                     scores.tolist(), strict=True):
            gold = {a for a, v in zip(lab, sc, strict=True) if v > 0}
            rows.append({"qid": key, "candidates": [str(a) for a in ids], "positive": [i for i, a in enumerate(ids) if a in gold],
                         "predicted": 0, "scores": values, "correct": score > 0})
        return scores, rows


class NLVR2Evaluator(_TaskEvaluator):
    """NLVR2 accuracy over a shard set written by ``vlmo_arrow nlvr2`` (sides query + image1, meta label)."""

    name = "nlvr2"
    sides = ("query", "image1")

    def batch_scores(self, module, batch) -> tuple[torch.Tensor, list[dict]]:
        logits = module.nlvr2_logits(batch["query"], batch["image1"]).float().cpu()
        labels = torch.tensor([int(m["label"]) for m in batch["meta"]])
        correct = (logits.argmax(-1) == labels).float()
        rows = [{"qid": key, "candidates": ["False", "True"], "positive": [label], "predicted": int(row.argmax()),
                 "scores": row.tolist(), "correct": bool(ok)}
                for key, row, label, ok in zip(batch["keys"], logits, labels.tolist(), correct.tolist(), strict=True)]
        return correct, rows
