"""What `unimm.train` and `unimm.eval` share: environment defaults, building config nodes, the run summary."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, ListConfig, OmegaConf

# The Hydra tree lives beside the package (installed editable by `make install`); UNIMM_CONF_DIR points elsewhere.
CONF_DIR = os.environ.get("UNIMM_CONF_DIR", str(Path(__file__).resolve().parents[1] / "conf"))


def set_environment_defaults() -> None:
    """Offline-first defaults; any value the user exported wins."""
    os.environ.setdefault("WANDB_MODE", "offline")  # wandb logs locally unless the user opts in
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its AVX2 probe is not news to a user
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")


def missing_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Dotted keys whose value is ``???`` (without resolving interpolations that point at them)."""
    found = []
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        path = f"{prefix}{key}" if isinstance(cfg, DictConfig) else f"{prefix.rstrip('.')}[{key}]"
        if OmegaConf.is_missing(cfg, key):
            found.append(path)
            continue
        child = cfg._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation() and not child._is_none():
            found += missing_keys(child, path + ".")
    return found


def require_complete(cfg: DictConfig, ignore: tuple[str, ...] = ("hydra",)) -> None:
    """Fail before building anything when a required value (``???``) is unset, naming every such key."""
    missing = sorted(k for k in missing_keys(cfg) if not k.startswith(ignore))
    if missing:
        examples = " ".join(f"{k}=..." for k in missing)
        sys.exit(f"error: required config value(s) not set: {', '.join(missing)}\n"
                 f"set them on the command line ({examples}) or in conf/local/default.yaml")


def instantiate_dict(node: DictConfig | None) -> list[Any]:
    """Build every ``_target_`` entry of a name -> config mapping (callbacks, loggers), skipping empty ones."""
    if not node:
        return []
    return [instantiate(cfg) for cfg in node.values() if cfg and "_target_" in cfg]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list):
    """The Lightning Trainer of ``cfg.trainer``, with a rich progress bar unless ``trainer.enable_progress_bar=false``."""
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks = [*callbacks, RichProgressBar(leave=True)]
    strategy = instantiate(cfg.strategy) if cfg.get("strategy") else "auto"
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, strategy=strategy)


def first_logger_with(loggers: list, method: str):
    """The logger that can do ``method`` (log_image, log_table), else the first logger, else None."""
    for logger in loggers:
        if hasattr(logger, method):
            return logger
    return loggers[0] if loggers else None


def close_loggers(loggers: list) -> None:
    """Flush and close loggers; wandb writes its run summary only when the run is finished."""
    for logger in loggers:
        logger.finalize("success")
        finish = getattr(getattr(logger, "_experiment", None), "finish", None)
        if callable(finish):
            finish()
