"""Real CLIP loading from a local Hugging Face folder (a tiny random CLIP saved in the official format)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from unimm.data.collate import RetrievalCollator
from unimm.data.records import Item, Record
from unimm.losses import InfoNCE
from unimm.methods.uniir import UniIRModule
from unimm.models.clip import clip_from_pretrained, tiny_clip
from unimm.models.processors import pretrained_processor, word_level_processor


@pytest.fixture()
def saved_clip(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nred\nblue\ndigit\nseven\n")
    model = tiny_clip(str(vocab), seed=3)
    processor = word_level_processor(str(vocab), image_size=32)
    folder = tmp_path / "clip"
    model.save_pretrained(folder)  # config.json + model.safetensors, as on the hub
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    return folder, model, processor


def _embed(model, processor):
    records = [
        Record("q0", {"query": Item(text="a red digit seven")}),
        Record("q1", {"query": Item(image=Image.new("RGB", (40, 40), (200, 10, 10)))}),
        Record("q2", {"query": Item(text="a blue digit", image=Image.new("RGB", (32, 32), (0, 0, 250)))}),
    ]
    batch = RetrievalCollator(processor, sides=("query",), use_instruction=False)(records)
    module = UniIRModule(model, InfoNCE(temperature=None), optimizer=None).eval()
    with torch.no_grad():
        return module.encode_query(batch["query"])


def test_local_folder_loads_with_identical_embeddings(saved_clip):
    folder, model, processor = saved_clip
    loaded = clip_from_pretrained(str(folder))
    loaded_processor = pretrained_processor(str(folder), max_length=32)
    expected, got = _embed(model, processor), _embed(loaded, loaded_processor)
    assert got.shape == (3, 64)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        clip_from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="processor folder not found"):
        pretrained_processor(str(tmp_path / "nope"))


def test_score_fusion_sums_raw_features_then_normalises(saved_clip):
    """UniIR: embedding of image+text = normalise(text_feature + image_feature), raw projected features."""
    _, model, processor = saved_clip
    image = Image.new("RGB", (32, 32), (0, 0, 250))
    with torch.no_grad():
        text = processor.text(["a blue digit."])
        t = model.get_text_features(**text).pooler_output[0]
        v = model.get_image_features(pixel_values=processor.images([image])).pooler_output[0]
    records = [Record("x", {"query": Item(text="a blue digit.", image=image)})]
    batch = RetrievalCollator(processor, sides=("query",), use_instruction=False)(records)
    module = UniIRModule(model, InfoNCE(temperature=None), optimizer=None).eval()
    with torch.no_grad():
        fused = module.encode_query(batch["query"])[0]
    assert torch.allclose(fused, (t + v) / (t + v).norm(), atol=1e-6)
