"""Frozen-feature evaluations of a vision encoder on labelled image sets (UNICOM / MLCD protocols).

- :class:`LinearProbeEvaluator`: multinomial logistic regression on frozen, L2-normalised features (full-batch
  L-BFGS in torch, L2 penalty as sklearn's ``C``; UNICOM's example probe is sklearn ``LogisticRegression(C=0.601)``),
  top-1 accuracy on the test set.
- :class:`KNNEvaluator`: DINO / UNICOM ``knn.py`` weighted k-NN: the top-k training neighbours by cosine vote with
  weight ``exp(sim / T)``, ``k in {10, 20, 100, 200}``, ``T = 0.07``.
- :class:`ImageRetrievalEvaluator`: Recall@k by nearest neighbour on L2-normalised features, leave-one-out
  within one set (SOP, CUB, Cars, iNat) or queries against a gallery (In-Shop): a query counts when one of its
  k nearest neighbours has its label.

Each set is ``{"path": shard_set, "sides": [...]}``: the image of a record is taken from the first side that
has one (an image alone: :func:`image_batches`), and its label from ``meta[label_key]`` (the toy dataset's ``digit``). Every evaluator has the
``run(module, datamodule, output_dir, logger=None, tag="") -> dict`` of the shared retrieval evaluator, embeds
with ``module.encode_candidate`` and returns the same metrics on every rank.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unimm.eval.index import EmbeddingIndex
from unimm.eval.per_query import PerQueryWriter
from unimm.eval.report import markdown_table, publish
from unimm.losses.distributed import gather_no_grad
from unimm.utils.progress import is_rank_zero


def key_hash(key: str) -> int:
    """A stable non-negative integer of a record key (the same in every process, unlike ``hash``)."""
    return zlib.crc32(key.encode())


def _gather_keys(keys: list[str]) -> list[str]:
    """Every rank's record keys, in rank order (the order of :func:`gather_no_grad`)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return keys
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, keys)
    return [k for part in parts for k in part]


def image_batches(datamodule, path: str, sides: Sequence[str]):
    """Yield ``(keys, metas, side)`` per batch: one image per record, ``side`` in the layout of
    :class:`~unimm.data.collate.RetrievalCollator` (``size``, ``pixel_values [n, 3, H, W]``, ``image_rows``).

    A collator that encodes each side under its name (RetrievalCollator and its subclasses) is asked for one side
    at a time, and a record is taken from the first of ``sides`` whose item is an image alone: a probe of image
    features must not embed an i2t record's caption or an it2i query's image+text; and asked for several sides,
    a subclass may build another layout (VLMoCollator makes training pairs when asked for its pair sides). The
    passes split the records over ranks alike, so a rank's record is the same rank's in every pass. Any other
    collator (ClusterLabelCollator: it picks the image itself, under ``image``) is asked for all ``sides`` at once.
    """
    from unimm.data.collate import RetrievalCollator

    if not isinstance(datamodule._collate(sides), RetrievalCollator):
        for batch in datamodule.eval_loader(path, sides=sides):
            if batch["keys"]:
                yield batch["keys"], batch["meta"], batch["image"] if "image" in batch else batch[sides[0]]
        return
    taken: set[str] = set()
    for name in sides:
        for batch in datamodule.eval_loader(path, sides=(name,)):
            part = batch.get(name)
            if not batch["keys"] or part is None or "pixel_values" not in part:
                continue
            with_text = set(part["text_rows"].tolist())
            picks = [(j, i) for j, i in enumerate(part["image_rows"].tolist())
                     if i not in with_text and batch["keys"][i] not in taken]
            if not picks:
                continue
            rows = [i for _, i in picks]
            taken.update(batch["keys"][i] for i in rows)
            yield ([batch["keys"][i] for i in rows], [batch["meta"][i] for i in rows],
                   {"size": len(rows), "pixel_values": part["pixel_values"][[j for j, _ in picks]],
                    "image_rows": torch.arange(len(rows)), "text_rows": torch.zeros(0, dtype=torch.long)})


@torch.no_grad()
def embed_labelled(module, datamodule, shard_set: Mapping[str, Any], label_key: str, with_key_hash: bool = False,
                   with_keys: bool = False) -> tuple:
    """Features ``[N, D]`` (float32, CPU) and integer labels ``[N]`` of every record of a set, from all ranks;
    with ``with_key_hash`` also :func:`key_hash` of every record's key ``[N]`` (int64); with ``with_keys`` also
    the record keys (a list of N str, last)."""
    sides = tuple(shard_set.get("sides", ("cand",)))
    feats, labels, hashes, keys = [], [], [], []
    for batch_keys, metas, side in image_batches(datamodule, shard_set["path"], sides):
        keys += batch_keys
        side = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v for k, v in side.items()}
        feats.append(module.encode_candidate(side).float())
        labels.append(torch.tensor([int(m[label_key]) for m in metas], device=module.device))
        hashes.append(torch.tensor([key_hash(k) for k in batch_keys], device=module.device))
    if not feats:
        raise ValueError(f"no records with an image on sides {list(sides)} in {shard_set['path']}")
    out = [gather_no_grad(torch.cat(t)).cpu() for t in (feats, labels, hashes)]
    out = out if with_key_hash else out[:2]
    return (*out, _gather_keys(keys)) if with_keys else tuple(out)


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float = 0.601,
                            max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn-style multinomial logistic regression: minimise ``C * sum CE + ||W||^2 / 2`` (bias not penalised).

    Returns ``(weight [K, D], bias [K])``; full-batch L-BFGS, deterministic.
    """
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    x64 = x.double()
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        # divided by C * N so the scale of the objective does not depend on the data size
        loss = F.cross_entropy(x64 @ weight.T + bias, y, reduction="sum") / len(y) + (weight**2).sum() / (2 * c * len(y))
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach().float(), bias.detach().float()


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int, temperature: float,
                num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """DINO weighted k-NN: class scores ``[Q, K]`` = sum over the top-k neighbours of ``exp(cos / T)``."""
    k = min(k, len(train_x))
    scores = []
    for start in range(0, len(test_x), chunk):
        sim, idx = (test_x[start:start + chunk] @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


class _FrozenFeatureEvaluator:
    """Shared plumbing: embed the sets, score on rank 0, write the report, broadcast the metrics."""

    title = ""

    def __init__(self, name: str, label_key: str = "digit", prefix: str = "val"):
        self.name, self.label_key, self.prefix = name, label_key, prefix

    def score(self, module, datamodule) -> dict[str, float]:
        raise NotImplementedError  # abstract

    def run(self, module, datamodule, output_dir: str | os.PathLike, logger=None, tag: str = "") -> dict[str, float]:
        """Evaluate on every rank (all ranks must call it); returns the metrics on every rank."""
        was_training = module.training
        module.eval()
        scores = self.score(module, datamodule)
        if was_training:
            module.train()
        results = {f"{self.prefix}/{self.name}/{metric}": value for metric, value in scores.items()}
        if is_rank_zero():
            table = markdown_table([self.name], list(scores), {(self.name, m): v for m, v in scores.items()},
                                   title=f"{self.title} ({tag or 'model'})", average_row=False, row_header="dataset")
            publish(output_dir, f"{type(self).__name__}_{self.name}", table, results, logger)
        return results


class LinearProbeEvaluator(_FrozenFeatureEvaluator):
    """Logistic regression on frozen features of ``train``, top-1 (%) on ``test``.

    Args:
        name: dataset name in the metric names ``<prefix>/<name>/linear_probe/top1``.
        train, test: ``{"path": shard_set, "sides": [...]}``.
        label_key: the meta field holding the integer class.
        c: inverse L2 strength (sklearn's ``C``); a list sweeps it as the CLIP protocol does (MLCD's linear
            probe): each value is fitted on the training records whose :func:`key_hash` is not ``0 mod
            val_every``, scored on those that are, and the best (the smallest on ties) is refitted on all of them.
            The split depends on the keys only, so it is the same with any number of processes.
        val_every: one training record in ``val_every`` is held out for the sweep.
        max_iter: L-BFGS iterations.
    """

    title = "Linear probe top-1 (%)"

    def __init__(self, name: str, train: Mapping[str, Any], test: Mapping[str, Any], label_key: str = "digit",
                 c: float | Sequence[float] = 0.601, max_iter: int = 1000, prefix: str = "val", val_every: int = 5):
        super().__init__(name, label_key, prefix)
        self.train, self.test, self.max_iter, self.val_every = dict(train), dict(test), max_iter, val_every
        self.c = sorted(float(v) for v in c) if isinstance(c, Sequence) else float(c)

    def select_c(self, x: torch.Tensor, y: torch.Tensor, hashes: torch.Tensor, num_classes: int) -> float:
        """The ``C`` of the sweep with the best held-out top-1 (ties: the smallest, i.e. the most regularised)."""
        held = hashes % self.val_every == 0
        best, best_acc = self.c[0], -1.0
        for c in self.c:
            weight, bias = fit_logistic_regression(x[~held], y[~held], num_classes, c, self.max_iter)
            acc = ((x[held] @ weight.T + bias).argmax(dim=1) == y[held]).float().mean().item()
            if acc > best_acc:
                best, best_acc = c, acc
        return best

    def score(self, module, datamodule) -> dict[str, float]:
        train_x, train_y, hashes = embed_labelled(module, datamodule, self.train, self.label_key, with_key_hash=True)
        test_x, test_y = embed_labelled(module, datamodule, self.test, self.label_key)
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        sweep = isinstance(self.c, list)
        c = self.select_c(train_x, train_y, hashes, num_classes) if sweep else self.c
        weight, bias = fit_logistic_regression(train_x, train_y, num_classes, c, self.max_iter)
        pred = (test_x @ weight.T + bias).argmax(dim=1)
        out = {"linear_probe/top1": 100.0 * (pred == test_y).float().mean().item()}
        return {**out, "linear_probe/c": c} if sweep else out


class KNNEvaluator(_FrozenFeatureEvaluator):
    """Weighted k-NN classification top-1 (%) for each ``k`` (metric ``<prefix>/<name>/knn/top1@k``).

    Args:
        ks: neighbour counts (UNICOM / DINO: 10, 20, 100, 200).
        temperature: ``T`` of the vote weight ``exp(cos / T)`` (0.07).
    """

    title = "Weighted k-NN top-1 (%)"

    def __init__(self, name: str, train: Mapping[str, Any], test: Mapping[str, Any], label_key: str = "digit",
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07, prefix: str = "val"):
        super().__init__(name, label_key, prefix)
        self.train, self.test, self.ks, self.temperature = dict(train), dict(test), list(ks), temperature

    def score(self, module, datamodule) -> dict[str, float]:
        train_x, train_y = embed_labelled(module, datamodule, self.train, self.label_key)
        test_x, test_y = embed_labelled(module, datamodule, self.test, self.label_key)
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        out = {}
        for k in self.ks:
            pred = knn_predict(train_x, train_y, test_x, k, self.temperature, num_classes).argmax(dim=1)
            out[f"knn/top1@{k}"] = 100.0 * (pred == test_y).float().mean().item()
        return out


class ImageRetrievalEvaluator(_FrozenFeatureEvaluator):
    """Recall@k (%) of label-matched nearest neighbours (metric ``<prefix>/<name>/retrieval/recall@k``).

    Args:
        query: ``{"path", "sides"}``; with no ``gallery``, leave-one-out: every image queries all the others.
        gallery: optional separate gallery set (query/gallery protocol, e.g. In-Shop).
        ks: reported k (UNICOM reports Recall@1).
        index: keyword arguments of :class:`~unimm.eval.index.EmbeddingIndex` (flat by default).
    """

    title = "Image retrieval Recall@k (%)"

    def __init__(self, name: str, query: Mapping[str, Any], gallery: Mapping[str, Any] | None = None,
                 label_key: str = "digit", ks: Sequence[int] = (1,), index: Mapping[str, Any] | None = None,
                 prefix: str = "val", per_query_top_k: int | None = None):
        super().__init__(name, label_key, prefix)
        self.query, self.gallery = dict(query), dict(gallery) if gallery else None
        self.ks, self.index_kwargs = list(ks), dict(index or {})
        self.per_query_top_k = per_query_top_k
        self._ranking: dict | None = None  # the last score()'s ranking, for the per-query outputs

    def score(self, module, datamodule) -> dict[str, float]:
        query_x, query_y, query_keys = embed_labelled(module, datamodule, self.query, self.label_key, with_keys=True)
        gallery_x, gallery_y, gallery_keys = (query_x, query_y, query_keys) if self.gallery is None else \
            embed_labelled(module, datamodule, self.gallery, self.label_key, with_keys=True)
        depth = self.per_query_top_k or max(max(self.ks), 10)
        ranking: dict = {}
        metrics = recall_at_k(query_x.numpy(), query_y.numpy(), gallery_x.numpy(), gallery_y.numpy(), self.ks,
                              leave_one_out=self.gallery is None, index_kwargs=self.index_kwargs, depth=depth,
                              ranking=ranking)
        self._ranking = {**ranking, "query_keys": query_keys, "gallery_keys": gallery_keys,
                         "query_y": query_y.numpy(), "gallery_y": gallery_y.numpy(), "k": depth}
        return metrics

    def run(self, module, datamodule, output_dir: str | os.PathLike, logger=None, tag: str = "") -> dict[str, float]:
        """The base run, then ``per_query/<name>.trec`` / ``.jsonl`` and the manifest (docs/per_query_outputs.md);
        positives of a query are the gallery records with its label (itself excluded when leave-one-out)."""
        results = super().run(module, datamodule, output_dir, logger=logger, tag=tag)
        if is_rank_zero() and self._ranking is not None:
            r = self._ranking
            loo = self.gallery is None
            positives = [{int(j) for j in np.flatnonzero(r["gallery_y"] == y) if not (loo and j == q)}
                         for q, y in enumerate(r["query_y"])]
            main = f"retrieval/recall@{self.ks[0]}"
            writer = PerQueryWriter(output_dir, self.name, tag)
            writer.pool(self.name, dataset=self.name, task="i2i", query_modality="image", query_keys=r["query_keys"],
                        query_metas=[{}] * len(r["query_keys"]), pool_keys=r["gallery_keys"], ranked=r["ranked"],
                        scores=r["scores"], positives=positives, ks=self.ks, k=min(r["k"], r["ranked"].shape[1]),
                        queries_path=str(self.query["path"]),
                        pool_path=str((self.gallery or self.query)["path"]), metric=main,
                        value=results[f"{self.prefix}/{self.name}/{main}"])
            writer.close(logger)
        self._ranking = None
        return results


def recall_at_k(query_x: np.ndarray, query_y: np.ndarray, gallery_x: np.ndarray, gallery_y: np.ndarray,
                ks: Sequence[int], leave_one_out: bool, index_kwargs: Mapping[str, Any] | None = None,
                depth: int = 0, ranking: dict | None = None) -> dict[str, float]:
    """Recall@k (%): share of queries with a same-label item among their k nearest gallery items.

    With ``leave_one_out`` the gallery is the query set and each query's own row is excluded. ``ranking`` (a dict),
    when given, receives the search results ``ranked`` / ``scores`` ``[Q, max(max(ks), depth)]`` (gallery rows,
    -1 = none).
    """
    index = EmbeddingIndex(gallery_x.shape[1], **dict(index_kwargs or {}))
    index.add(gallery_x)
    width = max(max(ks), depth)
    k_max = width + int(leave_one_out)
    scores, ranked = index.search(np.asarray(query_x, np.float32), min(k_max, len(gallery_x)))
    if leave_one_out:
        own = ranked == np.arange(len(query_x))[:, None]
        # drop the query itself (wherever a tie put it), keep the first `width` others; a row that did not find
        # itself (a tie beyond the search depth of a small gallery) is one longer: all are cut to the same width
        keep = min(width, min(int((~mask).sum()) for mask in own)) if len(own) else width
        scores = np.stack([row[~mask][:keep] for row, mask in zip(scores, own)])
        ranked = np.stack([row[~mask][:keep] for row, mask in zip(ranked, own)])
    if ranking is not None:
        ranking.update(ranked=ranked, scores=scores)
    ranked = ranked[:, : max(ks)]
    hits = (ranked >= 0) & (gallery_y[ranked.clip(min=0)] == query_y[:, None])
    return {f"retrieval/recall@{k}": 100.0 * float(hits[:, :k].any(axis=1).mean()) for k in ks}
