"""The VLMo multiway (mixture-of-modality-experts) transformer and its routing.

Every block is pre-LayerNorm with one self-attention shared by all modalities and three FFN experts, each
with its own LayerNorm: ``mlp_text``/``norm2_text`` (L-FFN), ``mlp_imag``/``norm2_imag`` (V-FFN) and, from
``vlffn_start_layer`` up, ``mlp_vl``/``norm2_vl`` (VL-FFN)::

    x = x + drop_path(gamma_1 * Attn(norm1(x)))
    x = x + drop_path(gamma_2 * FFN_e(norm2_e(x)))

Routing (official ``vlmo_module.py``): text-only inputs use L-FFN in every layer, image-only inputs V-FFN;
both can be *rerun* from the input of layer ``vlffn_start_layer`` through the VL-FFN layers to get a second
CLS (the ``vl_*`` ITC of pretraining). Image-text inputs ``[text; image]`` go through L-FFN (text tokens) and
V-FFN (image tokens) below ``vlffn_start_layer`` and through VL-FFN (all tokens) from there on.

The official code pads the text to exactly ``max_text_len`` and splits the joint sequence there; here the
split is after the given text length ``T <= max_text_len``. Padding keys are masked out of attention, so the
outputs of the real tokens are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings

from unimm.models.vlmo.config import VLMoConfig
from unimm.models.vlmo.heads import VLMoHeads

EXPERTS = ("text", "image", "vl")
TEXT_TOKEN_TYPE = 0
IMAGE_TOKEN_TYPE = 1


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p``, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class FFN(nn.Module):
    """``fc2(GELU(fc1(x)))`` with ``D -> ratio*D -> D``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MultiwayAttention(nn.Module):
    """Multi-head self-attention with q and v biases only (the k bias is fixed at 0, as BEiT) and fp32 logits."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N, D]``; ``mask`` ``[B, N]`` (True = real key); ``bias`` ``[H, N, N]`` added to the logits.

        One fused ``scaled_dot_product_attention`` call with an additive fp32 mask (relative-position bias plus
        ``-inf`` on padded keys). q is scaled before the fp32 cast as in the official model, so SDPA's own scale is
        1. In fp32 this equals the official ``softmax(q k^T + bias) v``; under bf16 the value product runs in fp32
        (the official multiplies bf16 probabilities by bf16 values), a difference below bf16 resolution.
        """
        b, n, d = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # each [B, H, N, Dh]
        additive = None  # [B | 1, H | 1, N, N]
        if bias is not None:
            additive = bias.float().unsqueeze(0)
        if mask is not None:
            padding = torch.zeros(mask.shape, dtype=torch.float32, device=x.device).masked_fill(~mask, float("-inf"))
            padding = padding[:, None, None, :]
            additive = padding if additive is None else additive + padding
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=additive, scale=1.0)
        return self.proj(out.type_as(x).transpose(1, 2).reshape(b, n, d))


class MultiwayBlock(nn.Module):
    """One pre-LN block: shared attention, then the FFN expert chosen by the caller.

    Args:
        with_vl: this block has the VL-FFN expert (layers ``>= vlffn_start_layer``).
        layer_scale_init: initial ``gamma_1``/``gamma_2``; ``None`` = no layer scale.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, drop_path_rate: float,
                 layer_scale_init: float | None, with_vl: bool):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = MultiwayAttention(dim, num_heads)
        self.norm2_text = nn.LayerNorm(dim, eps=eps)
        self.mlp_text = FFN(dim, hidden)
        self.norm2_imag = nn.LayerNorm(dim, eps=eps)
        self.mlp_imag = FFN(dim, hidden)
        self.norm2_vl = nn.LayerNorm(dim, eps=eps) if with_vl else None
        self.mlp_vl = FFN(dim, hidden) if with_vl else None
        if layer_scale_init is None:
            self.gamma_1 = self.gamma_2 = None
        else:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_path_rate = drop_path_rate

    @property
    def has_vl(self) -> bool:
        return self.mlp_vl is not None

    def _residual(self, x: torch.Tensor, branch: torch.Tensor, gamma: nn.Parameter | None) -> torch.Tensor:
        if gamma is not None:
            branch = gamma * branch
        return x + drop_path(branch, self.drop_path_rate, self.training)

    def _ffn(self, x: torch.Tensor, norm: nn.LayerNorm, mlp: FFN) -> torch.Tensor:
        return self._residual(x, mlp(norm(x)), self.gamma_2)

    def forward(self, x: torch.Tensor, expert: str, text_len: int = 0, mask: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N, D]`` -> ``[B, N, D]``.

        Args:
            expert: ``text`` (L-FFN for all tokens), ``image`` (V-FFN) or ``vl``: VL-FFN for all tokens in a
                block that has it, otherwise L-FFN for the first ``text_len`` tokens and V-FFN for the rest.
        """
        if expert not in EXPERTS:
            raise ValueError(f"unknown expert {expert!r}; valid: {EXPERTS}")
        x = self._residual(x, self.attn(self.norm1(x), mask=mask, bias=bias), self.gamma_1)
        if expert == "text":
            return self._ffn(x, self.norm2_text, self.mlp_text)
        if expert == "image":
            return self._ffn(x, self.norm2_imag, self.mlp_imag)
        if self.has_vl:
            return self._ffn(x, self.norm2_vl, self.mlp_vl)
        text = self._ffn(x[:, :text_len], self.norm2_text, self.mlp_text)
        image = self._ffn(x[:, text_len:], self.norm2_imag, self.mlp_imag)
        return torch.cat([text, image], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` conv (with bias): ``[B, 3, H, W]`` -> ``[B, (H/p)*(W/p), D]``."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class MultiwayTransformer(nn.Module):
    """Patch embedding, CLS token, optional absolute image positions, the blocks and the final LayerNorm."""

    def __init__(self, config: VLMoConfig):
        super().__init__()
        c = config
        self.image_size = c.image_size
        self.patch_embed = PatchEmbed(c.patch_size, c.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.pos_embed = None if c.relative_position else nn.Parameter(torch.zeros(1, c.num_image_tokens, c.hidden_size))
        rates = torch.linspace(0, c.drop_path_rate, c.num_layers).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            MultiwayBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.layer_norm_eps, rates[i], c.layer_scale_init,
                          with_vl=i >= c.vlffn_start_layer)
            for i in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def visual_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, 1 + P, D]`` (CLS first)."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(pixel_values.shape[-2:])}")
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x if self.pos_embed is None else x + self.pos_embed


class RelativePositionBias(nn.Module):
    """One table shared by all layers: ``table`` ``[num_distances, heads * layers]``, chunked per layer.

    Layout (official ``build_relative_position_embed``), with ``g`` the patch grid, ``n_img = (2g-1)^2 + 3``
    and ``t = max_text_len_of_initckpt``:

    - rows ``0 .. (2g-1)^2 - 1``: BEiT 2-D patch offsets; ``n_img-3``: CLS->patch, ``n_img-2``: patch->CLS,
      ``n_img-1``: CLS->CLS;
    - ``n_img``: any text->image pair; ``n_img+1``: any image->text pair;
    - ``n_img+2 ..``: 1-D text offsets ``j - i`` between non-CLS text tokens, from ``-(t-2)`` to ``t-2``;
    - the last three rows: text CLS->token, token->CLS, CLS->CLS.
    """

    def __init__(self, config: VLMoConfig):
        super().__init__()
        g = config.patch_grid
        self.num_layers = config.num_layers
        self.num_image_distances = (2 * g - 1) ** 2 + 3
        self.num_distances = self.num_image_distances + 2 * config.max_text_len_of_initckpt + 2
        self.table = nn.Parameter(torch.zeros(self.num_distances, config.num_heads * config.num_layers))
        self.register_buffer("image_index", self._image_index(g), persistent=False)
        self.register_buffer("text_index", self._text_index(config.max_text_len, config.max_text_len_of_initckpt),
                             persistent=False)

    def _image_index(self, g: int) -> torch.Tensor:
        coords = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")).flatten(1)  # [2, P]
        rel = coords[:, :, None] - coords[:, None, :]  # [2, P, P]: offset of token i from token j
        patch = (rel[0] + g - 1) * (2 * g - 1) + (rel[1] + g - 1)
        n = self.num_image_distances
        index = torch.zeros(g * g + 1, g * g + 1, dtype=torch.long)
        index[1:, 1:] = patch
        index[0, :] = n - 3
        index[:, 0] = n - 2
        index[0, 0] = n - 1
        return index

    def _text_index(self, max_text_len: int, span: int) -> torch.Tensor:
        pos = torch.arange(max_text_len - 1)
        offsets = pos[None, :] - pos[:, None]  # [i, j] = j - i
        n = self.num_distances
        index = torch.zeros(max_text_len, max_text_len, dtype=torch.long)
        index[1:, 1:] = offsets + (span - 2) + self.num_image_distances + 2
        index[0, :] = n - 3
        index[:, 0] = n - 2
        index[0, 0] = n - 1
        return index

    def index(self, text_len: int = 0, image: bool = False) -> torch.Tensor:
        """Index ``[N, N]`` of a text (``text_len`` tokens), image, or ``[text; image]`` sequence."""
        if text_len > self.text_index.shape[0]:
            raise ValueError(f"text of {text_len} tokens exceeds max_text_len {self.text_index.shape[0]}")
        text = self.text_index[:text_len, :text_len]
        if not image:
            return text
        if not text_len:
            return self.image_index
        n_img = self.image_index.shape[0]
        t2i = torch.full((text_len, n_img), self.num_image_distances, dtype=torch.long, device=text.device)
        i2t = torch.full((n_img, text_len), self.num_image_distances + 1, dtype=torch.long, device=text.device)
        return torch.cat([torch.cat([text, t2i], 1), torch.cat([i2t, self.image_index], 1)], 0)

    def forward(self, index: torch.Tensor) -> list[torch.Tensor]:
        """One bias ``[H, N, N]`` per layer, for the ``[N, N]`` index."""
        bias = F.embedding(index, self.table).permute(2, 0, 1)  # [H*L, N, N]
        return list(bias.chunk(self.num_layers, dim=0))


class VLMoTextEmbeddings(BertEmbeddings):
    """BERT embeddings (word + token type 0 + LayerNorm + dropout); positions only when ``absolute``.

    The official model builds ``BertEmbeddings`` with ``position_embedding_type="rel_pos"`` for the relative
    models, which adds no position embedding; transformers 5 always adds them, so this subclass decides.
    """

    def __init__(self, config: BertConfig, absolute: bool):
        super().__init__(config)
        self.absolute = absolute

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``[B, T]`` ids -> ``[B, T, D]``."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(torch.zeros_like(input_ids))
        if self.absolute:
            x = x + self.position_embeddings(self.position_ids[:, : input_ids.shape[1]])
        return self.dropout(self.LayerNorm(x))


@dataclass
class MultiwayOutput:
    """Encodings of one modality: ``hidden`` ``[B, N, D]`` after the final norm through the modality's own
    experts, and ``vl_hidden`` ``[B, N, D]`` of the rerun through the VL-FFN layers (None when not asked or
    the model has no VL layer)."""

    hidden: torch.Tensor
    vl_hidden: torch.Tensor | None = None


class VLMo(nn.Module):
    """VLMo: text embeddings, modality (token type) embeddings, the multiway transformer, the shared
    relative position bias and every head (:class:`~unimm.models.vlmo.heads.VLMoHeads`)."""

    def __init__(self, config: VLMoConfig):
        super().__init__()
        self.config = config
        bert = BertConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                          max_position_embeddings=config.max_text_len, hidden_dropout_prob=config.drop_path_rate,
                          pad_token_id=config.pad_token_id)
        self.text_embeddings = VLMoTextEmbeddings(bert, absolute=not config.relative_position)
        self.token_type_embeddings = nn.Embedding(config.num_token_types, config.hidden_size)
        self.transformer = MultiwayTransformer(config)
        self.relative_position = RelativePositionBias(config) if config.relative_position else None
        self.heads = VLMoHeads(config.hidden_size, config.vocab_size, config.mlm, config.vqa_num_answers, config.nlvr2)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.transformer.cls_token, std=0.02)
        if self.transformer.pos_embed is not None:
            nn.init.trunc_normal_(self.transformer.pos_embed, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_layers(self) -> int:
        return len(self.transformer.blocks)

    @property
    def vlffn_start_layer(self) -> int:
        return self.config.vlffn_start_layer

    # -- embeddings ----------------------------------------------------------------------------------------
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` -> ``[B, T, D]`` with the text modality embedding."""
        x = self.text_embeddings(input_ids)
        return x + self.token_type_embeddings.weight[TEXT_TOKEN_TYPE]

    def embed_image(self, pixel_values: torch.Tensor, token_type: int = IMAGE_TOKEN_TYPE) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, 1 + P, D]`` with modality embedding ``token_type`` (NLVR2: 1 or 2)."""
        return self.transformer.visual_embed(pixel_values) + self.token_type_embeddings.weight[token_type]

    def _biases(self, text_len: int, image: bool) -> list[torch.Tensor | None]:
        if self.relative_position is None:
            return [None] * self.num_layers
        return self.relative_position(self.relative_position.index(text_len, image))

    # -- routing -------------------------------------------------------------------------------------------
    def _layers(self, x, layers: range, expert: str, text_len: int, mask, biases) -> torch.Tensor:
        for i in layers:
            x = self.transformer.blocks[i](x, expert, text_len=text_len, mask=mask, bias=biases[i])
        return x

    def _single_modality(self, x: torch.Tensor, expert: str, mask, biases, vl: bool) -> MultiwayOutput:
        start = self.vlffn_start_layer
        below = self._layers(x, range(start), expert, 0, mask, biases)
        hidden = self._layers(below, range(start, self.num_layers), expert, 0, mask, biases)
        vl_hidden = None
        if vl and start < self.num_layers:
            # second CLS (VL-FFN CLS): the input of layer `start` rerun through the VL-FFN layers
            vl_hidden = self.transformer.norm(self._layers(below, range(start, self.num_layers), "vl", 0, mask, biases))
        return MultiwayOutput(self.transformer.norm(hidden), vl_hidden)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vl: bool = True) -> MultiwayOutput:
        """Text only, L-FFN in every layer (``vl=True`` adds the VL-FFN rerun). ``[B, T]`` -> ``[B, T, D]``."""
        mask = attention_mask.bool()
        return self._single_modality(self.embed_text(input_ids), "text", mask, self._biases(input_ids.shape[1], False), vl)

    def encode_image(self, pixel_values: torch.Tensor, vl: bool = True, token_type: int = IMAGE_TOKEN_TYPE) -> MultiwayOutput:
        """Image only, V-FFN in every layer (``vl=True`` adds the VL-FFN rerun). -> ``[B, 1 + P, D]``."""
        return self._single_modality(self.embed_image(pixel_values, token_type), "image", None, self._biases(0, True), vl)

    def encode_image_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                          image_token_type: int = IMAGE_TOKEN_TYPE) -> torch.Tensor:
        """Joint ``[text; image]`` encoding after the final norm: ``[B, T + 1 + P, D]`` (text tokens first).

        Below ``vlffn_start_layer`` text tokens use L-FFN and image tokens V-FFN; from there on every token uses
        VL-FFN. The fused CLS is token 0 (the text CLS), pooled by ``heads.pooler``.
        """
        text = self.embed_text(input_ids)
        image = self.embed_image(pixel_values, image_token_type)
        t = text.shape[1]
        mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(image.shape[:2]).bool()], dim=1)
        x = self._layers(torch.cat([text, image], dim=1), range(self.num_layers), "vl", t, mask, self._biases(t, True))
        return self.transformer.norm(x)
