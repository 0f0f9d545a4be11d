"""UniMoCo's modality-completion module: pseudo-visual tokens from text, for inputs without an image.

Path (UniMoCo ``modeling_phi3_v.py``, default variant): text tokens -> a small text model (``t2i_model``, PhiModel)
``[n, T, Dt]`` -> ``t2i_proj`` Linear(Dt -> Dv) = pseudo patch embeddings -> a *second* copy of the image encoder
(same initial weights as the backbone's, patch embedding skipped, ``pre_layrnorm`` applied) -> the hidden states of
``feature_layer``, first position dropped -> a copy of the backbone's projector -> ``[n, T-1, H]`` tokens that take
the place of image tokens in the LM input.

Choices where UniMoCo's release is silent or does not run (documented, config options):
- the text model reads the backbone's own token ids (its embedding table is sized to the backbone's vocabulary);
  UniMoCo tokenises a separate prompt for it with Phi-1.5's tokenizer;
- the completion input is the row's first ``num_tokens + 1`` real tokens, padded with the pad id to that fixed
  length (no attention mask in the CLIP layers): a row's pseudo-visual tokens do not depend on the batch;
- works with backbones whose image encoder is a CLIP-style tower (``pre_layrnorm`` + ``encoder``): LLaVA-NeXT and
  Phi-3.5-V; Qwen2-VL's windowless ViT with 2-D RoPE on a patch grid has no text-shaped entry point.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class ModalityCompletion(nn.Module):
    """Text -> pseudo-visual LM tokens.

    Args:
        text_model: a transformers base model (``PhiModel``...) returning ``last_hidden_state`` ``[n, T, Dt]``.
        vision_tower: the copy of the image encoder (``pre_layrnorm``, ``encoder``); see :func:`build_completion`.
        projector: the copy of the backbone's vision->LM projector (``[.., Dv] -> [.., H]``).
        num_tokens: pseudo-visual tokens per completed row (``T - 1``).
        feature_layer: which hidden state of the tower feeds the projector (Phi-3.5-V, LLaVA: -2).
        pad_token_id: id used to pad rows shorter than ``num_tokens + 1``.
    """

    def __init__(self, text_model: nn.Module, vision_tower: nn.Module, projector: nn.Module, num_tokens: int = 16,
                 feature_layer: int = -2, pad_token_id: int = 0):
        super().__init__()
        self.text_model = text_model
        self.vision_tower = vision_tower
        self.projector = projector
        self.num_tokens = num_tokens
        self.feature_layer = feature_layer
        self.pad_token_id = pad_token_id
        self.proj = nn.Linear(text_model.config.hidden_size, vision_tower.config.hidden_size)

    def completion_ids(self, input_ids: Tensor, attention_mask: Tensor, slots: Tensor) -> Tensor:
        """The first ``num_tokens + 1`` real (non-slot) tokens of each row, right padded: ``[n, num_tokens + 1]``."""
        length = self.num_tokens + 1
        out = torch.full((input_ids.shape[0], length), self.pad_token_id, dtype=torch.long, device=input_ids.device)
        for r in range(input_ids.shape[0]):
            ids = input_ids[r][attention_mask[r].bool() & ~slots[r]][:length]
            out[r, : ids.numel()] = ids
        return out

    def forward(self, input_ids: Tensor) -> Tensor:
        """``input_ids`` ``[n, num_tokens + 1]`` -> pseudo-visual tokens ``[n, num_tokens, H]``."""
        text = self.text_model(input_ids=input_ids).last_hidden_state  # [n, T, Dt]
        patches = self.proj(text)  # [n, T, Dv]: the tower's patch-embedding output, replaced
        hidden = self.vision_tower.encoder(inputs_embeds=self.vision_tower.pre_layrnorm(patches),
                                           output_hidden_states=True).hidden_states[self.feature_layer]
        return self.projector(hidden[:, 1:])  # first position plays CLS: dropped as UniMoCo does

    def fill(self, backbone, inputs: dict[str, Tensor]) -> Tensor:
        """Token embeddings ``[B, L, H]`` of ``inputs`` with every ``completion_mask`` slot replaced."""
        embeds = backbone.embed_tokens(inputs["input_ids"])
        slots = inputs["completion_mask"]
        rows = slots.any(dim=1).nonzero().squeeze(1)
        ids = self.completion_ids(inputs["input_ids"][rows], inputs["attention_mask"][rows], slots[rows])
        pseudo = self.forward(ids).to(embeds.dtype)  # [n, K, H]
        return embeds.masked_scatter(slots.unsqueeze(-1), pseudo.reshape(-1, pseudo.shape[-1]))


def build_completion(backbone, text_model: nn.Module, num_tokens: int = 16, feature_layer: int = -2,
                     pad_token_id: int = 0) -> ModalityCompletion:
    """UniMoCo's "dual image encoders initialised from identical weights": deep copies of the backbone's image
    tower and projector (the backbone exposes them as ``vision_tower()`` and ``projector()``)."""
    if not (hasattr(backbone, "vision_tower") and hasattr(backbone, "projector")):
        raise TypeError(f"{type(backbone).__name__} has no CLIP-style vision tower for modality completion "
                        "(supported: LlavaNextBackbone, Phi3VBackbone)")
    return ModalityCompletion(text_model, copy.deepcopy(backbone.vision_tower()), copy.deepcopy(backbone.projector()),
                              num_tokens, feature_layer, pad_token_id)
