"""UNICOM's released ViTs (``deepglint/unicom``: ``FP16-ViT-B-32.pt``, ``FP16-ViT-B-16.pt``, ``FP16-ViT-L-14.pt``,
``FP16-ViT-L-14-336px.pt``) into :class:`~unimm.models.vit.UnicomViT`, by an explicit key map.

The file is a bare fp16 state dict of ``unicom/vision_transformer.py``'s ``VisionTransformer`` (read with
``weights_only=True``; a ``module.`` prefix is removed, as the official ``rm_module_from_state_dict``).
Official key -> ours:

===============================================  ===============================================
official                                         ours
===============================================  ===============================================
``patch_embed.proj.{weight,bias}``               ``patch_embed.{weight,bias}``
``pos_embed`` ``[1, N, D]``                      ``pos_embed``
``blocks.i.norm1/norm2.*``                       same
``blocks.i.attn.qkv.weight`` (no bias)           same
``blocks.i.attn.proj.*``                         same
``blocks.i.mlp.fc1.*`` / ``mlp.fc2.*``           ``blocks.i.mlp.0.*`` / ``blocks.i.mlp.2.*`` (ReLU6 between)
``norm.*``                                       same
``feature.{0,1,2,3}.*`` (Linear, BN, Linear, BN;  same
running stats and ``num_batches_tracked``)
===============================================  ===============================================

The official ``load`` casts every tensor to fp32 before ``load_state_dict``; here each is cast to the model's
dtype and listed in ``report.cast``. The encoder must have the release's shapes (``build_model``: B/32 224 px,
768 wide, 12 x 12 heads, E 512; B/16 E 768; L/14 and L/14@336px 1024 wide, 24 layers, 16 heads, E 768 --
``conf/experiment/unicom_vit_*.yaml``). Any other key, and any of ours left unfilled, is an error naming them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from unimm.checkpoints.io import load_checkpoint
from unimm.checkpoints.report import LoadReport, rename_by_rules, strict_fit

# (official regex, our replacement); the first match wins, keys matching none are unexpected
OFFICIAL_TO_OURS: tuple[tuple[str, str], ...] = (
    (r"^patch_embed\.proj\.(weight|bias)$", r"patch_embed.\1"),
    (r"^pos_embed$", "pos_embed"),
    (r"^blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$", r"blocks.\1.\2.\3"),
    (r"^blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$", r"blocks.\1.attn.\2.\3"),
    (r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"blocks.\1.mlp.0.\2"),
    (r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"blocks.\1.mlp.2.\2"),
    (r"^norm\.(weight|bias)$", r"norm.\1"),
    (r"^feature\.([0-3])\.(weight|bias|running_mean|running_var|num_batches_tracked)$", r"feature.\1.\2"),
)


def official_to_ours(key: str) -> str | None:
    """Our name for an official UNICOM key, or None when no rule matches."""
    return rename_by_rules(key, OFFICIAL_TO_OURS)


def convert_unicom_state(official: Mapping[str, Tensor], ours: Mapping[str, Tensor],
                         report: LoadReport) -> dict[str, Tensor]:
    """Official tensors -> ours (names mapped, dtypes cast), checked strictly against ``ours``."""
    state, unknown = {}, []
    for key, value in official.items():
        name = official_to_ours(key.removeprefix("module."))
        if name is None:
            unknown.append(key)
            continue
        report.mapped[key] = name
        state[name] = value
    if unknown:
        raise KeyError(f"not a UNICOM ViT checkpoint: {len(unknown)} keys no rule maps {sorted(unknown)[:20]}")
    return strict_fit(state, ours, report, "UNICOM ViT checkpoint")


def load_unicom_vit(encoder, path: str | Path) -> LoadReport:
    """Load a released ``FP16-ViT-*.pt`` into a :class:`~unimm.models.vit.UnicomViT` (in place, strict)."""
    report = LoadReport(source=str(path), loader="unimm.checkpoints.unicom.load_unicom_vit")
    ckpt = load_checkpoint(path)
    official = ckpt.get("state_dict", ckpt)
    state = convert_unicom_state(official, encoder.state_dict(), report)
    encoder.load_state_dict(state, strict=True)
    return report


def load_unicom_released(module, path: str | Path) -> LoadReport:
    """The ``pretrained`` loader of the UNICOM experiments: the ViT into ``module.encoder`` of a
    :class:`~unimm.methods.cluster_disc.ClusterDiscModule`; the PartialFC class centres are not in the release
    and keep their initialisation (listed in ``report.kept``)."""
    report = load_unicom_vit(module.encoder, path)
    report.kept.update({f"loss.{k}": "class centres: not in the released backbone file"
                        for k in module.loss.state_dict()})
    return report
