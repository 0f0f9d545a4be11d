"""Callbacks every experiment can use: throughput, data accounting, the config inside checkpoints."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

CONFIG_KEY = "unimm_config"


class Throughput(L.Callback):
    """Logs ``train/samples_per_sec`` (global: per-rank batch x world size) and keeps run totals for the summary."""

    def __init__(self, window: int = 20):
        self.window = window
        self._start: float | None = None
        self._samples = 0
        self.total_samples = 0
        self.total_time = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = len(batch["keys"]) * trainer.world_size
        self._samples += n
        self.total_samples += n
        if (batch_idx + 1) % self.window == 0 and self._start is not None:
            elapsed = time.perf_counter() - self._start
            self.total_time += elapsed
            pl_module.log("train/samples_per_sec", self._samples / elapsed, batch_size=len(batch["keys"]))
            self._start, self._samples = None, 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._start is not None:
            self.total_time += time.perf_counter() - self._start
        self._start, self._samples = None, 0

    @property
    def samples_per_sec(self) -> float:
        return self.total_samples / self.total_time if self.total_time else 0.0


class DataAccounting(L.Callback):
    """Adds up each batch's stream stats; at epoch end reports delivered vs promised and skips by reason."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.datamodule.accounting.update(batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        accounting = trainer.datamodule.accounting
        stats = accounting.reduce()
        if trainer.is_global_zero:
            promised = trainer.datamodule.train_stream().promised
            print(f"[data] epoch {trainer.current_epoch}: " + accounting.summary(stats, promised).replace("\n", "; "))
        for logger in trainer.loggers:
            logger.log_metrics(
                {"data/delivered": stats.delivered, "data/skipped": stats.n_skipped, "data/refilled": stats.refilled},
                step=trainer.global_step,
            )
        accounting.reset()


class StoreConfig(L.Callback):
    """Writes the resolved run config into every checkpoint, so ``load_run`` needs no command line."""

    def __init__(self, config: DictConfig | dict):
        self.config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config
