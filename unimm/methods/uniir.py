"""UniIR retrievers (Wei et al., 2024): CLIP towers with score fusion.

Score fusion (CLIP_SF): a query or candidate with text and/or image is embedded as
``txt_mask * text_feature + img_mask * image_feature`` (the projected CLIP features, summed raw, then
L2-normalised), as in UniIR's ``clip_sf.py``. The instruction is already prefixed to the query text by the
collator. Training loss: InfoNCE query -> candidate only, scaled by CLIP's learnable (unclamped) logit scale,
candidates gathered across ranks with gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from unimm.losses import InfoNCE
from unimm.methods.base import EmbeddingModule


class UniIRModule(EmbeddingModule):
    """UniIR CLIP score-fusion retriever.

    Args:
        encoder: a Hugging Face ``CLIPModel`` (both towers and projections).
        loss: the contrastive loss; with ``temperature=None`` CLIP's own ``logit_scale`` is used (learnable).
        optimizer, scheduler: see :class:`~unimm.methods.base.EmbeddingModule`.
    """

    def __init__(self, encoder: CLIPModel, loss: InfoNCE, optimizer, scheduler=None, on_nonfinite_loss: str = "skip"):
        super().__init__(optimizer, scheduler, on_nonfinite_loss)
        self.encoder = encoder
        self.loss = loss

    def embed(self, side: dict[str, Any]) -> torch.Tensor:
        """Score fusion of one side: ``[B, D]`` with D the CLIP projection dim, L2-normalised."""
        dim = self.encoder.config.projection_dim
        fused = torch.zeros(side["size"], dim, device=self.device, dtype=self.encoder.logit_scale.dtype)
        if len(side["text_rows"]):
            text = self.encoder.get_text_features(input_ids=side["input_ids"], attention_mask=side["attention_mask"])
            fused = fused.index_add(0, side["text_rows"], text.pooler_output.to(fused.dtype))
        if len(side["image_rows"]):
            image = self.encoder.get_image_features(pixel_values=side["pixel_values"])
            fused = fused.index_add(0, side["image_rows"], image.pooler_output.to(fused.dtype))
        return F.normalize(fused, dim=-1)

    def encode_query(self, side: dict[str, Any]) -> torch.Tensor:
        return self.embed(side)

    def encode_candidate(self, side: dict[str, Any]) -> torch.Tensor:
        return self.embed(side)

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query = self.encode_query(batch["query"])
        cand = self.encode_candidate(batch["pos"])
        scale = self.encoder.logit_scale.exp() if self.loss.temperature is None else None
        out = self.loss(query, cand, logit_scale=scale)
        terms = {"accuracy": out.accuracy, "logit_scale": self.encoder.logit_scale.exp().detach()}
        return out.loss, terms
