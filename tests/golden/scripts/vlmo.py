"""Golden outputs of the official VLMo code on a tiny random model: encodings, ITC/ITM/MLM losses and gradients.

Official code: https://github.com/microsoft/unilm, folder ``vlmo/``, at 8b810f5fb68c69f939dbdc5dd2c5554db4ae9947 (the
last commit touching ``vlmo/``; the unilm snapshot fetched whole, 62 MB, so no standalone mirror was needed). Run
from a checkout of that folder: ``vlmo/modules/vlmo_module.py`` (``VLMo``: ``infer``, ``infer_text``,
``infer_image``, ``forward``), ``multiway_transformer.py`` (``MultiWayTransformer``), ``heads.py``, and
``objectives.py`` (``compute_itc``, ``compute_itm_hardneg``, ``compute_mlm``).

Two tiny variants of the released shapes, built with the official ``MultiWayTransformer`` through timm's
``create_model`` as ``vlmo_module`` does (this script registers the tiny sizes beside ``vlmo_base_patch16``):
  - ``rel`` (as VLMo-Base/Large): relative position bias, layer scale 0.1, 32 px / patch 8, width 32, 3 layers,
    4 heads, VL-FFN from layer 2, ``max_text_len`` 8, ``max_text_len_of_initckpt`` 12, vocabulary 50;
  - ``abs`` (as VLMo-Base+): absolute positions, no layer scale, otherwise the same.
Every parameter is perturbed from its initial value (seeded) so layer scales, biases, norms, the relative table and
the logit scales all matter. Recorded per variant: the model's ``state_dict`` in the official layout (loaded by
unimm's ``unimm.checkpoints.vlmo.load_official_vlmo`` in the test), ``infer_text`` / ``infer_image`` outputs (final
hidden states, ITC features of the expert and VL-FFN CLS), ``infer`` (joint hidden states, pooled CLS) with the ITM
logits, then one ``forward`` with ``current_tasks = [mlm, itc, itm]`` (pretraining): the three losses (``mlm_loss``
already x0.25 as in ``compute_mlm``), the hard negatives drawn by ``compute_itm_hardneg`` with the sampling
weights they were drawn from, and gradients of the summed loss (``training_step``) for selected parameters.
A third model (``rel`` size with the fine-tuning heads: ``irtr``, ``vqa`` with 5 answers, ``nlvr2`` with its third
token type) records one ``forward`` per fine-tuning task: ``compute_irtr``, ``compute_vqa`` (soft-score BCE x
answers), ``compute_nlvr2`` (two joint passes, image token types 1 and 2): losses, logits and gradients.

Shims, all in this script, none can change a number:
  - ``pytorch_lightning`` (1.5.5 does not import beside torch 2.x) is a stub module: ``LightningModule`` is
    ``nn.Module`` with ``save_hyperparameters`` (stores the constructor's ``config`` as ``hparams.config``), a
    no-op ``log`` and a ``device`` property; ``rank_zero_info`` is a no-op;
  - ``torch.Tensor.get_device`` returns ``"cpu"`` for CPU tensors (the official code calls
    ``.to(device=img.get_device())``, which is -1 on CPU);
  - ``torch.multinomial`` is wrapped to record its input weights and output (the call itself is unchanged);
  - torch.distributed runs as a gloo group of size 1 (``compute_itc`` / ``compute_itm_hardneg`` gather).

Environment: /work/golden/envs/e_official (Python 3.11, torch 2.14.1 run on CPU, timm 0.4.12, transformers 4.36.2
in place of 4.8.1: VLMo uses only ``BertConfig``, ``BertEmbeddings`` with ``position_embedding_type="rel_pos"`` or
``"absolute"`` and ``BertPredictionHeadTransform``, whose forward is the same in both; torchmetrics 1.x for the
logging metrics only).

Rerun (writes tests/golden/vlmo/vlmo_{rel,abs,ft}.safetensors and vlmo.json):
  python3 -m venv /work/golden/envs/e_official
  /work/golden/envs/e_official/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.36.2 \\
      timm==0.4.12 tokenizers==0.15.2 einops==0.8.2 scipy==1.17.1 safetensors==0.8.0 numpy==2.4.6 \\
      pillow==13.0.0 faiss-cpu==1.15.1 torchmetrics==1.9.0 ftfy==6.3.1 regex
  git --git-dir=<unilm mirror> archive 8b810f5fb68c69f939dbdc5dd2c5554db4ae9947 vlmo | tar -x -C /tmp/unilm
  /work/golden/envs/e_official/bin/python tests/golden/scripts/vlmo.py /tmp/unilm/vlmo
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import types
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "vlmo"
COMMIT = "8b810f5fb68c69f939dbdc5dd2c5554db4ae9947"
B, T, VOCAB = 3, 8, 50
SIZE = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 4, "mlp_ratio": 4,
        "vlffn_start_layer_index": 2}
VARIANTS = {"rel": {"use_abs_pos_emb": False, "need_relative_position_embed": True, "layer_scale_init_values": 0.1},
            "abs": {"use_abs_pos_emb": True, "need_relative_position_embed": False, "layer_scale_init_values": None}}
GRAD_KEYS = [
    "transformer.patch_embed.proj.weight", "transformer.blocks.0.attn.qkv.weight", "transformer.blocks.0.attn.q_bias",
    "transformer.blocks.1.mlp_text.fc1.weight", "transformer.blocks.1.mlp_imag.fc2.weight",
    "transformer.blocks.2.mlp_vl.fc1.weight", "transformer.blocks.2.norm2_vl.weight", "transformer.norm.weight",
    "text_embeddings.word_embeddings.weight", "token_type_embeddings.weight", "pooler.dense.weight",
    "itc_text_proj.fc.weight", "itc_vl_image_proj.fc.weight", "logit_scale", "logit_vl_scale", "itm_score.fc.weight",
    "mlm_score.transform.dense.weight", "mlm_score.decoder.weight", "mlm_score.bias",
]


def install_shims() -> list:
    """Stub ``pytorch_lightning`` and make CPU devices usable; returns the multinomial call log."""
    pl = types.ModuleType("pytorch_lightning")
    utilities = types.ModuleType("pytorch_lightning.utilities")
    distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
    distributed.rank_zero_info = lambda *a, **k: None

    class LightningModule(nn.Module):
        def save_hyperparameters(self):
            caller = inspect.currentframe().f_back.f_locals
            self.hparams = types.SimpleNamespace(config=caller["config"])

        def log(self, *args, **kwargs):
            pass

        @property
        def device(self):
            return next(self.parameters()).device

    pl.LightningModule = LightningModule
    pl.utilities, utilities.distributed = utilities, distributed
    sys.modules.update({"pytorch_lightning": pl, "pytorch_lightning.utilities": utilities,
                        "pytorch_lightning.utilities.distributed": distributed})

    get_device = torch.Tensor.get_device
    torch.Tensor.get_device = lambda self: "cpu" if self.device.type == "cpu" else get_device(self)

    calls = []
    multinomial = torch.multinomial

    def recording_multinomial(weights, *args, **kwargs):
        out = multinomial(weights, *args, **kwargs)
        calls.append((weights.detach().clone(), out.detach().clone()))
        return out

    torch.multinomial = recording_multinomial
    return calls


def register_tiny(variant: str) -> str:
    from timm.models.registry import register_model
    from vlmo.modules.multiway_transformer import MultiWayTransformer

    name = f"vlmo_golden_tiny_{variant}"

    def build(pretrained=False, **kwargs):  # same pattern as the official vlmo_base_patch16
        img_size = kwargs.pop("img_size", SIZE["img_size"])
        size = {k: v for k, v in SIZE.items() if k != "img_size"}
        return MultiWayTransformer(img_size=img_size, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                   **size, **VARIANTS[variant], **kwargs)

    build.__name__ = name
    register_model(build)
    return name


PRETRAIN_LOSSES = {"itm": 1, "itc": 1, "mlm": 1, "textmlm": 0, "vqa": 0, "nlvr2": 0, "irtr": 0}
FINETUNE_LOSSES = {"itm": 0, "itc": 0, "mlm": 0, "textmlm": 0, "vqa": 1, "nlvr2": 1, "irtr": 1}
VQA_ANSWERS = 5


def config(arch: str, losses: dict | None = None) -> dict:
    return {"model_arch": arch, "image_size": SIZE["img_size"], "drop_path_rate": 0.0, "vocab_size": VOCAB,
            "max_text_len": T, "max_text_len_of_initckpt": 12, "loss_names": dict(losses or PRETRAIN_LOSSES),
            "load_path": "", "test_only": False, "vqav2_label_size": VQA_ANSWERS, "get_recall_metric": False}


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    ids[:, 0] = 1  # a CLS-like first token
    lengths = torch.tensor([T, 5, 3])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # pad id 0
    mlm_ids, mlm_labels = ids.clone(), torch.full_like(ids, -100)
    for row, col in [(0, 2), (0, 6), (1, 1), (1, 3), (2, 2)]:
        mlm_labels[row, col] = ids[row, col]
        mlm_ids[row, col] = 2  # [MASK]
    pixels = torch.randn(B, 3, SIZE["img_size"], SIZE["img_size"], generator=g)
    return {"text_ids": ids, "text_masks": mask, "text_ids_mlm": mlm_ids, "text_labels_mlm": mlm_labels,
            "pixel_values": pixels}


def run_variant(variant: str, x: dict[str, torch.Tensor], calls: list) -> tuple[dict, dict]:
    from vlmo.modules.vlmo_module import VLMo

    torch.manual_seed(10)
    model = VLMo(config(register_tiny(variant)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()  # no dropout (all rates are 0 anyway); gradients still flow
    batch = {"text_ids": x["text_ids"], "text_masks": x["text_masks"], "text_labels": torch.full_like(x["text_ids"], -100),
             "text_ids_mlm": x["text_ids_mlm"], "text_labels_mlm": x["text_labels_mlm"], "image": [x["pixel_values"]]}
    out = {f"state.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        text, image, joint = model.infer_text(batch), model.infer_image(batch), model.infer(batch)
        out.update({
            "text.hidden": text["text_feats"], "text.cls_feats": text["cls_feats"],
            "text.cls_vlffn_feats": text["cls_vlffn_feats"],
            "image.hidden": image["image_feats"], "image.cls_feats": image["cls_feats"],
            "image.cls_vlffn_feats": image["cls_vlffn_feats"],
            "joint.text_feats": joint["text_feats"], "joint.image_feats": joint["image_feats"],
            "joint.cls_feats": joint["cls_feats"], "joint.itm_logits": model.itm_score(joint["cls_feats"]),
        })
    model.current_tasks = ["mlm", "itc", "itm"]
    calls.clear()
    torch.manual_seed(3)
    ret = model(batch)
    total = sum(v for k, v in ret.items() if "loss" in k)  # training_step
    total.backward()
    params = dict(model.named_parameters())
    out.update({f"grad.{k}": params[k].grad.detach().clone() for k in GRAD_KEYS if k in params})
    assert len(calls) == 2 * B, f"expected {2 * B} multinomial draws, got {len(calls)}"
    out["itm.weights_t2i"] = torch.stack([w for w, _ in calls[:B]])  # image negative of each text
    out["itm.neg_image"] = torch.cat([i for _, i in calls[:B]])
    out["itm.weights_i2t"] = torch.stack([w for w, _ in calls[B:]])  # text negative of each image
    out["itm.neg_text"] = torch.cat([i for _, i in calls[B:]])
    out["loss.itm_logits"] = ret["itm_logits"].detach()
    for k in ("itc_loss", "itm_loss", "mlm_loss"):
        out[f"loss.{k}"] = ret[k].detach().reshape(1)
    out["loss.total"] = total.detach().reshape(1)
    meta = {"losses": {k: float(ret[k]) for k in ("itc_loss", "itm_loss", "mlm_loss")}, "total": float(total),
            "neg_image": out["itm.neg_image"].tolist(), "neg_text": out["itm.neg_text"].tolist(),
            "grad_keys": [k for k in GRAD_KEYS if k in params]}
    return out, meta


def run_finetune(x: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The ``rel`` size with the fine-tuning heads (``irtr``, ``vqa`` with 5 answers, ``nlvr2``: 3 token types);
    one ``forward`` per task, gradients of each task's loss."""
    from vlmo.modules.vlmo_module import VLMo

    torch.manual_seed(11)
    model = VLMo(config("vlmo_golden_tiny_rel", FINETUNE_LOSSES))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.train()  # compute_nlvr2's eval branch needs dataset table names; every dropout / drop-path rate is 0
    g = torch.Generator().manual_seed(4)
    second = torch.randn(x["pixel_values"].shape, generator=g)  # the second NLVR2 image
    text = {"text_ids": x["text_ids"], "text_masks": x["text_masks"], "text_labels": torch.full_like(x["text_ids"], -100)}
    vqa = {"vqa_labels": [[0, 3], [1], [4, 2, 0]], "vqa_scores": [[1.0, 0.3], [0.6], [0.9, 0.3, 1.0]]}
    answers = [1, 0, 1]
    batches = {"irtr": {**text, "image": [x["pixel_values"]]},
               "vqa": {**text, "image": [x["pixel_values"]], **vqa},
               "nlvr2": {**text, "image_0": [x["pixel_values"]], "image_1": [second], "answers": answers}}
    grad_keys = {"irtr": ["itc_text_proj.fc.weight", "itc_image_proj.fc.weight", "logit_scale",
                          "transformer.blocks.0.attn.qkv.weight", "transformer.blocks.2.mlp_text.fc1.weight",
                          "transformer.blocks.2.mlp_imag.fc1.weight", "relative_position_bias_table"],
                 "vqa": ["vqa_classifier.0.weight", "vqa_classifier.1.weight", "vqa_classifier.3.weight",
                         "pooler.dense.weight", "transformer.blocks.2.mlp_vl.fc2.weight"],
                 "nlvr2": ["nlvr2_classifier.0.weight", "nlvr2_classifier.3.bias", "token_type_embeddings.weight",
                           "transformer.blocks.1.mlp_imag.fc1.weight"]}
    out = {f"state.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    out["inputs.second_pixel_values"] = second
    meta = {"vqa": vqa, "answers": answers, "grad_keys": grad_keys, "losses": {}}
    params = dict(model.named_parameters())
    for task, batch in batches.items():
        model.zero_grad(set_to_none=True)
        model.current_tasks = [task]
        ret = model(batch)
        ret[f"{task}_loss"].backward()
        out[f"{task}.loss"] = ret[f"{task}_loss"].detach().reshape(1)
        if task != "irtr":
            out[f"{task}.logits"] = ret[f"{task}_logits"].detach()
        out.update({f"{task}.grad.{k}": params[k].grad.detach().clone() for k in grad_keys[task]})
        meta["losses"][task] = float(ret[f"{task}_loss"])
    return out, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vlmo", type=Path, help=f"the vlmo/ folder of microsoft/unilm at {COMMIT}")
    args = parser.parse_args()
    sys.path.insert(0, str(args.vlmo))
    calls = install_shims()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29535")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    x = inputs()
    info = {"official": {"repo": "microsoft/unilm (vlmo/)", "commit": COMMIT}, "size": SIZE, "variants": VARIANTS,
            "vocab_size": VOCAB, "max_text_len": T, "max_text_len_of_initckpt": 12, "runs": {}}
    OUT.mkdir(parents=True, exist_ok=True)
    for variant in VARIANTS:
        tensors, meta = run_variant(variant, x, calls)
        tensors.update({f"inputs.{k}": v for k, v in x.items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / f"vlmo_{variant}.safetensors"))
        info["runs"][variant] = meta
        print(variant, json.dumps(meta["losses"]), meta["neg_image"], meta["neg_text"])
    tensors, meta = run_finetune(x)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "vlmo_ft.safetensors"))
    info["finetune"] = {**meta, "vqa_answers": VQA_ANSWERS}
    print("finetune", json.dumps(meta["losses"]))
    import timm
    import transformers
    info["versions"] = {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
                        "python": sys.version.split()[0]}
    (OUT / "vlmo.json").write_text(json.dumps(info, indent=1) + "\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
