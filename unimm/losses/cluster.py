"""Cluster discrimination losses (UNICOM, MLCD) over class centres sharded across ranks (PartialFC).

Sharding (as UNICOM's ``PartialFC_V2``): rank ``r`` of ``W`` holds only its contiguous block of the ``C`` class
centres, ``[C_r, D]`` with ``C_r ~ C / W``; the full centre matrix never exists on one device. Each step:

1. the embeddings of all ranks are gathered with gradient (:func:`~unimm.losses.distributed.gather_with_grad`),
   labels without, giving ``N = W * B`` rows on every rank;
2. each rank keeps its positive centres plus random negative centres up to ``sample_rate * C_r``;
3. it computes the cosine logits ``[N, n_sampled]`` against those local centres;
4. every normaliser over classes (softmax ``logsumexp``, MLCD ``log(1 + sum exp)``) is combined across ranks with
   an all-reduce of the max and of the sum of exponentials.

Every rank ends with the same global mean loss. Gradients: the local centres get exactly ``dL/dW_r`` (they are
not averaged by DDP: :meth:`PartialFC.ddp_ignored` names them for the LightningModule to exclude), and the local
embeddings get ``W * dL/demb_r`` so that DDP's average over ranks gives the backbone the gradient of the
single-process loss on the concatenated batch.

Objectives:

- :class:`ArcFaceSoftmax` (UNICOM): softmax cross entropy over ``s * cos`` with the target logit
  ``s * cos(theta_y + m)``.
- :class:`MultiLabelClusterLoss` (MLCD): ``log(1 + sum_{i in pos} e^{-s * cos(theta_i + m)})
  + log(1 + sum_{j in sampled neg} e^{s * cos theta_j})``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unimm.losses.distributed import (
    dist_logsumexp,
    gather_no_grad,
    gather_with_grad,
    sum_value_across_ranks,
    world_info,
)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` (undoes DDP's 1/W average for the backbone)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


# -- margins and objectives ------------------------------------------------------------------------------------


def arcface_cos(cos: torch.Tensor, margin: float, straight_through: bool = True) -> torch.Tensor:
    """``cos(theta + margin)`` of cosines ``cos`` (any shape, within ``[-1, 1]``).

    With ``straight_through`` (the official UNICOM / insightface ``CombinedMarginLoss``, which applies the margin
    in place under ``no_grad``) the value is the official ``cos(arccos(cos) + m)`` -- with no threshold: past
    ``theta + m = pi`` it rises again, as UNICOM's ``m1 = 1, m3 = 0`` branch does (golden test
    ``tests/test_golden_unicom.py``) -- and the gradient is that of ``cos`` itself. Otherwise (a unimm option) the
    exact derivative of ``cos(theta + m)``, with the angle clamped to ``[0, pi]`` so the target logit stays
    monotonic and the arccos derivative finite.
    """
    if straight_through:
        with torch.no_grad():
            margined = torch.cos(torch.arccos(cos.clamp(-1, 1)) + margin)
        return cos + (margined - cos).detach()
    theta = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    return torch.cos((theta + margin).clamp(max=math.pi))


MAX_ROW_LOSS = -math.log(1e-30)  # UNICOM DistCrossEntropy: loss.clamp_min_(1e-30).log_()


class ArcFaceSoftmax(nn.Module):
    """UNICOM's ArcFace softmax (``CombinedMarginLoss`` with ``m1 = 1, m3 = 0``): one positive per row.

    Args:
        scale: ``s``; logits are ``s * cos`` and the target ``s * cos(theta_y + margin)``.
        margin: the additive angular margin ``m2``.
        straight_through: official gradient (see :func:`arcface_cos`).
    """

    multi_label = False

    def __init__(self, scale: float = 32.0, margin: float = 0.3, straight_through: bool = True):
        super().__init__()
        self.scale, self.margin, self.straight_through = scale, margin, straight_through

    def forward(self, cos: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """``cos`` ``[N, c_local]`` against this rank's sampled centres; ``positive`` ``[N, c_local]`` bool, one
        True per row over all ranks. Returns the per-row cross entropy ``[N]`` (global over ranks)."""
        logits = torch.where(positive, arcface_cos(cos, self.margin, self.straight_through), cos) * self.scale
        target = sum_value_across_ranks((logits * positive).sum(dim=1))
        loss = dist_logsumexp(logits) - target
        # UNICOM's DistCrossEntropy takes -log(max(p_y, 1e-30)): a row's value is capped at -log(1e-30) ~ 69.08,
        # while its hand-written backward stays softmax - one_hot (uncapped). Same value, same gradient here.
        return loss + (loss.clamp(max=MAX_ROW_LOSS) - loss).detach()


class MultiLabelClusterLoss(nn.Module):
    """MLCD's multi-label cluster discrimination (arXiv 2407.17331, Eq. 5), per row:

    ``log(1 + sum_{i in pos} exp(-s * cos(theta_i + m))) + log(1 + sum_{j in neg} exp(s * cos theta_j))``

    where ``neg`` are the sampled centres that are not positives of the row. The paper states neither ``s`` nor
    ``m`` (UNVERIFIED, see the config); with ``s = 1, m = 0`` this is Eq. 5 exactly.
    """

    multi_label = True

    def __init__(self, scale: float = 32.0, margin: float = 0.0, straight_through: bool = True):
        super().__init__()
        self.scale, self.margin, self.straight_through = scale, margin, straight_through

    def forward(self, cos: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """``cos``, ``positive``: ``[N, c_local]``; returns ``[N]``."""
        pos = -self.scale * arcface_cos(cos, self.margin, self.straight_through) if self.margin else -self.scale * cos
        neg = self.scale * cos
        return dist_logsumexp(pos, positive, plus_one=True) + dist_logsumexp(neg, ~positive, plus_one=True)


# -- PartialFC -------------------------------------------------------------------------------------------------


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous block ``[start, end)`` of class ids held by ``rank`` (the first ``C % W`` ranks hold one more)."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass
class ClusterLossOutput:
    loss: torch.Tensor
    num_sampled: int  # centres used on this rank


class PartialFC(nn.Module):
    """Class centres sharded over ranks with positive + sampled negative centres, and a margin objective.

    Args:
        num_classes: ``C``, the number of pseudo-classes (k-means clusters).
        embedding_dim: ``D``.
        objective: :class:`ArcFaceSoftmax` (single label) or :class:`MultiLabelClusterLoss` (MLCD).
        sample_rate: fraction of this rank's centres used per step (all positives always kept); 1.0 = full softmax.
        num_feat: optional random subset of feature dimensions per step, shared by embeddings and centres
            (UNICOM's ``sample_num_feat``); the same on every rank (seeded by step).
        init_std: centres start as ``N(0, init_std^2)`` (UNICOM: 0.01).
        seed: seeds the centre initialisation (with the rank) and the feature subsets.

    Call :meth:`shard` once the process group exists (the LightningModule does so in ``setup``); until then the
    module holds all ``C`` centres, which is what a single process uses.
    """

    def __init__(self, num_classes: int, embedding_dim: int, objective: nn.Module, sample_rate: float = 1.0,
                 num_feat: int | None = None, init_std: float = 0.01, seed: int = 0):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.objective = objective
        self.sample_rate, self.num_feat = sample_rate, num_feat
        self.init_std, self.seed = init_std, seed
        self.rank, self.world_size = 0, 1
        self.start, self.end = 0, num_classes
        self.weight = nn.Parameter(self._init_centres(num_classes, 0))
        self._step = 0

    def _init_centres(self, n: int, rank: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + rank)
        return torch.randn(n, self.embedding_dim, generator=gen) * self.init_std

    def shard(self, rank: int, world_size: int) -> None:
        """Keep only this rank's block of centres (re-initialised from ``(seed, rank)``); no-op if unchanged."""
        start, end = class_range(self.num_classes, rank, world_size)
        if (start, end) == (self.start, self.end):
            return
        self.rank, self.world_size, self.start, self.end = rank, world_size, start, end
        self.weight = nn.Parameter(self._init_centres(end - start, rank).to(self.weight.device))

    @staticmethod
    def ddp_ignored(prefix: str) -> list[str]:
        """Parameter names DDP must not average: each rank's centres are a different block."""
        return [f"{prefix}.weight"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A checkpoint written by a W-rank run holds rank 0's block only. A single-process rebuild (evaluation,
        # export) never uses the centres, so it takes that block as it is instead of failing on the shape.
        stored = state_dict.get(prefix + "weight")
        if stored is not None and stored.shape != self.weight.shape and self.world_size == 1:
            self.weight = nn.Parameter(torch.empty_like(stored, device=self.weight.device))
            self.end = stored.shape[0]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def sample(self, local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the centres of this step.

        Args:
            local_labels: ``[N, l]`` class ids relative to this rank's block, -1 where not held here.

        Returns:
            ``index`` ``[n]`` sorted local centre ids (every positive, then random others up to
            ``sample_rate * C_r``) and ``labels`` ``[N, l]`` remapped into ``index`` (-1 kept).
        """
        num_local = self.end - self.start
        if self.sample_rate >= 1.0:
            return torch.arange(num_local, device=local_labels.device), local_labels
        held = local_labels >= 0
        positive = torch.unique(local_labels[held])
        num_sample = max(int(self.sample_rate * num_local), positive.numel())
        score = torch.rand(num_local, device=local_labels.device)
        score[positive] = 2.0  # positives first
        index = torch.topk(score, k=num_sample).indices.sort().values
        remapped = torch.where(held, torch.searchsorted(index, local_labels.clamp_min(0)), local_labels)
        return index, remapped

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> ClusterLossOutput:
        """Mean loss over the embeddings of all ranks.

        Args:
            embeddings: ``[B, D]`` this rank's embeddings (not necessarily normalised).
            labels: ``[B]`` (single label) or ``[B, l]`` global class ids, -1 for padding.
        """
        labels = labels.reshape(labels.shape[0], -1)
        if labels.shape[1] > 1 and not self.objective.multi_label:
            raise ValueError(f"{type(self.objective).__name__} takes one label per sample, got {labels.shape[1]}")
        _, world_size = world_info()
        if world_size != self.world_size:
            raise RuntimeError(f"PartialFC sharded for {self.world_size} ranks but running on {world_size}; "
                               "call shard(rank, world_size) after the process group starts")
        if world_size > 1:
            embeddings = _ScaleGrad.apply(embeddings, float(world_size))
        all_emb = gather_with_grad(embeddings)  # [N, D]
        all_labels = gather_no_grad(labels)  # [N, l]
        held = (all_labels >= self.start) & (all_labels < self.end)
        local_labels = torch.where(held, all_labels - self.start, torch.full_like(all_labels, -1))
        index, local_labels = self.sample(local_labels)
        centres = self.weight[index]
        if self.num_feat is not None and self.num_feat < self.embedding_dim:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._step)  # same subset on every rank
            dims = torch.randperm(self.embedding_dim, generator=gen)[: self.num_feat].to(all_emb.device)
            all_emb, centres = all_emb[:, dims], centres[:, dims]
        self._step += 1
        cos = (F.normalize(all_emb.float(), dim=1) @ F.normalize(centres.float(), dim=1).T).clamp(-1, 1)
        positive = torch.zeros_like(cos, dtype=torch.bool)
        rows, cols = (local_labels >= 0).nonzero(as_tuple=True)
        positive[rows, local_labels[rows, cols]] = True
        loss = self.objective(cos, positive).mean()
        return ClusterLossOutput(loss=loss, num_sampled=int(index.numel()))
