"""Golden outputs of the official UniIR code (CLIP_SF, BLIP_FF) on tiny random weights, for tests/test_golden_uniir.py.

Official code (not copied here; pass the checkouts as arguments):
- UniIR   https://github.com/TIGER-AI-Lab/UniIR   commit 98dc570c2645fec8e1fd42c7d4ac9853f46051fd
  (src/models/uniir_clip/clip_scorefusion/clip_sf.py, src/models/uniir_blip/blip_featurefusion/blip_ff.py,
  src/models/uniir_blip/backbone/{vit,med,blip}.py, backbone/transform/blip_transform.py)
- OpenAI CLIP https://github.com/openai/CLIP    commit d05afc436d78f1c48dc0dbf8e5980a9d471f35f6 (the ``clip``
  package UniIR installs: clip.model.CLIP, clip._transform, clip.tokenize)

Environment (/work/golden/envs/uniir, Python 3.11, run on the CPU): torch 2.14.1, torchvision 0.29.1,
transformers 4.36.2 (BLIP's med.py BERT, UniIR's T5 imports), timm 0.6.13, fairscale 0.4.13, opencv-python-headless
5.0.0 (imported by BLIP's randaugment; it upgrades numpy to 2.4.6), tokenizers 0.15.2, ftfy 6.3.1, regex,
scikit-image 0.26.0, safetensors 0.8.0, Pillow 13.0.0. The recorded meta.json repeats the main versions.

Rerun:
    python3 -m venv /work/golden/envs/uniir
    /work/golden/envs/uniir/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/golden/envs/uniir/bin/pip install "numpy<2" transformers==4.36.2 timm==0.6.13 ftfy regex tqdm \\
        scikit-image safetensors
    /work/golden/envs/uniir/bin/pip install opencv-python-headless packaging
    /work/golden/envs/uniir/bin/pip install --no-build-isolation fairscale==0.4.13
    git clone https://github.com/TIGER-AI-Lab/UniIR /tmp/UniIR && git -C /tmp/UniIR checkout 98dc570c
    git clone https://github.com/openai/CLIP /tmp/CLIP && git -C /tmp/CLIP checkout d05afc43
    /work/golden/envs/uniir/bin/python tests/golden/scripts/uniir.py /tmp/UniIR /tmp/CLIP tests/golden/uniir

Shims (none changes a number):
- ``clip.load`` is replaced by a function returning a tiny randomly initialised official ``clip.model.CLIP`` and
  the official ``clip._transform(n_px)`` (the real one downloads released weights).
- ``blip_ff.create_vit`` returns the official ``VisionTransformer`` at tiny size (the real one knows only
  base / large); ``blip_ff.init_tokenizer`` builds the official tokenizer recipe (BertTokenizer + [DEC] + [ENC])
  over a tiny local vocabulary instead of downloading bert-base-uncased.
- A one-process gloo group, so that UniIR's all_gather calls run (world size 1: identity).

Recorded (tests/golden/uniir/): the official ``.pth`` files ({"model": state_dict}), the source images (PNG crops
of skimage photos of odd sizes), ``golden.safetensors`` (pixels of each official transform, token ids, embeddings,
losses, gradients) and ``meta.json`` (texts, sizes, row layout, configs, versions).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

CLIP_SIZES = (32, 61)   # 32: the tiny CLIP's input; 61: an odd crop size
BLIP_SIZES = (32, 40)   # 32: the tiny BLIP's input
# crops (x0, y0, w, h) of skimage photos; sizes chosen so that several centre-crop offsets end in .5 and round up
IMAGES = {
    "astronaut": ("astronaut", (40, 10, 131, 197)),
    "chelsea": ("chelsea", (60, 20, 251, 167)),
    "coffee": ("coffee", (100, 50, 301, 203)),
    "rocket": ("rocket", (200, 60, 213, 143)),
    "camera_gray": ("camera", (100, 100, 157, 99)),
}
TEXTS = [
    "Retrieve an image that matches the given caption. A cat sleeping on a red sofa.",
    "a rocket on the launch pad",
    "Find a news photo matching this sentence: two people drink coffee in the morning.",
    "an astronaut holding a flag",
    "a grey photo of a man with a camera",
    "",
]
BLIP_WORDS = ("a an the of on in with this that two is to and image photo caption retrieve find matches matching "
              "given sentence cat sleeping red sofa rocket launch pad news people drink coffee morning astronaut "
              "holding flag grey man camera . : ,").split()

# rows of one training batch: (text index or None, image name or None)
QUERIES = [(0, None), (None, "rocket"), (2, "coffee"), (3, "astronaut")]
POSITIVES = [(None, "chelsea"), (1, None), (4, "camera_gray"), (None, "astronaut")]
NEGATIVES = [[(3, None), (None, "coffee")], [(None, "rocket"), (2, "chelsea")],
             [(1, "rocket"), (0, None)], [(None, "camera_gray"), (4, None)]]
IN_BATCH_NEG_NUM = 2
POS_DIDS = [101, 102, 103, 101]  # BLIP_FF: a repeated did = two positives of one query

CLIP_TINY = dict(embed_dim=16, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                 context_length=77, vocab_size=49408, transformer_width=8, transformer_heads=2, transformer_layers=2)
BLIP_TEXT = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                 max_position_embeddings=40, encoder_width=32, add_cross_attention=True, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
                 type_vocab_size=2, initializer_range=0.02, model_type="bert", architectures=["BertModel"])
BLIP_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
BLIP_QUEUE, BLIP_MAX_LEN, BLIP_ALPHA = 8, 24, 0.4


def perturb_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random LayerNorm gains / biases (official init is 1 / 0), so that a mis-mapped norm shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.2 * torch.randn(m.weight.shape, generator=generator))
                m.bias.add_(0.2 * torch.randn(m.bias.shape, generator=generator))


def save_images(out: Path) -> dict[str, list[int]]:
    from PIL import Image
    from skimage import data as skdata
    (out / "images").mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, (source, (x0, y0, w, h)) in IMAGES.items():
        array = getattr(skdata, source)()
        Image.fromarray(array[y0:y0 + h, x0:x0 + w]).save(out / "images" / f"{name}.png")
        sizes[name] = [w, h]
    return sizes


def load_images(out: Path) -> dict:
    from PIL import Image
    # as UniIR's MBEIRDataset: Image.open(path).convert("RGB") before the transform
    return {name: Image.open(out / "images" / f"{name}.png").convert("RGB") for name in IMAGES}


def main(uniir_dir: str, clip_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(Path(uniir_dir) / "src"), str(Path(clip_dir))]
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    import clip
    import clip.clip as clip_impl
    from clip.model import CLIP
    from safetensors.torch import save_file
    from transformers import BertTokenizer

    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"texts": TEXTS, "images": save_images(out), "clip_sizes": CLIP_SIZES, "blip_sizes": BLIP_SIZES,
                  "queries": QUERIES, "positives": POSITIVES, "negatives": NEGATIVES,
                  "in_batch_neg_num": IN_BATCH_NEG_NUM, "pos_dids": POS_DIDS, "clip_tiny": CLIP_TINY,
                  "blip_text": BLIP_TEXT, "blip_vit": BLIP_VIT, "blip_queue": BLIP_QUEUE,
                  "blip_max_length": BLIP_MAX_LEN, "blip_alpha": BLIP_ALPHA,
                  "versions": {"torch": torch.__version__}}
    images = load_images(out)

    # -- preprocessing: the official transforms ----------------------------------------------------------------
    import torchvision
    from models.uniir_blip.backbone.transform.blip_transform import get_blip_transform
    meta["versions"]["torchvision"] = torchvision.__version__
    for n in CLIP_SIZES:
        tf = clip_impl._transform(n)
        tensors[f"pixels/openai_clip/{n}"] = torch.stack([tf(images[k]) for k in IMAGES])
    for n in BLIP_SIZES:
        tf = get_blip_transform(n, is_train=False)
        tensors[f"pixels/blip/{n}"] = torch.stack([tf(images[k]) for k in IMAGES])
    tensors["clip_ids"] = clip.tokenize(TEXTS, context_length=77, truncate=True).long()

    rows = QUERIES + POSITIVES + [r for negs in NEGATIVES for r in negs]
    b, n_neg = len(QUERIES), len(NEGATIVES[0])
    index_mapping = {"query": [[i] for i in range(b)], "pos_cand": [[b + i] for i in range(b)],
                     "neg_cand_list": [[2 * b + i * n_neg + j for j in range(n_neg)] for i in range(b)]}
    name_index = {k: i for i, k in enumerate(IMAGES)}

    def image_batch(size_key: str) -> torch.Tensor:
        pixels = tensors[size_key]
        blank = torch.zeros_like(pixels[0])  # UniIR's padding image for a missing one
        return torch.stack([pixels[name_index[im]] if im is not None else blank for _, im in rows])

    # -- CLIP_SF ---------------------------------------------------------------------------------------------
    from models.uniir_clip.clip_scorefusion import clip_sf as clip_sf_module
    gen = torch.Generator().manual_seed(0)

    def tiny_clip_load(name, device="cpu", jit=False, download_root=None):
        torch.manual_seed(0)
        model = CLIP(**CLIP_TINY)
        perturb_norms(model, gen)
        return model.float(), clip_impl._transform(CLIP_TINY["image_resolution"])

    clip_sf_module.clip.load = tiny_clip_load
    config = SimpleNamespace(model=SimpleNamespace(gather_embeddings=True),
                             data_config=SimpleNamespace(in_batch_neg_num=IN_BATCH_NEG_NUM))
    model = clip_sf_module.CLIPScoreFusion("tiny", "cpu", config=config).train()
    torch.save({"model": model.state_dict()}, out / "clip_sf.pth")
    txt = model.get_tokenizer()([TEXTS[t] if t is not None else "" for t, _ in rows]).long()
    batch = {"txt_batched": txt, "image_batched": image_batch(f"pixels/openai_clip/{CLIP_TINY['image_resolution']}"),
             "txt_mask_batched": torch.tensor([float(t is not None) for t, _ in rows]),
             "image_mask_batched": torch.tensor([float(im is not None) for _, im in rows])}
    with torch.no_grad():
        tensors["clip_sf/embeddings"] = model.encode_multimodal_input(
            batch["txt_batched"], batch["image_batched"], batch["txt_mask_batched"], batch["image_mask_batched"])
        plain = model({**batch, "index_mapping": {k: v for k, v in index_mapping.items() if k != "neg_cand_list"}})
    tensors["clip_sf/loss_in_batch"] = plain["loss"].detach().reshape(1)
    outputs = model({**batch, "index_mapping": index_mapping})
    outputs["loss"].backward()
    tensors["clip_sf/loss_hard_negatives"] = outputs["loss"].detach().reshape(1)
    tensors["clip_sf/accuracy_hard_negatives"] = outputs["accuracy"].detach().float().reshape(1)
    for key in ("clip_model.visual.conv1.weight", "clip_model.text_projection", "clip_model.logit_scale",
                "clip_model.ln_final.weight", "clip_model.transformer.resblocks.0.attn.in_proj_weight",
                "clip_model.visual.proj"):
        tensors[f"clip_sf/grad/{key}"] = dict(model.named_parameters())[key].grad.detach().clone()

    # -- BLIP_FF ---------------------------------------------------------------------------------------------
    from models.uniir_blip.backbone.vit import VisionTransformer
    from models.uniir_blip.blip_featurefusion import blip_ff as blip_ff_module
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BLIP_WORDS]
    (out / "blip_vocab.txt").write_text("\n".join(vocab) + "\n")

    def tiny_tokenizer():
        tokenizer = BertTokenizer(str(out / "blip_vocab.txt"), do_lower_case=True)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    def tiny_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        return VisionTransformer(**BLIP_VIT), BLIP_VIT["embed_dim"]

    blip_ff_module.create_vit, blip_ff_module.init_tokenizer = tiny_vit, tiny_tokenizer
    med = {**BLIP_TEXT, "vocab_size": len(tiny_tokenizer())}
    meta["blip_text"] = med
    (out / "blip_med_config.json").write_text(json.dumps(med, indent=1))
    torch.manual_seed(1)
    model = blip_ff_module.BLIPFeatureFusion(
        med_config=str(out / "blip_med_config.json"), image_size=BLIP_VIT["img_size"], vit="base",
        embed_dim=BLIP_TEXT["hidden_size"], queue_size=BLIP_QUEUE, momentum=0.995,
        config=SimpleNamespace(tokenizer_max_length=BLIP_MAX_LEN))
    perturb_norms(model, gen)
    model.copy_params()  # the momentum copies equal the (perturbed) online towers, as after BLIP's __init__
    model.train()
    os.remove(out / "blip_med_config.json")
    torch.save({"model": model.state_dict()}, out / "blip_ff.pth")
    ff_rows = QUERIES + POSITIVES  # no hard negatives: they enter UniIR's BLIP loss through its queue
    txt = model.get_tokenizer()([TEXTS[t] if t is not None else "" for t, _ in ff_rows])
    tensors["blip_ids"], tensors["blip_mask"] = txt.input_ids.long(), txt.attention_mask.long()
    pixels = tensors[f"pixels/blip/{BLIP_VIT['img_size']}"]
    image_batched = torch.stack([pixels[name_index[im]] if im is not None else torch.zeros_like(pixels[0])
                                 for _, im in ff_rows])
    with torch.no_grad():
        tensors["blip_ff/embeddings"] = model.encode_multimodal_input(txt, image_batched, None, None)
    ff_batch = {"txt_batched": txt, "image_batched": image_batched, "txt_mask_batched": None,
                "image_mask_batched": None, "p_did_list": POS_DIDS,
                "index_mapping": {"query": index_mapping["query"], "pos_cand": index_mapping["pos_cand"]}}
    outputs = model(ff_batch, alpha=BLIP_ALPHA)
    outputs["loss"].backward()
    tensors["blip_ff/loss"] = outputs["loss"].detach().reshape(1)
    for key in ("visual_encoder.patch_embed.proj.weight", "visual_encoder.norm.weight",
                "text_encoder.pooler.dense.weight", "text_encoder.encoder.layer.0.crossattention.self.query.weight",
                "text_encoder.embeddings.word_embeddings.weight", "temp"):
        tensors[f"blip_ff/grad/{key}"] = dict(model.named_parameters())[key].grad.detach().clone()

    import timm
    import transformers
    meta["versions"].update(transformers=transformers.__version__, timm=timm.__version__, numpy=np.__version__)
    save_file({k: v.contiguous().float() if v.is_floating_point() else v.contiguous() for k, v in tensors.items()},
              out / "golden.safetensors")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({k: list(v.shape) for k, v in tensors.items()}, indent=0))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: uniir.py UNIIR_CHECKOUT CLIP_CHECKOUT OUT_DIR")
    main(*sys.argv[1:])
