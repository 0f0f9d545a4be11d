"""Turning raw text and PIL images into model inputs. A processor belongs to a backbone; collators use it."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessorPil, PreTrainedTokenizerFast

from unimm.models.official_transforms import TRANSFORMS, OfficialImageTransform

# Special tokens of the word-level tokenizer; the tiny CLIP text config uses these ids.
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TextImageProcessor:
    """A tokenizer plus an image processor behind one small interface.

    Args:
        tokenizer: a Hugging Face tokenizer.
        image_processor: a Hugging Face image processor.
        max_length: texts are truncated to this many tokens (CLIP: 77).
        padding: ``longest`` pads a batch to its longest text; ``max_length`` pads every text to ``max_length``
            (UniIR's CLIP ``clip.tokenize(context_length=77)`` and BLIP ``padding="max_length"`` do; it matters
            where padding tokens enter the embedding, e.g. the mean pool of CLIP_FF).
        pad_token_id: id written at the padded positions (``attention_mask == 0``); None keeps the tokenizer's.
            OpenAI's ``clip.tokenize`` (UniIR CLIP) pads with 0 where HF CLIP tokenizers pad with
            ``<|endoftext|>`` (49407); the id matters wherever padding tokens are embedded and pooled (CLIP_FF).
    """

    PADDINGS = ("longest", "max_length")

    def __init__(self, tokenizer, image_processor, max_length: int = 77, padding: str = "longest",
                 pad_token_id: int | None = None):
        if padding not in self.PADDINGS:
            raise ValueError(f"padding={padding!r}; valid: {list(self.PADDINGS)}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length
        self.padding = padding
        self.pad_token_id = pad_token_id

    def text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Returns ``input_ids`` and ``attention_mask``, both ``[N, L]`` (right padded; L = ``max_length`` with
        ``padding="max_length"``)."""
        enc = self.tokenizer(texts, padding=self.padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        input_ids, mask = enc["input_ids"], enc["attention_mask"]
        if self.pad_token_id is not None:
            input_ids = input_ids.masked_fill(mask == 0, self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": mask}

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        """Returns ``pixel_values`` ``[N, 3, H, W]``."""
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]


def pretrained_processor(path: str, max_length: int = 77, padding: str = "longest",
                         image_size: int | None = None, transform: str = "hf",
                         pad_token_id: int | None = None) -> TextImageProcessor:
    """Tokenizer and image processor saved in a local Hugging Face folder (e.g. openai/clip-vit-large-patch14).

    Args:
        path: the folder (tokenizer files, ``preprocessor_config.json``).
        max_length, padding, pad_token_id: see :class:`TextImageProcessor`.
        image_size: square input size (None = the folder's), e.g. 224 for UniIR's BLIP from a 384 px folder.
        transform: ``hf`` = the folder's Hugging Face image processor; ``openai_clip`` / ``blip`` = the official
            evaluation transform of that family (:mod:`unimm.models.official_transforms`), whose pixels differ
            from HF's (CLIP: centre-crop rounding; both: PIL bicubic resize of the original image).
    """
    if not Path(path).is_dir():
        raise FileNotFoundError(f"processor folder not found: {path} (download the checkpoint and point the config at it)")
    if transform not in ("hf", *TRANSFORMS):
        raise ValueError(f"processor transform={transform!r}; valid: {['hf', *TRANSFORMS]}")
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    if transform != "hf":
        size = image_size or _folder_image_size(image_processor, path)
        image_processor = OfficialImageTransform(transform, size, image_processor.image_mean, image_processor.image_std)
    elif image_size is not None:
        square = {"height": image_size, "width": image_size}
        if getattr(image_processor, "crop_size", None):  # resize the short side, then centre-crop (CLIP)
            image_processor.size, image_processor.crop_size = {"shortest_edge": image_size}, square
        else:  # resize straight to the square (BLIP)
            image_processor.size = square
    return TextImageProcessor(AutoTokenizer.from_pretrained(path, local_files_only=True), image_processor,
                              max_length, padding, pad_token_id)


def _folder_image_size(image_processor, path: str) -> int:
    """The square input side of a HF image processor: its crop (CLIP) or its resize target (BLIP)."""
    for attr in ("crop_size", "size"):
        spec = getattr(image_processor, attr, None) or {}
        if spec.get("height"):
            return int(spec["height"])
    raise ValueError(f"cannot tell the image size of {path}'s preprocessor_config.json: set processor.image_size")


def word_level_tokenizer(vocab_file: str) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over the words in ``vocab_file`` (one per line), for tiny models.

    Sequences are ``[BOS] words [EOS]``; the ids of the specials are fixed (PAD 0, UNK 1, BOS 2, EOS 3) so a
    tiny CLIP text config can point its ``eos_token_id`` at 3 (CLIP pools at the first EOS).
    """
    words = [w.strip() for w in Path(vocab_file).read_text().splitlines() if w.strip()]
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS])}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS, padding_side="right"
    )


def word_level_processor(vocab_file: str, image_size: int = 32, max_length: int = 32,
                         padding: str = "longest") -> TextImageProcessor:
    """Word-level tokenizer + CLIP image preprocessing at ``image_size``: the processor of tiny experiments."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return TextImageProcessor(word_level_tokenizer(vocab_file), image_processor, max_length, padding)


def vocab_size(vocab_file: str) -> int:
    """Size of the word-level vocabulary built from ``vocab_file`` (specials included)."""
    return len(word_level_tokenizer(vocab_file))
