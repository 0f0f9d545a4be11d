"""What `unimm.train` and `unimm.eval` share: environment defaults, building config nodes, the run summary."""

from __future__ import annotations

import os
import warnings
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig


def set_environment_defaults() -> None:
    """Offline-first defaults; any value the user exported wins."""
    os.environ.setdefault("WANDB_MODE", "offline")  # wandb logs locally unless the user opts in
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")


def instantiate_dict(node: DictConfig | None) -> list[Any]:
    """Build every ``_target_`` entry of a name -> config mapping (callbacks, loggers), skipping empty ones."""
    if not node:
        return []
    return [instantiate(cfg) for cfg in node.values() if cfg and "_target_" in cfg]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list):
    strategy = instantiate(cfg.strategy) if cfg.get("strategy") else "auto"
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, strategy=strategy)


def first_logger_with(loggers: list, method: str):
    """The logger that can do ``method`` (log_image, log_table), else the first logger, else None."""
    for logger in loggers:
        if hasattr(logger, method):
            return logger
    return loggers[0] if loggers else None
