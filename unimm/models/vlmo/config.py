"""VLMo sizes (Bao et al., 2022) as one dataclass and one builder per released size."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class VLMoConfig:
    """Hyperparameters of a VLMo multiway transformer and its heads.

    Attributes:
        vocab_size: text vocabulary (bert-base-uncased: 30522).
        hidden_size, num_layers, num_heads, mlp_ratio: transformer shape; every FFN expert is
            ``hidden_size -> mlp_ratio * hidden_size -> hidden_size``.
        image_size, patch_size: square images, conv patch embedding with bias, plus a CLS token.
        max_text_len: text positions used (40 in VL pretraining, 196 in text pretraining); image-text inputs
            below ``vlffn_start_layer`` are split after the text tokens.
        max_text_len_of_initckpt: size of the text part of the relative position table (196 for every
            released checkpoint); it fixes the table layout, so it must match the checkpoint.
        vlffn_start_layer: first layer with a vision-language FFN expert; ``num_layers`` = no VL expert (text
            pretraining, stage 2).
        relative_position: BEiT-style relative position bias (base, large); ``False`` = absolute position
            embeddings for image and text (base_plus).
        layer_scale_init: initial value of the layer-scale vectors ``gamma_1``/``gamma_2``; ``None`` disables
            layer scale (base_plus).
        drop_path_rate: stochastic depth at the last layer (linear from 0); also the text embedding dropout.
        layer_norm_eps: eps of the transformer LayerNorms (1e-6); the BERT parts use 1e-12.
        pad_token_id: padding id of the tokenizer.
        num_token_types: modality embeddings (2: text 0, image 1; NLVR2 uses 3, row 2 copied from row 1).
        mlm: build the MLM head.
        vqa_num_answers: build the VQA classifier with this many answers (VQAv2: 3129); 0 = none.
        nlvr2: build the NLVR2 classifier.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    image_size: int = 224
    patch_size: int = 16
    max_text_len: int = 40
    max_text_len_of_initckpt: int = 196
    vlffn_start_layer: int = 10
    relative_position: bool = True
    layer_scale_init: float | None = 0.1
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-6
    pad_token_id: int = 0
    num_token_types: int = 2
    mlm: bool = True
    vqa_num_answers: int = 0
    nlvr2: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0 <= self.vlffn_start_layer <= self.num_layers:
            raise ValueError(f"vlffn_start_layer {self.vlffn_start_layer} not in [0, {self.num_layers}]")
        if self.nlvr2 and self.num_token_types < 3:
            raise ValueError("nlvr2=True needs num_token_types=3 (image token types 1 and 2)")
        if self.relative_position and self.max_text_len > self.max_text_len_of_initckpt:
            raise ValueError(
                f"max_text_len {self.max_text_len} exceeds the relative table's text span "
                f"max_text_len_of_initckpt={self.max_text_len_of_initckpt}"
            )

    @property
    def patch_grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Patches plus the CLS token."""
        return self.patch_grid**2 + 1


def vlmo_base(**overrides) -> VLMoConfig:
    """VLMo-Base: 12 x 768, 12 heads, VL-FFN in layers 10-11, relative position bias (175M parameters)."""
    return replace(VLMoConfig(), **overrides)


def vlmo_base_plus(**overrides) -> VLMoConfig:
    """VLMo-Base+: 24 x 544, 16 heads, VL-FFN in layers 21-23, absolute positions, no layer scale (167M)."""
    base = VLMoConfig(hidden_size=544, num_layers=24, num_heads=16, vlffn_start_layer=21, relative_position=False,
                      layer_scale_init=None)
    return replace(base, **overrides)


def vlmo_large(**overrides) -> VLMoConfig:
    """VLMo-Large: 24 x 1024, 16 heads, VL-FFN in layers 21-23, relative position bias (562M)."""
    return replace(VLMoConfig(hidden_size=1024, num_layers=24, num_heads=16, vlffn_start_layer=21), **overrides)


def vlmo_tiny(vocab_size: int | None = None, vocab_file: str | None = None, **overrides) -> VLMoConfig:
    """A CPU-sized VLMo: 3 x 64, 4 heads, VL-FFN in the last layer, 32 px images with 8 px patches.

    With ``vocab_file`` (the word-level toy vocabulary) the vocabulary gets one extra id after the
    tokenizer's, used as ``[MASK]`` by the MLM collator (the word-level tokenizer has no mask token).
    """
    if vocab_file is not None:
        from unimm.models.processors import vocab_size as word_vocab_size

        vocab_size = word_vocab_size(vocab_file) + 1
    if vocab_size is None:
        raise ValueError("vlmo_tiny needs vocab_size or vocab_file")
    base = VLMoConfig(vocab_size=vocab_size, hidden_size=64, num_layers=3, num_heads=4, image_size=32, patch_size=8,
                      max_text_len=32, max_text_len_of_initckpt=32, vlffn_start_layer=2, drop_path_rate=0.0)
    return replace(base, **overrides)
