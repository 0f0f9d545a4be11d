"""Loading checkpoints without executing code from them, and rebuilding a run from its stored config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unimm.training.callbacks import CONFIG_KEY


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class LoadedRun:
    """A model rebuilt from a checkpoint: the module (weights loaded, eval mode), its processor and config."""

    module: Any
    processor: Any
    config: DictConfig
    step: int


def load_run(path: str | Path) -> LoadedRun:
    """Rebuild the LightningModule and processor of a run from ``checkpoints/*.ckpt`` alone.

    The module is built from the config stored in the checkpoint (``model`` and ``processor`` nodes) and
    its weights are loaded strictly.
    """
    ckpt = load_checkpoint(path)
    if CONFIG_KEY not in ckpt:
        raise KeyError(f"{path} holds no unimm config (key {CONFIG_KEY!r}); was it written by unimm.train?")
    config = OmegaConf.create(ckpt[CONFIG_KEY])
    processor = instantiate(config.processor)
    module = instantiate(config.model)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.eval()
    return LoadedRun(module, processor, config, int(ckpt.get("global_step", 0)))
