"""Phi-3.5-V from the official ``microsoft/Phi-3.5-vision-instruct`` folder, without its remote code.

The folder: ``config.json`` (``model_type: phi3_v``), ``model.safetensors`` or shards listed by
``model.safetensors.index.json``, the tokenizer files, optionally ``preprocessor_config.json``.

Official key -> ours (:class:`~unimm.models.vlm.phi35v.Phi35VModel`), an explicit prefix table:

=============================================================  ======================================
``model.vision_embed_tokens.img_processor.vision_model.*``     ``vision.img_processor.*`` (CLIP tower)
``model.vision_embed_tokens.glb_GN`` ``[1, 1, 4D]``             ``vision.glb_GN``
``model.vision_embed_tokens.sub_GN`` ``[1, 1, 1, 4D]``          ``vision.sub_GN``
``model.vision_embed_tokens.img_projection.{0,2}.*``            ``vision.img_projection.{0,2}.*``
``model.embed_tokens.*`` / ``model.layers.*`` / ``model.norm.*``  ``language_model.*`` (native Phi3Model)
``lm_head.weight``                                              ignored (embeddings only)
``model.vision_embed_tokens.wte.weight``                        a second name of ``model.embed_tokens.weight``
                                                                (the official module tree holds the table
                                                                twice; kept only by some exporters): must
                                                                equal it when present
=============================================================  ======================================

Any other official key, and any of ours left unfilled, is an error naming them.

``config.json`` -> a :class:`~transformers.Phi3Config` (LongRoPE: the legacy ``rope_scaling`` type ``su`` is
``longrope``) and the CLIP tower: the official code builds a fixed ViT-L/14-336 whenever
``img_processor.model_name`` is ``openai/clip-vit-large-patch14-336``; ``vision_config`` overrides it (tests).
Only the settings Phi-3.5-V ships are supported (HD transform, learnable separators, ``sub_glb``, MLP projector,
patch features); others raise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, CLIPVisionConfig, Phi3Config
from transformers.initialization import no_init_weights

from unimm.checkpoints.report import LoadReport, strict_fit
from unimm.models.vlm.phi35v import IMAGE_TOKEN, Phi3VAdapter, Phi3VBackbone, Phi35VModel
from unimm.models.vlm.phi35v_crop import CLIP_MEAN, CLIP_STD, Phi35VImageProcessor

# official prefix -> ours; the first match wins (most specific first)
KEY_PREFIXES = (
    ("model.vision_embed_tokens.img_processor.vision_model.", "vision.img_processor."),
    ("model.vision_embed_tokens.glb_GN", "vision.glb_GN"),
    ("model.vision_embed_tokens.sub_GN", "vision.sub_GN"),
    ("model.vision_embed_tokens.img_projection.", "vision.img_projection."),
    ("model.embed_tokens.", "language_model.embed_tokens."),
    ("model.layers.", "language_model.layers."),
    ("model.norm.", "language_model.norm."),
)
IGNORED_KEYS = frozenset({"lm_head.weight"})
WTE_ALIAS = ("model.vision_embed_tokens.wte.weight", "model.embed_tokens.weight")

# the tower the official image_embedding_phi3_v.py hard-codes (CLIP_VIT_LARGE_PATCH14_336_CONFIG)
CLIP_VIT_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                        projection_dim=768)
OFFICIAL_TOWER = "openai/clip-vit-large-patch14-336"
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act",
             "max_position_embeddings", "original_max_position_embeddings", "initializer_range", "rms_norm_eps",
             "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window", "tie_word_embeddings")
SUPPORTED_EMBD_LAYER = {"use_hd_transform": True, "with_learnable_separator": True, "hd_transform_order": "sub_glb",
                        "projection_cls": "mlp"}


def _require_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {path} (download microsoft/Phi-3.5-vision-instruct and "
                                "point the config at it)")
    return path


def official_to_ours(name: str) -> str | None:
    """Our parameter name for an official key; None for a key outside the table."""
    for theirs, ours in KEY_PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return None


# -- config ---------------------------------------------------------------------------------------------------
def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The LM's ``rope_parameters`` from the official ``rope_scaling`` (``su`` = ``longrope``) and ``rope_theta``."""
    theta = config.get("rope_theta", 10000.0)
    scaling = config.get("rope_scaling")
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ("su", "longrope"):
        raise ValueError(f"rope_scaling type {kind!r} is not Phi-3.5-V's (su / longrope)")
    return {"rope_type": "longrope", "rope_theta": theta, "short_factor": list(scaling["short_factor"]),
            "long_factor": list(scaling["long_factor"]),
            "original_max_position_embeddings": config["original_max_position_embeddings"]}


def phi35v_configs(config: dict[str, Any], vision_config: dict[str, Any] | None = None
                   ) -> tuple[Phi3Config, CLIPVisionConfig, int]:
    """Official ``config.json`` contents -> (LM config, CLIP tower config, feature layer index)."""
    embd = config.get("embd_layer", {})
    for key, value in SUPPORTED_EMBD_LAYER.items():
        if embd.get(key) != value:
            raise ValueError(f"config.json embd_layer.{key} = {embd.get(key)!r}; only {value!r} (Phi-3.5-V) is "
                             "supported")
    img = config.get("img_processor") or {}
    if img.get("name") != "clip_vision_model" or img.get("type_feature", "patch") != "patch":
        raise ValueError(f"config.json img_processor {img} is not Phi-3.5-V's CLIP patch features")
    if vision_config is None:
        if img.get("model_name") != OFFICIAL_TOWER:
            raise ValueError(f"img_processor.model_name {img.get('model_name')!r}: the official code only builds "
                             f"{OFFICIAL_TOWER}; pass vision_config for another tower")
        vision_config = CLIP_VIT_L14_336
    vision = CLIPVisionConfig(**vision_config)
    if img.get("image_dim_out") != vision.hidden_size:
        raise ValueError(f"img_processor.image_dim_out {img.get('image_dim_out')} != tower width {vision.hidden_size}")
    grid = vision.image_size // vision.patch_size // 2
    if img.get("num_img_tokens", grid * grid) != grid * grid:
        raise ValueError(f"img_processor.num_img_tokens {img['num_img_tokens']} != {grid}^2 merged tokens per view")
    text = Phi3Config(**{k: config[k] for k in TEXT_KEYS if k in config}, rope_parameters=rope_parameters(config))
    return text, vision, int(img.get("layer_idx", -2))


# -- weights --------------------------------------------------------------------------------------------------
def read_official_state(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's ``model.safetensors`` or of the shards its index lists, by official key."""
    path = _require_dir(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    state = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            state.update({key: f.get_tensor(key) for key in f.keys()})
    return state


def map_official_state(official: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official tensors -> ours in our dtypes, checked: unknown keys, missing keys and shape mismatches raise, naming
    them."""
    official = dict(official)
    alias, target = WTE_ALIAS
    if alias in official:
        wte = official.pop(alias)
        if target in official and not torch.equal(wte, official[target]):
            raise ValueError(f"{alias} differs from {target}; they are one table in Phi-3.5-V")
    mapped, unknown = {}, []
    for key, tensor in official.items():
        if key in IGNORED_KEYS:
            continue
        name = official_to_ours(key)
        if name is None or name not in ours:
            unknown.append(key)
        else:
            mapped[name] = tensor
    if unknown:
        raise KeyError(f"not a Phi-3.5-V checkpoint: unexpected official keys {sorted(unknown)[:20]} "
                       f"({len(unknown)} in all)")
    return strict_fit(mapped, ours, LoadReport(), "Phi-3.5-V checkpoint")


def load_phi35v_weights(model: Phi35VModel, path: str | Path) -> Phi35VModel:
    """Load the folder's official weights into ``model`` (strict), cast to its dtypes.

    The tensors read are assigned as the parameters (no second copy: 8 ranks each loading 4.2B parameters)."""
    ours = model.state_dict()
    state = map_official_state(read_official_state(path), ours)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def phi35v_from_pretrained(path: str, dtype: str | None = None, attn_implementation: str | None = None,
                           vision_config: dict[str, Any] | None = None) -> Phi3VBackbone:
    """Phi-3.5-V from a local official folder; the LM head is dropped (embeddings only).

    Args:
        path: the folder of ``microsoft/Phi-3.5-vision-instruct``.
        dtype: e.g. ``bfloat16``; None = float32.
        attn_implementation: ``eager`` (VLM2Vec), ``sdpa``, ``flash_attention_2``; None = transformers' default.
        vision_config: CLIP tower fields replacing ViT-L/14-336 (tiny test checkpoints).
    """
    path = _require_dir(path)
    text, vision, layer_idx = phi35v_configs(json.loads((path / "config.json").read_text()), vision_config)
    if attn_implementation:
        text._attn_implementation = attn_implementation
        vision._attn_implementation = attn_implementation
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype) if dtype else torch.float32)
    try:
        with no_init_weights():  # every weight is loaded next, strictly
            model = Phi35VModel(text, vision, layer_idx)
    finally:
        torch.set_default_dtype(previous)
    return Phi3VBackbone(load_phi35v_weights(model, path))


def phi35v_processor(path: str, num_crops: int = 4, max_length: int = 256, padding_side: str | None = None,
                     crop_size: int = 336, patch_size: int = 14) -> Phi3VAdapter:
    """Tokenizer (+ ``<|image_1|>`` as one added token) and HD crops for a local official folder.

    ``num_crops``: VLM2Vec and UniMoCo use 4; the mean/std come from ``preprocessor_config.json`` when present.
    """
    path = _require_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    vocab_size = json.loads((path / "config.json").read_text())["vocab_size"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id >= vocab_size:
        raise ValueError(f"{IMAGE_TOKEN} got id {image_id}, outside the model's {vocab_size} embeddings")
    pre = path / "preprocessor_config.json"
    stats = json.loads(pre.read_text()) if pre.is_file() else {}
    image_processor = Phi35VImageProcessor(num_crops, crop_size, patch_size, stats.get("image_mean", CLIP_MEAN),
                                           stats.get("image_std", CLIP_STD))
    return Phi3VAdapter(tokenizer, image_processor, max_length, padding_side)
