"""Collators: a list of :class:`~unimm.data.records.Record` -> tensors for the encoders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from unimm.data.image_decode import ResizeTarget
from unimm.data.records import DecodeHint, Item, Record, record_fields


def format_query_text(instruction: str | None, text: str | None) -> str | None:
    """UniIR's query formatting: ``"{instruction} {text}"``, stripped, first letter upper-cased, ending in a period.

    Returns None when there is neither instruction nor text.
    """
    s = " ".join(part.strip() for part in (instruction, text) if part and part.strip())
    s = " ".join(s.split())  # newlines and repeated spaces -> one space
    if not s:
        return None
    if s[-1] not in ".?!":
        s += "."
    return s[0].upper() + s[1:]


def processor_resize_target(processor) -> ResizeTarget | None:
    """A processor's first resize (:class:`~unimm.data.image_decode.ResizeTarget`), or None when it cannot tell.

    Read from the processor's ``resize_target`` when it has one (the official transforms), else from its HF
    image processor: ``size`` with only ``shortest_edge`` (CLIP) or only ``height``/``width`` (BLIP), and its
    ``resample``. Processors that tile or resize by a longest edge (VLMs), or do not resize, give None: full
    decode.
    """
    image_processor = getattr(processor, "image_processor", processor)
    target = getattr(image_processor, "resize_target", None)
    if isinstance(target, ResizeTarget):
        return target
    size = getattr(image_processor, "size", None)
    if size is None or not getattr(image_processor, "do_resize", True):
        return None
    resample = getattr(image_processor, "resample", None)
    resample = Image.Resampling.BICUBIC if resample is None else resample
    if not isinstance(resample, int):  # a torchvision InterpolationMode (HF fast processors): not PIL's filter
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        return ResizeTarget(shortest_edge=size, resample=resample)
    # a dict, or transformers' SizeDict (attributes, None when unset)
    fields = {k: size.get(k) if isinstance(size, dict) else getattr(size, k, None) for k in _SIZE_FIELDS}
    fields = {k: int(v) for k, v in fields.items() if v is not None}
    if set(fields) == {"shortest_edge"}:
        return ResizeTarget(shortest_edge=fields["shortest_edge"], resample=resample)
    if set(fields) == {"height", "width"}:
        return ResizeTarget(height=fields["height"], width=fields["width"], resample=resample)
    return None


_SIZE_FIELDS = ("shortest_edge", "height", "width", "longest_edge", "max_height", "max_width", "min_pixels",
                "max_pixels")


def collator_decode_hint(sides: Sequence[str], processor, reduced_decode: bool) -> DecodeHint:
    """Decode only ``sides``; at reduced size when ``reduced_decode`` and the processor's first resize is known."""
    return DecodeHint(tuple(sides), processor_resize_target(processor) if reduced_decode else None)


class RetrievalCollator:
    """Encodes the named sides of each record with a processor.

    For each side the batch holds a dict with ``size`` (B), the text rows ``input_ids``/``attention_mask``
    ``[n_text, L]`` with their positions ``text_rows`` ``[n_text]``, and ``pixel_values`` ``[n_img, 3, H, W]``
    with ``image_rows`` ``[n_img]``: only the present modalities are encoded. The batch also keeps ``keys``,
    ``meta`` and the ``shards`` the records came from (so a report can re-read a few of them for display).

    Args:
        processor: a :class:`~unimm.models.processors.TextImageProcessor`.
        sides: the record sides to encode, e.g. ``("query", "pos")``.
        use_instruction: prefix query texts with the record's instruction (UniIR).
        reduced_decode: decode large JPEGs at reduced size (:class:`~unimm.data.records.DecodeHint`); off by
            default: it is faster but not exact (README "Data at scale" gives the measured pixel differences).
    """

    def __init__(self, processor, sides: Sequence[str] = ("query", "pos"), use_instruction: bool = True,
                 reduced_decode: bool = False):
        self.processor = processor
        self.sides = tuple(sides)
        self.use_instruction = use_instruction
        self.reduced_decode = reduced_decode

    @property
    def decode_hint(self) -> DecodeHint:
        """What the data workers decode for this collator: the images of its sides only."""
        return collator_decode_hint(self.sides, self.processor, self.reduced_decode)

    def encode_side(self, items: list[Item], instructions: list[str | None] | None = None) -> dict[str, Any]:
        texts = [item.text for item in items]
        if instructions is not None:
            texts = [format_query_text(ins, t) for ins, t in zip(instructions, texts)]
        out: dict[str, Any] = {"size": len(items)}
        text_rows = [i for i, t in enumerate(texts) if t is not None]
        image_rows = [i for i, item in enumerate(items) if item.image is not None]
        if text_rows:
            out.update(self.processor.text([texts[i] for i in text_rows]))
        if image_rows:
            out["pixel_values"] = self.processor.images([items[i].image for i in image_rows])
        out["text_rows"] = torch.tensor(text_rows, dtype=torch.long)
        out["image_rows"] = torch.tensor(image_rows, dtype=torch.long)
        return out

    def __call__(self, records: list[Record]) -> dict[str, Any]:
        batch: dict[str, Any] = record_fields(records)
        for side in self.sides:
            items = [r.sides[side] for r in records]
            instructions = [r.instruction for r in records] if side == "query" and self.use_instruction else None
            batch[side] = self.encode_side(items, instructions)
        return batch
