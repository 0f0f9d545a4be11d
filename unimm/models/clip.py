"""Builders for Hugging Face CLIP towers: real weights from a local folder, or a tiny random model for CPU tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from unimm.models.processors import BOS_ID, EOS_ID, PAD_ID, vocab_size
from unimm.models.vit import vision_tower_from_pretrained


def with_vision_model(clip: CLIPModel, vision_path: str | None) -> CLIPModel:
    """``clip`` with its vision transformer replaced by the one of an exported ``CLIPVisionModel`` folder
    (:mod:`unimm.checkpoints.export_vision`); ``visual_projection`` is kept and maps its pooled output.

    Only CLIP-layout towers fit (``CLIPModel`` calls its vision model with CLIP's arguments): an MLCD RoPE2D
    export is a LLaVA-NeXT tower (:func:`unimm.models.vlm.adapters.tiny_llava_next`), UNICOM's own ViT is not
    exportable.
    """
    if vision_path is None:
        return clip
    tower = vision_tower_from_pretrained(vision_path, clip.visual_projection.in_features)
    if not isinstance(tower, CLIPVisionModel):
        raise TypeError(f"{vision_path} holds a {type(tower).__name__}; a CLIP tower must be a CLIPVisionModel")
    vision_model = type(clip.vision_model)(tower.config)  # the export's size, CLIPModel's own class
    vision_model.load_state_dict(tower.state_dict(), strict=True)
    clip.vision_model = vision_model.to(clip.visual_projection.weight.dtype)
    clip.config.vision_config = tower.config
    return clip


def clip_from_pretrained(path: str, dtype: str | None = None, vision_path: str | None = None) -> CLIPModel:
    """Load a CLIPModel saved in a local Hugging Face folder (``config.json`` + safetensors weights).

    Args:
        path: the folder, e.g. a local copy of ``openai/clip-vit-large-patch14``.
        dtype: optional weight dtype name (``bfloat16``...); default keeps the checkpoint's float32.
        vision_path: optional exported ``CLIPVisionModel`` folder replacing the vision tower
            (see :func:`with_vision_model`).
    """
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP checkpoint at {path}: expected {Path(path) / 'config.json'} and weights")
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    return with_vision_model(CLIPModel.from_pretrained(path, local_files_only=True, **kwargs), vision_path)


def tiny_clip(
    vocab_file: str,
    image_size: int = 32,
    patch_size: int = 4,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int = 64,
    max_text_length: int = 32,
    seed: int = 0,
    vision_path: str | None = None,
) -> CLIPModel:
    """A randomly initialised CLIP small enough to train on a CPU in minutes.

    The text side uses the word-level vocabulary of ``vocab_file`` (see
    :func:`unimm.models.processors.word_level_tokenizer`), pooling at its EOS id. ``vision_path``: an exported
    ``CLIPVisionModel`` folder replacing the random vision tower (:func:`with_vision_model`).
    """
    text = dict(
        vocab_size=vocab_size(vocab_file), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_text_length, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    vision = dict(
        image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=heads,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the "untrained" baseline is the same model every time
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    return with_vision_model(clip, vision_path)


def clip_from_config(text_config: dict, vision_config: dict, projection_dim: int, seed: int = 0) -> CLIPModel:
    """A randomly initialised ``CLIPModel`` of any size from HF ``CLIPTextConfig`` / ``CLIPVisionConfig`` keyword
    dicts, e.g. the shape of an OpenAI CLIP / UniIR ``.pth`` to load through :mod:`unimm.checkpoints.uniir`
    (OpenAI CLIP: ``quick_gelu``, LayerNorm eps 1e-5, the HF defaults)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config,
                                    projection_dim=projection_dim))
