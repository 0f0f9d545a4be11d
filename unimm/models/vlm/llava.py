"""LLaVA (1.5 layout) builders: the E5-V-style "LLaVA-Phi-3.5-Mini" embedder of seed 002 (trained with the code of
xtuner/llava-phi-3-mini-hf: CLIP ViT-L/14-336, penultimate layer without CLS -> 2-layer GELU MLP -> Phi-3 LM; one
image = 576 ``<image>`` tokens, no anyres tiling).

Adapter and backbone classes are :class:`~unimm.models.vlm.adapters.LlavaAdapter` and
:class:`~unimm.models.vlm.adapters.LlavaBackbone`; here are the local-folder loaders (native transformers
``LlavaForConditionalGeneration``, no remote code) and the tiny random twin for CPU tests.

xtuner exports its Phi-3 LM in the Llama layout ("the HuggingFace LLaVA format only supports Llama", its
``convert_phi_to_llama.py``), so the official folder has a ``llama`` text config and the legacy key layout
(``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*``); transformers maps those keys, and a
folder with a native ``phi3`` text config loads the same way (the folder's config picks the class).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Phi3Config,
)

from unimm.models.vlm.adapters import LlavaAdapter, LlavaBackbone, require_dir, special_token_tokenizer

# <image> plus Phi-3's chat markers, so the tiny twin tokenizes the real prompt format (<|user|>...<|end|>)
LLAVA_PHI3_SPECIALS = ("<image>", "<|user|>", "<|end|>", "<|assistant|>")


def llava_tiny_processor(vocab_file: str, image_size: int = 32, patch_size: int = 8, max_length: int = 64,
                         padding_side: str | None = None) -> LlavaAdapter:
    """Word-level toy tokenizer + ``<image>`` and Phi-3's chat markers; CLIP resize + centre crop to ``image_size``."""
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return LlavaAdapter(special_token_tokenizer(vocab_file, LLAVA_PHI3_SPECIALS), image_processor, max_length,
                        padding_side, patch_size=patch_size)


def llava_processor(path: str, max_length: int = 256, padding_side: str | None = None, patch_size: int = 14,
                    vision_feature_select_strategy: str = "default") -> LlavaAdapter:
    """Tokenizer and CLIP image processor (336 px resize + centre crop) of a local LLaVA folder."""
    require_dir(path)
    image_processor = CLIPImageProcessorPil.from_pretrained(path, local_files_only=True)
    return LlavaAdapter(AutoTokenizer.from_pretrained(path, local_files_only=True), image_processor, max_length,
                        padding_side, patch_size, vision_feature_select_strategy)


def tiny_llava(vocab_file: str, image_size: int = 32, patch_size: int = 8, hidden_size: int = 64, layers: int = 2,
               heads: int = 4, vision_width: int = 32, vision_layers: int = 2, seed: int = 0) -> LlavaBackbone:
    """A random LLaVA with a CLIP vision tower and a Phi-3 LM over the toy vocabulary + :data:`LLAVA_PHI3_SPECIALS`;
    the feature layer (-2), strategy (``default``) and projector (2-layer GELU MLP) of xtuner/llava-phi-3-mini-hf."""
    tok = special_token_tokenizer(vocab_file, LLAVA_PHI3_SPECIALS)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                                       num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                                       patch_size=patch_size),
        text_config=Phi3Config(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                               max_position_embeddings=1024, pad_token_id=0, bos_token_id=None, eos_token_id=None),
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlavaBackbone(LlavaForConditionalGeneration(config).model)


def llava_from_pretrained(path: str, dtype: str | None = None, attn_implementation: str | None = None
                          ) -> LlavaBackbone:
    """A LLaVA (1.5 layout) from a local Hugging Face folder, e.g. xtuner/llava-phi-3-mini-hf or the seed's
    LLaVA-Phi-3.5-Mini; the LM head is dropped (embeddings only). Missing or unexpected checkpoint keys are an
    error (a silently random layer would still embed)."""
    require_dir(path)
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model, info = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, output_loading_info=True,
                                                                **kwargs)
    bad = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    if bad:
        raise ValueError(f"{path}: checkpoint keys do not match LlavaForConditionalGeneration: {bad}")
    return LlavaBackbone(model.model)
