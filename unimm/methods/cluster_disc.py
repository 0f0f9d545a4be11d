"""Cluster discrimination (UNICOM, An et al. 2023; MLCD, An et al. 2024): a vision encoder trained to classify
images into offline k-means pseudo-classes, against class centres sharded over ranks (PartialFC).

UNICOM: one label per image, ArcFace softmax. MLCD: the top-l nearest centres as positives, multi-label loss
with sampled negatives. Both are the same module with a different loss (``conf/model/cluster_disc.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unimm.losses.cluster import PartialFC
from unimm.losses.distributed import world_info
from unimm.methods.base import EmbeddingModule


class ClusterDiscModule(EmbeddingModule):
    """A vision encoder trained by cluster discrimination.

    Args:
        encoder: ``pixel_values [B, 3, H, W] -> [B, D]`` with an ``embedding_dim`` attribute
            (:class:`~unimm.models.vit.UnicomViT`, :class:`~unimm.models.vit.PooledVisionEncoder`).
        loss: partial :class:`~unimm.losses.cluster.PartialFC` taking ``embedding_dim``.
        optimizer, scheduler, on_nonfinite_loss: see :class:`~unimm.methods.base.EmbeddingModule`.
    """

    def __init__(self, encoder: nn.Module, loss: Callable[..., PartialFC], optimizer, scheduler=None,
                 on_nonfinite_loss: str = "skip", compile: bool | dict = False):
        super().__init__(optimizer, scheduler, on_nonfinite_loss, compile)
        self.encoder = encoder
        self.loss = loss(embedding_dim=encoder.embedding_dim)

    def setup(self, stage: str) -> None:
        # The process group exists now (it did not when the module was built): keep only this rank's block of
        # class centres and tell DDP not to average them (each rank holds different classes).
        rank, world_size = world_info()
        self.loss.shard(rank, world_size)
        self._ddp_params_and_buffers_to_ignore = PartialFC.ddp_ignored("loss")

    def embed(self, side: dict[str, Any]) -> torch.Tensor:
        """``[B, D]`` L2-normalised image features of a side (every row must have an image)."""
        if len(side["image_rows"]) != side["size"]:
            raise ValueError(f"cluster discrimination embeds images only: {side['size'] - len(side['image_rows'])} "
                             f"of {side['size']} rows have no image")
        return F.normalize(self.encoder(side["pixel_values"]).float(), dim=-1)

    def encode_query(self, side: dict[str, Any]) -> torch.Tensor:
        return self.embed(side)

    def encode_candidate(self, side: dict[str, Any]) -> torch.Tensor:
        return self.embed(side)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        unlabelled = (labels < 0).all(dim=1)
        if unlabelled.any():
            keys = [k for k, u in zip(batch["keys"], unlabelled.tolist()) if u][:5]
            raise KeyError(f"{int(unlabelled.sum())} training records have no cluster labels (e.g. {keys}); "
                           "is the collator's labels_dir the one made for this shard set?")
        out = self.loss(self.encoder(batch["image"]["pixel_values"]), labels)
        return out.loss, {"num_sampled_centres": torch.tensor(float(out.num_sampled))}
