"""GPU checks (marked `gpu`, skipped without CUDA): bf16 training, FSDP and DeepSpeed strategies end to end."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.conftest import run_cli, single_run_dir
from unimm.checkpoints import load_run

EXPERIMENT = "uniir_clip_sf_tiny"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _train(toy_data_dir, tmp_path, *overrides):
    run_cli("unimm.train", f"+experiment={EXPERIMENT}", "trainer=gpu", "trainer.devices=1", "logger=csv",
            f"paths.data_dir={toy_data_dir}", f"paths.log_dir={tmp_path}", *overrides, cwd=tmp_path)
    return single_run_dir(tmp_path, EXPERIMENT)


def test_bf16_training_on_gpu_learns(toy_data_dir, tmp_path):
    run_dir = _train(toy_data_dir, tmp_path, "trainer.max_epochs=4", "eval.autocast=bf16")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/toy/average"] > 25  # chance is about 4


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_sharded_strategies_train_and_reload(toy_data_dir, tmp_path, strategy):
    if strategy.startswith("deepspeed") and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed on this GPU machine")
    run_dir = _train(toy_data_dir, tmp_path, f"strategy={strategy}", "trainer.max_steps=20", "eval=none")
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    if checkpoint.is_file():  # FSDP with a full state dict: one file that load_run rebuilds from
        run = load_run(checkpoint)
        assert run.step == 20
