"""Golden values and gradients of the official contrastive losses of UniIR (CLIP_SF) and VLM2Vec.

Official code (run from checkouts, never copied into unimm):
  - UniIR, https://github.com/TIGER-AI-Lab/UniIR at 98dc570c2645fec8e1fd42c7d4ac9853f46051fd:
    ``src/models/uniir_clip/clip_scorefusion/clip_sf.py::CLIPScoreFusion.compute_inbatch_contrastive_loss`` (with
    its ``encode_multimodal_input`` score fusion ``txt * txt_mask + img * img_mask``), in three settings: in-batch
    with ``gather_embeddings=True`` (gloo group of size 1), and with hard negatives (``neg_cand_list``) for
    ``in_batch_neg_num`` 0 (every released config) and 2. It imports OpenAI CLIP
    (https://github.com/openai/CLIP at d05afc436d78f1c48dc0dbf8e5980a9d471f35f6) at module level.
  - VLM2Vec, https://github.com/TIGER-AI-Lab/VLM2Vec at 6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16:
    ``src/loss.py::SimpleContrastiveLoss`` (temperature 0.02, the GradCache trainer of ``train.py``) and
    ``DistributedContrastiveLoss`` (world size 1, so ``scale_loss`` multiplies by 1). Its training collators
    return (query, positive) only, so no hard-negative form is recorded for VLM2Vec.

Shims (cannot change a number): ``CLIPScoreFusion.__init__`` only loads a released CLIP and copies three config
values; here the object is created without it, those attributes are set (``loss_function`` =
``nn.CrossEntropyLoss()`` as in ``__init__``) and ``clip_model`` is a stand-in whose ``encode_text`` /
``encode_image`` return rows of fixed leaf embedding tables (so gradients are with respect to the embeddings) and
whose ``logit_scale`` is a parameter. Every line of ``compute_inbatch_contrastive_loss`` and
``encode_multimodal_input`` runs as released.

Environment: /work/golden/envs/e_official (Python 3.11, torch 2.14.1 run on CPU).

Rerun (writes tests/golden/losses/losses.safetensors and losses.json):
  python3 -m venv /work/golden/envs/e_official
  /work/golden/envs/e_official/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.36.2 \\
      timm==0.4.12 tokenizers==0.15.2 einops==0.8.2 scipy==1.17.1 safetensors==0.8.0 numpy==2.4.6 \\
      pillow==13.0.0 faiss-cpu==1.15.1 torchmetrics==1.9.0 ftfy==6.3.1 regex
  git --git-dir=<UniIR mirror> archive 98dc570c2645fec8e1fd42c7d4ac9853f46051fd | tar -x -C /tmp/uniir
  git --git-dir=<VLM2Vec mirror> archive 6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16 | tar -x -C /tmp/vlm2vec
  git --git-dir=<CLIP mirror> archive d05afc436d78f1c48dc0dbf8e5980a9d471f35f6 | tar -x -C /tmp/openai_clip
  /work/golden/envs/e_official/bin/python tests/golden/scripts/losses.py --uniir /tmp/uniir --vlm2vec /tmp/vlm2vec \\
      --clip /tmp/openai_clip
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "losses"
COMMITS = {"uniir": "98dc570c2645fec8e1fd42c7d4ac9853f46051fd", "vlm2vec": "6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16",
           "openai_clip": "d05afc436d78f1c48dc0dbf8e5980a9d471f35f6"}
B, NEG, D = 4, 2, 8
ROWS = B * 2 + B * NEG  # queries, positives, hard negatives
# which rows carry text / image (UniIR masks): queries 0-1 text only, 2 image only, 3 both; candidates mixed
TXT_MASK = [1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1]
IMG_MASK = [0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1]


class TableCLIP(nn.Module):
    """Stand-in for the CLIP towers: row lookups into leaf tables, and CLIP's ``logit_scale`` parameter."""

    def __init__(self, txt: torch.Tensor, img: torch.Tensor, logit_scale: float):
        super().__init__()
        self.txt, self.img = txt, img
        self.logit_scale = nn.Parameter(torch.tensor(logit_scale))

    def encode_text(self, idx: torch.Tensor) -> torch.Tensor:
        return self.txt[idx]

    def encode_image(self, idx: torch.Tensor) -> torch.Tensor:
        return self.img[idx]


def uniir(repo: Path, clip_repo: Path, tables: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    sys.path.insert(0, str(clip_repo))
    sys.path.insert(0, str(repo / "src/models/uniir_clip/clip_scorefusion"))
    from clip_sf import CLIPScoreFusion

    index_mapping = {"query": [[i] for i in range(B)], "pos_cand": [[B + i] for i in range(B)]}
    negs = [[2 * B + NEG * i + j for j in range(NEG)] for i in range(B)]
    cases = {"inbatch_gather": (None, 0), "hardneg_inbatch0": (negs, 0), "hardneg_inbatch2": (negs, 2)}
    tensors, meta = {}, {}
    for name, (neg, in_batch_neg_num) in cases.items():
        txt = tables["txt"].clone().requires_grad_(True)
        img = tables["img"].clone().requires_grad_(True)
        model = CLIPScoreFusion.__new__(CLIPScoreFusion)
        nn.Module.__init__(model)
        model.clip_model = TableCLIP(txt, img, float(tables["logit_scale"]))
        model.loss_function = nn.CrossEntropyLoss()
        model.gather_embeddings = True
        model.in_batch_neg_num = in_batch_neg_num
        mapping = dict(index_mapping)
        if neg is not None:
            mapping["neg_cand_list"] = neg
        batch = {"txt_batched": torch.arange(ROWS), "image_batched": torch.arange(ROWS),
                 "txt_mask_batched": torch.tensor(TXT_MASK, dtype=torch.float32),
                 "image_mask_batched": torch.tensor(IMG_MASK, dtype=torch.float32), "index_mapping": mapping}
        out = model.compute_inbatch_contrastive_loss(batch)
        out["loss"].backward()
        tensors[f"uniir.{name}.loss"] = out["loss"].detach().reshape(1)
        tensors[f"uniir.{name}.grad_txt"] = txt.grad.clone()
        tensors[f"uniir.{name}.grad_img"] = img.grad.clone()
        tensors[f"uniir.{name}.grad_logit_scale"] = model.clip_model.logit_scale.grad.reshape(1).clone()
        meta[name] = {"in_batch_neg_num": in_batch_neg_num, "hard_negatives": neg, "loss": float(out["loss"]),
                      "accuracy": float(out["accuracy"])}
    return tensors, {"index_mapping": index_mapping, "txt_mask": TXT_MASK, "img_mask": IMG_MASK, "cases": meta}


def vlm2vec(repo: Path, tables: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    spec = importlib.util.spec_from_file_location("vlm2vec_loss", repo / "src/loss.py")
    loss_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loss_mod)
    tensors, meta = {}, {}
    for name, cls in (("simple", loss_mod.SimpleContrastiveLoss), ("distributed", loss_mod.DistributedContrastiveLoss)):
        q = tables["vlm_q"].clone().requires_grad_(True)
        p = tables["vlm_p"].clone().requires_grad_(True)
        loss = cls(temperature=0.02)(q, p)
        loss.backward()
        tensors[f"vlm2vec.{name}.loss"] = loss.detach().reshape(1)
        tensors[f"vlm2vec.{name}.grad_q"] = q.grad.clone()
        tensors[f"vlm2vec.{name}.grad_p"] = p.grad.clone()
        meta[name] = {"temperature": 0.02, "loss": float(loss)}
    return tensors, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uniir", type=Path, required=True, help=f"UniIR checkout at {COMMITS['uniir']}")
    parser.add_argument("--vlm2vec", type=Path, required=True, help=f"VLM2Vec checkout at {COMMITS['vlm2vec']}")
    parser.add_argument("--clip", type=Path, required=True, help=f"openai/CLIP checkout at {COMMITS['openai_clip']}")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    g = torch.Generator().manual_seed(0)
    vlm_q = torch.nn.functional.normalize(torch.randn(6, D, generator=g), dim=-1)  # VLM2Vec reps are normalised
    vlm_p = torch.nn.functional.normalize(vlm_q + 0.7 * torch.randn(6, D, generator=g), dim=-1)
    tables = {"txt": torch.randn(ROWS, D, generator=g), "img": torch.randn(ROWS, D, generator=g),
              "logit_scale": torch.tensor(2.3), "vlm_q": vlm_q, "vlm_p": vlm_p}
    t1, m1 = uniir(args.uniir, args.clip, tables)
    t2, m2 = vlm2vec(args.vlm2vec, tables)
    OUT.mkdir(parents=True, exist_ok=True)
    inputs = {f"inputs.{k}": v.reshape(-1) if v.ndim == 0 else v for k, v in tables.items()}
    save_file({k: v.contiguous() for k, v in {**inputs, **t1, **t2}.items()}, str(OUT / "losses.safetensors"))
    info = {"official": COMMITS, "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
            "uniir": m1, "vlm2vec": m2}
    (OUT / "losses.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: v["loss"] for k, v in m1["cases"].items()}), json.dumps(m2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
