"""Collator of the frozen-LLM family (FROMAGe / UNIMUR): image-caption pairs for training, [RET] sequences for
evaluation, interleaved image/text dialogue contexts.

Token layout (FROMAGe ``data.py``): a caption is ``[BOS] words [RET]``, at most ``processor.max_length`` tokens
(24 in FROMAGe); a caption that is too long loses its last words, never its ``[RET]``. An image inside a sequence
is one ``<|image|>`` placeholder (the model expands it to its ``n_vis`` prefix embeddings), placed before the
item's text as in FROMAGe's ``generate_for_images_and_texts``. Padding is on the right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from unimm.data.collate import format_query_text
from unimm.data.records import DecodeHint, Item, Record, record_fields

CONTEXT_PREFIX = "ctx."  # dialogue records: sides ctx.0, ctx.1, ... hold the earlier turns, oldest first


def context_items(record: Record) -> list[Item]:
    """The earlier dialogue turns of a record, oldest first (``ctx.0``, ``ctx.1``, ...)."""
    names = [n for n in record.sides if n.startswith(CONTEXT_PREFIX)]
    return [record.sides[n] for n in sorted(names, key=lambda n: int(n[len(CONTEXT_PREFIX):]))]


class FrozenLMCollator:
    """Builds the inputs of :class:`~unimm.methods.frozen_llm.FrozenLLMModule`.

    Called with the training sides (``pair_sides``), each record becomes one image-caption pair: the side that
    holds only an image and the side that holds only a text (either way round, so the toy t2i and i2t records
    both give pairs). Records without such a pair are not used and counted in ``batch["unpaired"]``.
    Training batch::

        {"keys", "meta", "shards", "unpaired": int,
         "image": pixel_values [B, 3, H, W],
         "caption": {"input_ids" [B, L], "attention_mask" [B, L]
                     (+ "clip_input_ids", "clip_attention_mask" [B, L_clip] with a CLIP tokenizer)}}

    Any other sides (evaluation) are encoded one by one. An image-only item goes to the image branch; anything
    else (text, image+text, and for the ``query`` side the dialogue context before it) becomes one LM sequence
    ending in ``[RET]``. Per side::

        {"size": B,
         "seq_rows" [n_seq], "input_ids" [n_seq, L], "attention_mask" [n_seq, L],
         "seq_pixel_values" [n_seq_img, 3, H, W] (the images of the sequences, in placeholder order),
         "image_rows" [n_img], "pixel_values" [n_img, 3, H, W],
         "clip_rows" [n_clip] (text-only rows) + "clip_input_ids" / "clip_attention_mask" with a CLIP tokenizer}

    Args:
        processor: a :class:`~unimm.models.frozen_lm.FrozenLMProcessor`.
        sides: the record sides to encode.
        pair_sides: the training sides that form image-caption pairs.
        use_instruction: prefix query texts with the record's instruction (FROMAGe uses none).
    """

    def __init__(self, processor, sides: Sequence[str] = ("query", "pos"), pair_sides: Sequence[str] = ("query", "pos"),
                 use_instruction: bool = False):
        self.processor = processor
        self.sides = tuple(sides)
        self.pair_sides = tuple(pair_sides)
        self.use_instruction = use_instruction
        tok = processor.tokenizer
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @property
    def decode_hint(self) -> DecodeHint:
        """The images of the encoded and paired sides and of the dialogue context (``ctx.N``); full size."""
        return DecodeHint(tuple(dict.fromkeys((*self.sides, *self.pair_sides, CONTEXT_PREFIX.rstrip(".")))))

    # -- token sequences ---------------------------------------------------------------------------------------
    def _segment(self, item: Item, words: list[int] | None) -> list[int]:
        seg = [self.processor.image_token_id] if item.image is not None else []
        if words is not None:
            seg += ([self.bos_id] if self.bos_id is not None else []) + words
        return seg

    def sequence(self, items: list[Item], texts: list[str | None]) -> list[int]:
        """Ids of one row: the context items then the last item, ``[RET]`` at the end.

        The last text keeps at most ``max_length - 2`` words (room for BOS and [RET]); whole context items are
        dropped, oldest first, until the row fits ``context_max_length``.
        """
        words = [None if t is None else ids for t, ids in zip(texts, self._word_ids(texts))]
        last = words[-1]
        if last is not None:
            last = last[: max(0, self.processor.max_length - 2)]
        segments = [self._segment(it, w) for it, w in zip(items[:-1], words[:-1])]
        final = self._segment(items[-1], last) + [self.processor.ret_token_id]
        while segments and sum(map(len, segments)) + len(final) > self.processor.context_max_length:
            segments.pop(0)
        return [tok for seg in segments for tok in seg] + final

    def _word_ids(self, texts: list[str | None]) -> list[list[int] | None]:
        present = [t for t in texts if t is not None]
        ids = iter(self.processor.word_ids(present) if present else [])
        return [None if t is None else next(ids) for t in texts]

    def pad(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    # -- batches -------------------------------------------------------------------------------------------------
    def pairs(self, records: list[Record]) -> dict[str, Any]:
        used, images, captions = [], [], []
        for r in records:
            items = [r.sides[s] for s in self.pair_sides if s in r.sides]
            image = next((it.image for it in items if it.image is not None and it.text is None), None)
            text = next((it.text for it in items if it.text is not None and it.image is None), None)
            if image is not None and text is not None:
                used.append(r)
                images.append(image)
                captions.append(text)
        batch: dict[str, Any] = {**record_fields(used), "unpaired": len(records) - len(used)}
        if not used:
            return batch
        caption = self.pad([self.sequence([Item(text=c)], [c]) for c in captions])
        if self.processor.clip_tokenizer is not None:
            caption.update(self.processor.clip_text(captions))
        batch["image"] = self.processor.images(images)
        batch["caption"] = caption
        return batch

    def encode_side(self, records: list[Record], side: str) -> dict[str, Any]:
        out: dict[str, Any] = {"size": len(records)}
        seq_rows, seqs, seq_images, image_rows, images, clip_rows, clip_texts = [], [], [], [], [], [], []
        for row, r in enumerate(records):
            item = r.sides[side]
            text = item.text
            if side == "query" and self.use_instruction:
                text = format_query_text(r.instruction, text)
            context = context_items(r) if side == "query" else []
            if not context and item.image is not None and text is None:
                image_rows.append(row)
                images.append(item.image)
                continue
            items = [*context, Item(text=text, image=item.image)]
            seq_rows.append(row)
            seqs.append(self.sequence(items, [it.text for it in items]))
            seq_images += [it.image for it in items if it.image is not None]
            if not context and item.image is None:
                clip_rows.append(row)
                clip_texts.append(text)
        out["seq_rows"] = torch.tensor(seq_rows, dtype=torch.long)
        out["image_rows"] = torch.tensor(image_rows, dtype=torch.long)
        if seqs:
            out.update(self.pad(seqs))
        if seq_images:
            out["seq_pixel_values"] = self.processor.images(seq_images)
        if images:
            out["pixel_values"] = self.processor.images(images)
        if self.processor.clip_tokenizer is not None:
            out["clip_rows"] = torch.tensor(clip_rows, dtype=torch.long)
            if clip_texts:
                out.update(self.processor.clip_text(clip_texts))
        return out

    def __call__(self, records: list[Record]) -> dict[str, Any]:
        if self.sides == self.pair_sides:
            return self.pairs(records)
        batch: dict[str, Any] = record_fields(records)
        for side in self.sides:
            batch[side] = self.encode_side(records, side)
        return batch
