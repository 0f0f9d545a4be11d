"""The shared LightningModule base of the embedding families: optimizer, schedule, training logging."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch

from unimm.training.compile import CompileSettings, compile_blocks
from unimm.training.optim import weight_decay_groups


class EmbeddingModule(L.LightningModule):
    """Base class: subclasses implement :meth:`encode_query`, :meth:`encode_candidate` and :meth:`compute_loss`.

    Args:
        optimizer: partial optimizer (``torch.optim.AdamW`` with lr, betas, weight_decay...); parameter groups
            without weight decay are built here (see :func:`~unimm.training.optim.weight_decay_groups`).
        scheduler: optional partial taking ``(optimizer, total_steps)``; stepped every optimizer step.
        on_nonfinite_loss: ``skip`` (no optimizer step; counted, logged as ``train/skipped_steps`` and reported;
            :class:`~unimm.training.callbacks.NonFiniteGuard` stops the run past ``nonfinite_guard.max_skipped_fraction``)
            or ``stop`` (raise at the first one, naming the step and the batch keys).
        compile: ``model.compile``: ``true`` or ``{backend, mode, dynamic, fallback}`` compiles the repeated
            transformer blocks of every encoder in place (:mod:`unimm.training.compile`) for training and embedding.
    """

    NONFINITE_POLICIES = ("skip", "stop")

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable | None = None,
                 on_nonfinite_loss: str = "skip", compile: bool | Mapping[str, Any] = False):
        super().__init__()
        self.compile_settings = CompileSettings.parse(compile)
        if on_nonfinite_loss not in self.NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite_loss={on_nonfinite_loss!r}; valid: {list(self.NONFINITE_POLICIES)}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.on_nonfinite_loss = on_nonfinite_loss
        self.skipped_steps = 0
        self.last_nonfinite: dict[str, Any] | None = None

    def configure_model(self) -> None:
        """Lightning hook, after the strategy has placed the model: compile the blocks once (idempotent)."""
        if self.compile_settings.enabled and not getattr(self, "_blocks_compiled", False):
            compile_blocks(self, self.compile_settings)
            self._blocks_compiled = True

    # -- what a family provides ------------------------------------------------------------------------------
    def encode_query(self, side: dict[str, Any]) -> torch.Tensor:
        """Embed the query side of a batch: ``[B, D]``, L2-normalised."""
        raise NotImplementedError  # abstract

    def encode_candidate(self, side: dict[str, Any]) -> torch.Tensor:
        """Embed a candidate side of a batch: ``[B, D]``, L2-normalised."""
        raise NotImplementedError  # abstract

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(loss, terms_to_log)`` for a training batch."""
        raise NotImplementedError  # abstract

    # -- shared training logic ---------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss, terms = self.compute_loss(batch)
        size = len(batch["keys"])
        if not self._all_ranks_finite(loss):
            self.skip_nonfinite(loss, batch)
            return None  # Lightning skips backward and the optimizer step; every rank agrees (see below)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        return loss

    def skip_nonfinite(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        """Handle a non-finite loss by the policy: raise (``stop``) or count the skipped step (``skip``).

        The skip is recorded in ``last_nonfinite`` (step, loss, batch keys) for
        :class:`~unimm.training.callbacks.NonFiniteGuard`, which reports it and stops a run that skips too many.
        ``train/loss`` is logged as the non-finite value: the progress bar and loggers must not keep showing the
        last finite loss.
        """
        value = float(loss.detach().float().item()) if loss.numel() == 1 else float("nan")
        if self.on_nonfinite_loss == "stop":
            raise FloatingPointError(f"non-finite loss {value} at step {self.global_step}; batch keys: {batch['keys']}")
        self.skipped_steps += 1
        self.last_nonfinite = {"step": int(self.global_step), "loss": value, "keys": list(batch["keys"])}
        size = len(batch["keys"])
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=size)
        self.log("train/loss", value, prog_bar=True, batch_size=size)

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        """True when the loss is finite on every rank: ranks must skip a step together or DDP would hang."""
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; override to give parts their own lr or decay (e.g. fusion layers)."""
        return weight_decay_groups(self.named_parameters(), weight_decay)

    def configure_optimizers(self):
        weight_decay = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        optimizer = self.optimizer_factory(self.param_groups(weight_decay))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
