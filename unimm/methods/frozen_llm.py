"""Retrieval with a frozen LLM: FROMAGe (Koh et al., 2023) and UNIMUR (Wang et al., 2024).

Each training step runs FROMAGe's two passes over a batch of image-caption pairs:

1. captioning: ``[image prefix; BOS caption]`` -> LM loss on the caption (not on [RET] or padding); with
   probability ``concat_captions_prob`` per step (FROMAGe: 0.5) pairs of examples are concatenated into one row
   ``[prefix_1; caption_1; prefix_2; caption_2]`` (:func:`~unimm.losses.frozen_lm.concat_caption_pairs`);
2. retrieval: ``[BOS caption [RET]]`` -> LM loss up to [RET] (teaches emitting [RET]) and the [RET] hidden state
   through ``text_head`` = the *unified embedding* ``u``; ``u`` is aligned contrastively with the paired image
   (FROMAGe: learned ``image_head``; UNIMUR: frozen CLIP-V) and, for UNIMUR, with the frozen CLIP-T embedding of
   the same text (:class:`~unimm.losses.frozen_lm.DualAlignment`).

Total: ``caption_weight * L_cap + ret_lm_weight * L_ret + w_vm * VM + w_tm * TM`` (FROMAGe: all 1, w_tm = 0).
After each step the [RET] row is rescaled to the frozen rows' mean norm.

Embedding for retrieval: anything with text, or a dialogue context, goes through the LLM and gives ``u``; an
image alone gives its image embedding. Text-only candidates use ``u`` (``text_candidate="unified"``) or the
frozen CLIP-T embedding (``"clip"``; UNIMUR's text targets live there, which one the paper used is unverified).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules.module import _IncompatibleKeys

from unimm.losses.frozen_lm import DualAlignment, caption_labels, concat_caption_pairs, retrieval_labels
from unimm.methods.base import EmbeddingModule
from unimm.models.frozen_lm import FrozenLMEncoder
from unimm.training.optim import weight_decay_groups


class FrozenLLMModule(EmbeddingModule):
    """FROMAGe / UNIMUR.

    Args:
        encoder: the :class:`~unimm.models.frozen_lm.FrozenLMEncoder` (frozen LM + CLIP, trainable mappings).
        alignment: the contrastive terms (:class:`~unimm.losses.frozen_lm.DualAlignment`).
        optimizer, scheduler, on_nonfinite_loss: see :class:`~unimm.methods.base.EmbeddingModule`.
        caption_weight: weight of the captioning LM loss (FROMAGe ``cap_loss_scale`` = 1).
        ret_lm_weight: weight of the retrieval-pass LM loss (FROMAGe ``ret_loss_scale`` = 1).
        text_candidate: ``unified`` or ``clip`` embedding for text-only candidates.
        concat_captions_prob: probability per training step that the captioning pass concatenates pairs of
            examples (FROMAGe ``--concat-captions-prob`` 0.5; the retrieval pass never concatenates, as FROMAGe
            without ``--concat-for-ret``). Drawn from torch's global generator (seeded by the run's seed).
        prune_checkpoints: Lightning checkpoints keep only the trainable parts (megabytes, not the LLM).
    """

    TEXT_CANDIDATES = ("unified", "clip")

    def __init__(self, encoder: FrozenLMEncoder, alignment: DualAlignment, optimizer: Callable, scheduler=None,
                 caption_weight: float = 1.0, ret_lm_weight: float = 1.0, text_candidate: str = "unified",
                 prune_checkpoints: bool = True, concat_captions_prob: float = 0.0,
                 on_nonfinite_loss: str = "skip", compile: bool | dict = False):
        super().__init__(optimizer, scheduler, on_nonfinite_loss, compile)
        if text_candidate not in self.TEXT_CANDIDATES:
            raise ValueError(f"text_candidate={text_candidate!r}; valid: {list(self.TEXT_CANDIDATES)}")
        self.encoder = encoder
        self.alignment = alignment
        self.caption_weight = caption_weight
        self.ret_lm_weight = ret_lm_weight
        self.text_candidate = text_candidate
        self.prune_checkpoints = prune_checkpoints
        if not 0.0 <= concat_captions_prob <= 1.0:
            raise ValueError(f"concat_captions_prob={concat_captions_prob} is not a probability")
        self.concat_captions_prob = concat_captions_prob

    # -- embedding -----------------------------------------------------------------------------------------------
    def _prefix(self, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        if pixel_values is None:
            return None
        pooled, _ = self.encoder.clip_image(pixel_values)
        return self.encoder.prefix_embeddings(pooled)

    def embed(self, side: dict[str, Any], clip_text_rows: bool = False) -> torch.Tensor:
        """``[B, E]`` L2-normalised: LLM [RET] embedding for sequences, image embedding for lone images, and with
        ``clip_text_rows`` the frozen CLIP-T embedding for text-only rows."""
        out = torch.zeros(side["size"], self.encoder.embed_dim, device=self.device)
        seq_rows = side["seq_rows"]
        keep = torch.ones(len(seq_rows), dtype=torch.bool, device=seq_rows.device)
        if clip_text_rows and len(side.get("clip_rows", ())):
            clip = self.encoder.clip_text_embedding(side["clip_input_ids"], side["clip_attention_mask"])
            out = out.index_copy(0, side["clip_rows"], clip)
            keep = ~torch.isin(seq_rows, side["clip_rows"])  # text-only rows hold no image: image order unchanged
        if bool(keep.any()):
            unified, _ = self.encoder.unified_embedding(
                side["input_ids"][keep], side["attention_mask"][keep], self._prefix(side.get("seq_pixel_values"))
            )
            out = out.index_copy(0, seq_rows[keep], unified)
        if len(side["image_rows"]):
            image = self.encoder.image_embedding(*self.encoder.clip_image(side["pixel_values"]))
            out = out.index_copy(0, side["image_rows"], image)
        return out

    def encode_query(self, side: dict[str, Any]) -> torch.Tensor:
        return self.embed(side)

    def encode_candidate(self, side: dict[str, Any]) -> torch.Tensor:
        return self.embed(side, clip_text_rows=self.text_candidate == "clip")

    # -- training ------------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not batch["keys"]:
            raise ValueError(f"a training batch without any image-caption pair ({batch['unpaired']} unpaired records)")
        enc = self.encoder
        # drawn first, so that the decision depends only on the seed and the step (FROMAGe draws once per pass)
        concat = bool(torch.rand(()) < self.concat_captions_prob) and len(batch["keys"]) > 1
        cap = batch["caption"]
        ids, mask = cap["input_ids"], cap["attention_mask"]
        pooled, projected = enc.clip_image(batch["image"])

        # 1. captioning: [<|image|>] + caption; the placeholder becomes the n_vis prefix embeddings
        image_col = torch.full_like(ids[:, :1], enc.image_token_id)
        cap_ids = torch.cat([image_col, ids], dim=1)
        cap_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        labels = caption_labels(cap_ids, cap_mask, enc.ret_token_id, enc.image_token_id)
        if concat:  # images stay in placeholder (row-major) order: rows 2i, 2i+1 -> row i keeps their order
            pad_id = enc.lm.config.pad_token_id
            cap_ids, cap_mask, labels = concat_caption_pairs(cap_ids, cap_mask, labels, enc.ret_token_id,
                                                             0 if pad_id is None else pad_id)
        cap_loss = enc.caption_loss(cap_ids, cap_mask, labels, enc.prefix_embeddings(pooled))

        # 2. retrieval: caption + [RET] through the LM; the [RET] state is the unified embedding
        unified, ret_lm = enc.unified_embedding(ids, mask, None, labels=retrieval_labels(ids, mask))
        image = enc.image_embedding(pooled, projected)
        text = None
        if self.alignment.textual_weight:
            text = enc.clip_text_embedding(cap["clip_input_ids"], cap["clip_attention_mask"])
        align, terms = self.alignment(unified, image, text, logit_scale=enc.logit_scale.exp())

        loss = self.caption_weight * cap_loss + self.ret_lm_weight * ret_lm + align
        terms.update({"caption_lm": cap_loss.detach(), "ret_lm": ret_lm.detach(),
                      "logit_scale": enc.logit_scale.exp().detach().squeeze(0),
                      "unpaired": torch.tensor(float(batch["unpaired"])),
                      "concat_captions": torch.tensor(float(concat))})
        return loss, terms

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.encoder.rescale_ret_row()

    def param_groups(self, weight_decay: float) -> list[dict]:
        """As the base class, but the LM embedding matrix never gets weight decay: decay would shrink the frozen
        rows, whose gradient is zero but whose weights AdamW's decoupled decay still touches."""
        matrix = self.encoder.token_embeddings
        others = ((n, p) for n, p in self.named_parameters() if p is not matrix)
        return weight_decay_groups(others, weight_decay) + [{"params": [matrix], "weight_decay": 0.0}]

    # -- pruned checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.prune_checkpoints:
            checkpoint["state_dict"] = {f"encoder.{k}": v for k, v in self.encoder.trainable_state().items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads a full state dict, or a pruned one (only ``encoder.<trainable>`` keys) onto the frozen backbones."""
        pruned = {f"encoder.{k}" for k in self.encoder.trainable_state()}
        if set(state_dict) == pruned:
            self.encoder.load_trainable_state({k[len("encoder."):]: v for k, v in state_dict.items()})
            return _IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
