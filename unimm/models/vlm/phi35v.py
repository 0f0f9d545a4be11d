"""Phi-3.5-V (``microsoft/Phi-3.5-vision-instruct``) from native transformers parts: CLIP ViT-L/14-336 + HD crops
+ an MLP projector + the Phi-3 language model, behind the :class:`~unimm.models.vlm.adapters.VLMAdapter` /
:class:`~unimm.models.vlm.adapters.VLMBackbone` interfaces (VLM2Vec's and UniMoCo's first backbone).

What differs from the other backbones (the official ``image_embedding_phi3_v.py``, ``processing_phi3_v.py``):

- image token ``<|image_1|>`` (MMEB's own), **right** padding (VLM2Vec), HD crops (:mod:`.phi35v_crop`);
- image features: the CLIP tower's **penultimate** layer (``layer_idx = -2``), patch tokens only (no CLS); each
  view's ``G x G`` patch grid is merged 2x2 into ``g x g`` tokens of width ``4 * D`` (channel order: row offset,
  column offset, feature); the tiles are laid out as one ``hc*g x wc*g`` grid;
- order per image (``hd_transform_order = "sub_glb"``): the tiles' grid row by row, each row followed by the
  newline ``sub_GN``; then the separator ``glb_GN``; then the global view's ``g x g`` grid, each row followed by
  ``sub_GN`` too; then ``img_projection`` = Linear(4D -> H), GELU, Linear(H -> H);
- the LM is the native :class:`~transformers.Phi3Model` (fused ``qkv_proj`` / ``gate_up_proj``, LongRoPE).

Prompts with images are tokenised as the official ``Phi3VProcessor._convert_images_texts_to_inputs``: split on
the ``<|image_N|>`` tags, each text piece tokenised on its own (so each keeps its own BOS: ``[BOS] [img]*n [BOS]
text``), the pieces joined by the images' tokens, and not truncated (the official processor ignores
``max_length`` when a prompt has images; it cuts text-only prompts only). The official processor writes ``-N`` at
the image positions and its model embeds them as id 0 before overwriting them; here they hold the id of
``<|image_1|>`` and ``image_mask`` marks them (same embeddings). Choices: only the real views of an image go through the tower (the official code also encodes the
zero-padded ones and drops them; the kept features are the same, the tower sees each view on its own).
LongRoPE switches every row of a batch to its long factors when any row passes ``original_max_position_embeddings``
(4096) positions; VLM2Vec's inputs (256 text tokens + at most 781 image tokens at 4 crops) stay below it.
"""

from __future__ import annotations

import re

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3Model

from unimm.models.vlm.adapters import VLMAdapter, VLMBackbone, special_token_tokenizer
from unimm.models.vlm.phi35v_crop import Phi35VImageProcessor

IMAGE_TOKEN = "<|image_1|>"
IMAGE_TAG = re.compile(r"<\|image_\d+\|>")  # the official processor's split pattern


# -- model side ---------------------------------------------------------------------------------------------------
class Phi35VImageEmbedding(nn.Module):
    """HD-crop views -> projected image tokens (the official ``vision_embed_tokens``, without its ``wte``).

    Args:
        vision_config: the CLIP tower (Phi-3.5-V: ViT-L/14 at 336 px, width ``D`` 1024).
        hidden_size: the LM width ``H``.
        layer_idx: the tower's hidden state used (transformers' ``hidden_states`` index; official -2).
    """

    def __init__(self, vision_config: CLIPVisionConfig, hidden_size: int, layer_idx: int = -2):
        super().__init__()
        self.img_processor = CLIPVisionModel(vision_config)
        self.layer_idx = layer_idx
        self.patch_grid = vision_config.image_size // vision_config.patch_size  # G (24)
        if self.patch_grid % 2:
            raise ValueError(f"{self.patch_grid} patches per side cannot be merged 2x2")
        self.crop_size = vision_config.image_size
        merged = 4 * vision_config.hidden_size
        # separators (official shapes): glb_GN between tiles and global view, sub_GN ends every row
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, merged))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, merged))
        self.img_projection = nn.Sequential(nn.Linear(merged, hidden_size), nn.GELU(),
                                            nn.Linear(hidden_size, hidden_size))

    def patch_features(self, views: Tensor) -> Tensor:
        """``[n, 3, S, S]`` -> merged patch features ``[n, g, g, 4D]`` of the ``layer_idx`` hidden state."""
        tower = self.img_processor
        hidden = tower(views.to(tower.dtype), output_hidden_states=True).hidden_states[self.layer_idx][:, 1:]
        n, _, d = hidden.shape
        g = self.patch_grid // 2
        # [n, G*G, D] -> [n, g, 2, g, 2, D] -> [n, g, g, (2, 2, D)]: each token holds a 2x2 patch block
        return hidden.reshape(n, g, 2, g, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(n, g, g, 4 * d)

    def with_newlines(self, grid: Tensor) -> Tensor:
        """``[h, w, 4D]`` -> ``[h * (w + 1), 4D]``: ``sub_GN`` after each row."""
        newline = self.sub_GN.reshape(1, 1, -1).expand(grid.shape[0], 1, -1)
        return torch.cat([grid, newline.to(grid.dtype)], dim=1).reshape(-1, grid.shape[-1])

    def forward(self, pixel_values: Tensor, image_sizes: Tensor) -> Tensor:
        """``pixel_values`` ``[N, V, 3, S, S]`` (global view first), ``image_sizes`` ``[N, 2]`` (H, W) ->
        ``[sum of tokens, H]``: the images' tokens one after the other."""
        s = self.crop_size
        crops = [(int(h) // s, int(w) // s) for h, w in image_sizes.tolist()]
        views = torch.cat([pixel_values[i, : 1 + hc * wc] for i, (hc, wc) in enumerate(crops)])
        feats = self.patch_features(views)  # [sum of views, g, g, 4D]
        g = feats.shape[1]
        out, start = [], 0
        for hc, wc in crops:
            glb, tiles = feats[start], feats[start + 1 : start + 1 + hc * wc]
            start += 1 + hc * wc
            # [hc*wc, g, g, C] -> [hc, g, wc, g, C] -> one (hc*g) x (wc*g) grid, tiles in row-major order
            grid = tiles.reshape(hc, wc, g, g, -1).permute(0, 2, 1, 3, 4).reshape(hc * g, wc * g, -1)
            out += [self.with_newlines(grid), self.glb_GN.reshape(1, -1).to(feats.dtype), self.with_newlines(glb)]
        proj = self.img_projection[0]
        return self.img_projection(torch.cat(out).to(proj.weight.dtype))


class Phi35VModel(nn.Module):
    """The native Phi-3 LM with image features scattered into its input embeddings.

    ``config`` is the LM's :class:`~transformers.Phi3Config` (what peft and the embedding table read).
    """

    base_model_prefix = ""  # read by peft's key conversion when it wraps a model holding transformers submodules

    def __init__(self, text_config: Phi3Config, vision_config: CLIPVisionConfig, layer_idx: int = -2):
        super().__init__()
        self.language_model = Phi3Model(text_config)
        self.vision = Phi35VImageEmbedding(vision_config, text_config.hidden_size, layer_idx)
        self.config = self.language_model.config

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs)
        self.vision.img_processor.gradient_checkpointing_enable(gradient_checkpointing_kwargs)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, use_cache: bool = False,
                pixel_values: Tensor | None = None, image_sizes: Tensor | None = None,
                image_mask: Tensor | None = None):
        """``inputs_embeds`` ``[B, L, H]``; ``image_mask`` ``[B, L]`` marks the image tokens, filled in row-major
        order with the images' features (images in batch order). Returns the LM output (``last_hidden_state``)."""
        if pixel_values is not None:
            feats = self.vision(pixel_values, image_sizes)
            mask = image_mask.bool()
            if int(mask.sum()) != feats.shape[0]:
                raise ValueError(f"{int(mask.sum())} image tokens in the input but the images give {feats.shape[0]} "
                                 "features (processor and model disagree on crop size or num_crops)")
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), feats.to(inputs_embeds.dtype))
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=use_cache)


class Phi3VBackbone(VLMBackbone):
    """Phi-3.5-V: 1-D positions (the base class), image tokens located by the adapter's ``image_mask``."""

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def vision_tower(self) -> nn.Module:
        return self.model.vision.img_processor

    def projector(self) -> nn.Module:
        return self.model.vision.img_projection

    def image_kwargs(self, inputs):
        return {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"],
                "image_mask": inputs["image_mask"]}


# -- input side ---------------------------------------------------------------------------------------------------
class Phi3VAdapter(VLMAdapter):
    """Phi-3.5-V: ``<|image_N|>`` tags, right padding (VLM2Vec), HD crops; ``image_mask`` marks the image tokens.
    Prompts with images are tokenised piece-wise and not truncated, as the official processor (:meth:`tokenize`).

    Args:
        image_processor: a :class:`~unimm.models.vlm.phi35v_crop.Phi35VImageProcessor`.
    """

    image_token = IMAGE_TOKEN
    default_padding_side = "right"

    def tokenize(self, texts, images):
        """Text-only prompts: one call, cut to ``max_length``. Prompts with images: the official piece-wise
        tokenisation (module docstring), tags ``<|image_1|>`` ... ``<|image_n|>`` once each, in order (the official
        model fills image positions in order, whatever the tag's number)."""
        rows = []
        for r, (text, row_images) in enumerate(zip(texts, images)):
            if not row_images:
                rows.append(self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"])
                continue
            tags = IMAGE_TAG.findall(text)
            expected = [f"<|image_{i + 1}|>" for i in range(len(row_images))]
            if tags != expected:
                raise ValueError(f"row {r} has {len(row_images)} images, so its prompt needs the tags {expected} in "
                                 f"that order, once each; found {tags}: {text[:200]!r}")
            pieces = [self.tokenizer(piece)["input_ids"] for piece in IMAGE_TAG.split(text)]
            ids = list(pieces[0])
            for piece in pieces[1:]:
                ids += [self.image_token_id, *piece]
            rows.append(ids)
        return rows

    def image_inputs(self, images: list[Image.Image]):
        out = self.image_processor(images)
        return out, self.image_processor.tokens(out["image_sizes"])

    def token_type(self, ids):
        return {"image_mask": [int(t == self.image_token_id) for t in ids]}


# -- tiny builders ------------------------------------------------------------------------------------------------
def tiny_vision_config(width: int = 32, layers: int = 2, heads: int = 4, crop_size: int = 56,
                       patch_size: int = 14) -> CLIPVisionConfig:
    """A CLIP tower shaped as Phi-3.5-V's (quick-GELU, patch 14) but ``width`` wide at ``crop_size`` px."""
    return CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=crop_size, patch_size=patch_size,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)


def phi35v_tiny_processor(vocab_file: str, crop_size: int = 56, patch_size: int = 14, num_crops: int = 4,
                          max_length: int = 32, padding_side: str | None = None) -> Phi3VAdapter:
    """Word-level toy tokenizer + ``<|image_1|>`` and HD crops of ``crop_size`` px (pair with :func:`tiny_phi35v`)."""
    return Phi3VAdapter(special_token_tokenizer(vocab_file, (IMAGE_TOKEN,)),
                        Phi35VImageProcessor(num_crops, crop_size, patch_size), max_length, padding_side)


def tiny_phi35v(vocab_file: str, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 4,
                vision_width: int = 32, vision_layers: int = 2, crop_size: int = 56, patch_size: int = 14,
                seed: int = 0) -> Phi3VBackbone:
    """A random Phi-3.5-V small enough for CPU tests over the toy vocabulary + ``<|image_1|>``."""
    tok = special_token_tokenizer(vocab_file, (IMAGE_TOKEN,))
    text = Phi3Config(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    vision = tiny_vision_config(vision_width, vision_layers, 4, crop_size, patch_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Phi3VBackbone(Phi35VModel(text, vision))
