"""Decoding only what the collator uses, and reduced-size JPEG decoding (issue 17, item 2)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from unimm.data.collate import RetrievalCollator, processor_image_size
from unimm.data.mbeir_collate import MBEIRCollator
from unimm.data.records import CorruptSample, DecodeHint, decode_sample, make_sample
from unimm.models.image_processor import clip_image_processor
from unimm.models.official_transforms import OfficialImageTransform

CLIP_STD_255 = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1) * 255  # pixel_values -> levels


def jpeg(width: int, height: int, image: np.ndarray | None = None) -> bytes:
    pixels = data.astronaut() if image is None else image
    buf = io.BytesIO()
    Image.fromarray(pixels[..., :3]).resize((width, height), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def real_images() -> list[np.ndarray]:
    """Photographs bundled with scikit-image (no download)."""
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
        a = getattr(data, name)()
        out.append(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3])
    return out


def test_only_the_sides_the_collator_uses_are_decoded():
    raw = make_sample("k1", {"qid": "1"}, image_format="jpg", query=("a query", jpeg(64, 48)),
                      pos=(None, jpeg(64, 48)), pos_1=(None, jpeg(32, 32)), neg_0=(None, b"not a jpeg"))
    with pytest.raises(CorruptSample, match="bad_image"):
        decode_sample(raw)  # every side, as before
    record = decode_sample(raw, hint=DecodeHint(("query", "pos")))
    assert record.sides["query"].text == "a query" and record.sides["query"].image.size == (64, 48)
    assert record.sides["pos"].image.size == (64, 48)
    assert record.sides["pos.1"].image.size == (32, 32)  # "pos" covers every positive: one is drawn per access
    assert "neg.0" in record.sides and record.sides["neg.0"].image is None  # not decoded, so not a bad sample
    only_query = decode_sample(raw, hint=DecodeHint(("query",)))
    assert only_query.sides["pos"].image is None and only_query.sides["query"].image is not None
    # a side name that merely starts like another is not covered
    raw = make_sample("k2", image_format="jpg", posx=(None, jpeg(8, 8)))
    assert decode_sample(raw, hint=DecodeHint(("pos",))).sides["posx"].image is None


def test_reduced_decode_scale_is_the_largest_power_of_two_keeping_the_target():
    def size(width, height, min_size, fmt="JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format=fmt)
        raw = {"__key__": "k", "cand." + ("jpg" if fmt == "JPEG" else "png"): buf.getvalue()}
        return decode_sample(raw, hint=DecodeHint(min_size=min_size)).sides["cand"].image.size

    assert size(500, 375, 224) == (500, 375)  # 375 < 2 * 224: full size (the 1/2 scale would be 188 < 224)
    assert size(640, 480, 224) == (320, 240)  # COCO size: 1/2
    assert size(1000, 750, 224) == (500, 375)  # 750 // 224 = 3 -> 1/2
    assert size(2000, 1500, 224) == (500, 375)  # 1500 // 224 = 6 -> 1/4
    assert size(4000, 3000, 224) == (500, 375)  # 1/8
    assert size(1001, 751, 224) == (501, 376)  # libjpeg rounds up
    assert size(2000, 1500, 224, "PNG") == (2000, 1500)  # only JPEGs have DCT scaling
    assert size(2000, 1500, None) == (2000, 1500)


def test_reduced_decode_pixel_difference_on_real_images_is_bounded():
    """The measured deviation of the processor's output (CLIP 224, in 0..255 levels) stays within what the README
    states; 500x375 images (no reduction possible) are exact."""
    processor = clip_image_processor(224)

    def pixels(raw, hint):
        return processor.images([decode_sample(raw, hint=hint).sides["cand"].image])[0] * CLIP_STD_255

    worst = {}
    for width, height in ((500, 375), (640, 480), (1000, 750)):
        diffs = []
        for image in real_images():
            raw = {"__key__": "k", "cand.jpg": jpeg(width, height, image)}
            diffs.append((pixels(raw, None) - pixels(raw, DecodeHint(min_size=224))).abs().flatten())
        d = torch.cat(diffs)
        worst[(width, height)] = (d.max().item(), d.mean().item())
    assert worst[(500, 375)] == (0.0, 0.0)
    # README "Data at scale" (bench_decode.py, 7 images): 640x480 max 38, mean 1.2; 1000x750 max 14, mean 0.45
    assert 0 < worst[(640, 480)][0] <= 45 and worst[(640, 480)][1] <= 1.6
    assert 0 < worst[(1000, 750)][0] <= 20 and worst[(1000, 750)][1] <= 0.7


def test_collators_hint_their_sides_and_the_processor_size():
    class Processor:  # the collator reads only .image_processor for its hint
        image_processor = clip_image_processor(224).image_processor

    plain = RetrievalCollator(Processor(), sides=("query", "pos"))
    assert plain.decode_hint == DecodeHint(("query", "pos"), None)  # exact by default
    assert RetrievalCollator(Processor(), sides=("cand",), reduced_decode=True).decode_hint == DecodeHint(("cand",), 224)
    training = MBEIRCollator(Processor(), sides=("query", "pos"), hard_negatives=2)
    assert training.decode_hint.sides == ("query", "pos", "neg")
    assert MBEIRCollator(Processor(), sides=("query",), hard_negatives=2).decode_hint.sides == ("query",)
    assert processor_image_size(OfficialImageTransform("blip", 384)) == 384
    assert processor_image_size(OfficialImageTransform("openai_clip", 336)) == 336

    class Tiling:
        image_processor = type("P", (), {"size": {"longest_edge": 1344}})()

    assert processor_image_size(Tiling()) is None  # VLM tiling: full decode
