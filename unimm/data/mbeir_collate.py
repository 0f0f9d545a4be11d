"""The UniIR / M-BEIR collator: instructions from the M-BEIR table, positive resampling, optional hard negatives,
candidate ids for the momentum queue, and filled slots for feature fusion.

What it adds to :class:`~unimm.data.collate.RetrievalCollator` (UniIR ``data/mbeir_dataset.py``):

- **Instruction**: with a table, the query prompt is looked up by (M-BEIR dataset id of the qid, query
  modality, modality of the chosen positive) and drawn at random for training batches, or deterministically
  from the qid for evaluation batches (see :mod:`unimm.data.instructions`). A collator that encodes a
  candidate side (``pos``) is making training batches; the evaluator asks for one side (``query`` or ``cand``)
  at a time. Without a table, or for a record whose meta carries no ``dataset_id`` (e.g. the toy set), the
  record's own ``instruction.txt`` is used.
- **Positive**: a record may carry several positives as sides ``pos``, ``pos.1``, ``pos.2`` ... (meta
  ``pos_dids`` aligned with them); one is drawn per access, as UniIR resamples from ``pos_cand_list``.
- **Hard negatives** (off by default, as in every released UniIR config): ``hard_negatives = n`` takes ``n``
  of the record's ``neg.0``, ``neg.1`` ... sides (shuffled, wrapping around when it has fewer) into side
  ``neg`` of ``B * n`` rows, query-major.
- **Candidate ids** ``pos_ids`` ``[B]`` int64 (momentum-queue positives): UniIR's ``hash_did`` for M-BEIR dids
  (``"ds:n" -> ds * 10^7 + n``), a stable 63-bit hash of any other did, the record key when there is no did.
- **fill_missing**: every row gets a text (``""`` when absent) and an image (an all-zero pixel tensor when
  absent), UniIR's padding for feature fusion.
- **format_candidates**: candidate texts are formatted like queries (stripped, capitalised, final period), as
  UniIR's ``format_string`` does for candidates.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from unimm.data.collate import RetrievalCollator, collator_decode_hint, format_query_text
from unimm.data.instructions import load_instruction_table
from unimm.data.records import DecodeHint, Item, Record, record_fields

# M-BEIR task id -> candidate modality (the inverse of the converter's TASK_IDS; 5 is unused)
TASK_CAND_MODALITY = {0: "image", 1: "text", 2: "image,text", 3: "text", 4: "image", 6: "text", 7: "image",
                      8: "image,text"}


def candidate_id(did: str) -> int:
    """UniIR's ``hash_did`` for ``"ds:n"`` M-BEIR dids; a stable non-negative 63-bit hash otherwise."""
    ds, sep, n = did.partition(":")
    if sep and ds.isdigit() and n.isdigit():
        return int(ds) * 10_000_000 + int(n)
    return int.from_bytes(hashlib.blake2b(did.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def positive_sides(record: Record) -> list[str]:
    """``["pos", "pos.1", ...]``: the record's positives in order."""
    extra = sorted((s for s in record.sides if s.startswith("pos.")), key=lambda s: int(s.split(".", 1)[1]))
    return ["pos", *extra] if "pos" in record.sides else extra


class MBEIRCollator(RetrievalCollator):
    """RetrievalCollator with M-BEIR instructions, positive resampling, hard negatives and candidate ids.

    Args:
        processor, sides, use_instruction: see :class:`~unimm.data.collate.RetrievalCollator`.
        instructions: path of an M-BEIR ``query_instructions.tsv``; None keeps each record's instruction.txt.
        hard_negatives: hard negatives per query taken from the record's ``neg.N`` sides (0 = none).
        fill_missing: give every row a text and an image (feature fusion).
        format_candidates: format candidate texts as UniIR does.
        reduced_decode: see :class:`~unimm.data.collate.RetrievalCollator` (off: exact full-size decode).
    """

    def __init__(self, processor, sides: Sequence[str] = ("query", "pos"), use_instruction: bool = True,
                 instructions: str | None = None, hard_negatives: int = 0, fill_missing: bool = False,
                 format_candidates: bool = True, reduced_decode: bool = False):
        super().__init__(processor, sides, use_instruction, reduced_decode)
        self.table = load_instruction_table(instructions)
        self.hard_negatives = hard_negatives
        self.fill_missing = fill_missing
        self.format_candidates = format_candidates
        self.training = "pos" in self.sides

    @property
    def decode_hint(self) -> DecodeHint:
        """The images of the encoded sides (every ``pos.N``: one is drawn per access) and, with hard negatives
        in training batches, the ``neg.N`` sides."""
        sides = self.sides + (("neg",) if self.hard_negatives and self.training else ())
        return collator_decode_hint(sides, self.processor, self.reduced_decode)

    # -- per record --------------------------------------------------------------------------------------------
    def _instruction(self, record: Record, cand_modality: str | None) -> str | None:
        meta = record.meta
        if self.table is None or meta.get("dataset_id") is None or cand_modality is None:
            return record.instruction
        qid = None if self.training else str(meta.get("qid", record.key))
        return self.table.choose(meta["dataset_id"], record.sides["query"].modality, cand_modality, qid=qid)

    def _eval_cand_modality(self, meta: dict[str, Any]) -> str | None:
        if meta.get("cand_modality"):
            return meta["cand_modality"]
        task_id = meta.get("task_id")
        return TASK_CAND_MODALITY.get(task_id) if task_id is not None else None

    def _pick_positive(self, record: Record) -> tuple[Item, int]:
        sides = positive_sides(record)
        i = random.randrange(len(sides)) if len(sides) > 1 else 0
        dids = record.meta.get("pos_dids")
        did = dids[i] if dids else record.meta.get("pos_did") if i == 0 else None
        return record.sides[sides[i]], candidate_id(str(did) if did is not None else record.key)

    def _pick_negatives(self, record: Record) -> list[Item]:
        negs = [s for s in record.sides if s.startswith("neg.")]
        if not negs:
            raise ValueError(f"record {record.key} has no neg.N side but hard_negatives={self.hard_negatives}")
        random.shuffle(negs)
        return [record.sides[negs[i % len(negs)]] for i in range(self.hard_negatives)]

    # -- encoding ------------------------------------------------------------------------------------------------
    def encode_side(self, items: list[Item], instructions: list[str | None] | None = None) -> dict[str, Any]:
        if instructions is None and self.format_candidates:
            items = [Item(format_query_text(None, it.text), it.image) for it in items]
        if not self.fill_missing:
            return super().encode_side(items, instructions)
        texts = [it.text for it in items]
        if instructions is not None:
            texts = [format_query_text(ins, t) for ins, t in zip(instructions, texts)]
        out: dict[str, Any] = {"size": len(items)}
        out.update(self.processor.text([t if t is not None else "" for t in texts]))
        present = [i for i, it in enumerate(items) if it.image is not None]
        if present:
            pixels = self.processor.images([items[i].image for i in present])
            full = pixels.new_zeros((len(items), *pixels.shape[1:]))
            full[present] = pixels
        else:  # the processed size comes from the processor itself: process one blank image and zero it
            full = torch.zeros_like(self.processor.images([Image.new("RGB", (8, 8))])).expand(len(items), -1, -1, -1)
        out["pixel_values"] = full.contiguous()
        out["text_rows"] = torch.arange(len(items))
        out["image_rows"] = torch.arange(len(items))
        return out

    def __call__(self, records: list[Record]) -> dict[str, Any]:
        batch: dict[str, Any] = record_fields(records)
        positives = [self._pick_positive(r) for r in records] if "pos" in self.sides else None
        for side in self.sides:
            if side == "query":
                if self.use_instruction:
                    cand_modalities = ([p.modality for p, _ in positives] if positives is not None
                                       else [self._eval_cand_modality(r.meta) for r in records])
                    instructions = [self._instruction(r, m) for r, m in zip(records, cand_modalities)]
                else:
                    instructions = None
                batch[side] = self.encode_side([r.sides["query"] for r in records], instructions)
            elif side == "pos":
                batch[side] = self.encode_side([p for p, _ in positives])
                batch["pos_ids"] = torch.tensor([i for _, i in positives], dtype=torch.long)
            else:
                batch[side] = self.encode_side([r.sides[side] for r in records])
        if self.hard_negatives and "pos" in self.sides:
            batch["neg"] = self.encode_side([n for r in records for n in self._pick_negatives(r)])
        return batch
