"""A non-finite loss is skipped and counted (or stops the run naming the step and batch keys); a run that skips
more than ``nonfinite_guard.max_skipped_fraction`` of its steps stops with an error (issue 15, item 5)."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from unimm.methods.base import EmbeddingModule
from unimm.training.callbacks import NonFiniteGuard, NonFiniteLossError


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


def _batches(keys=(["a"], ["nan-1"], ["b"], ["nan-2"])):
    return [{"keys": k, "x": torch.ones(1, 3)} for k in keys]


def _fit(policy, batches=None, callbacks=()):
    module = _Linear(policy)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches or _batches(), batch_size=None))
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


def _diverging(n_good: int, n_total: int):
    """``n_good`` finite batches, then NaN losses (a diverged run: every later step is skipped)."""
    return _batches([[f"ok-{i}"] for i in range(n_good)] + [[f"nan-{i}"] for i in range(n_good, n_total)])


def test_diverged_run_stops_naming_step_loss_and_keys(capsys):
    """The lr=1e6 toy run of issue 15 skipped 28 of 30 steps and exited 0 with a table of zeros."""
    guard = NonFiniteGuard(max_skipped_fraction=0.1, window=20)
    with pytest.raises(NonFiniteLossError, match=r"3 of 5 steps .* last at step 4, loss nan, batch keys: \['nan-4'\]"):
        _fit("skip", _diverging(2, 30), [guard])
    out = capsys.readouterr().out
    # every skip is on the console as it happens, with its step and keys
    assert "[nonfinite] step 2: loss nan" in out and "['nan-2']" in out and "(1 of 3 steps so far)" in out


def test_rare_nonfinite_steps_are_reported_not_fatal(capsys):
    """One NaN batch in 30 (3%) is below the 10% threshold: skipped, printed and in the summary, run completes."""
    guard = NonFiniteGuard(max_skipped_fraction=0.1, window=20)
    batches = _batches([["nan-0"] if i == 7 else [f"ok-{i}"] for i in range(30)])
    module, trainer = _fit("skip", batches, [guard])
    assert module.skipped_steps == 1 and guard.summary() == "non-finite steps skipped: 1 of 30"
    assert "[nonfinite] step 7: loss nan" in capsys.readouterr().out


def test_short_run_is_judged_over_all_its_steps():
    """Under the window (fast_dev_run, a few steps) the end-of-training check still applies: 2 of 4 > 10%."""
    with pytest.raises(NonFiniteLossError, match="2 of 4 steps"):
        _fit("skip", None, [NonFiniteGuard(max_skipped_fraction=0.1)])


def test_threshold_null_only_reports():
    guard = NonFiniteGuard(max_skipped_fraction=None)
    module, _ = _fit("skip", _diverging(2, 30), [guard])
    assert module.skipped_steps == 28 and guard.summary() == "non-finite steps skipped: 28 of 30"


def test_threshold_must_be_a_fraction():
    with pytest.raises(ValueError, match="max_skipped_fraction=10"):
        NonFiniteGuard(max_skipped_fraction=10)


def test_counts_survive_a_resume(tmp_path):
    """A run that diverged before an interruption is judged with those steps after resuming from its checkpoint:
    8 of 10 steps skipped before, 2 good ones after, is 8 of 12 (> 10%), not 0 of 2."""
    batches = _diverging(2, 10)
    module = _Linear("skip")
    guard = NonFiniteGuard(max_skipped_fraction=None)  # only counts in the first part
    first = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", default_root_dir=tmp_path, callbacks=[guard])
    first.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    checkpoint = tmp_path / "diverged.ckpt"
    first.save_checkpoint(checkpoint)
    assert torch.load(checkpoint, weights_only=False)["callbacks"]["NonFiniteGuard"] == {"steps": 10, "skipped": 8}

    resumed = NonFiniteGuard(max_skipped_fraction=0.1)
    second = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       accelerator="cpu", default_root_dir=tmp_path, callbacks=[resumed])
    with pytest.raises(NonFiniteLossError, match="8 of 12 steps"):
        second.fit(_Linear("skip"), train_dataloaders=torch.utils.data.DataLoader(_batches([["a"], ["b"]]),
                                                                                   batch_size=None),
                   ckpt_path=checkpoint)
