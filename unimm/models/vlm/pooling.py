"""Last-token pooling of a decoder's hidden states (VLM2Vec ``pooling last`` / ``eos``; E5-V)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last non-padding token, ``[B]``, for left *and* right padding.

    VLM2Vec takes index -1 when the batch is left padded and ``mask.sum() - 1`` otherwise, which is wrong for a
    right-padded row with padding inside; the position of the last 1 in the mask is right for every layout.

    Args:
        attention_mask: ``[B, L]`` with 1 on real tokens.
    """
    length = attention_mask.shape[1]
    # argmax returns the first maximum: on the flipped mask, the first 1 is the last real token
    return length - 1 - attention_mask.flip(1).to(torch.int32).argmax(dim=1)


def last_token_pool(hidden: Tensor, attention_mask: Tensor, normalize: bool = True) -> Tensor:
    """The hidden state of each row's last real token: ``hidden [B, L, H]`` -> ``[B, H]``, L2-normalised."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    pooled = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
    return F.normalize(pooled, dim=-1) if normalize else pooled
