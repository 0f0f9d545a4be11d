"""The one record format of unimm (see ARCHITECTURE.md section 3).

A record is a webdataset sample: a dict of ``<field>.<ext>`` byte strings sharing one ``__key__``.
Each *side* of a record (``query``, ``pos``, ``neg.0``, ``cand`` ...) is an :class:`Item` with optional
text and optional image. ``instruction.txt`` and ``meta.json`` hang off the record itself.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from unimm.data.image_decode import ResizeTarget, decode_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class CorruptSample(Exception):
    """A sample that cannot be decoded. ``reason`` is a short category used in skip accounting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Item:
    """One side of a record: text, image or both. ``image`` is a PIL image once decoded."""

    text: str | None = None
    image: Image.Image | None = None

    @property
    def modality(self) -> str:
        """M-BEIR modality string: ``text``, ``image`` or ``image,text``."""
        if self.text is not None and self.image is not None:
            return "image,text"
        if self.image is not None:
            return "image"
        if self.text is not None:
            return "text"
        raise CorruptSample("empty_item", "neither text nor image")


@dataclass
class Record:
    """A decoded sample. ``sides`` maps side name (``query``, ``pos``, ``cand``, ``neg.0`` ...) to an Item."""

    key: str
    sides: dict[str, Item]
    meta: dict[str, Any] = field(default_factory=dict)
    instruction: str | None = None
    shard: str = ""


def record_fields(records: list[Record]) -> dict[str, list]:
    """The per-record fields every collated batch carries: ``keys``, ``meta`` and ``shards`` (for error reports
    and the evaluators' row bookkeeping), in batch order."""
    return {"keys": [r.key for r in records], "meta": [r.meta for r in records], "shards": [r.shard for r in records]}


def encode_image(image: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if fmt in ("jpg", "jpeg") else fmt.upper())
    return buf.getvalue()


def make_sample(
    key: str,
    meta: dict[str, Any] | None = None,
    instruction: str | None = None,
    image_format: str = "png",
    **sides: Item | tuple[str | None, Image.Image | bytes | None],
) -> dict[str, Any]:
    """Build the webdataset dict of one record.

    Side names with a dot are written with keyword-safe underscores: ``neg_0=Item(...)`` becomes ``neg.0``.
    Images may be PIL images (encoded with ``image_format``) or already-encoded bytes (kept as they are,
    with ``image_format`` as their extension).
    """
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain '.' (webdataset splits fields on the first dot)")
    sample: dict[str, Any] = {"__key__": key}
    for name, item in sides.items():
        name = name.replace("_", ".")
        text, image = (item.text, item.image) if isinstance(item, Item) else item
        if text is not None:
            sample[f"{name}.txt"] = text.encode("utf-8")
        if image is not None:
            sample[f"{name}.{image_format}"] = image if isinstance(image, bytes) else encode_image(image, image_format)
    if instruction is not None:
        sample["instruction.txt"] = instruction.encode("utf-8")
    sample["meta.json"] = json.dumps(meta or {}, sort_keys=True).encode("utf-8")
    return sample


@dataclass(frozen=True)
class DecodeHint:
    """What a collator uses of a record's images, so that a data worker decodes no more (``Collator.decode_hint``).

    Args:
        sides: the sides whose images are decoded (``"pos"`` covers ``pos.1``, ``pos.2`` ...; ``"neg"`` covers
            ``neg.0`` ...); the images of other sides are not decoded (their texts are, which is cheap), so a
            broken image in a side nobody uses is not counted as a bad sample. None = every side.
        resize: the processor's first resize, when reduced-size JPEG decoding is on: a JPEG larger than it on
            both axes is decoded at ``m/8`` scale and resized to it (:mod:`unimm.data.image_decode`). Faster, not
            exact: see README "Data at scale" for the measured pixel difference. None = full-size decode (exact).
    """

    sides: tuple[str, ...] | None = None
    resize: ResizeTarget | None = None

    def decodes(self, side: str) -> bool:
        return self.sides is None or any(side == s or side.startswith(s + ".") for s in self.sides)


def decode_sample(raw: dict[str, Any], shard: str = "", hint: DecodeHint | None = None) -> Record:
    """Decode a raw webdataset sample (bytes per field) into a :class:`Record`.

    ``hint``: decode only the images the collator uses, optionally at reduced size (:class:`DecodeHint`);
    None decodes every image at full size. A side whose image is not decoded is still in ``sides`` (with its
    text, if any).

    Raises:
        CorruptSample: ``bad_image`` (undecodable image bytes), ``bad_json`` (malformed meta.json),
            ``bad_text`` (not UTF-8) or ``empty_sample``.
    """
    key = raw.get("__key__", "?")
    sides: dict[str, Item] = {}
    meta: dict[str, Any] = {}
    instruction = None
    resize = hint.resize if hint is not None else None
    for name, value in raw.items():
        if name.startswith("__"):
            continue
        side, _, ext = name.rpartition(".")
        ext = ext.lower()
        if name == "meta.json":
            try:
                meta = json.loads(value)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CorruptSample("bad_json", f"{key}.meta.json in {shard}: {err}") from err
            continue
        if ext == "txt":
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorruptSample("bad_text", f"{key}.{name} in {shard}") from err
            if side == "instruction":
                instruction = text
            else:
                sides.setdefault(side, Item()).text = text
        elif ext in IMAGE_EXTS:
            item = sides.setdefault(side, Item())
            if hint is not None and not hint.decodes(side):
                continue
            try:
                item.image = decode_image(value, ext, resize)
            except Exception as err:  # PIL raises many types for broken files
                raise CorruptSample("bad_image", f"{key}.{name} in {shard}: {err}") from err
    if not sides:
        raise CorruptSample("empty_sample", f"{key} in {shard} has no text or image field")
    return Record(key=key, sides=sides, meta=meta, instruction=instruction, shard=shard)
