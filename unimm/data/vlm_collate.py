"""Collator of the VLM embedders (VLM2Vec, UniMoCo, E5-V): records -> prompts -> backbone inputs, in chunks.

Prompts: MMEB texts already carry their instruction and the Phi-3.5-V image token ``<|image_1|>``; other sources
(toy, M-BEIR) get a template per modality (``{text}`` is the item's text, with the record's instruction before it
on the query side). ``<|image_1|>`` is then swapped for the backbone's own image token (the adapter's
``image_token``). E5-V's one-word summary prompts are just other templates.

Each side is cut into chunks of ``chunk_size`` rows, each processed (and padded) on its own, as VLM2Vec's
"late process": GradCache encodes chunk by chunk, and the plain step concatenates the chunk embeddings (equal to
one big batch, since an embedding does not depend on the padding around it). Per side::

    {"size": B, "chunks": [adapter inputs of rows 0..c-1, rows c..2c-1, ...]}

With ``completion_tokens = K > 0`` (UniMoCo) every row without an image gets K pseudo-visual slots
(``completion_mask``), in training and in evaluation. Training batches (more than one side) also give the
``query`` and ``pos`` sides ``"drop_image"``: their rows that have both text and image, again without the image
and with slots, and ``"drop_rows"`` ``[n]`` their positions (the alignment pairs). Evaluation encodes one side
at a time and needs no pairs.

Hard negatives (E5-V's NLI ``hard_neg``) are the sides ``neg.0``...: list them in the DataModule's
``train_sides`` and they are collated like any other side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from unimm.data.records import Item, Record, record_fields

MMEB_IMAGE_TOKEN = "<|image_1|>"
DEFAULT_TEMPLATES = {
    "text": "{text}",
    "image": MMEB_IMAGE_TOKEN + " represent the given image",
    "image,text": MMEB_IMAGE_TOKEN + " {text}",
}


ALIGN_SIDES = ("query", "pos")  # the sides whose image-dropped copies UniMoCo aligns


class VLMCollator:
    """Builds VLM inputs per side.

    Args:
        processor: a backbone adapter (:class:`~unimm.models.vlm.adapters.VLMAdapter`).
        sides: record sides to encode.
        templates: prompt per modality (``text``, ``image``, ``image,text``); ``{text}`` is replaced by the text.
            A text that already holds ``<|image_1|>`` (MMEB) is used as it is.
        chunk_size: rows per chunk (GradCache chunk); None = one chunk per side.
        use_instruction: put the record's instruction before the query text.
        completion_tokens: UniMoCo pseudo-visual slots for rows without an image (0 = off).
    """

    def __init__(self, processor, sides: Sequence[str] = ("query", "pos"), templates: Mapping[str, str] | None = None,
                 chunk_size: int | None = None, use_instruction: bool = True, completion_tokens: int = 0):
        self.processor = processor
        self.sides = tuple(sides)
        self.templates = {**DEFAULT_TEMPLATES, **(templates or {})}
        self.chunk_size = chunk_size
        self.use_instruction = use_instruction
        self.completion_tokens = completion_tokens

    def prompt(self, item: Item, instruction: str | None = None) -> str:
        text = " ".join(p.strip() for p in (instruction, item.text) if p and p.strip())
        if item.image is None:  # an MMEB text whose image was dropped (UniMoCo alignment pairs)
            text = " ".join(text.replace(MMEB_IMAGE_TOKEN, " ").split())
        if item.image is not None and MMEB_IMAGE_TOKEN in text:
            prompt = text
        else:
            prompt = self.templates[item.modality].replace("{text}", text)
        return prompt.replace(MMEB_IMAGE_TOKEN, self.processor.image_token)

    def encode(self, items: list[Item], instructions: list[str | None]) -> list[dict[str, torch.Tensor]]:
        size = self.chunk_size or max(len(items), 1)
        chunks = []
        for start in range(0, len(items), size):
            part = items[start:start + size]
            texts = [self.prompt(it, ins) for it, ins in zip(part, instructions[start:start + size])]
            images = [[it.image] if it.image is not None else [] for it in part]
            slots = [self.completion_tokens * (it.image is None) for it in part] if self.completion_tokens else None
            chunks.append(self.processor(texts, images, completion_tokens=slots))
        return chunks

    def __call__(self, records: list[Record]) -> dict[str, Any]:
        batch: dict[str, Any] = record_fields(records)
        for side in self.sides:
            items = [r.sides[side] for r in records]
            instructions = [r.instruction if side == "query" and self.use_instruction else None for r in records]
            out: dict[str, Any] = {"size": len(items), "chunks": self.encode(items, instructions)}
            if self.completion_tokens and side in ALIGN_SIDES and len(self.sides) > 1:
                rows = [i for i, it in enumerate(items) if it.image is not None and it.text]
                out["drop_rows"] = torch.tensor(rows, dtype=torch.long)
                out["drop_image"] = self.encode([Item(text=items[i].text) for i in rows], [instructions[i] for i in rows])
            batch[side] = out
        return batch
