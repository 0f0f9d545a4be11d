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


@pytest.mark.parametrize("devices", [1, 2])
def test_vlm2vec_gradcache_learns_under_deepspeed_stage_2_bf16(toy_data_dir, tmp_path, devices):
    """GradCache through Lightning's DeepSpeed ZeRO-2 strategy in bf16 (what kept VLM2Vec off DeepSpeed, its #70):
    the real training_step (manual optimisation, one coalesced ZeRO reduction per step) runs on 1 and 2 GPUs, the
    loss falls and retrieval beats the untrained model. Its gradients are checked exactly on CPU by
    tests/test_gradcache_zero2.py; here the Lightning path (engine.backward via manual_backward, engine.step via
    optimizer.step) runs for real. Checked on CPU with the CUDA check bypassed: 1 and 2 processes train."""
    import csv

    import numpy as np

    from tests.test_vlm_embed_e2e import untrained_average

    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed on this GPU machine")
    if torch.cuda.device_count() < devices:
        pytest.skip(f"needs {devices} GPUs")
    experiment = "vlm2vec_tiny"
    run_cli("unimm.train", f"+experiment={experiment}", "trainer=gpu", f"trainer.devices={devices}",
            "trainer.precision=bf16-mixed", "strategy=deepspeed_stage_2",
            # the datamodule batches inside its stream (no batch_sampler), so Lightning cannot infer DeepSpeed's
            # train_micro_batch_size_per_gpu from the loader and fails; give it (only used for DeepSpeed's logging)
            "++strategy.logging_batch_size_per_gpu=${data.batch_size}",
            "model.gradcache=true", "logger=csv", "trainer.max_epochs=3", "trainer.log_every_n_steps=5",
            f"paths.data_dir={toy_data_dir}", f"paths.log_dir={tmp_path}", cwd=tmp_path)
    run_dir = single_run_dir(tmp_path, experiment)
    rows = list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 4 and np.isfinite(losses).all(), losses
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2]), losses
    trained = json.loads((run_dir / "metrics.json").read_text())["val/toy/average"]
    assert trained > untrained_average(toy_data_dir, tmp_path / "untrained") + 5, trained
