"""A run killed with SIGKILL mid-epoch and resumed from its last checkpoint continues exactly.

Exactly means: the resumed run sees precisely the samples the killed run had not yet trained on in that
epoch (none repeated, none skipped), its epoch's data accounting equals the uninterrupted run's and, on CPU,
its per-step losses equal the uninterrupted run's.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, single_run_dir

EXPERIMENT = "uniir_clip_sf_tiny"
STEPS = 30


def _overrides(data_dir: Path, log_dir: Path) -> list[str]:
    return [
        f"+experiment={EXPERIMENT}", f"paths.data_dir={data_dir}", f"paths.log_dir={log_dir}", "logger=csv",
        "callbacks=audit", "callbacks.model_checkpoint.every_n_epochs=null",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "callbacks.model_checkpoint.save_top_k=-1", f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1", "eval=none", "data.num_workers=2",
    ]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv"))))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _data_metrics(run_dir: Path) -> dict[str, float]:
    """The epoch's data accounting as logged (``data/*`` columns of the metrics.csv row that has them)."""
    rows = csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv"))))
    [row] = [r for r in rows if r.get("data/delivered")]
    return {k: float(v) for k, v in row.items() if k.startswith("data/") and v}


def _sample_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "samples.rank0.jsonl")]


def test_sigkill_mid_epoch_then_resume_is_exact(toy_data_dir, tmp_path):
    reference = run_cli("unimm.train", *_overrides(toy_data_dir, tmp_path / "a"), cwd=tmp_path)
    assert reference.returncode == 0
    ref_dir = single_run_dir(tmp_path / "a", EXPERIMENT)

    # the same run, killed without warning once it has written the checkpoint of step 12
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen([sys.executable, "-m", "unimm.train", *_overrides(toy_data_dir, tmp_path / "b")],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its own process group: the kill takes its data workers too
    deadline = time.time() + 300
    while not list((tmp_path / "b").glob(f"{EXPERIMENT}/runs/*/checkpoints/step0000012.ckpt")):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # as a node failure: trainer and data workers die at once
    victim.wait()
    killed_dir = single_run_dir(tmp_path / "b", EXPERIMENT)
    last = killed_dir / "checkpoints" / "last.ckpt"
    from unimm.checkpoints import load_checkpoint

    resumed_step = load_checkpoint(last)["global_step"]
    assert 4 <= resumed_step < STEPS  # last.ckpt may still be the one before step 12 when the kill lands

    run_cli("unimm.train", *_overrides(toy_data_dir, tmp_path / "c"), f"resume_from={last}", cwd=tmp_path)
    resumed_dir = single_run_dir(tmp_path / "c", EXPERIMENT)

    # data: the killed run's committed steps + the resumed run = the uninterrupted run, batch for batch
    reference_batches = [e["keys"] for e in _sample_log(ref_dir)]
    before = [e["keys"] for e in _sample_log(killed_dir) if e["step"] <= resumed_step]
    after = [e["keys"] for e in _sample_log(resumed_dir)]
    assert len(before) == resumed_step
    assert before + after == reference_batches
    seen = [k for batch in before + after for k in batch]
    assert len(seen) == len(set(seen))  # one epoch: no sample twice

    # accounting: the resumed run's epoch tally counts the samples delivered before the kill too
    assert _data_metrics(resumed_dir) == _data_metrics(ref_dir)
    assert _data_metrics(ref_dir)["data/delivered"] == len(seen)

    # loss curve: identical after the resume point
    ref, res = _losses(ref_dir), _losses(resumed_dir)
    assert sorted(res) == list(range(resumed_step, STEPS))
    for step, loss in res.items():
        assert loss == pytest.approx(ref[step], abs=1e-5), step
