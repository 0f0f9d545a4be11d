"""Golden outputs of the official UNICOM code: PartialFC_V2 + CombinedMarginLoss (ArcFace) and the ViT forward.

Official code: https://github.com/deepglint/unicom at ae7141123532a471f082753b993e8d504104a6fb, run from a checkout:
  - ``unicom/partial_fc.py``: ``CombinedMarginLoss(s, m1=1, m2, m3=0)`` and ``PartialFC_V2`` (with its
    ``DistCrossEntropy`` autograd function) on fixed embeddings, labels and class centres, single process
    (a gloo group of size 1, as ``finetune_GLDv2.py`` builds one); loss, gradients of embeddings and centres, and
    the sampled centre index for ``sample_rate < 1``.
  - ``unicom/unicom/vision_transformer.py``: a tiny ``VisionTransformer`` (32 px, patch 8, width 32, depth 2,
    4 heads, embedding 16) in eval mode with random BatchNorm statistics; its state dict in the official key
    layout and its output on fixed pixels.

Shims, all in this script and none can change a number:
  - ``torch.Tensor.cuda`` returns the tensor itself (``PartialFC_V2`` moves everything to CUDA unconditionally);
  - ``torch.cuda.amp.autocast(True)`` in the ViT is a no-op on CPU tensors (CUDA autocast touches only CUDA ops),
    so the official forward runs in fp32 as the recorded values are.

Environment: /work/golden/envs/e_official (Python 3.11, torch 2.14.1 CPU/CUDA build run on CPU, timm 0.4.12,
torchvision 0.29.1).

Rerun (writes tests/golden/unicom/unicom.safetensors and unicom.json):
  python3 -m venv /work/golden/envs/e_official
  /work/golden/envs/e_official/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.36.2 \\
      timm==0.4.12 tokenizers==0.15.2 einops==0.8.2 scipy==1.17.1 safetensors==0.8.0 numpy==2.4.6 \\
      pillow==13.0.0 faiss-cpu==1.15.1 torchmetrics==1.9.0 ftfy==6.3.1 regex
  git --git-dir=<unicom mirror> archive ae7141123532a471f082753b993e8d504104a6fb -- . ':!mlcd_vl' | tar -x -C /tmp/unicom
  /work/golden/envs/e_official/bin/python tests/golden/scripts/unicom.py /tmp/unicom
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "unicom"
COMMIT = "ae7141123532a471f082753b993e8d504104a6fb"

N, D, C = 8, 16, 20
# (name, s, m2, sample_rate, seed of the sampling draw)
CASES = [("s32_m03_full", 32.0, 0.3, 1.0, 0), ("s64_m05_full", 64.0, 0.5, 1.0, 0), ("s32_m03_half", 32.0, 0.3, 0.5, 7)]


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(N, D, generator=g)
    weight = torch.randn(C, D, generator=g) * 0.01
    labels = torch.tensor([3, 0, 19, 7, 3, 12, 5, 11])
    # row 7's centre is almost opposite to its embedding: theta_y + m passes pi (ArcFace without a threshold)
    weight[11] = -emb[7] * 0.01 + 1e-4 * torch.randn(D, generator=g)
    return {"embeddings": emb, "weight": weight, "labels": labels}


def partial_fc_cases(repo: Path, x: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    sys.path.insert(0, str(repo / "unicom"))
    from partial_fc import CombinedMarginLoss, PartialFC_V2

    tensors, meta = {}, {}
    for name, s, m2, rate, seed in CASES:
        margin = CombinedMarginLoss(s, 1.0, m2, 0.0)
        pfc = PartialFC_V2(margin, D, C, sample_rate=rate)
        with torch.no_grad():
            pfc.weight.copy_(x["weight"])
        emb = x["embeddings"].clone().requires_grad_(True)
        torch.manual_seed(seed)  # the only random draw: the negative centres of sample()
        loss = pfc(emb, x["labels"].clone())
        loss.backward()
        tensors[f"{name}.grad_embeddings"] = emb.grad.detach().clone()
        tensors[f"{name}.grad_weight"] = pfc.weight.grad.detach().clone()
        tensors[f"{name}.loss"] = loss.detach().reshape(1)
        if rate < 1:
            tensors[f"{name}.weight_index"] = pfc.weight_index.detach().clone()
        meta[name] = {"s": s, "m1": 1.0, "m2": m2, "m3": 0.0, "sample_rate": rate, "seed": seed,
                      "loss": float(loss)}
    return tensors, meta


def vit(repo: Path) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(repo / "unicom"))
    from unicom.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    model = VisionTransformer(input_size=32, patch_size=8, in_channels=3, dim=32, embedding_size=16, depth=2,
                              num_heads=4, drop_path_rate=0.0, using_checkpoint=False)
    with torch.no_grad():  # non-trivial values for everything the init leaves constant (biases, norms, BN stats)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for bn in (model.feature[1], model.feature[3]):
            bn.running_mean.copy_(0.1 * torch.randn_like(bn.running_mean))
            bn.running_var.copy_(1.0 + 0.5 * torch.rand_like(bn.running_var))
    model.eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(pixels)
    state = {f"vit_state.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return {**state, "vit.pixel_values": pixels, "vit.output": out.float()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", type=Path, help=f"deepglint/unicom checkout at {COMMIT}")
    args = parser.parse_args()
    torch.Tensor.cuda = lambda self, *a, **k: self  # shim: PartialFC_V2 calls .cuda() unconditionally
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    x = inputs()
    tensors, meta = partial_fc_cases(args.repo, x)
    tensors.update({f"inputs.{k}": v for k, v in x.items()})
    tensors.update(vit(args.repo))
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "unicom.safetensors"))
    import timm
    info = {"official": {"repo": "deepglint/unicom", "commit": COMMIT},
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0]},
            "partial_fc": meta,
            "vit": {"input_size": 32, "patch_size": 8, "dim": 32, "embedding_size": 16, "depth": 2, "num_heads": 4}}
    (OUT / "unicom.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(meta))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
