"""Backbone adapters of the VLM embedders: each class states what differs between Qwen2-VL, LLaVA (1.5 layout),
LLaVA-NeXT and Phi-3.5-V.

Two halves per backbone, because inputs are built in DataLoader workers, far from the model:

- the **adapter** (``Qwen2VLAdapter``, ``LlavaAdapter``, ``LlavaNextAdapter``,
  :class:`~unimm.models.vlm.phi35v.Phi3VAdapter`) is the processor: the backbone's image token string, its padding
  side, and how a list of prompts + images becomes the backbone's input tensors (Qwen2-VL: flattened patches,
  ``image_grid_thw``, ``mm_token_type_ids``; LLaVA: one fixed-size view; LLaVA-NeXT: anyres tiles,
  ``image_sizes``). Prompts carry one image token per image; the adapter expands it into as many
  tokens as the image has features, *after* truncating the text to ``max_length`` (image tokens are never cut;
  Phi-3.5-V tokenises image prompts piece-wise and does not truncate them, as its official processor).
- the **backbone** (``Qwen2VLBackbone``, ``LlavaBackbone``, ``LlavaNextBackbone``,
  :class:`~unimm.models.vlm.phi35v.Phi3VBackbone`)
  wraps the native transformers model without its LM head and returns the last layer's hidden states. It always
  passes explicit position ids computed from the attention mask, so left padding does not shift positions (the
  cause of VLM2Vec issue #124, embeddings changing with padding).

Both halves take ``inputs_embeds`` overrides at ``completion_mask`` positions: UniMoCo's pseudo-visual tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from unimm.models.processors import word_level_tokenizer
from unimm.models.vit import vision_tower_from_pretrained


def special_token_tokenizer(vocab_file: str, special_tokens: Sequence[str]):
    """The word-level toy tokenizer (:func:`~unimm.models.processors.word_level_tokenizer`) plus a backbone's
    special tokens (image placeholders), appended after the vocabulary in the given order."""
    tok = word_level_tokenizer(vocab_file)
    tok.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tok


def require_dir(path: str) -> None:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {path} (download the model and point the config at it)")


# -- input side ---------------------------------------------------------------------------------------------------
class VLMAdapter:
    """Turns prompts and images into one backbone's inputs. Subclasses set the class attributes and
    :meth:`image_inputs`.

    Args:
        tokenizer: the backbone's tokenizer (must know :attr:`image_token` as one token).
        image_processor: the backbone's image processor.
        max_length: text tokens kept per prompt (image tokens come on top).
        padding_side: ``left`` or ``right``; None = the backbone's VLM2Vec default (:attr:`default_padding_side`).

    Attributes:
        image_token: the placeholder string of one image in a prompt (MMEB's ``<|image_1|>`` is swapped for it).
        default_padding_side: VLM2Vec's choice for this backbone.
    """

    image_token: str = ""
    default_padding_side: str = "left"

    def __init__(self, tokenizer, image_processor, max_length: int = 256, padding_side: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length
        self.padding_side = padding_side or self.default_padding_side
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be left or right, got {self.padding_side!r}")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token_strip())
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def image_token_strip(self) -> str:
        """The token that stands for the image features (the placeholder may wrap it in start/end tokens)."""
        return self.image_token

    def image_inputs(self, images: list[Image.Image]) -> tuple[dict[str, Tensor], list[int]]:
        """Backbone image tensors of ``images`` and the number of LM tokens of each image."""
        raise NotImplementedError  # abstract

    def tokenize(self, texts: list[str], images: list[list[Image.Image]]) -> list[list[int]]:
        """Token ids of each prompt with one :attr:`image_token_id` per image (expanded later by
        :meth:`__call__`): the whole prompt in one tokenizer call, cut to ``max_length``, as the native
        transformers processors do (their expansion happens before tokenising; the ids are the same)."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def token_type(self, ids: list[int]) -> dict[str, list[int]]:
        """Extra per-token rows this backbone needs (Qwen2-VL: ``mm_token_type_ids``); default none."""
        return {}

    def __call__(self, texts: list[str], images: list[list[Image.Image]],
                 completion_tokens: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Inputs of a batch of prompts.

        Args:
            texts: ``B`` prompts, with one :attr:`image_token` per image of the row, in order.
            images: per row, its images.
            completion_tokens: per row, how many pseudo-visual slots to insert before the text (UniMoCo rows
                without an image; 0 for the others). None = none.

        Returns:
            ``input_ids``, ``attention_mask`` ``[B, L]``; ``completion_mask`` ``[B, L]`` (bool) when any slot was
            asked for; plus the image tensors of :meth:`image_inputs` when any row has an image.
        """
        flat = [im for row in images for im in row]
        out: dict[str, Tensor] = {}
        counts: list[int] = []
        if flat:
            image_tensors, counts = self.image_inputs(flat)
            out.update(image_tensors)
        ids_rows = self.tokenize(list(texts), images)
        rows, slot_rows, extras = [], [], []
        it = iter(counts)
        for r, ids in enumerate(ids_rows):
            n_placeholders = sum(1 for t in ids if t == self.image_token_id)
            if n_placeholders != len(images[r]):
                raise ValueError(f"row {r} has {n_placeholders} image tokens after truncation to {self.max_length} "
                                 f"but {len(images[r])} images: {texts[r][:200]!r}")
            expanded: list[int] = []
            for t in ids:
                expanded += [t] * next(it) if t == self.image_token_id else [t]
            n_slots = completion_tokens[r] if completion_tokens is not None else 0
            rows.append([self.pad_token_id] * n_slots + expanded)
            slot_rows.append([1] * n_slots + [0] * len(expanded))
            extras.append(self.token_type(rows[-1]))
        length = max(len(r) for r in rows)
        pad = [length - len(r) for r in rows]

        def padded(seqs: list[list[int]], value: int) -> Tensor:
            if self.padding_side == "left":
                return torch.tensor([[value] * p + s for s, p in zip(seqs, pad)], dtype=torch.long)
            return torch.tensor([s + [value] * p for s, p in zip(seqs, pad)], dtype=torch.long)

        out["input_ids"] = padded(rows, self.pad_token_id)
        out["attention_mask"] = padded([[1] * len(r) for r in rows], 0)
        if completion_tokens is not None and any(completion_tokens):
            out["completion_mask"] = padded(slot_rows, 0).bool()
        for key in extras[0]:
            out[key] = padded([e[key] for e in extras], 0)
        return out


QWEN2VL_IMAGE_FORMATS = {
    # VLM2Vec (v1 and v2: VLM_IMAGE_TOKENS) swaps MMEB's <|image_1|> for <|image_pad|> alone; its Qwen2-VL
    # get_rope_index finds images only after <|vision_start|>, so every token gets 1-D text positions
    "vlm2vec": "<|image_pad|>",
    # Qwen2-VL's own chat format (transformers' processor and chat template): M-RoPE positions for the image
    "native": "<|vision_start|><|image_pad|><|vision_end|>",
}


class Qwen2VLAdapter(VLMAdapter):
    """Qwen2-VL: left padding (VLM2Vec), dynamic resolution; the image token depends on ``image_format``.

    Each image becomes ``t * h * w`` patches of 14 px (flattened to ``[n_patches, 3 * 2 * 14 * 14]``) and
    ``t*h*w / merge_size**2`` LM tokens. ``mm_token_type_ids`` marks (1) the image tokens that get M-RoPE positions:
    all of them in the ``native`` format, none in VLM2Vec's (there, as in VLM2Vec, every token gets 1-D positions).

    Args:
        image_format: ``vlm2vec`` (default): ``<|image_pad|>`` alone, as VLM2Vec's prompts; ``native``:
            ``<|vision_start|><|image_pad|><|vision_end|>`` with M-RoPE image positions (Qwen2-VL's own format).
    """

    default_padding_side = "left"

    def __init__(self, tokenizer, image_processor, max_length: int = 256, padding_side: str | None = None,
                 image_format: str = "vlm2vec"):
        if image_format not in QWEN2VL_IMAGE_FORMATS:
            raise ValueError(f"image_format {image_format!r}: choose one of {sorted(QWEN2VL_IMAGE_FORMATS)}")
        self.image_format = image_format
        self.image_token = QWEN2VL_IMAGE_FORMATS[image_format]
        super().__init__(tokenizer, image_processor, max_length, padding_side)

    def image_token_strip(self) -> str:
        return "<|image_pad|>"

    def image_inputs(self, images):
        out = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size
        counts = (out["image_grid_thw"].prod(-1) // merge**2).tolist()
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, counts

    def token_type(self, ids):
        mrope = self.image_format == "native"
        return {"mm_token_type_ids": [int(mrope and t == self.image_token_id) for t in ids]}


class LlavaAdapter(VLMAdapter):
    """LLaVA (1.5 layout, e.g. xtuner/llava-phi-3-mini-hf): ``<image>``, left padding, one fixed-size view per image.

    The CLIP processor resizes and centre-crops every image to ``crop_size``; the token count is transformers' own
    (``LlavaProcessor._get_num_multimodal_tokens``: patches + the tower's CLS token, minus that CLS under the
    ``default`` feature strategy): 576 for 336 px and patch 14.

    Attributes:
        counter_class: the transformers processor whose token count this backbone's model expects (used for that
            count only: the prompts are expanded here, after truncation).
    """

    image_token = "<image>"
    default_padding_side = "left"  # VLM2Vec's choice for LLaVA-NeXT; embeddings do not depend on it
    counter_class = LlavaProcessor

    def __init__(self, tokenizer, image_processor, max_length: int = 256, padding_side: str | None = None,
                 patch_size: int = 14, vision_feature_select_strategy: str = "default"):
        super().__init__(tokenizer, image_processor, max_length, padding_side)
        self._counter = self.counter_class(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                           vision_feature_select_strategy=vision_feature_select_strategy,
                                           image_token=self.image_token, num_additional_image_tokens=1)
        self.strategy = vision_feature_select_strategy

    def image_inputs(self, images):
        out = self.image_processor(images=images, return_tensors="pt")
        sizes = [(im.height, im.width) for im in images]
        return {"pixel_values": out["pixel_values"]}, self._counter._get_num_multimodal_tokens(sizes).num_image_tokens


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: as LLaVA, plus anyres tiles (base view + grid crops, ``image_sizes``).

    The token count per image is transformers' own (``LlavaNextProcessor._get_number_of_features``: unpadded
    grid features + one newline per row + the base view with the vision tower's CLS token), minus that CLS token
    under the ``default`` feature strategy.
    """

    counter_class = LlavaNextProcessor

    def image_inputs(self, images):
        out = self.image_processor(images=images, return_tensors="pt")
        tile = (self.image_processor.crop_size["height"], self.image_processor.crop_size["width"])
        counts = [self._counter._get_number_of_features(int(h), int(w), *tile) - (self.strategy == "default")
                  for h, w in out["image_sizes"]]
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}, counts


# -- model side ---------------------------------------------------------------------------------------------------
class VLMBackbone(nn.Module):
    """A native transformers VLM (its ``*Model``: no LM head) returning last-layer hidden states ``[B, L, H]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def position_ids(self, inputs: dict[str, Tensor]) -> Tensor:
        """1-D positions counting only real tokens: the same for a row whatever the padding around it."""
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def image_kwargs(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError  # abstract

    def forward(self, inputs: dict[str, Tensor], inputs_embeds: Tensor | None = None) -> Tensor:
        """``inputs`` from the adapter; ``inputs_embeds`` ``[B, L, H]`` replaces the token embeddings (UniMoCo)."""
        embeds = self.embed_tokens(inputs["input_ids"]) if inputs_embeds is None else inputs_embeds
        kwargs = self.image_kwargs(inputs) if "pixel_values" in inputs else {}
        out = self.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                         position_ids=self.position_ids(inputs), use_cache=False, **kwargs)
        return out.last_hidden_state


class Qwen2VLBackbone(VLMBackbone):
    """Qwen2-VL: M-RoPE positions from ``get_rope_index`` (3D for the image tokens ``mm_token_type_ids`` marks,
    real tokens only); 1-D positions when it marks none (text rows, VLM2Vec's ``<|image_pad|>``-only prompts)."""

    def position_ids(self, inputs):
        types = inputs.get("mm_token_type_ids")
        if types is None or not bool(types.any()):
            return super().position_ids(inputs)  # [B, L]; the model expands it to its 3 rotary sections
        position_ids, _ = self.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"])
        return position_ids  # [3, B, L]

    def image_kwargs(self, inputs):
        return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}


class LlavaBackbone(VLMBackbone):
    """LLaVA (1.5 layout): CLIP tower -> MLP projector -> LM; the image features replace the ``<image>`` tokens."""

    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    def projector(self) -> nn.Module:
        return self.model.multi_modal_projector

    def image_kwargs(self, inputs):
        return {"pixel_values": inputs["pixel_values"]}


class LlavaNextBackbone(LlavaBackbone):
    """LLaVA-NeXT: the tiles of each image are regrouped by its ``image_sizes``."""

    def image_kwargs(self, inputs):
        return {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]}


# -- builders -----------------------------------------------------------------------------------------------------
QWEN2VL_SPECIALS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


def qwen2vl_tiny_processor(vocab_file: str, image_size: int = 28, max_length: int = 64,
                           padding_side: str | None = None, image_format: str = "vlm2vec") -> Qwen2VLAdapter:
    """Word-level toy tokenizer + Qwen2-VL image processing fixed at ``image_size`` (multiple of 28) pixels."""
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels},
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2VLAdapter(special_token_tokenizer(vocab_file, QWEN2VL_SPECIALS), image_processor, max_length,
                          padding_side, image_format)


def qwen2vl_processor(path: str, max_length: int = 256, padding_side: str | None = None,
                      min_pixels: int | None = None, max_pixels: int | None = None,
                      image_format: str = "vlm2vec") -> Qwen2VLAdapter:
    """Tokenizer and image processor of a local Qwen2-VL folder; ``min/max_pixels`` bound the resize;
    ``image_format``: :class:`Qwen2VLAdapter`."""
    require_dir(path)
    size = {k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v is not None}
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True,
                                                               **({"size": size} if size else {}))
    return Qwen2VLAdapter(AutoTokenizer.from_pretrained(path, local_files_only=True), image_processor, max_length,
                          padding_side, image_format)


def tiny_qwen2vl(vocab_file: str, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 vision_width: int = 32, vision_layers: int = 2, seed: int = 0) -> Qwen2VLBackbone:
    """A random Qwen2-VL small enough for CPU tests, over the toy vocabulary + Qwen2-VL's special tokens."""
    tok = special_token_tokenizer(vocab_file, QWEN2VL_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIALS}
    head_dim = hidden_size // heads
    quarter = head_dim // 4  # M-RoPE sections (temporal, height, width) must sum to head_dim / 2
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1024, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                              mrope_section=[head_dim // 2 - 2 * quarter, quarter, quarter])),
        vision_config=dict(depth=vision_layers, embed_dim=vision_width, hidden_size=hidden_size, num_heads=4,
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|video_pad|>"],
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2VLBackbone(Qwen2VLForConditionalGeneration(config).model)


def qwen2vl_from_pretrained(path: str, dtype: str | None = None, attn_implementation: str | None = None
                            ) -> Qwen2VLBackbone:
    """Qwen2-VL (2B / 7B) from a local Hugging Face folder; the LM head is dropped (embeddings only)."""
    require_dir(path)
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return Qwen2VLBackbone(Qwen2VLForConditionalGeneration.from_pretrained(path, local_files_only=True, **kwargs).model)


LLAVA_SPECIALS = ("<image>",)


def llava_next_tiny_processor(vocab_file: str, image_size: int = 32, patch_size: int = 8, max_length: int = 64,
                              padding_side: str | None = None) -> LlavaNextAdapter:
    s = image_size
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                                 image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]])
    return LlavaNextAdapter(special_token_tokenizer(vocab_file, LLAVA_SPECIALS), image_processor, max_length,
                            padding_side, patch_size=patch_size)


def llava_next_processor(path: str, max_length: int = 256, padding_side: str | None = None,
                         patch_size: int = 14, vision_feature_select_strategy: str = "default") -> LlavaNextAdapter:
    require_dir(path)
    image_processor = LlavaNextImageProcessorPil.from_pretrained(path, local_files_only=True)
    return LlavaNextAdapter(AutoTokenizer.from_pretrained(path, local_files_only=True), image_processor, max_length,
                            padding_side, patch_size, vision_feature_select_strategy)


def tiny_llava_next(vocab_file: str, image_size: int = 32, patch_size: int = 8, hidden_size: int = 64,
                    layers: int = 2, heads: int = 4, vision_width: int = 32, seed: int = 0,
                    vision_path: str | None = None) -> LlavaNextBackbone:
    """A random LLaVA-NeXT (CLIP vision tower + Llama) over the toy vocabulary + ``<image>``.

    ``vision_path``: an exported ``CLIPVisionModel`` / ``MLCDVisionModel`` folder (unimm.checkpoints.export_vision)
    replacing the random vision tower; its width must be ``vision_width`` and its image / patch size the same.
    """
    tok = special_token_tokenizer(vocab_file, LLAVA_SPECIALS)
    s = image_size
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=vision_width, intermediate_size=2 * vision_width,
                           num_hidden_layers=2, num_attention_heads=4, image_size=s, patch_size=patch_size),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads // 2, max_position_embeddings=1024, pad_token_id=0,
                         bos_token_id=None, eos_token_id=None),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]],
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config).model
    if vision_path is not None:
        # the projector reads hidden_states[vision_feature_layer] of whatever tower sits here
        model.vision_tower = vision_tower_from_pretrained(vision_path, vision_width)
        model.config.vision_config = model.vision_tower.config
    return LlavaNextBackbone(model)


def llava_next_from_pretrained(path: str, dtype: str | None = None, attn_implementation: str | None = None,
                               vision_path: str | None = None) -> LlavaNextBackbone:
    """LLaVA-NeXT (e.g. llava-v1.6-mistral-7b-hf, E5-V's base) from a local folder; the LM head is dropped.

    ``vision_path``: an exported ``CLIPVisionModel`` / ``MLCDVisionModel`` folder replacing the vision tower
    (MLCD's LLaVA-NeXT recipe); its width must match the projector's input.
    """
    require_dir(path)
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = LlavaNextForConditionalGeneration.from_pretrained(path, local_files_only=True, **kwargs).model
    if vision_path is not None:
        width = model.config.vision_config.hidden_size
        tower = vision_tower_from_pretrained(vision_path, width)
        model.vision_tower = tower.to(model.multi_modal_projector.linear_1.weight.dtype)
        model.config.vision_config = model.vision_tower.config
    return LlavaNextBackbone(model)
