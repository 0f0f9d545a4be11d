"""Callbacks every experiment can use: throughput, data accounting, the config inside checkpoints."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary
from omegaconf import DictConfig, OmegaConf

from unimm.utils.errors import UserError

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
    """Drives the shard stream through epochs and accounts for its samples.

    Sets the stream's epoch (so each epoch reshuffles), adds up each batch's stream stats, reports delivered
    vs promised and skips by reason at epoch end, and keeps the running tally in checkpoints so that a
    resumed epoch reports the whole epoch.
    """

    MAX_SHARD_METRICS = 20  # per-shard index mismatches logged as metrics (all of them are printed)

    def __init__(self) -> None:
        self._accounting = None
        self._restored: dict[str, Any] = {}
        self.epochs: list[dict[str, Any]] = []  # the totals of every finished epoch (for summaries and tests)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        trainer.datamodule.train_stream().set_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.datamodule.accounting.update(batch)

    def state_dict(self) -> dict[str, Any]:
        return self._accounting.stats.to_dict() if self._accounting is not None else {}

    # Lightning calls setup() before it restores callback states from a checkpoint (and may call them in the
    # other order elsewhere): whichever comes second applies the restored tally, so a resumed epoch counts
    # the samples delivered before the interruption.
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = state
        self._apply_restored()

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._accounting = trainer.datamodule.accounting
        self._apply_restored()

    def _apply_restored(self) -> None:
        if self._accounting is not None and self._restored:
            from unimm.data.stream import StreamStats

            self._accounting.stats = StreamStats.from_dict(self._restored)
            self._restored = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        accounting = trainer.datamodule.accounting
        stats = accounting.reduce()
        stream = trainer.datamodule.train_stream()
        mismatches = stats.index_mismatches(stream.shard_counts)
        if trainer.is_global_zero:
            report = accounting.summary(stats, stream).replace("\n", "; ")
            print(f"[data] epoch {trainer.current_epoch}: {report}")
        totals = {"data/delivered": stats.used, "data/skipped": stats.n_skipped, "data/unused": stats.n_unused,
                  "data/refilled": stats.refilled, "data/beyond_index": stats.n_beyond_index,
                  "data/index_mismatch_shards": len(mismatches)}
        for shard, (held, count) in list(mismatches.items())[: self.MAX_SHARD_METRICS]:
            # held - promised, per shard: "<shard set folder>/<shard file>"
            totals["data/index_mismatch/" + "/".join(shard.split("/")[-2:])] = held - count
        self.epochs.append({"epoch": trainer.current_epoch, "promised": stream.promised, **totals})
        for logger in trainer.loggers:
            logger.log_metrics(totals, step=trainer.global_step)
        accounting.reset()


class NonFiniteGuard(L.Callback):
    """Reports every step skipped for a non-finite loss and stops a run that skips too many.

    The module skips such a step (``on_nonfinite_loss=skip``, see :class:`~unimm.methods.base.EmbeddingModule`);
    this prints it (step, loss, first batch keys) and raises :class:`NonFiniteLossError` once more than
    ``max_skipped_fraction`` of the steps run so far were skipped, judged over at least ``window`` steps (a single
    early NaN is not a diverged run), and again at the end of training over all its steps (short runs too).
    Every rank skips the same steps (the module agrees across ranks), so every rank stops together.
    ``max_skipped_fraction=null`` only reports. The counts are kept in checkpoints, so a resumed run is judged
    over all its steps, not only those since the restart.
    """

    def __init__(self, max_skipped_fraction: float | None = 0.1, window: int = 20, print_first: int = 10):
        if max_skipped_fraction is not None and not 0.0 <= max_skipped_fraction < 1.0:
            raise ValueError(f"nonfinite_guard.max_skipped_fraction={max_skipped_fraction}: use a fraction in [0, 1) "
                             "or null to only report skipped steps")
        self.max_skipped_fraction = max_skipped_fraction
        self.window = window
        self.print_first = print_first
        self.steps = 0      # training batches run in this process (skipped or not)
        self.skipped = 0
        self._seen = 0      # the module's skipped_steps at the last batch

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps, self.skipped = int(state.get("steps", 0)), int(state.get("skipped", 0))

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen = getattr(pl_module, "skipped_steps", 0)  # the module's own count restarts with the process

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        total = getattr(pl_module, "skipped_steps", 0)
        if total == self._seen:
            return
        self._seen = total
        self.skipped += 1
        last = getattr(pl_module, "last_nonfinite", None) or {"step": trainer.global_step, "loss": float("nan"),
                                                               "keys": list(batch.get("keys", []))}
        if trainer.is_global_zero and self.skipped <= self.print_first:
            more = " (further skips are counted, not printed)" if self.skipped == self.print_first else ""
            print(f"[nonfinite] step {last['step']}: loss {last['loss']}, optimizer step skipped "
                  f"({self.skipped} of {self.steps} steps so far); batch keys: {_head(last['keys'])}{more}")
        if self.max_skipped_fraction is not None and self.skipped > self.max_skipped_fraction * max(self.steps, self.window):
            self._stop(last)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.max_skipped_fraction is not None and self.skipped > self.max_skipped_fraction * self.steps:
            self._stop(getattr(pl_module, "last_nonfinite", None) or {"step": trainer.global_step, "loss": float("nan"),
                                                                      "keys": []})

    def _stop(self, last: dict[str, Any]) -> None:
        raise NonFiniteLossError(
            f"training diverged: {self.skipped} of {self.steps} steps had a non-finite loss and were skipped, more than "
            f"nonfinite_guard.max_skipped_fraction={self.max_skipped_fraction}; last at step {last['step']}, loss "
            f"{last['loss']}, batch keys: {_head(last['keys'])}. Lower the learning rate (model.optimizer.lr), clip "
            "gradients (trainer.gradient_clip_val), or raise the threshold (nonfinite_guard.max_skipped_fraction=null "
            "only reports)"
        )

    def summary(self) -> str:
        """The run summary's line."""
        return f"non-finite steps skipped: {self.skipped} of {self.steps}"


def _head(keys: list, n: int = 5) -> str:
    return str(keys[:n]) + (f" ... ({len(keys)} keys)" if len(keys) > n else "")


class NonFiniteLossError(UserError, FloatingPointError):
    """Too many non-finite steps: the run stopped (see :class:`NonFiniteGuard`)."""


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without FLOPs: Lightning counts them only through ``example_input_array``,
    which no unimm module has (a batch is a dict of sides), so its "Total FLOPs: 0" was never a measurement."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        from lightning.pytorch.utilities.model_summary import get_human_readable_count
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name if name else " ", justify="right" if name in ("Params", "In sizes", "Out sizes")
                             else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*map(str, row))
        console = get_console()
        console.print(table)
        console.print(f"Trainable params: {get_human_readable_count(trainable_parameters)}; non-trainable: "
                      f"{get_human_readable_count(total_parameters - trainable_parameters)}; total: "
                      f"{get_human_readable_count(total_parameters)} ({model_size:.1f} MB); modules in train / eval "
                      f"mode: {total_training_modes['train']} / {total_training_modes['eval']}")


class ProgressLog(L.Callback):
    """One plain-text line per training epoch in the run's log file: the file's copy of the live progress bar
    (whose in-place redraws are not written there)."""

    def __init__(self) -> None:
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from unimm.utils.console import write_log

        values = ", ".join(f"{k}: {float(v):.4g}" for k, v in trainer.progress_bar_metrics.items()
                           if isinstance(v, (int, float)) or getattr(v, "numel", lambda: 0)() == 1)
        last = trainer.max_epochs - 1 if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        write_log(f"[progress] epoch {trainer.current_epoch}/{last}: step {trainer.global_step}, "
                  f"{time.perf_counter() - self._start:.1f} s{', ' + values if values else ''}\n")


class StoreConfig(L.Callback):
    """Writes the resolved run config into every checkpoint, so ``load_run`` needs no command line."""

    def __init__(self, config: DictConfig | dict):
        self.config = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config


class SampleLog(L.Callback):
    """Appends ``{"step", "rank", "keys"}`` per training batch to ``<dirpath>/samples.rank<R>.jsonl``.

    For auditing data order (which samples each step saw), e.g. across an interruption and resume.
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import json
        import os

        os.makedirs(self.dirpath, exist_ok=True)
        with open(os.path.join(self.dirpath, f"samples.rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "rank": trainer.global_rank, "keys": batch["keys"]}) + "\n")


class AdapterExport(L.Callback):
    """Writes the peft adapters of every LoRA/DoRA-wrapped model in the module to ``<dirpath>/<module name>/``
    at the end of each epoch and of training (peft's layout: loadable by ``PeftModel.from_pretrained``).

    Runs on every rank because ZeRO-3 adapters are gathered collectively before rank 0 writes (see
    :func:`unimm.models.vlm.lora.save_peft_model`). The new folder replaces the old one only once complete.
    A module without adapters makes this a no-op.
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def export(self, trainer, pl_module) -> None:
        import os
        import shutil

        from peft import PeftModel

        from unimm.models.vlm.lora import save_peft_model

        for name, module in pl_module.named_modules():
            if not isinstance(module, PeftModel):
                continue
            target = os.path.join(self.dirpath, name or "model")
            save_peft_model(module, target + ".tmp")
            if trainer.is_global_zero:
                if os.path.isdir(target):
                    shutil.rmtree(target)
                os.replace(target + ".tmp", target)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.export(trainer, pl_module)
