"""A real 2-process DDP training run on CPU (gloo) through the CLI, and evaluation equality with 1 process."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, single_run_dir

EXPERIMENT = "uniir_clip_sf_tiny"


@pytest.mark.distributed
def test_ddp_two_processes_train_and_evaluate_like_one(toy_data_dir, tmp_path):
    train_logs = tmp_path / "train"
    run_cli(
        "unimm.train", f"+experiment={EXPERIMENT}", "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.max_steps=6", "data.num_workers=1", "logger=csv", f"paths.data_dir={toy_data_dir}",
        f"paths.log_dir={train_logs}", cwd=tmp_path,
    )
    run_dir = single_run_dir(train_logs, EXPERIMENT)
    ddp_metrics = json.loads((run_dir / "metrics.json").read_text())
    # both ranks took the same number of steps (the run would hang otherwise) and the checkpoint is complete
    eval_logs = tmp_path / "eval"
    run_cli("unimm.eval", f"+experiment={EXPERIMENT}", f"ckpt_path={run_dir}/checkpoints/last.ckpt",
            f"paths.data_dir={toy_data_dir}", f"paths.log_dir={eval_logs}", "logger=csv", "data.num_workers=1", cwd=tmp_path)
    single = json.loads((single_run_dir(eval_logs, EXPERIMENT, "evals") / "metrics.json").read_text())
    assert single.keys() == ddp_metrics.keys()
    for key, value in ddp_metrics.items():
        assert single[key] == pytest.approx(value, abs=1e-6), key
