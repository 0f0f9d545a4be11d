"""UniIR retrievers (Wei et al., ECCV 2024): one module, the variants are config.

- ``encoder``: the Hugging Face dual encoder (``CLIPModel`` for CLIP_SF / CLIP_FF, ``BlipModel`` for BLIP_SF /
  BLIP_FF); queries and candidates share it.
- ``fusion``: how a row with text and/or image becomes one vector (:mod:`unimm.models.fusion`): score fusion
  (sum of the projected text and image features) or feature fusion (CLIP tokens through T5 layers; BLIP text
  encoder cross-attending to the image). The embedding is the fused vector, L2-normalised.
- ``loss``: :class:`~unimm.losses.InfoNCE` (CLIP variants: query -> candidate only, CLIP's learnable unclamped
  logit scale, candidates gathered across ranks with gradient) or
  :class:`~unimm.losses.momentum.MomentumDistillation` (BLIP variants: ALBEF momentum encoder and queues). With
  the momentum loss the module keeps a frozen EMA copy of encoder and fusion (``momentum_towers``).
- ``fusion_lr``: a learning rate of its own for the fusion head's parameters (CLIP_FF-L trains its T5 layers at
  5e-4 and CLIP at 1e-5); None = the optimizer's lr for everything.

The instruction is prefixed to the query text by the collator.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unimm.losses import InfoNCE
from unimm.losses.momentum import MomentumDistillation, momentum_copy, momentum_update
from unimm.methods.base import EmbeddingModule
from unimm.models.fusion import CLIPScoreFusion
from unimm.training.optim import weight_decay_groups
from unimm.utils.errors import UnsupportedSetting


class UniIRModule(EmbeddingModule):
    """UniIR fusion retriever.

    Args:
        encoder: a Hugging Face ``CLIPModel`` or ``BlipModel``.
        loss: ``InfoNCE`` (with ``temperature=None`` the encoder's own ``logit_scale`` is used, learnable) or
            ``MomentumDistillation``.
        optimizer, scheduler, on_nonfinite_loss: see :class:`~unimm.methods.base.EmbeddingModule`.
        fusion: a fusion head (default: CLIP score fusion, the CLIP_SF model).
        fusion_lr: learning rate of the fusion head's parameters (None = the optimizer's).
    """

    def __init__(self, encoder, loss: InfoNCE | MomentumDistillation, optimizer, scheduler=None,
                 on_nonfinite_loss: str = "skip", compile: bool | dict = False, fusion: nn.Module | None = None,
                 fusion_lr: float | None = None):
        super().__init__(optimizer, scheduler, on_nonfinite_loss, compile)
        scale = getattr(encoder, "logit_scale", None)
        if isinstance(scale, nn.Parameter) and scale.ndim == 0:
            # FSDP cannot shard 0-dim parameters: hold CLIP's logit scale as a 1-element vector (same math)
            encoder.logit_scale = nn.Parameter(scale.detach().reshape(1))
        self.encoder = encoder
        self.fusion = fusion if fusion is not None else CLIPScoreFusion()
        self.loss = loss
        self.fusion_lr = fusion_lr
        self.momentum_towers = None
        if isinstance(loss, MomentumDistillation):
            self.momentum_towers = momentum_copy(nn.ModuleDict({"encoder": encoder, "fusion": self.fusion}))
        self._batch_idx = 0

    # -- embeddings ----------------------------------------------------------------------------------------------
    def embed(self, side: dict[str, Any]) -> torch.Tensor:
        """One side of a batch: ``[B, D]``, L2-normalised."""
        return F.normalize(self.fusion(self.encoder, side), dim=-1)

    @torch.no_grad()
    def embed_momentum(self, side: dict[str, Any]) -> torch.Tensor:
        """The momentum encoder's ``[B, D]`` L2-normalised embeddings (BLIP variants)."""
        towers = self.momentum_towers
        return F.normalize(towers["fusion"](towers["encoder"], side), dim=-1)

    def encode_query(self, side: dict[str, Any]) -> torch.Tensor:
        return self.embed(side)

    def encode_candidate(self, side: dict[str, Any]) -> torch.Tensor:
        return self.embed(side)

    # -- training ------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int):
        self._batch_idx = batch_idx  # the momentum loss ramps alpha over the first epoch
        return super().training_step(batch, batch_idx)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.momentum_towers is None:
            return self._contrastive_loss(batch)
        return self._momentum_loss(batch)

    def _contrastive_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query = self.encode_query(batch["query"])
        cand = self.encode_candidate(batch["pos"])
        negatives = None
        if "neg" in batch:  # [B * N, D] query-major -> [B, N, D]
            negatives = self.encode_candidate(batch["neg"]).view(query.shape[0], -1, query.shape[1])
        scale = self.encoder.logit_scale.exp() if self.loss.temperature is None else None
        out = self.loss(query, cand, logit_scale=scale, hard_negatives=negatives)
        terms = {"accuracy": out.accuracy, "logit_scale": self.encoder.logit_scale.exp().detach().squeeze()}
        return out.loss, terms

    def _momentum_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "pos_ids" not in batch:
            raise KeyError("the momentum loss needs candidate ids (batch['pos_ids']): collate with "
                           "unimm.data.mbeir_collate.MBEIRCollator")
        if "neg" in batch:  # silently dropping them would train a different model than the one asked for
            raise UnsupportedSetting(
                "hard negatives with the momentum loss (UniIR BLIP_SF / BLIP_FF put them into the candidate queue) "
                "are not implemented: set data.collator.hard_negatives=0 or use a CLIP variant")
        query = self.encode_query(batch["query"])
        cand = self.encode_candidate(batch["pos"])
        # UniIR updates the momentum encoder first, then embeds with it
        momentum_update(self.momentum_towers["encoder"], self.encoder, self.loss.momentum)
        momentum_update(self.momentum_towers["fusion"], self.fusion, self.loss.momentum)
        query_m, cand_m = self.embed_momentum(batch["query"]), self.embed_momentum(batch["pos"])
        out = self.loss(query, cand, query_m, cand_m, batch["pos_ids"].to(query.device), ramp=self._alpha_ramp())
        return out.loss, {"accuracy": out.accuracy, **out.terms}

    def _alpha_ramp(self) -> float:
        """Fraction of the first epoch done (UniIR: ``alpha * min(1, i / len(loader))`` in epoch 0), then 1."""
        trainer = self._trainer
        if trainer is None or self.current_epoch > 0 or not trainer.num_training_batches:
            return 1.0
        return min(1.0, self._batch_idx / float(trainer.num_training_batches))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The base groups, with the fusion head's parameters at ``fusion_lr`` when set."""
        if self.fusion_lr is None:
            return super().param_groups(weight_decay)
        fusion_ids = {id(p) for p in self.fusion.parameters()}
        backbone = [(n, p) for n, p in self.named_parameters() if id(p) not in fusion_ids]
        groups = weight_decay_groups(backbone, weight_decay)
        groups += [{**g, "lr": self.fusion_lr} for g in weight_decay_groups(self.fusion.named_parameters(), weight_decay)]
        return [g for g in groups if g["params"]]
