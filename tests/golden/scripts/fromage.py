"""Golden outputs of the official FROMAGe model code on a tiny random OPT and CLIP vision tower.

Official code: https://github.com/kohjingyu/fromage at b36a1889e16cb9486e83e1853dce68ab653068c9, run from a checkout:
``fromage/models.py`` (``FromageModel``: ``__init__`` builds the LM and CLIP from local folders, resizes the LM's
embeddings, builds ``visual_embeddings`` / ``visual_fc`` / ``text_hidden_fcs``; ``forward`` in ``captioning`` and
``retrieval`` modes) and ``fromage/losses.py`` (``contrastive_loss``), combined as ``main.py``'s ``train`` does:
``loss = cap_ce + ret_ce + (contrastive_loss(logits_per_text) + contrastive_loss(logits_per_image)) / 2`` with
``logits_per_image = visual_embs @ last_embedding.t()`` (``cap_loss_scale = ret_loss_scale = 1``).

Tiny setup: OPT (vocabulary 60 + ``<|image|>`` 60 + ``[RET]`` 61 as ``main.py`` adds them, width 32, 2 layers,
4 heads, pad 1, BOS 2) and CLIP vision (32 px, patch 8, width 32, 2 layers), random, saved as Hugging Face folders
(``facebook/opt-golden`` and ``clip-vit-golden``: FROMAGe dispatches on those substrings); ``n_visual_tokens`` 2,
``shared_emb_dim`` 16, ``text_emb_layers [-1]``. After ``FromageModel.__init__`` the trainable parts (and the new
embedding rows) are set to seeded random values. Recorded: the resized LM (a folder), the CLIP folder, FROMAGe's
pruned checkpoint layout (``prune_model_ckpt.py``: ``model.*`` trainable keys + ``ret_input_embeddings.weight``),
the captioning prefix embeddings, the retrieval ``[RET]`` embedding and scaled visual embedding, every loss term,
for ``concat_captions`` False and True, and the gradients of the total loss for the trainable parameters (the
``[RET]`` row of the embedding gradient, the only row ``main.py`` keeps).

Shims (cannot change a number): the tokenizer passed to ``FromageModel`` is a stand-in holding only what the model
code reads (``cls_token_id`` = ``<|image|>``, ``pad_token_id``, ``len``); token ids are given directly. The
resized embedding matrix is set to ``requires_grad=True`` after ``__init__``: transformers 4.21.3 (FROMAGe's pin)
returns it trainable from ``resize_token_embeddings`` (the comment in ``__init__`` relies on it), 4.36 does not.
``preprocessor_config.json`` gets the ``feature_extractor_type`` key 4.36's ``AutoFeatureExtractor`` needs (the
feature extractor is built but never used: pixels are given directly).

Environment: /work/golden/envs/e_official (Python 3.11, torch 2.14.1 run on CPU, transformers 4.36.2 in place of
4.21.3 (OPT / CLIP vision forward unchanged for these inputs), torchvision 0.29.1, einops).

Rerun (writes tests/golden/fromage/):
  python3 -m venv /work/golden/envs/e_official
  /work/golden/envs/e_official/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.36.2 \\
      timm==0.4.12 tokenizers==0.15.2 einops==0.8.2 scipy==1.17.1 safetensors==0.8.0 numpy==2.4.6 \\
      pillow==13.0.0 faiss-cpu==1.15.1 torchmetrics==1.9.0 ftfy==6.3.1 regex
  git --git-dir=<fromage mirror> archive b36a1889e16cb9486e83e1853dce68ab653068c9 -- fromage | tar -x -C /tmp/fromage
  /work/golden/envs/e_official/bin/python tests/golden/scripts/fromage.py /tmp/fromage
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "fromage"
COMMIT = "b36a1889e16cb9486e83e1853dce68ab653068c9"
V0, IMAGE_ID, RET_ID, PAD_ID, BOS_ID = 60, 60, 61, 1, 2
B, L, N_VIS, EMB = 4, 8, 2, 16


class StandInTokenizer:
    """What ``FromageModel`` reads from its tokenizer (``cls_token_id``, ``pad_token_id``, ``len``)."""

    cls_token_id, pad_token_id = IMAGE_ID, PAD_ID

    def __len__(self) -> int:
        return V0 + 2


def backbones(folder: Path) -> tuple[Path, Path]:
    from transformers import (
        CLIPFeatureExtractor,
        CLIPVisionConfig,
        CLIPVisionModel,
        OPTConfig,
        OPTForCausalLM,
    )

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=V0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32,
                                   pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=BOS_ID, dropout=0.0,
                                   attention_dropout=0.0))
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4))
    lm_path, clip_path = folder / "facebook" / "opt-golden", folder / "clip-vit-golden"
    opt.save_pretrained(lm_path)
    clip.save_pretrained(clip_path)
    CLIPFeatureExtractor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_path)
    # FROMAGe loads it with AutoFeatureExtractor, which 4.36 finds by this key (the pixels are given directly)
    config_file = clip_path / "preprocessor_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "feature_extractor_type": "CLIPFeatureExtractor"}))
    return lm_path, clip_path


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = [8, 6, 4, 7]  # tokens incl. BOS and [RET]; the rest is padding
    tokens = torch.full((B, L), PAD_ID)
    for i, n in enumerate(lengths):
        tokens[i, 0] = BOS_ID
        tokens[i, 1 : n - 1] = torch.randint(3, V0, (n - 2,), generator=g)
        tokens[i, n - 1] = RET_ID
    return {"tokens": tokens, "caption_len": torch.tensor(lengths),
            "pixel_values": torch.randn(B, 3, 32, 32, generator=g)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", type=Path, help=f"kohjingyu/fromage checkout at {COMMIT}")
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo))
    from fromage import losses as losses_utils
    from fromage.models import FromageModel, FrozenArgs

    work = Path(tempfile.mkdtemp())
    lm_path, clip_path = backbones(work)
    model_args = FrozenArgs()
    model_args.opt_version, model_args.visual_encoder = str(lm_path), str(clip_path)
    model_args.n_visual_tokens, model_args.shared_emb_dim, model_args.text_emb_layers = N_VIS, EMB, [-1]
    model_args.retrieval_token_idx, model_args.text_embed_dropout_prob = RET_ID, 0.0
    model = FromageModel(StandInTokenizer(), model_args)
    # transformers 4.21.3 (FROMAGe's pin) returns a trainable matrix from resize_token_embeddings, as the comment
    # in FromageModel.__init__ says; 4.36 keeps the frozen flag, so restore 4.21's behaviour
    model.input_embeddings.weight.requires_grad_(True)
    torch.manual_seed(5)
    with torch.no_grad():
        for module in (model.visual_embeddings, model.visual_fc, model.text_hidden_fcs):
            for p in module.parameters():
                p.copy_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(2.5)
        model.input_embeddings.weight[V0:] = 0.05 * torch.randn(2, 32)  # <|image|>, [RET] (new rows)
    model.train()  # FROMAGe's override keeps the frozen LM and CLIP in eval mode
    x = inputs()
    out = {f"inputs.{k}": v for k, v in x.items()}
    meta = {}
    for concat in (False, True):
        model.zero_grad(set_to_none=True)
        tag = "concat" if concat else "plain"
        cap_out, cap_labels, _, _, _ = model(x["pixel_values"], x["tokens"].clone(), x["caption_len"].clone(),
                                             mode="captioning", concat_captions=concat)
        ret_out, _, last_embedding, _, visual_embs = model(x["pixel_values"], x["tokens"].clone(),
                                                           x["caption_len"].clone(), mode="retrieval")
        logits_per_image = visual_embs @ last_embedding.t()
        caption_loss = losses_utils.contrastive_loss(logits_per_image.t())
        image_loss = losses_utils.contrastive_loss(logits_per_image)
        total = cap_out.loss + ret_out.loss + (caption_loss + image_loss) / 2.0
        total.backward()
        out.update({f"{tag}.loss.caption_lm": cap_out.loss.detach().reshape(1),
                    f"{tag}.loss.retrieval_lm": ret_out.loss.detach().reshape(1),
                    f"{tag}.loss.contrastive": ((caption_loss + image_loss) / 2).detach().reshape(1),
                    f"{tag}.loss.total": total.detach().reshape(1)})
        grads = {"prefix.weight": model.visual_embeddings.weight, "prefix.bias": model.visual_embeddings.bias,
                 "image_head.weight": model.visual_fc.weight, "image_head.bias": model.visual_fc.bias,
                 "text_head.0.weight": model.text_hidden_fcs[0][0].weight,
                 "text_head.0.bias": model.text_hidden_fcs[0][0].bias, "logit_scale": model.logit_scale}
        out.update({f"{tag}.grad.{k}": p.grad.detach().reshape(p.shape or (1,)).clone() for k, p in grads.items()})
        out[f"{tag}.grad.ret_embedding"] = model.input_embeddings.weight.grad[RET_ID : RET_ID + 1].clone()
        meta[tag] = {"caption_lm": float(cap_out.loss), "retrieval_lm": float(ret_out.loss),
                     "contrastive": float((caption_loss + image_loss) / 2), "total": float(total)}
        if not concat:
            with torch.no_grad():
                out["plain.caption_labels"] = cap_labels.clone()
                out["plain.prefix_embeddings"] = model.get_visual_embs(x["pixel_values"], "captioning")
                out["plain.ret_embedding"] = last_embedding.detach()  # L2-normalised [RET] state through text_hidden_fcs
                out["plain.visual_embs_scaled"] = visual_embs.detach()  # logit_scale.exp() * normalised visual_fc
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / "fromage.safetensors"))
    # FROMAGe's pruned checkpoint layout (prune_model_ckpt.py), as safetensors; the test writes it as .pth.tar
    pruned = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()
              if k.startswith(("visual_embeddings.", "visual_fc.", "text_hidden_fcs.")) or k == "logit_scale"}
    pruned["ret_input_embeddings.weight"] = model.input_embeddings.weight[RET_ID : RET_ID + 1].detach().clone()
    save_file({k: v.contiguous() for k, v in pruned.items()}, str(OUT / "pruned_ckpt.safetensors"))
    for name, path in (("opt", lm_path), ("clip_vision", clip_path)):
        shutil.rmtree(OUT / name, ignore_errors=True)
        shutil.copytree(path, OUT / name)
    model.lm.config._name_or_path = "facebook/opt-golden"  # not the temporary folder: reruns give the same files
    model.lm.save_pretrained(OUT / "opt")  # the resized LM (62 rows), with the new rows set above
    import transformers
    info = {"official": {"repo": "kohjingyu/fromage", "commit": COMMIT},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]},
            "ids": {"image": IMAGE_ID, "ret": RET_ID, "pad": PAD_ID, "bos": BOS_ID}, "n_visual_tokens": N_VIS,
            "shared_emb_dim": EMB, "losses": meta}
    (OUT / "fromage.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
