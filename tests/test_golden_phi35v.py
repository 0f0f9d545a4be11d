"""Phi-3.5-V against outputs recorded from the official code (VLM2Vec's pinned Phi-3.5-V remote code) on a tiny
random checkpoint: processor (token ids, attention mask, HD-crop pixels, image sizes) and last-token embeddings.

The recorded files and how they were made: tests/golden/scripts/phi35v.py. unimm reads the same checkpoint folder
through its own loaders (``phi35v_processor``, ``phi35v_from_pretrained``: the official key layout and config).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from unimm.checkpoints.phi35v import phi35v_from_pretrained, phi35v_processor
from unimm.models.vlm.pooling import last_token_pool

GOLDEN = Path(__file__).parent / "golden" / "phi35v"


@pytest.fixture(scope="module")
def golden():
    meta = json.loads((GOLDEN / "golden.json").read_text())
    proc = phi35v_processor(str(GOLDEN), num_crops=meta["num_crops"], max_length=meta["max_len"])
    texts = [p["text"] for p in meta["prompts"]]
    images = [[Image.open(GOLDEN / p["image"])] if p["image"] else [] for p in meta["prompts"]]
    return meta, load_file(str(GOLDEN / "golden.safetensors")), proc, proc(texts, images)


def test_token_ids_and_mask_equal_the_official_processor(golden):
    meta, gold, proc, inputs = golden
    official = gold["input_ids"]  # -1 at the image positions, pad <|endoftext|> on the right
    assert (official[0, :2].tolist(), official[0, 1 + 757].item()) == ([1, -1], 1)  # [BOS] [img]*757 [BOS] ...
    expected = official.masked_fill(official < 0, proc.image_token_id)  # unimm: <|image_1|> + image_mask
    assert torch.equal(inputs["input_ids"], expected)
    assert torch.equal(inputs["image_mask"].bool(), official < 0)
    assert torch.equal(inputs["attention_mask"], gold["attention_mask"])


def test_pixels_equal_the_official_image_processor(golden):
    meta, gold, proc, inputs = golden
    assert inputs["pixel_values"].shape[0] == len(meta["image_rows"])
    for k in range(len(meta["image_rows"])):
        pv = inputs["pixel_values"][k].double()  # [num_crops + 1, 3, 336, 336], unused views zero
        assert inputs["image_sizes"][k].tolist() == gold[f"image{k}.image_sizes"].tolist()
        torch.testing.assert_close(pv.sum(-1), gold[f"image{k}.row_sums"], atol=1e-5, rtol=0)
        torch.testing.assert_close(pv.sum(-2), gold[f"image{k}.col_sums"], atol=1e-5, rtol=0)
        torch.testing.assert_close(pv.flatten()[gold[f"image{k}.sample_index"]].float(),
                                   gold[f"image{k}.sample_values"], atol=1e-5, rtol=0)


def test_embeddings_equal_the_official_model(golden):
    meta, gold, proc, inputs = golden
    model = phi35v_from_pretrained(str(GOLDEN), vision_config=meta["vision_config"]).eval()
    with torch.no_grad():
        pooled = last_token_pool(model(inputs), inputs["attention_mask"], normalize=False)
    torch.testing.assert_close(pooled, gold["pooled"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), gold["embedding"], atol=1e-5, rtol=0)
