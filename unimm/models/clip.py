"""Builders for Hugging Face CLIP towers: real weights from a local folder, or a tiny random model for CPU tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from unimm.models.processors import BOS_ID, EOS_ID, PAD_ID, vocab_size


def clip_from_pretrained(path: str, dtype: str | None = None) -> CLIPModel:
    """Load a CLIPModel saved in a local Hugging Face folder (``config.json`` + safetensors weights).

    Args:
        path: the folder, e.g. a local copy of ``openai/clip-vit-large-patch14``.
        dtype: optional weight dtype name (``bfloat16``...); default keeps the checkpoint's float32.
    """
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP checkpoint at {path}: expected {Path(path) / 'config.json'} and weights")
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    return CLIPModel.from_pretrained(path, local_files_only=True, **kwargs)


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
) -> CLIPModel:
    """A randomly initialised CLIP small enough to train on a CPU in minutes.

    The text side uses the word-level vocabulary of ``vocab_file`` (see
    :func:`unimm.models.processors.word_level_tokenizer`), pooling at its EOS id.
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
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
