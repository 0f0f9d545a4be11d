"""The collator: UniIR's query formatting and encoding only the modalities a record has."""

from __future__ import annotations

import torch
from PIL import Image

from unimm.data.collate import RetrievalCollator, format_query_text
from unimm.data.records import Item, Record
from unimm.models.processors import word_level_processor


def test_format_query_text_like_uniir():
    assert format_query_text("retrieve an image of this caption", "a red  seven\n") == "Retrieve an image of this caption a red seven."
    assert format_query_text(None, "already done.") == "Already done."
    assert format_query_text("find the caption", None) == "Find the caption."
    assert format_query_text(None, "  ") is None


def test_only_present_modalities_are_encoded(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nred\nseven\nfind\nit\n")
    collate = RetrievalCollator(word_level_processor(str(vocab), image_size=16), sides=("query", "pos"))
    img = Image.new("RGB", (20, 20))
    records = [
        Record("k0", {"query": Item(text="a red seven"), "pos": Item(image=img)}, instruction="find it"),
        Record("k1", {"query": Item(image=img), "pos": Item(text="seven")}),
    ]
    batch = collate(records)
    q, p = batch["query"], batch["pos"]
    assert q["size"] == 2 and q["text_rows"].tolist() == [0] and q["image_rows"].tolist() == [1]
    assert p["text_rows"].tolist() == [1] and p["image_rows"].tolist() == [0]
    assert q["pixel_values"].shape == (1, 3, 16, 16)
    # "[BOS] find it a red seven [UNK=.] [EOS]": the instruction is prefixed, ids 2 and 3 are BOS/EOS
    ids = q["input_ids"][0]
    assert ids[0] == 2 and ids[-1] == 3 and len(ids) == 8
    assert batch["keys"] == ["k0", "k1"]
    assert torch.equal(p["attention_mask"], torch.ones(1, 3, dtype=torch.long))
