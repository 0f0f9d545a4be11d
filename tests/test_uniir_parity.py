"""UniIR details that change numbers (issue 14, items 2-5): the official image transforms, BLIP's ViT LayerNorm
eps, UniIR's hard-negative loss, the CLIP padding id. Expected values come from the official code recorded in
tests/golden/uniir/ (tests/golden/scripts/uniir.py) or from the official formulas worked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BlipConfig, BlipForImageTextRetrieval, CLIPImageProcessorPil, PreTrainedTokenizerFast

from unimm.models.blip import blip_from_pretrained, blip_from_retrieval_pretrained, tiny_blip
from unimm.models.official_transforms import OfficialImageTransform, center_crop_box, short_side_size
from unimm.models.processors import TextImageProcessor, pretrained_processor

ROOT = Path(__file__).resolve().parents[1]
GOLD = ROOT / "tests" / "golden" / "uniir"


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLD / "golden.safetensors"), json.loads((GOLD / "meta.json").read_text())


def _images(meta):
    return [Image.open(GOLD / "images" / f"{name}.png").convert("RGB") for name in meta["images"]]


# -- item 2: image preprocessing -------------------------------------------------------------------------------
def test_center_crop_rounds_like_torchvision():
    """640x427 at 224: resized to 335x224, offset round(55.5) = 56 (HF CLIPImageProcessor: floor = 55)."""
    assert short_side_size(640, 427, 224) == (335, 224)
    assert center_crop_box(335, 224, 224) == (56, 0, 280, 224)
    assert center_crop_box(224, 337, 224)[1] == 56  # round(56.5) = 56: half to even, as Python's round


@pytest.mark.parametrize("kind", ["openai_clip", "blip"])
def test_official_transforms_match_recorded_pixels(golden, kind):
    tensors, meta = golden
    for size in meta[f"{'clip' if kind == 'openai_clip' else 'blip'}_sizes"]:
        expected = tensors[f"pixels/{kind}/{size}"]
        got = OfficialImageTransform(kind, size)(images=_images(meta))["pixel_values"]
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5, (kind, size)


def _hf_folder(tmp_path, image_processor) -> Path:
    folder = tmp_path / "hf"
    tok = Tokenizer(models.WordLevel(vocab={"[PAD]": 0, "[UNK]": 1, "a": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def test_uniir_clip_processor_config_gives_openai_pixels(golden, tmp_path):
    """processor=uniir_clip on a HF CLIP folder reproduces clip._transform; the folder's HF processor does not."""
    tensors, meta = golden
    size = meta["clip_sizes"][1]
    folder = _hf_folder(tmp_path, CLIPImageProcessorPil(size={"shortest_edge": size},
                                                        crop_size={"height": size, "width": size}))
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf/processor/clip.yaml"),
                          OmegaConf.load(ROOT / "conf/processor/uniir_clip.yaml"), {"path": str(folder)})
    cfg.pop("defaults", None)
    expected = tensors[f"pixels/openai_clip/{size}"]
    official = instantiate(cfg).images(_images(meta))
    assert (official - expected).abs().max() <= 1e-5
    hf = pretrained_processor(str(folder), transform="hf").images(_images(meta))
    assert (hf - expected).abs().max() > 1e-2  # why the option exists


def test_uniir_blip_processor_config_resizes_to_224(tmp_path):
    from transformers import BlipImageProcessorPil
    folder = _hf_folder(tmp_path, BlipImageProcessorPil(size={"height": 384, "width": 384}))
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf/processor/clip.yaml"),
                          OmegaConf.load(ROOT / "conf/processor/uniir_blip.yaml"), {"path": str(folder)})
    cfg.pop("defaults", None)
    processor = instantiate(cfg)
    assert isinstance(processor.image_processor, OfficialImageTransform)
    assert processor.images([Image.new("RGB", (61, 47), (9, 200, 30))]).shape == (1, 3, 224, 224)


def test_transform_errors_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match="openai_clip"):
        OfficialImageTransform("resnet", 224)
    folder = _hf_folder(tmp_path, CLIPImageProcessorPil())
    with pytest.raises(ValueError, match="valid"):
        pretrained_processor(str(folder), transform="timm")


# -- item 3: BLIP ViT LayerNorm eps ------------------------------------------------------------------------------
def _vision_eps(model) -> set[float]:
    return {m.eps for m in model.vision_model.modules() if isinstance(m, torch.nn.LayerNorm)}


def test_blip_builders_force_official_vit_eps(tmp_path, vocab_file):
    text = dict(vocab_size=40, hidden_size=32, encoder_hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, is_decoder=True)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, layer_norm_eps=1e-5)  # what HF BLIP folders carry
    source = BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vision))
    source.save_pretrained(tmp_path / "itm")
    model = blip_from_retrieval_pretrained(str(tmp_path / "itm"), projection_dim=16)
    assert _vision_eps(model) == {1e-6}
    assert _vision_eps(blip_from_retrieval_pretrained(str(tmp_path / "itm"), 16, vision_layer_norm_eps=None)) == {1e-5}
    model.config.vision_config.layer_norm_eps = 1e-5  # a folder saved with HF's value
    model.save_pretrained(tmp_path / "saved")
    assert _vision_eps(blip_from_pretrained(str(tmp_path / "saved"))) == {1e-6}
    assert _vision_eps(tiny_blip(vocab_file)) == {1e-6}


@pytest.fixture()
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("a\nred\nblue\n")
    return str(path)


# -- item 4: UniIR's hard-negative loss --------------------------------------------------------------------------
def _uniir_reference(q, p, n, scale, k):
    """The official code worked row by row: [pos, own negatives, k "in-batch negatives"], which UniIR's
    ``p_embeds.unsqueeze(1).expand(-1, bs, -1)[~eye]`` makes copies of the row's own positive."""
    rows = []
    for i in range(q.shape[0]):
        extra = [p[i]] * min(k, q.shape[0] - 1)
        cands = torch.stack([p[i], *n[i], *extra])
        rows.append(-F.log_softmax(scale * cands @ q[i], dim=0)[0])
    return torch.stack(rows).mean()


@pytest.mark.parametrize("k", [0, 2, 10])
def test_uniir_hard_negative_form_is_the_uniir_experiments_default(k):
    g = torch.Generator().manual_seed(0)
    q, p = F.normalize(torch.randn(4, 8, generator=g), dim=-1), F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    n = F.normalize(torch.randn(4, 3, 8, generator=g), dim=-1)
    cfg = OmegaConf.load(ROOT / "conf/model/uniir_clip_sf.yaml").loss
    loss = instantiate(cfg, temperature=0.05, in_batch_neg_num=k)
    out = loss(q, p, hard_negatives=n)
    expected = _uniir_reference(q, p, n, 20.0, k)
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert out.logits.shape == (4, 1 + 3 + min(3, k))
    full = instantiate(cfg, temperature=0.05, hard_negative_form="full_batch")(q, p, hard_negatives=n)
    assert full.logits.shape == (4, 4 + 3)
    assert not torch.allclose(full.loss, expected, atol=1e-3)
    plain = loss(q, p)  # without hard negatives both forms are the in-batch loss
    assert torch.allclose(plain.loss, F.cross_entropy(20.0 * q @ p.T, torch.arange(4)), atol=1e-6)


def test_hard_negative_form_error_names_choices():
    from unimm.losses import InfoNCE
    with pytest.raises(ValueError, match="full_batch"):
        InfoNCE(hard_negative_form="gathered")


# -- item 5: CLIP padding id -------------------------------------------------------------------------------------
def test_uniir_clip_processor_pads_with_zero_like_clip_tokenize(golden):
    """HF CLIP tokenizers pad with <|endoftext|>; UniIR's clip.tokenize (recorded) pads with 0."""
    tensors, _ = golden
    official = tensors["clip_ids"]
    eot = int(official.max())
    assert eot == 49407
    lengths = (official == eot).int().argmax(dim=1) + 1
    assert all((row[n:] == 0).all() for row, n in zip(official, lengths))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "cat": 3}  # pad = eos, as HF CLIP
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    pad_id = OmegaConf.load(ROOT / "conf/processor/uniir_clip.yaml").pad_token_id
    ids = TextImageProcessor(hf, None, 8, "max_length", pad_token_id=pad_id).text(["a cat", "cat"])
    assert ids["input_ids"].tolist() == [[0, 2, 3, 1, 0, 0, 0, 0], [0, 3, 1, 0, 0, 0, 0, 0]]
    assert ids["attention_mask"].sum(1).tolist() == [4, 3]
    plain = TextImageProcessor(hf, None, 8, "max_length").text(["cat"])["input_ids"]
    assert plain.tolist() == [[0, 3, 1, 1, 1, 1, 1, 1]]  # HF's padding, kept when pad_token_id is None


def test_blip_hard_negatives_are_refused_not_dropped(vocab_file):
    """UniIR's BLIP hard negatives go through its momentum queue; unimm does not reproduce that and says so."""
    from unimm.losses.momentum import MomentumDistillation
    from unimm.methods.uniir import UniIRModule
    from unimm.models.fusion import BLIPScoreFusion
    module = UniIRModule(tiny_blip(vocab_file), MomentumDistillation(embed_dim=64, queue_size=8), None,
                         fusion=BLIPScoreFusion())
    side = {"size": 1, "input_ids": torch.tensor([[2, 4, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
            "pixel_values": torch.zeros(1, 3, 32, 32), "text_rows": torch.tensor([0]), "image_rows": torch.tensor([0])}
    with pytest.raises(NotImplementedError, match="hard_negatives=0"):
        module._momentum_loss({"query": side, "pos": side, "neg": side, "pos_ids": torch.tensor([1])})
