"""Phi-3.5-V from native parts: HD-crop geometry (hand-computed), loading a tiny checkpoint that this test writes in
the official key layout and matching a plain reference forward, batch/padding invariance, and VLM2Vec training
through the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3Model

from tests.conftest import run_cli, single_run_dir
from unimm.checkpoints.phi35v import map_official_state, phi35v_from_pretrained, phi35v_processor
from unimm.models.processors import word_level_tokenizer
from unimm.models.vlm.phi35v import IMAGE_TOKEN, phi35v_tiny_processor, tiny_phi35v
from unimm.models.vlm.phi35v_crop import Phi35VImageProcessor
from unimm.models.vlm.pooling import last_token_pool

WORDS = "a red green blue digit seven small large"
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(WORDS.split()))
    return str(path)


def normalised(rgb) -> torch.Tensor:
    return torch.tensor((np.array(rgb) / 255.0 - MEAN) / STD, dtype=torch.float32)


# -- HD crop geometry -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, num_crops, hw, tokens", [
    # square, budget 4: scale 2 -> 672 x 672, 2 x 2 tiles: (4 + 1) * 144 + 1 + (2 + 1) * 12 (the official "757")
    ((336, 336), 4, (672, 672), 757),
    # 2:1 landscape: scale 2 (scale 3 would need 3 * 2 = 6 tiles) -> 672 x 336, 1 x 2 tiles: 3 * 144 + 1 + 2 * 12
    ((1000, 500), 4, (336, 672), 457),
    # the same in portrait: transposed, 2 x 1 tiles: 3 * 144 + 1 + 3 * 12
    ((500, 1000), 4, (672, 336), 469),
    # ratio 3.36: scale 3 -> 1008 x 300, height padded to 336: 1 x 3 tiles: 4 * 144 + 1 + 2 * 12
    ((336, 100), 4, (336, 1008), 601),
    # 4:3 with budget 16: scale 4 (5 would need 5 * 4 = 20) -> 1344 x 1008: 3 x 4 tiles: 13 * 144 + 1 + 4 * 12
    ((400, 300), 16, (1008, 1344), 1921),
])
def test_hd_crop_geometry(size, num_crops, hw, tokens):
    proc = Phi35VImageProcessor(num_crops=num_crops, crop_size=336, patch_size=14)
    out = proc([Image.new("RGB", size, (10, 20, 30))])
    assert out["image_sizes"].tolist() == [list(hw)]
    assert out["pixel_values"].shape == (1, num_crops + 1, 3, 336, 336)
    assert proc.tokens(out["image_sizes"]) == [tokens]
    n_tiles = (hw[0] // 336) * (hw[1] // 336)
    assert out["pixel_values"][0, 1 + n_tiles:].abs().sum() == 0  # unused views are zeros


def test_tiles_row_major_and_white_padding():
    proc = Phi35VImageProcessor(num_crops=4, crop_size=56, patch_size=14)
    # 112 x 56, left half red, right half blue: scale 2, no resize, 1 x 2 tiles: red then blue
    two = Image.new("RGB", (112, 56), (255, 0, 0))
    two.paste((0, 0, 255), (56, 0, 112, 56))
    # 56 x 20 green: ratio 2.8, scale 2 -> 112 x 40, padded to 56 with 8 white rows on top and 8 below
    thin = Image.new("RGB", (56, 20), (0, 255, 0))
    out = proc([two, thin])
    pv = out["pixel_values"]
    assert out["image_sizes"].tolist() == [[56, 112], [56, 112]]
    torch.testing.assert_close(pv[0, 1], normalised((255, 0, 0)).view(3, 1, 1).expand(3, 56, 56))
    torch.testing.assert_close(pv[0, 2], normalised((0, 0, 255)).view(3, 1, 1).expand(3, 56, 56))
    # the global view is the whole image squeezed to 56 x 56: red on the left, blue on the right
    torch.testing.assert_close(pv[0, 0, :, :, :20], normalised((255, 0, 0)).view(3, 1, 1).expand(3, 56, 20))
    torch.testing.assert_close(pv[0, 0, :, :, -20:], normalised((0, 0, 255)).view(3, 1, 1).expand(3, 56, 20))
    white, green = normalised((255, 255, 255)).view(3, 1, 1), normalised((0, 255, 0)).view(3, 1, 1)
    for tile in (pv[1, 1], pv[1, 2]):
        torch.testing.assert_close(tile[:, :8], white.expand(3, 8, 56))
        torch.testing.assert_close(tile[:, 8:48], green.expand(3, 40, 56))
        torch.testing.assert_close(tile[:, 48:], white.expand(3, 8, 56))
    # g = 56 / 14 / 2 = 2: (2 + 1) * 4 + 1 + (1 + 1) * 2
    assert proc.tokens(out["image_sizes"]) == [17, 17]


# -- a tiny checkpoint in the official layout -----------------------------------------------------------------
V_WIDTH, V_LAYERS, CROP, PATCH = 32, 2, 56, 14
H, LAYERS, HEADS = 64, 2, 4
TINY_TOWER = dict(hidden_size=V_WIDTH, intermediate_size=2 * V_WIDTH, num_hidden_layers=V_LAYERS,
                  num_attention_heads=4, image_size=CROP, patch_size=PATCH, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5)


def official_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of microsoft/Phi-3.5-vision-instruct's safetensors, by its official name, at tiny sizes."""
    v = "model.vision_embed_tokens.img_processor.vision_model."
    n_patches = (CROP // PATCH) ** 2
    shapes = {f"{v}embeddings.class_embedding": (V_WIDTH,),
              f"{v}embeddings.patch_embedding.weight": (V_WIDTH, 3, PATCH, PATCH),
              f"{v}embeddings.position_embedding.weight": (n_patches + 1, V_WIDTH),
              f"{v}pre_layrnorm.weight": (V_WIDTH,), f"{v}pre_layrnorm.bias": (V_WIDTH,),
              f"{v}post_layernorm.weight": (V_WIDTH,), f"{v}post_layernorm.bias": (V_WIDTH,)}
    for i in range(V_LAYERS):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (V_WIDTH, V_WIDTH)
            shapes[f"{p}self_attn.{proj}.bias"] = (V_WIDTH,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (V_WIDTH,)
        shapes[f"{p}mlp.fc1.weight"], shapes[f"{p}mlp.fc1.bias"] = (2 * V_WIDTH, V_WIDTH), (2 * V_WIDTH,)
        shapes[f"{p}mlp.fc2.weight"], shapes[f"{p}mlp.fc2.bias"] = (V_WIDTH, 2 * V_WIDTH), (V_WIDTH,)
    shapes.update({"model.vision_embed_tokens.glb_GN": (1, 1, 4 * V_WIDTH),
                   "model.vision_embed_tokens.sub_GN": (1, 1, 1, 4 * V_WIDTH),
                   "model.vision_embed_tokens.img_projection.0.weight": (H, 4 * V_WIDTH),
                   "model.vision_embed_tokens.img_projection.0.bias": (H,),
                   "model.vision_embed_tokens.img_projection.2.weight": (H, H),
                   "model.vision_embed_tokens.img_projection.2.bias": (H,),
                   "model.embed_tokens.weight": (vocab_size, H), "model.norm.weight": (H,),
                   "lm_head.weight": (vocab_size, H)})
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({f"{p}self_attn.qkv_proj.weight": (3 * H, H), f"{p}self_attn.o_proj.weight": (H, H),
                       f"{p}mlp.gate_up_proj.weight": (4 * H, H), f"{p}mlp.down_proj.weight": (H, 2 * H),
                       f"{p}input_layernorm.weight": (H,), f"{p}post_attention_layernorm.weight": (H,)})
    return shapes


def official_config(vocab_size: int) -> dict:
    """config.json as microsoft/Phi-3.5-vision-instruct writes it, at tiny sizes (LongRoPE "su" kept)."""
    return {"architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v", "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                         "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
            "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
            "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                           "use_hd_transform": True, "with_learnable_separator": True},
            "embd_pdrop": 0.0, "hidden_act": "silu", "hidden_size": H, "initializer_range": 0.02,
            "img_processor": {"image_dim_out": V_WIDTH, "model_name": "openai/clip-vit-large-patch14-336",
                              "name": "clip_vision_model", "num_img_tokens": 4},
            "intermediate_size": 2 * H, "max_position_embeddings": 4096, "num_attention_heads": HEADS,
            "num_hidden_layers": LAYERS, "num_key_value_heads": HEADS, "original_max_position_embeddings": 128,
            "resid_pdrop": 0.0, "rms_norm_eps": 1e-5,
            "rope_scaling": {"long_factor": [1.0 + 0.5 * i for i in range(8)],
                             "short_factor": [1.0 + 0.1 * i for i in range(8)], "type": "su"},
            "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False,
            "torch_dtype": "float32", "transformers_version": "4.38.1", "use_cache": True,
            "vocab_size": vocab_size, "_attn_implementation": "flash_attention_2"}


@pytest.fixture(scope="module")
def official_dir(vocab, tmp_path_factory):
    """A folder in the official layout: config.json, two safetensors shards + index, the tokenizer."""
    folder = tmp_path_factory.mktemp("phi35v")
    tok = word_level_tokenizer(vocab)
    tok.save_pretrained(str(folder))
    vocab_size = len(tok) + 1  # room for <|image_1|>, which the loader adds
    (folder / "config.json").write_text(json.dumps(official_config(vocab_size)))
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=gen) * 0.1 for k, s in official_shapes(vocab_size).items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    return folder, tensors


def reference_embedding(tensors: dict[str, torch.Tensor], config: dict, input_ids: list[int], image_id: int,
                        pixel_values: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Phi-3.5-V's embedding of one prompt with one image, written out plainly from the official tensors."""
    v = "model.vision_embed_tokens.img_processor.vision_model."
    tower = CLIPVisionModel(CLIPVisionConfig(**TINY_TOWER)).eval()
    tower.load_state_dict({k[len(v):]: t for k, t in tensors.items() if k.startswith(v)})
    hc, wc = image_size[0] // CROP, image_size[1] // CROP
    views = pixel_values[: 1 + hc * wc]
    patches = tower(views, output_hidden_states=True).hidden_states[-2][:, 1:]  # penultimate layer, no CLS
    G = CROP // PATCH

    def token(view: int, i: int, j: int) -> torch.Tensor:  # 2x2 patch block -> one 4D token
        p = patches[view].reshape(G, G, -1)
        return torch.cat([p[2 * i, 2 * j], p[2 * i, 2 * j + 1], p[2 * i + 1, 2 * j], p[2 * i + 1, 2 * j + 1]])

    g = G // 2
    sub_gn = tensors["model.vision_embed_tokens.sub_GN"].reshape(-1)
    seq = []
    for row in range(hc * g):  # the tiles as one grid, row by row, each row closed by sub_GN
        for col in range(wc * g):
            seq.append(token(1 + (row // g) * wc + col // g, row % g, col % g))
        seq.append(sub_gn)
    seq.append(tensors["model.vision_embed_tokens.glb_GN"].reshape(-1))
    for row in range(g):  # the global view
        seq += [token(0, row, col) for col in range(g)] + [sub_gn]
    proj = "model.vision_embed_tokens.img_projection."
    w0, b0, w2, b2 = (tensors[proj + k] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    image = F.gelu(torch.stack(seq) @ w0.T + b0) @ w2.T + b2  # Linear, GELU, Linear
    table = tensors["model.embed_tokens.weight"]
    rows, k = [], 0
    for t in input_ids:
        if t == image_id:
            rows.append(image[k])
            k += 1
        else:
            rows.append(table[t])
    assert k == image.shape[0]
    text = Phi3Config(vocab_size=table.shape[0], hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, pad_token_id=0, original_max_position_embeddings=128,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                       "short_factor": config["rope_scaling"]["short_factor"],
                                       "long_factor": config["rope_scaling"]["long_factor"],
                                       "original_max_position_embeddings": 128})
    lm = Phi3Model(text).eval()
    lm.load_state_dict({k[len("model."):]: t for k, t in tensors.items()
                        if k.startswith("model.") and not k.startswith("model.vision_embed_tokens.")})
    hidden = lm(inputs_embeds=torch.stack(rows)[None]).last_hidden_state[0, -1]
    return F.normalize(hidden, dim=-1)


def test_official_checkpoint_matches_plain_reference(official_dir):
    folder, tensors = official_dir
    proc = phi35v_processor(str(folder), num_crops=4, max_length=32, crop_size=CROP, patch_size=PATCH)
    model = phi35v_from_pretrained(str(folder), vision_config=TINY_TOWER).eval()
    # every official tensor but the LM head was used, every parameter of ours was filled
    assert set(map_official_state(tensors, model.model.state_dict())) == set(model.model.state_dict())
    torch.testing.assert_close(model.model.vision.sub_GN, tensors["model.vision_embed_tokens.sub_GN"])
    wide = Image.new("RGB", (112, 56), (200, 30, 30))
    wide.paste((20, 40, 220), (70, 10, 100, 50))
    tall = Image.new("RGB", (40, 100), (0, 180, 0))
    texts = [f"{proc.image_token} a red digit", "a blue digit", f"seven {proc.image_token} large small"]
    imgs = [[wide], [], [tall]]
    inputs = proc(texts, imgs)
    with torch.no_grad():
        ours = last_token_pool(model(inputs), inputs["attention_mask"])
    config = json.loads((folder / "config.json").read_text())
    for row, img_row in ((0, 0), (2, 1)):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
        with torch.no_grad():
            ref = reference_embedding(tensors, config, ids, proc.image_token_id, inputs["pixel_values"][img_row],
                                      tuple(inputs["image_sizes"][img_row].tolist()))
        torch.testing.assert_close(ours[row], ref, atol=1e-5, rtol=1e-4)
    # 112 x 56: 1 x 2 tiles -> 17 image tokens; 40 x 100 (ratio 2.5, portrait): scale 2 -> 2 x 1 tiles -> 19
    assert inputs["image_mask"].sum(1).tolist() == [17, 0, 19]


def test_single_file_checkpoint_and_key_errors(official_dir, tmp_path):
    folder, tensors = official_dir
    for file in folder.iterdir():  # config and tokenizer files
        if "safetensors" not in file.name:
            (tmp_path / file.name).write_bytes(file.read_bytes())
    alias = {**tensors, "model.vision_embed_tokens.wte.weight": tensors["model.embed_tokens.weight"].clone()}
    save_file(alias, str(tmp_path / "model.safetensors"))  # one file, with the wte alias some exporters keep
    model = phi35v_from_pretrained(str(tmp_path), vision_config=TINY_TOWER)
    torch.testing.assert_close(model.model.language_model.norm.weight, tensors["model.norm.weight"])
    ours = model.model.state_dict()
    with pytest.raises(KeyError, match=r"model\.vision_embed_tokens\.extra"):
        map_official_state({**tensors, "model.vision_embed_tokens.extra": torch.zeros(1)}, ours)
    missing = {k: t for k, t in tensors.items() if k != "model.vision_embed_tokens.sub_GN"}
    with pytest.raises(KeyError, match=r"vision\.sub_GN"):
        map_official_state(missing, ours)
    with pytest.raises(ValueError, match="wte"):
        map_official_state({**tensors, "model.vision_embed_tokens.wte.weight": torch.zeros_like(
            tensors["model.embed_tokens.weight"])}, ours)


def test_config_translation_and_unsupported_settings():
    from unimm.checkpoints.phi35v import phi35v_configs

    config = official_config(20)
    text, vision, layer = phi35v_configs(config, TINY_TOWER)
    assert text.rope_parameters["rope_type"] == "longrope"  # the legacy "su"
    assert text.rope_parameters["original_max_position_embeddings"] == 128
    assert text.rope_parameters["short_factor"] == config["rope_scaling"]["short_factor"]
    assert (text.hidden_size, text.num_hidden_layers, vision.hidden_size, layer) == (H, LAYERS, V_WIDTH, -2)
    # without an override the official tower is ViT-L/14-336, whose width must match image_dim_out
    with pytest.raises(ValueError, match="image_dim_out"):
        phi35v_configs(config)
    with pytest.raises(ValueError, match="hd_transform_order"):
        phi35v_configs({**config, "embd_layer": {**config["embd_layer"], "hd_transform_order": "glb_sub"}}, TINY_TOWER)


# -- the adapter contract -------------------------------------------------------------------------------------
def test_embedding_independent_of_batch_and_padding(vocab):
    proc, model = phi35v_tiny_processor(vocab), tiny_phi35v(vocab).eval()
    assert proc.padding_side == "right"  # VLM2Vec's default for Phi-3.5-V
    t = proc.image_token
    red, green = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (60, 30), (0, 255, 0))
    texts = [f"{t} a red digit", "a blue digit seven small large a red", f"{t} seven"]
    imgs = [[red], [], [green]]

    def embed(x, i):
        inputs = proc(x, i)
        with torch.no_grad():
            return last_token_pool(model(inputs), inputs["attention_mask"])

    reference = {}
    for side in ("left", "right"):
        proc.padding_side = side
        batch = embed(texts, imgs)
        alone = torch.cat([embed([x], [i]) for x, i in zip(texts, imgs)])
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
        reference[side] = batch
    torch.testing.assert_close(reference["left"], reference["right"], atol=1e-5, rtol=1e-5)
    assert (reference["left"][0] - reference["left"][2]).abs().max() > 1e-3


def test_dora_and_unimoco_completion_wrap_the_backbone(vocab):
    """VLM2Vec's DoRA targets reach the Phi-3 and CLIP projections; UniMoCo's completion reads the tower and the
    4D-wide projector; gradients flow to both (an image row and a text-only row with pseudo-visual slots)."""
    from functools import partial

    from unimm.models.vlm.lora import LoraSpec, apply_lora
    from unimm.models.vlm.unimoco import build_completion, tiny_text_model

    proc, backbone = phi35v_tiny_processor(vocab), tiny_phi35v(vocab)
    completion = build_completion(backbone, partial(tiny_text_model), num_tokens=4, projector_input_size=4 * 32)
    backbone = apply_lora(backbone, LoraSpec(rank=4))
    names = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert any("qkv_proj.lora_A" in n for n in names) and any("img_processor" in n and "q_proj.lora_A" in n
                                                                for n in names)
    inputs = proc([f"{proc.image_token} a red", "blue digit"], [[Image.new("RGB", (40, 40), (9, 9, 9))], []],
                  completion_tokens=[0, 4])
    hidden = backbone(inputs, inputs_embeds=completion.fill(backbone, inputs))
    last_token_pool(hidden, inputs["attention_mask"]).sum().backward()
    grads = {n: p.grad for n, p in backbone.named_parameters() if "lora_A" in n}
    assert all(g is not None for n, g in grads.items() if "language_model" in n or "encoder.layers.0." in n)
    # the tower's last block feeds nothing: Phi-3.5-V reads the penultimate layer
    assert all(g is None for n, g in grads.items() if "encoder.layers.1." in n)
    assert completion.proj.weight.grad.abs().sum() > 0


def test_image_prompts_tokenised_piece_wise_as_the_official_processor(vocab):
    """The official Phi3VProcessor splits a prompt on its <|image_N|> tags and tokenises each piece on its own, so
    every piece keeps the tokenizer's specials (here BOS 2 ... EOS 3; Phi-3.5-V's tokenizer adds BOS only), and it
    does not truncate prompts with images; text-only prompts are one call, cut to max_length."""
    proc = phi35v_tiny_processor(vocab, num_crops=1, max_length=4)
    w = {word: i + 4 for i, word in enumerate(WORDS.split())}  # after PAD 0, UNK 1, BOS 2, EOS 3
    img = proc.image_token_id
    square = Image.new("RGB", (40, 40), (9, 9, 9))  # 1 x 1 tile: 2 * 4 + 1 + 2 * 2 = 13 tokens
    out = proc([f"{proc.image_token} a red digit seven small", f"seven {proc.image_token} large",
                "a red green blue digit"], [[square], [square], []])
    rows = [r[m.bool()].tolist() for r, m in zip(out["input_ids"], out["attention_mask"])]
    assert rows[0] == [2, 3] + [img] * 13 + [2, w["a"], w["red"], w["digit"], w["seven"], w["small"], 3]
    assert rows[1] == [2, w["seven"], 3] + [img] * 13 + [2, w["large"], 3]
    assert rows[2] == [2, w["a"], w["red"], 3]  # text only: one call, cut to max_length (4), specials kept
    assert out["image_mask"].sum(1).tolist() == [13, 13, 0]
    assert out["attention_mask"].sum(1).tolist() == [22, 19, 4]
    assert out["attention_mask"][:, 0].all()  # right padding (VLM2Vec)
    with pytest.raises(ValueError, match=r"<\|image_1\|>"):
        proc([f"{IMAGE_TOKEN.replace('1', '2')} red"], [[square]])  # tags must number the row's images in order


def test_token_count_mismatch_is_reported(vocab):
    model = tiny_phi35v(vocab)
    proc = phi35v_tiny_processor(vocab, num_crops=1)
    inputs = proc([f"{proc.image_token} red"], [[Image.new("RGB", (112, 56))]])
    inputs["image_mask"][0, -1] = 1  # one token too many
    with pytest.raises(ValueError, match="image tokens in the input"):
        model(inputs)


# -- training through the CLI ---------------------------------------------------------------------------------
def test_vlm2vec_phi35v_tiny_trains(toy_data_dir, tmp_path):
    """80 GradCache steps of 32 pairs (2x2 tiles + global view per image): the loss falls and ends below chance."""
    log_dir = tmp_path / "logs"
    run_cli("unimm.train", "+experiment=vlm2vec_phi35v_tiny", f"paths.data_dir={toy_data_dir}",
            f"paths.log_dir={log_dir}", "logger=csv", "eval=none", "data.batch_size=32", "trainer.max_steps=80",
            "trainer.log_every_n_steps=5", cwd=tmp_path)
    run_dir = single_run_dir(log_dir, "vlm2vec_phi35v_tiny")
    rows = list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first - 0.2, losses
    assert last < np.log(32) - 0.15, losses  # chance: ln(batch size)
