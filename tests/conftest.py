"""Shared test setup: offline environment, one toy dataset per session, a helper to run the CLIs."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("UNIMM_PROGRESS", "0")


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    """A data folder holding the default toy dataset (built once per test session, as `make train` builds it)."""
    from unimm.data.toy import ensure_toy

    data_dir = tmp_path_factory.mktemp("data")
    ensure_toy(data_dir / "toy", seed=0)
    return data_dir


def run_cli(module: str, *overrides: str, cwd: Path, check: bool = True, timeout: int = 900, env: dict | None = None):
    """Run ``python -m <module> <overrides>`` like a user would; on failure show its output."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
             "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def single_run_dir(log_dir: Path, task_name: str, kind: str = "runs") -> Path:
    """The one run folder of ``task_name`` (``kind`` = runs for training, evals for unimm.eval)."""
    runs = sorted(glob.glob(str(log_dir / task_name / kind / "*")))
    assert len(runs) == 1, f"expected one run folder under {log_dir / task_name / kind}, found {runs}"
    return Path(runs[0])
