"""Vision backbones of the cluster discrimination family (UNICOM, MLCD).

- :class:`UnicomViT`: UNICOM's ViT (``unicom/vision_transformer.py``) as our own small module: no CLS token,
  learned absolute positions, pre-norm blocks with a ReLU6 MLP and SDPA attention, and a head that flattens
  *all* patch tokens: ``Linear(D*N -> D, no bias) -> BN -> Linear(D -> E, no bias) -> BN(eps 2e-5)``.
- MLCD's RoPE2D ViT is transformers' native ``MLCDVisionModel``: :func:`mlcd_vision` builds a random one
  from ``MLCDVisionConfig``, :func:`mlcd_vision_from_pretrained` loads a local folder, and
  :class:`PooledVisionEncoder` turns any HF vision model with a ``pooler_output`` (MLCD, CLIP) into
  ``pixel_values -> [B, D]``.

Every backbone here exposes ``embedding_dim`` and maps ``pixel_values [B, 3, H, W] -> [B, embedding_dim]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, CLIPVisionModel, MLCDVisionConfig, MLCDVisionModel, PreTrainedModel


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, h, N, dh]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU6(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UnicomViT(nn.Module):
    """UNICOM's ViT: patch tokens only, flattened into a BatchNorm head.

    Args:
        image_size, patch_size: square input and patch sides (B/32: 224, 32).
        width: token width ``D`` (B: 768).
        layers, heads: transformer depth and attention heads (B: 12, 12).
        embedding_dim: output ``E`` (UNICOM B/32: 512, L: 768).
        mlp_ratio: MLP hidden width over ``D`` (4).
        qkv_bias: bias on the fused qkv projection (UNICOM: False).
        seed: initialisation seed, so an "untrained" baseline is the same model every time.
    """

    def __init__(self, image_size: int = 224, patch_size: int = 32, width: int = 768, layers: int = 12, heads: int = 12,
                 embedding_dim: int = 512, mlp_ratio: float = 4.0, qkv_bias: bool = False, seed: int = 0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            num_patches = (image_size // patch_size) ** 2
            self.embedding_dim = embedding_dim
            self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
            self.pos_embed = nn.Parameter(torch.randn(1, num_patches, width) * 0.02)
            self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio, qkv_bias) for _ in range(layers))
            self.norm = nn.LayerNorm(width)
            self.feature = nn.Sequential(
                nn.Linear(width * num_patches, width, bias=False),
                nn.BatchNorm1d(width, eps=2e-5),
                nn.Linear(width, embedding_dim, bias=False),
                nn.BatchNorm1d(embedding_dim, eps=2e-5),
            )

    def forward_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, N, D]`` normalised patch tokens."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W] -> [B, E]`` (not normalised; the loss and the module normalise)."""
        return self.feature(self.forward_tokens(pixel_values).flatten(1))


class PooledVisionEncoder(nn.Module):
    """A Hugging Face vision model (``MLCDVisionModel``, ``CLIPVisionModel``) as ``pixel_values -> pooler_output``.

    MLCD and CLIP both pool the class token through ``post_layernorm``; ``embedding_dim`` is ``hidden_size``.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self.embedding_dim = model.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output


def mlcd_vision(image_size: int = 32, patch_size: int = 4, width: int = 64, layers: int = 2, heads: int = 4,
                initializer_factor: float = 1.0, seed: int = 0) -> PooledVisionEncoder:
    """A random ``MLCDVisionModel`` (RoPE2D, learned class position) of any size; the defaults are tiny (CPU tests).

    ``initializer_factor`` is ``MLCDVisionConfig``'s multiplier of every initial weight std (1.0: transformers'
    CLIP-style init, whose query / key std ``width^-0.5 * (2 * layers)^-0.5`` starts attention near uniform).
    """
    config = MLCDVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=heads, initializer_factor=float(initializer_factor),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return PooledVisionEncoder(MLCDVisionModel(config))


def mlcd_vision_from_pretrained(path: str, dtype: str | None = None) -> PooledVisionEncoder:
    """Load a local ``MLCDVisionModel`` folder (e.g. a copy of DeepGlint-AI/mlcd-vit-bigG-patch14-336)."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no MLCD checkpoint at {path}: expected {Path(path) / 'config.json'} and weights")
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    return PooledVisionEncoder(_strict(MLCDVisionModel, path, kwargs))


def clip_vision_from_pretrained(path: str, dtype: str | None = None) -> PooledVisionEncoder:
    """Load a local ``CLIPVisionModel`` folder (``mlcd-vit-large-patch14-336`` is a plain ``clip_vision_model``)."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP vision checkpoint at {path}: expected {Path(path) / 'config.json'}")
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    return PooledVisionEncoder(_strict(CLIPVisionModel, path, kwargs))


def _strict(cls, path: str, kwargs: dict) -> PreTrainedModel:
    """``cls.from_pretrained`` that refuses a folder with missing, unexpected or resized weights (transformers
    only warns), naming them."""
    model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise KeyError(f"{path} does not fit {cls.__name__}: {problems}")
    return model


def vision_tower_from_pretrained(path: str, expected_width: int) -> PreTrainedModel:
    """A vision model folder (an :mod:`unimm.checkpoints.export_vision` export: ``CLIPVisionModel`` or
    ``MLCDVisionModel``) loaded by its ``config.json``, to become another family's vision tower.

    Raises:
        ValueError: when its ``hidden_size`` is not ``expected_width``, the input width of the host's projector.
    """
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no vision model at {path}: expected {Path(path) / 'config.json'} and weights")
    model = AutoModel.from_pretrained(path, local_files_only=True)
    if model.config.hidden_size != expected_width:
        raise ValueError(f"the vision model at {path} has width {model.config.hidden_size}; the host's projector "
                         f"takes {expected_width}")
    return model
