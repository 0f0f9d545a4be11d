"""Losses: pure modules over tensors. Cross-rank gathering lives only in :mod:`unimm.losses.distributed`."""

from unimm.losses.contrastive import ContrastiveOutput, InfoNCE
from unimm.losses.distributed import gather_no_grad, gather_with_grad, world_info

__all__ = ["ContrastiveOutput", "InfoNCE", "gather_no_grad", "gather_with_grad", "world_info"]
