"""VLMo (Bao et al., NeurIPS 2022): the multiway transformer, its configs and heads."""

from unimm.models.vlmo.config import VLMoConfig, vlmo_base, vlmo_base_plus, vlmo_large, vlmo_tiny
from unimm.models.vlmo.heads import VLMoHeads
from unimm.models.vlmo.multiway import MultiwayBlock, MultiwayOutput, MultiwayTransformer, VLMo

__all__ = [
    "MultiwayBlock", "MultiwayOutput", "MultiwayTransformer", "VLMo", "VLMoConfig", "VLMoHeads",
    "vlmo_base", "vlmo_base_plus", "vlmo_large", "vlmo_tiny",
]
