"""What `unimm.train` and `unimm.eval` share: environment defaults, building config nodes, the run summary."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig, ListConfig, MissingMandatoryValue, OmegaConf

from unimm.training.callbacks import ModelSummary, ProgressLog
from unimm.utils.config_types import check_value_types
from unimm.utils.console import log_console, quiet_known_noise
from unimm.utils.errors import UserError, report_errors

T = TypeVar("T")
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


def run_log_path() -> Path | None:
    """The run folder's log file (``<job name>.log``: train.log, cli.log), where Hydra's job logging writes."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"


# folder-name fragment -> the converter that writes such a shard set (each has --help)
CONVERTERS = {
    "mbeir": "python -m unimm.data.convert mbeir train --queries ... --pool ... --images ... --out {path}",
    "mmeb": "python -m unimm.data.convert mmeb ... --out {path}",
    "nli": "python -m unimm.data.convert.nli --csv nli_for_simcse.csv --out {path}",
    "cc3m": "python -m unimm.data.convert cc3m ... --out {path}",
    "visdial": "python -m unimm.data.convert visdial ... --out {path}",
    "mmdialog": "python -m unimm.data.convert mmdialog ... --out {path}",
    "arrow": "python -m unimm.data.convert vlmo_arrow ... --out {path}",
}


def shard_set_hint(message: str) -> str:
    """The command that builds the missing shard set named in ``message`` (by its folder name), else the list."""
    path = message.split(": ", 1)[-1].split(" is missing")[0].removesuffix("/index.json")
    name = Path(path).name.lower() + " " + Path(path).parent.name.lower()
    for fragment, command in CONVERTERS.items():
        if fragment in name:
            return f"build it with: {command.format(path=path)} (see --help; the experiment's README has the full command)"
    return (f"build it with a converter: python -m unimm.data.convert <format> ... --out {path} (formats: "
            f"python -m unimm.data.convert --help), or point the data config at an existing shard set")


def run_main(fn: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """What every CLI entry does around its work: the console into the run's log file, known noise off, the
    config checked (unset values, value types) before anything is built, explained errors without a traceback."""
    set_environment_defaults()
    log_path = run_log_path()
    if log_path is not None and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        log_console(log_path)
    quiet_known_noise()

    def checked() -> T:
        require_complete(cfg)
        check_value_types(cfg)
        try:
            return fn(cfg)
        except FileNotFoundError as err:
            if "not a unimm shard set" not in str(err):
                raise
            raise UserError(f"{err}\n{shard_set_hint(str(err))}") from err
        except MissingMandatoryValue as err:  # an interpolation reached a ``???`` at run time: name the key
            raise UserError(f"the config value '{err.full_key}' is required but not set; pass it on the command "
                            f"line, e.g. {err.full_key}=...") from err

    return report_errors(checked, log_path)


def instantiate_dict(node: DictConfig | None) -> list[Any]:
    """Build every ``_target_`` entry of a name -> config mapping (callbacks, loggers), skipping empty ones."""
    if not node:
        return []
    return [instantiate(cfg) for cfg in node.values() if cfg and "_target_" in cfg]


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list):
    """The Lightning Trainer of ``cfg.trainer``, with a rich progress bar unless ``trainer.enable_progress_bar=false``;
    plain-text epoch lines go to the run's log file either way (:class:`~unimm.training.callbacks.ProgressLog`)."""
    callbacks = [*callbacks, ProgressLog()]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks = [*callbacks, RichProgressBar(leave=True)]
    if cfg.trainer.get("enable_model_summary", True):
        callbacks = [*callbacks, ModelSummary()]  # Lightning's, less its FLOPs row that is always 0 here
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
