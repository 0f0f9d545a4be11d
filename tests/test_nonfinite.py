"""A non-finite loss is skipped and counted (or stops the run naming the step and batch keys)."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from unimm.methods.base import EmbeddingModule


class _Linear(EmbeddingModule):
    """Loss = mean(w . x); batches whose keys contain "nan" produce a NaN loss."""

    def __init__(self, policy: str):
        super().__init__(functools.partial(torch.optim.SGD, lr=0.1), on_nonfinite_loss=policy)
        self.w = torch.nn.Parameter(torch.ones(3))

    def compute_loss(self, batch):
        loss = (batch["x"] @ self.w).mean()
        if any("nan" in k for k in batch["keys"]):
            loss = loss * float("nan")
        return loss, {}


def _batches():
    keys = [["a"], ["nan-1"], ["b"], ["nan-2"]]
    return [{"keys": k, "x": torch.ones(1, 3)} for k in keys]


def _fit(policy):
    module = _Linear(policy)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_batches(), batch_size=None))
    return module, trainer


def test_nonfinite_steps_are_skipped_and_counted():
    module, trainer = _fit("skip")
    assert module.skipped_steps == 2
    # two good SGD steps of lr 0.1 on d(mean(x . w))/dw = 1 per coordinate: w = 1 - 2 * 0.1
    assert torch.allclose(module.w.detach(), torch.full((3,), 0.8))
    assert torch.isfinite(module.w).all()


def test_nonfinite_stop_names_step_and_keys():
    with pytest.raises(FloatingPointError, match=r"step 1; batch keys: \['nan-1'\]"):
        _fit("stop")


def test_unknown_policy_lists_choices():
    with pytest.raises(ValueError, match="valid: \\['skip', 'stop'\\]"):
        _Linear("ignore")
