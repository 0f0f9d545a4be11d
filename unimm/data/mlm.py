"""Whole-word masking for masked language modelling, and the VLMo training collator built on it.

Masking follows Hugging Face's ``DataCollatorForWholeWordMask`` (BERT): words are WordPiece runs (a token
starting with ``##`` continues the previous word); whole words are drawn in random order until
``round(probability * n_tokens)`` tokens are chosen (at least one; the count includes the special tokens, not
the padding); each chosen token becomes ``[MASK]`` with probability 0.8, a random token with 0.1, and stays
with 0.1. Labels are the original ids at chosen positions and -100 elsewhere.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from unimm.data.collate import RetrievalCollator
from unimm.data.records import Record, record_fields

IGNORE_INDEX = -100
APPEND = "append"


class WholeWordMasker:
    """Whole-word masking of padded id batches.

    Args:
        tokenizer: a Hugging Face tokenizer (for tokens, special ids and the vocabulary size).
        probability: share of tokens to predict (VLMo: 0.15).
        mask_token_id: the ``[MASK]`` id; ``None`` = the tokenizer's mask token; ``"append"`` = the id just past
            the tokenizer's vocabulary (the word-level toy tokenizer has no mask token; ``vlmo_tiny(vocab_file=...)``
            reserves that row).
        mask_ratio, random_ratio: of the chosen tokens, the share replaced by ``[MASK]`` and by a random token.
        subword_prefix: marks a token that continues the previous word.
        seed: seed of the masking RNG (``None``: seeded from torch's RNG, which Lightning seeds per worker).
    """

    def __init__(self, tokenizer, probability: float = 0.15, mask_token_id: int | str | None = None,
                 mask_ratio: float = 0.8, random_ratio: float = 0.1, subword_prefix: str = "##", seed: int | None = None):
        if mask_token_id is None:
            mask_token_id = tokenizer.mask_token_id
            if mask_token_id is None:
                raise ValueError("the tokenizer has no mask token: set mask_token_id (an id, or 'append')")
        elif mask_token_id == APPEND:
            mask_token_id = len(tokenizer)
        self.tokenizer = tokenizer
        self.probability = probability
        self.mask_token_id = int(mask_token_id)
        self.mask_ratio = mask_ratio
        self.random_ratio = random_ratio
        self.subword_prefix = subword_prefix
        self.special_ids = set(tokenizer.all_special_ids)
        self.random_vocab = len(tokenizer)
        self.rng = random.Random(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))

    def words(self, ids: Sequence[int]) -> list[list[int]]:
        """Positions of each maskable word (specials excluded) of one unpadded sequence."""
        words: list[list[int]] = []
        for pos, (tid, tok) in enumerate(zip(ids, self.tokenizer.convert_ids_to_tokens(list(ids)), strict=True)):
            if tid in self.special_ids:
                continue
            if words and tok.startswith(self.subword_prefix) and words[-1][-1] == pos - 1:
                words[-1].append(pos)
            else:
                words.append([pos])
        return words

    def chosen_positions(self, ids: Sequence[int]) -> list[int]:
        """Token positions to predict in one unpadded sequence."""
        budget = max(1, round(len(ids) * self.probability))
        words = self.words(ids)
        self.rng.shuffle(words)
        chosen: list[int] = []
        for word in words:
            if len(chosen) >= budget:
                break
            if len(chosen) + len(word) > budget:
                continue
            chosen.extend(word)
        return chosen

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, T]`` ids and mask -> (masked ids ``[N, T]``, labels ``[N, T]``)."""
        masked = input_ids.clone()
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row in range(input_ids.shape[0]):
            ids = input_ids[row][attention_mask[row].bool()].tolist()
            for pos in self.chosen_positions(ids):
                labels[row, pos] = input_ids[row, pos]
                draw = self.rng.random()
                if draw < self.mask_ratio:
                    masked[row, pos] = self.mask_token_id
                elif draw < self.mask_ratio + self.random_ratio:
                    masked[row, pos] = self.rng.randrange(self.random_vocab)
        return masked, labels


def pad_to(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[N, T]`` ids and mask to ``[N, length]`` (a fixed length lets ranks gather texts)."""
    if ids.shape[1] > length:
        raise ValueError(f"texts of {ids.shape[1]} tokens exceed text_length={length}; lower the processor max_length")
    extra = length - ids.shape[1]
    return (torch.nn.functional.pad(ids, (0, extra), value=pad_id), torch.nn.functional.pad(mask, (0, extra), value=0))


class VLMoCollator(RetrievalCollator):
    """Training batches for VLMo; evaluation batches exactly as :class:`RetrievalCollator`.

    Training (``pair_sides`` all among the requested ``sides``), ``mode``:

    - ``pairs``: one image-text pair per record, whichever of the two sides holds the text alone and which the
      image alone (toy ``t2i`` and ``i2t`` records; arrow caption records). Records that are not such a pair
      (e.g. toy ``it2i``: image+text -> image) are left out and counted in ``batch["unpaired"]``. The batch
      holds ``pairs`` = {input_ids, attention_mask, mlm_input_ids, mlm_labels ``[B, text_length]``,
      pixel_values ``[B, 3, H, W]``}; ``keys``/``meta``/``shards`` of the kept records.
    - ``text``: the text of the first pair side (text corpus, stage 2): ``text`` = {input_ids, attention_mask,
      mlm_input_ids, mlm_labels}; records without text are counted in ``batch["unpaired"]``.

    Under DDP use data where every record is a pair, so that every rank keeps the same batch size.

    Args:
        processor, sides, use_instruction: see :class:`RetrievalCollator` (VLMo uses no instruction).
        pair_sides: the two record sides that make a training pair.
        mode: ``pairs`` or ``text``.
        text_length: texts are padded to this length (the model's ``max_text_len``).
        mlm_probability: whole-word masking share (0 = no MLM inputs).
        mask_token_id: see :class:`WholeWordMasker`.
    """

    MODES = ("pairs", "text")

    def __init__(self, processor, sides: Sequence[str] = ("query", "pos"), use_instruction: bool = False,
                 pair_sides: Sequence[str] = ("query", "pos"), mode: str = "pairs", text_length: int = 40,
                 mlm_probability: float = 0.15, mask_token_id: int | str | None = None):
        super().__init__(processor, sides, use_instruction)
        if mode not in self.MODES:
            raise ValueError(f"mode={mode!r}; valid: {self.MODES}")
        self.pair_sides = tuple(pair_sides)
        self.mode = mode
        self.text_length = text_length
        self.masker = WholeWordMasker(processor.tokenizer, mlm_probability, mask_token_id) if mlm_probability else None

    def _texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.processor.text(texts)
        ids, mask = pad_to(enc["input_ids"], enc["attention_mask"], self.text_length, self.processor.tokenizer.pad_token_id)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.masker is not None:
            out["mlm_input_ids"], out["mlm_labels"] = self.masker(ids, mask)
        return out

    def _pair(self, record: Record) -> tuple[str, Any] | None:
        a, b = (record.sides.get(s) for s in self.pair_sides)
        if a is None or b is None:
            return None
        if a.text is not None and a.image is None and b.image is not None and b.text is None:
            return a.text, b.image
        if b.text is not None and b.image is None and a.image is not None and a.text is None:
            return b.text, a.image
        return None

    def __call__(self, records: list[Record]) -> dict[str, Any]:
        if not set(self.pair_sides) <= set(self.sides):
            return super().__call__(records)
        if self.mode == "text":
            kept = [(r, r.sides[self.pair_sides[0]].text) for r in records
                    if self.pair_sides[0] in r.sides and r.sides[self.pair_sides[0]].text is not None]
        else:
            kept = [(r, p) for r in records if (p := self._pair(r)) is not None]
        batch: dict[str, Any] = {**record_fields([r for r, _ in kept]), "unpaired": len(records) - len(kept)}
        if not kept:
            return batch
        if self.mode == "text":
            batch["text"] = self._texts([t for _, t in kept])
        else:
            batch["pairs"] = {**self._texts([t for _, (t, _) in kept]),
                              "pixel_values": self.processor.images([img for _, (_, img) in kept])}
        return batch
