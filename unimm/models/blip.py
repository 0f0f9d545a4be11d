"""Builders for Hugging Face BLIP dual encoders (``BlipModel``): a tiny random model for CPU tests, or real weights
from a local folder.

UniIR's BLIP retrievers use the BLIP ViT, the BERT text encoder *with* its cross-attention layers (text mode for
score fusion, multimodal mode for feature fusion), its pooler (feature fusion) and new projections to the
embedding dim (768 for ViT-L: 1024 -> 768 and 768 -> 768). ``BlipModel`` holds exactly these parts:
``vision_model``, ``text_model`` (with pooler; cross-attention when ``text_config.is_decoder``),
``visual_projection``, ``text_projection``. UniIR's projections are ``nn.Linear`` *with* bias while
``BlipModel``'s have none, so the builders replace them (:func:`with_biased_projections`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipModel

from unimm.models.processors import BOS_ID, EOS_ID, PAD_ID, vocab_size

# BLIP's and UniIR's ViT build every LayerNorm with eps 1e-6 (``partial(nn.LayerNorm, eps=1e-6)``); HF BLIP
# folders carry ``layer_norm_eps: 1e-5`` for the vision tower, which changes every ViT output. The builders below
# force the official value; None would keep the folder's.
OFFICIAL_VISION_LAYER_NORM_EPS = 1e-6


def _vision_eps(vision_config: dict, eps: float | None) -> dict:
    return {**vision_config, "layer_norm_eps": eps} if eps is not None else vision_config


def _require_folder(path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no BLIP checkpoint at {path}: expected {Path(path) / 'config.json'} and weights")


def with_biased_projections(model: BlipModel) -> BlipModel:
    """Replace the bias-free projections of ``model`` by ``nn.Linear`` with bias (UniIR's ``vision_proj`` /
    ``text_proj``), newly initialised with BLIP's ``initializer_range``."""
    std = model.config.initializer_range
    for name in ("visual_projection", "text_projection"):
        old = getattr(model, name)
        new = nn.Linear(old.in_features, old.out_features, bias=True)
        nn.init.normal_(new.weight, std=std)
        nn.init.zeros_(new.bias)
        setattr(model, name, new.to(old.weight.dtype))
    return model


def blip_from_pretrained(path: str, dtype: str | None = None,
                         vision_layer_norm_eps: float | None = OFFICIAL_VISION_LAYER_NORM_EPS) -> BlipModel:
    """Load a ``BlipModel`` saved in a local Hugging Face folder (e.g. a UniIR BLIP model saved by unimm); its
    projections get UniIR's biases (new, zero) as in :func:`with_biased_projections` when the folder has none.
    ``vision_layer_norm_eps``: the ViT's LayerNorm eps (official 1e-6; None = the folder's)."""
    _require_folder(path)
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    config = BlipConfig.from_pretrained(path, local_files_only=True)
    if vision_layer_norm_eps is not None:
        config.vision_config.layer_norm_eps = vision_layer_norm_eps
    model = BlipModel.from_pretrained(path, config=config, local_files_only=True, **kwargs)
    if model.text_projection.bias is None:
        weights = {n: getattr(model, n).weight.detach().clone() for n in ("visual_projection", "text_projection")}
        with_biased_projections(model)
        with torch.no_grad():
            for name, weight in weights.items():
                getattr(model, name).weight.copy_(weight)
    return model


def resize_position_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """``[1, 1 + g*g, D]`` -> ``[1, 1 + grid*grid, D]``: the CLS row kept, the ``g x g`` patch grid resized
    bicubically (BLIP's ``interpolate_pos_embed``, used when a checkpoint meets another image size)."""
    cls, patches = table[:, :1], table[:, 1:]
    old = int(round(patches.shape[1] ** 0.5))
    if old * old != patches.shape[1]:
        raise ValueError(f"position table of {table.shape[1]} rows is not CLS + a square patch grid")
    if old == grid:
        return table
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    image = torch.nn.functional.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)], dim=1)


def blip_from_retrieval_pretrained(path: str, projection_dim: int = 768, dtype: str | None = None,
                                   image_size: int | None = None,
                                   vision_layer_norm_eps: float | None = OFFICIAL_VISION_LAYER_NORM_EPS) -> BlipModel:
    """A ``BlipModel`` initialised from a local ``BlipForImageTextRetrieval`` folder (e.g. a copy of
    ``Salesforce/blip-itm-large-coco``), as UniIR starts from a BLIP checkpoint.

    The ViT and the text encoder (cross-attention included) are copied; the text pooler and the two projections
    to ``projection_dim`` are new, as in UniIR (BLIP's own projections map to 256, and its retrieval checkpoints
    carry no pooler weights). Every copied tensor must match: a missing or unexpected key is an error.
    ``image_size`` (None = the folder's): build the ViT for that size, the position table resized to its grid
    (UniIR trains BLIP at 224 px; the HF retrieval folders are 384 px). ``vision_layer_norm_eps``: the ViT's
    LayerNorm eps (official 1e-6, HF folders say 1e-5; None = the folder's).
    """
    _require_folder(path)
    source = BlipForImageTextRetrieval.from_pretrained(path, local_files_only=True)
    vision_config = _vision_eps(source.config.vision_config.to_dict(), vision_layer_norm_eps)
    if image_size is not None:
        vision_config["image_size"] = image_size
    config = BlipConfig(text_config=source.config.text_config.to_dict(), vision_config=vision_config,
                        projection_dim=projection_dim)
    model = with_biased_projections(BlipModel(config))
    vision_state = source.vision_model.state_dict()
    key = "embeddings.position_embedding"
    vision_state[key] = resize_position_table(vision_state[key], config.vision_config.image_size // config.vision_config.patch_size)
    model.vision_model.load_state_dict(vision_state, strict=True)
    missing, unexpected = model.text_model.load_state_dict(source.text_encoder.state_dict(), strict=False)
    new = {"pooler.dense.weight", "pooler.dense.bias"}
    if unexpected or set(missing) != new:
        raise KeyError(f"text encoder of {path} does not match BlipTextModel: missing {sorted(set(missing) - new)}, "
                       f"unexpected {sorted(unexpected)}")
    if dtype:
        model = model.to(getattr(torch, dtype))
    return model


def tiny_blip(
    vocab_file: str,
    image_size: int = 32,
    patch_size: int = 4,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int = 64,
    max_text_length: int = 32,
    seed: int = 0,
    initializer_range: float = 0.02,
    vision_layer_norm_eps: float | None = OFFICIAL_VISION_LAYER_NORM_EPS,
) -> BlipModel:
    """A randomly initialised BLIP dual encoder small enough to train on a CPU; the text side uses the word-level
    vocabulary of ``vocab_file`` with its ``[BOS]`` as the first ([CLS]) token.

    ``initializer_range``: std of every weight (BLIP's 0.02 by default). At width 32-64 and 0.02 the [CLS] states
    are the same for every input (text features of different captions have cosine 0.99998): a model trained from
    scratch on the toy data then learns only which task a row belongs to; the tiny experiments use 0.15.
    ``vision_layer_norm_eps``: as BLIP's ViT (1e-6).
    """
    text = dict(
        vocab_size=vocab_size(vocab_file), hidden_size=width, encoder_hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_text_length,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, sep_token_id=EOS_ID, is_decoder=True,  # is_decoder: cross-attention
        initializer_range=initializer_range,
    )
    vision = dict(
        image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=heads,
        initializer_range=initializer_range,  # BlipVisionConfig's default 1e-10 (fine for loading) leaves a random ViT blind
    )
    return blip_from_config(text, vision, projection_dim, seed, initializer_range, vision_layer_norm_eps)


def blip_from_config(text_config: dict, vision_config: dict, projection_dim: int, seed: int = 0,
                     initializer_range: float = 0.02,
                     vision_layer_norm_eps: float | None = OFFICIAL_VISION_LAYER_NORM_EPS) -> BlipModel:
    """A randomly initialised UniIR BLIP encoder (``BlipModel`` with biased projections) from HF
    ``BlipTextConfig`` / ``BlipVisionConfig`` keyword dicts, the ViT LayerNorm eps forced to the official value
    (e.g. to load a UniIR ``.pth`` of any size through :mod:`unimm.checkpoints.uniir`)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return with_biased_projections(
            BlipModel(BlipConfig(text_config=text_config, vision_config=_vision_eps(vision_config, vision_layer_norm_eps),
                                 projection_dim=projection_dim, initializer_range=initializer_range)))
