"""unimm's UNICOM loss and ViT against outputs recorded from the official code (tests/golden/unicom/).

Recorded by tests/golden/scripts/unicom.py from deepglint/unicom (``partial_fc.py``: ``PartialFC_V2`` +
``CombinedMarginLoss``; ``unicom/vision_transformer.py``). Tolerance 1e-5 (fp32) on values; gradients are
compared relative to their largest entry (1e-5), because ``s = 64`` makes them O(1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unimm.checkpoints.unicom import load_unicom_vit
from unimm.losses.cluster import ArcFaceSoftmax, PartialFC
from unimm.models.vit import UnicomViT

HERE = Path(__file__).parent / "golden" / "unicom"
G = load_file(str(HERE / "unicom.safetensors"))
INFO = json.loads((HERE / "unicom.json").read_text())


def _close(ours: torch.Tensor, official: torch.Tensor, what: str) -> None:
    scale = max(1.0, float(official.abs().max()))
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(INFO["partial_fc"]))
def test_partial_fc_arcface_loss_and_gradients(case):
    """Single process, every centre (``sample_rate=1``) or the official random half (the same ``torch.rand``
    draw after seeding); loss, d loss / d embeddings and d loss / d centres."""
    cfg = INFO["partial_fc"][case]
    emb = G["inputs.embeddings"].clone().requires_grad_(True)
    weight = G["inputs.weight"]
    pfc = PartialFC(weight.shape[0], weight.shape[1], ArcFaceSoftmax(scale=cfg["s"], margin=cfg["m2"]),
                    sample_rate=cfg["sample_rate"])
    with torch.no_grad():
        pfc.weight.copy_(weight)
    torch.manual_seed(cfg["seed"])
    out = pfc(emb, G["inputs.labels"].clone())
    out.loss.backward()
    if f"{case}.weight_index" in G:
        assert out.num_sampled == G[f"{case}.weight_index"].numel()
    _close(out.loss.detach().reshape(1), G[f"{case}.loss"], f"{case} loss")
    _close(emb.grad, G[f"{case}.grad_embeddings"], f"{case} grad embeddings")
    _close(pfc.weight.grad, G[f"{case}.grad_weight"], f"{case} grad centres")


def test_vit_forward_through_the_official_layout(tmp_path):
    """The official tiny ViT's state dict (official keys) loads through unimm's loader and gives its output."""
    cfg = INFO["vit"]
    state = {k.removeprefix("vit_state."): v for k, v in G.items() if k.startswith("vit_state.")}
    path = tmp_path / "unicom_tiny.pt"
    torch.save(state, path)
    model = UnicomViT(image_size=cfg["input_size"], patch_size=cfg["patch_size"], width=cfg["dim"],
                      layers=cfg["depth"], heads=cfg["num_heads"], embedding_dim=cfg["embedding_size"])
    load_unicom_vit(model, path)
    model.eval()
    with torch.no_grad():
        out = model(G["vit.pixel_values"])
    _close(out, G["vit.output"], "ViT output")
