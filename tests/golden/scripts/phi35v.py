"""Golden outputs of the official Phi-3.5-V code (processor + model) as VLM2Vec runs it, on a tiny random model.

Official code: the Phi-3.5-V remote code pinned inside https://github.com/TIGER-AI-Lab/VLM2Vec at
6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16, ``src/model/baseline_backbone/phi3_v/``: ``processing_phi3_v.py``
(``Phi3VProcessor``), ``image_processing_phi3_v.py`` (``Phi3VImageProcessor``, HD transform, ``num_crops`` 4),
``image_embedding_phi3_v.py`` and ``modeling_phi3_v.py`` (``Phi3VForCausalLM`` with VLM2Vec's per-row image
split). The script feeds three prompts (an image prompt in MMEB's form, a text-only prompt, a prompt with text
before the image) through the processor row by row and pads them with ``processor.tokenizer.pad`` (as VLM2Vec's
``Phi3V_process_fn`` in ``src/model/processor.py``), runs the model with ``output_hidden_states`` and pools the
last real token of ``hidden_states[-1]`` (as VLM2Vec's ``MMEBModel.encode_input`` / ``_pooling``, right padding,
``eager`` attention, ``use_cache=False``).

Recorded under tests/golden/phi35v/ (about 1 MB):
  - the tiny checkpoint in the official layout: ``config.json`` (``Phi3VConfig``, LongRoPE ``su``),
    ``model.safetensors`` (every official key but the ``vision_embed_tokens.wte`` alias of ``embed_tokens``),
    the tokenizer files (a word-level tokenizer with SentencePiece-style ``▁`` prefixes that adds BOS only, as
    Phi-3.5-V's; pad ``<|endoftext|>``), the two input images (PNG, from scikit-image's ``chelsea`` and
    ``rocket``: 90 x 60 -> 2 x 2 tiles, 40 x 100 -> 2 x 1 tiles);
  - ``golden.json``: prompts, ``num_crops``, ``max_len``, the tiny CLIP tower's config, versions, commit;
  - ``golden.safetensors``: ``input_ids`` (official: ``-1`` at image positions), ``attention_mask``,
    ``image_sizes``, per image ``pixel_values`` row and column sums (float64) and 4096 sampled values with their
    flat indices (the full tensors are 1.4 M floats per image), ``pooled`` (last-token hidden state) and
    ``embedding`` (its L2 normalisation).

Shims, all in this script, none can change a number:
  - ``image_embedding_phi3_v.CLIP_VIT_LARGE_PATCH14_336_CONFIG`` (the module constant the official embedding builds
    its CLIP tower from) is replaced by a tiny tower with the same geometry (336 px, patch 14, quick-GELU): only
    the tower's width and depth shrink, its code path is the official one;
  - the script must run with ``python -O``: ``reshape_hd_patches_2x2merge`` asserts the tower width is 1024 (and
    nothing else checks it); ``-O`` drops assert statements, which compute nothing;
  - ``flash_attn`` is absent: the official modules import it inside ``try`` and VLM2Vec runs Phi-3.5-V ``eager``.

Environment: /work/golden/envs/phi35v (Python 3.11): torch 2.14.1 and torchvision 0.29.1 (the CUDA builds on this
machine's disk, run on CPU), transformers 4.52.3 (VLM2Vec's requirements.txt pin), tokenizers 0.21.4,
scikit-image 0.26.0, safetensors, pillow.

Rerun (overwrites tests/golden/phi35v/):
  python3 -m venv /work/golden/envs/phi35v
  /work/golden/envs/phi35v/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.52.3 safetensors \\
      pillow numpy scikit-image
  git --git-dir=<VLM2Vec mirror> archive 6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16 | tar -x -C /tmp/vlm2vec
  /work/golden/envs/phi35v/bin/python -O tests/golden/scripts/phi35v.py /tmp/vlm2vec
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "phi35v"
COMMIT = "6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16"
NUM_CROPS, MAX_LEN, SAMPLES = 4, 256, 4096
H, LAYERS, HEADS, V_WIDTH, V_LAYERS = 64, 2, 4, 32, 2
PROMPTS = [  # (prompt, image file or None)
    ("<|image_1|> represent the given image with the following question what animal is this", "chelsea.png"),
    ("find a photo of a rocket on the launch pad", None),
    ("a tall photo <|image_1|> represent the given image", "rocket.png"),
]
WORDS = ("represent the given image with following question what animal is this find a photo of rocket on launch "
         "pad tall cat").split()
TINY_TOWER = dict(hidden_size=V_WIDTH, intermediate_size=2 * V_WIDTH, num_hidden_layers=V_LAYERS,
                  num_attention_heads=4, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=16)


def build_tokenizer():
    """Word-level, lowercase, ``▁``-prefixed words (SentencePiece's Metaspace, prefix on every piece), BOS only."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + ["\u2581" + w for w in WORDS] + ["<|endoftext|>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<|endoftext|>", padding_side="right")


def make_images(out: Path) -> None:
    """Two real photos at two aspect ratios, saved as PNG so that both sides read the same pixels."""
    from skimage import data

    Image.fromarray(data.chelsea()).resize((90, 60), Image.Resampling.BICUBIC).save(out / "chelsea.png")
    Image.fromarray(data.rocket()[:, 230:390]).resize((40, 100), Image.Resampling.BICUBIC).save(out / "rocket.png")


def randomise(model: torch.nn.Module) -> None:
    """Every parameter random (the separators and norms too, which the default init leaves at 0 / 1)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = p.ndim == 1 and ("norm" in name or "layrnorm" in name)
            p.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else 0.1 * noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="VLM2Vec checkout at " + COMMIT)
    args = parser.parse_args()
    if __debug__:
        sys.exit("run with python -O (see the module docstring: the width-1024 assert of the official code)")
    sys.path.insert(0, str(Path(args.checkout) / "src" / "model" / "baseline_backbone"))
    import transformers
    from phi3_v import image_embedding_phi3_v
    from phi3_v.configuration_phi3_v import Phi3VConfig
    from phi3_v.image_processing_phi3_v import Phi3VImageProcessor
    from phi3_v.modeling_phi3_v import Phi3VForCausalLM
    from phi3_v.processing_phi3_v import Phi3VProcessor
    from transformers import CLIPVisionConfig

    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(OUT))
    make_images(OUT)
    # num_img_tokens: a field of the official preprocessor_config.json (144 = 12 x 12 merged tokens per view)
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=NUM_CROPS, num_img_tokens=144), tokenizer)

    # -- processor, row by row, then tokenizer.pad (VLM2Vec's Phi3V_process_fn) ---------------------------------
    ids, pixel_values, image_sizes = [], [], []
    for text, image_file in PROMPTS:
        image = Image.open(OUT / image_file) if image_file else None
        if image is None:
            inputs = processor(text, None, return_tensors="np", max_length=MAX_LEN, truncation=True)
            pixel_values.append(None)
            image_sizes.append(None)
        else:
            inputs = processor(text=text, images=[image], return_tensors="np", max_length=MAX_LEN, truncation=True)
            pixel_values.append(inputs["pixel_values"])
            image_sizes.append(inputs["image_sizes"])
        ids.append(inputs["input_ids"].squeeze().tolist())
    batch = processor.tokenizer.pad({"input_ids": ids}, return_tensors="pt")

    # -- the model ----------------------------------------------------------------------------------------------
    image_embedding_phi3_v.CLIP_VIT_LARGE_PATCH14_336_CONFIG = CLIPVisionConfig(**TINY_TOWER)
    head_half = H // HEADS // 2
    config = Phi3VConfig(
        vocab_size=len(tokenizer) + 4, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling={"type": "su", "short_factor": [1.0 + 0.1 * i for i in range(head_half)],
                      "long_factor": [1.0 + 2.0 * i for i in range(head_half)]},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, use_cache=False,
        embd_layer={"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                    "use_hd_transform": True, "with_learnable_separator": True},
        img_processor={"image_dim_out": V_WIDTH, "model_name": "openai/clip-vit-large-patch14-336",
                       "name": "clip_vision_model", "num_img_tokens": 144},
    )
    config._attn_implementation = "eager"  # VLM2Vec's MMEBModel.build for Phi-3.5-V
    torch.manual_seed(0)
    model = Phi3VForCausalLM(config).eval()
    randomise(model)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].clone(), attention_mask=batch["attention_mask"],
                    pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    last = batch["attention_mask"].sum(1) - 1  # right padding (VLM2Vec's _pooling)
    pooled = hidden[torch.arange(hidden.shape[0]), last]

    # -- record -------------------------------------------------------------------------------------------------
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.vision_embed_tokens.wte.weight"}
    save_file(state, str(OUT / "model.safetensors"), metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict.update(architectures=["Phi3VForCausalLM"], model_type="phi3_v", _attn_implementation="eager")
    (OUT / "config.json").write_text(json.dumps(config_dict, indent=1, sort_keys=True, default=str))
    tensors = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
               "pooled": pooled.contiguous(), "embedding": torch.nn.functional.normalize(pooled, dim=-1)}
    gen = np.random.default_rng(0)
    image_rows = [i for i, p in enumerate(pixel_values) if p is not None]
    for k, i in enumerate(image_rows):
        pv = torch.from_numpy(pixel_values[i][0]).double()  # [num_crops + 1, 3, 336, 336]
        tensors[f"image{k}.image_sizes"] = torch.from_numpy(np.asarray(image_sizes[i][0])).long()
        tensors[f"image{k}.row_sums"] = pv.sum(-1).contiguous()  # [V, 3, 336]
        tensors[f"image{k}.col_sums"] = pv.sum(-2).contiguous()
        index = torch.from_numpy(gen.choice(pv.numel(), SAMPLES, replace=False)).long()
        tensors[f"image{k}.sample_index"] = index
        tensors[f"image{k}.sample_values"] = pv.flatten()[index].float()
    save_file(tensors, str(OUT / "golden.safetensors"))
    meta = {"official": f"https://github.com/TIGER-AI-Lab/VLM2Vec/tree/{COMMIT}/src/model/baseline_backbone/phi3_v",
            "commit": COMMIT, "num_crops": NUM_CROPS, "max_len": MAX_LEN,
            "prompts": [{"text": t, "image": f} for t, f in PROMPTS], "image_rows": image_rows,
            "vision_config": TINY_TOWER, "pooling": "last real token of hidden_states[-1], right padding",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": __import__("tokenizers").__version__, "numpy": np.__version__}}
    (OUT / "golden.json").write_text(json.dumps(meta, indent=1))
    print("ids", [r[:6] for r in batch["input_ids"].tolist()], "lengths", batch["attention_mask"].sum(1).tolist())
    print("image_sizes", [s.tolist() for s in image_sizes if s is not None], "pooled[:, :4]", pooled[:, :4])


if __name__ == "__main__":
    main()
