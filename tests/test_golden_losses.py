"""unimm's InfoNCE against the official contrastive losses of UniIR (CLIP_SF) and VLM2Vec (tests/golden/losses/).

Recorded by tests/golden/scripts/losses.py: UniIR's ``compute_inbatch_contrastive_loss`` (in-batch with gathering,
and with hard negatives for ``in_batch_neg_num`` 0 and 2) on score-fused embeddings of fixed text / image tables,
and VLM2Vec's ``SimpleContrastiveLoss`` / ``DistributedContrastiveLoss`` (temperature 0.02). Loss values and
gradients (of the tables, of CLIP's log-scale, of the VLM2Vec reps) to 1e-5 in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from unimm.losses import InfoNCE

HERE = Path(__file__).parent / "golden" / "losses"
G = load_file(str(HERE / "losses.safetensors"))
INFO = json.loads((HERE / "losses.json").read_text())
UNIIR = INFO["uniir"]


def _close(ours: torch.Tensor, official: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _fused(txt: torch.Tensor, img: torch.Tensor, rows) -> torch.Tensor:
    """UniIR CLIP_SF score fusion ``txt * txt_mask + img * img_mask`` of the given rows, L2-normalised."""
    tm = torch.tensor(UNIIR["txt_mask"], dtype=torch.float32)[:, None]
    im = torch.tensor(UNIIR["img_mask"], dtype=torch.float32)[:, None]
    return F.normalize((txt * tm + img * im)[torch.as_tensor(rows)], dim=-1)


@pytest.mark.parametrize("case", list(UNIIR["cases"]))
def test_uniir_clip_sf_loss_and_gradients(case):
    cfg = UNIIR["cases"][case]
    txt = G["inputs.txt"].clone().requires_grad_(True)
    img = G["inputs.img"].clone().requires_grad_(True)
    log_scale = G["inputs.logit_scale"].clone().requires_grad_(True)
    query = _fused(txt, img, [r[0] for r in UNIIR["index_mapping"]["query"]])
    pos = _fused(txt, img, [r[0] for r in UNIIR["index_mapping"]["pos_cand"]])
    if cfg["hard_negatives"] is None:
        out = InfoNCE(temperature=None, symmetric=False)(query, pos, logit_scale=log_scale.exp())
    else:  # UniIR's own hard-negative form (issue 14 item 4)
        negatives = _fused(txt, img, cfg["hard_negatives"])  # [B, N, D]
        loss_fn = InfoNCE(temperature=None, symmetric=False, hard_negative_form="uniir",
                          in_batch_neg_num=cfg["in_batch_neg_num"])
        out = loss_fn(query, pos, logit_scale=log_scale.exp(), hard_negatives=negatives)
    out.loss.backward()
    _close(out.loss.detach().reshape(1), G[f"uniir.{case}.loss"], f"{case} loss")
    assert float(out.accuracy) == pytest.approx(cfg["accuracy"])
    _close(txt.grad, G[f"uniir.{case}.grad_txt"], f"{case} d/d text table")
    _close(img.grad, G[f"uniir.{case}.grad_img"], f"{case} d/d image table")
    _close(log_scale.grad.reshape(1), G[f"uniir.{case}.grad_logit_scale"], f"{case} d/d logit_scale")


@pytest.mark.parametrize("name", list(INFO["vlm2vec"]))
def test_vlm2vec_contrastive_loss_and_gradients(name):
    q = G["inputs.vlm_q"].clone().requires_grad_(True)
    p = G["inputs.vlm_p"].clone().requires_grad_(True)
    out = InfoNCE(temperature=INFO["vlm2vec"][name]["temperature"], symmetric=False)(q, p)
    out.loss.backward()
    _close(out.loss.detach().reshape(1), G[f"vlm2vec.{name}.loss"], f"{name} loss")
    _close(q.grad, G[f"vlm2vec.{name}.grad_q"], f"{name} d/d query")
    _close(p.grad, G[f"vlm2vec.{name}.grad_p"], f"{name} d/d positive")
