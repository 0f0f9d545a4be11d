"""The toy experiment end to end through the real CLIs: it learns, reloads, sweeps and logs."""

from __future__ import annotations

import glob
import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.conftest import REPO, run_cli, single_run_dir
from unimm.data.benchmark import load_benchmark, read_qrels
from unimm.data.shards import iter_raw_samples, read_index

EXPERIMENT = "uniir_clip_sf_tiny"


def chance_hit_at_k(benchmark_root: Path, evaluation: str, k: int) -> float:
    """Expected hit@k (%) of a random ranking: 1 - C(N - p, k) / C(N, k), averaged over queries."""
    bench = load_benchmark(benchmark_root)
    spec = next(e for e in bench.evaluations if e.name == evaluation)
    pool_size = read_index(bench.pools[spec.pool]).total
    qrels = read_qrels(spec.qrels)
    return 100 * float(np.mean([1 - comb(pool_size - len(p), k) / comb(pool_size, k) for p in qrels.values()]))


def untrained_metrics(data_dir: Path, out_dir: Path) -> dict[str, float]:
    """Evaluate the same tiny CLIP before any training step, through the same evaluator."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={EXPERIMENT}", f"paths.data_dir={data_dir}",
                                          f"paths.root_dir={out_dir}", f"paths.output_dir={out_dir}", "data.num_workers=0"])
    datamodule = instantiate(cfg.data)
    datamodule.attach_processor(instantiate(cfg.processor))
    return instantiate(cfg.eval).run(instantiate(cfg.model), datamodule, out_dir, tag="untrained")


@pytest.fixture(scope="module")
def trained_run(toy_data_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    proc = run_cli("unimm.train", f"+experiment={EXPERIMENT}", f"paths.data_dir={toy_data_dir}", f"paths.log_dir={log_dir}",
                   "trainer.max_epochs=4", cwd=log_dir)
    return single_run_dir(log_dir, EXPERIMENT), proc


def test_toy_training_beats_untrained_and_chance(trained_run, toy_data_dir, tmp_path):
    run_dir, proc = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    baseline = untrained_metrics(toy_data_dir, tmp_path)
    bench = toy_data_dir / "toy" / "eval"
    for evaluation in ("toy_t2i", "toy_i2t", "toy_it2i"):
        key = f"val/toy/{evaluation}/hit@5"
        chance = chance_hit_at_k(bench, evaluation, 5)
        assert metrics[key] > baseline[key] + 15, (evaluation, metrics[key], baseline[key])
        assert metrics[key] > chance + 15, (evaluation, metrics[key], chance)
    assert "== unimm run summary ==" in proc.stdout
    assert "R@5" in (run_dir / "retrieval_toy.md").read_text()
    assert (run_dir / "examples_toy_toy_t2i.png").stat().st_size > 1000


def test_loss_falls(trained_run):
    run_dir, _ = trained_run
    history = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*")))
    assert history, "wandb offline run folder was not written"
    # the checkpoint's config + wandb summary are checked elsewhere; the loss curve is in the wandb history:
    # read it back through the stored run file is wandb-internal, so compare the logged summary instead
    summary = json.loads(Path(history[0], "files", "wandb-summary.json").read_text())
    assert summary["train/loss"] < 3.0  # ln(64) = 4.16 is the loss of a random model at batch 64


def test_checkpoint_reloads_through_eval_to_the_same_metrics(trained_run, toy_data_dir, tmp_path):
    run_dir, _ = trained_run
    trained = json.loads((run_dir / "metrics.json").read_text())
    run_cli("unimm.eval", f"+experiment={EXPERIMENT}", f"ckpt_path={run_dir}/checkpoints/last.ckpt",
            f"paths.data_dir={toy_data_dir}", f"paths.log_dir={tmp_path}", "logger=csv", cwd=tmp_path)
    reloaded = json.loads((single_run_dir(tmp_path, "eval") / "metrics.json").read_text())
    assert reloaded.keys() == trained.keys()
    for key, value in trained.items():
        assert reloaded[key] == pytest.approx(value, abs=1e-6), key


def test_wandb_offline_run_has_metrics_and_examples(trained_run):
    run_dir, _ = trained_run
    run = Path(sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*")))[0])
    summary = json.loads((run / "files" / "wandb-summary.json").read_text())
    for key in ("train/loss", "train/lr", "train/samples_per_sec", "val/toy/toy_t2i/hit@5"):
        assert key in summary, key
    assert glob.glob(str(run / "files" / "media" / "images" / "**" / "*.png"), recursive=True)
    assert glob.glob(str(run / "files" / "media" / "table" / "**" / "*.json"), recursive=True)


def test_multirun_sweep_gives_each_run_its_folder(toy_data_dir, tmp_path):
    run_cli("unimm.train", "-m", f"+experiment={EXPERIMENT}", "seed=1,2", "trainer.max_steps=3", "logger=csv",
            f"paths.data_dir={toy_data_dir}", f"paths.log_dir={tmp_path}", cwd=tmp_path)
    sweeps = glob.glob(str(tmp_path / EXPERIMENT / "multiruns" / "*"))
    assert len(sweeps) == 1
    results = [json.loads(Path(sweeps[0], str(i), "metrics.json").read_text()) for i in (0, 1)]
    assert all("val/toy/average" in r for r in results)
    assert results[0] != results[1]  # different seeds, different runs


def test_submitit_local_launcher_runs_a_job(toy_data_dir, tmp_path):
    run_cli("unimm.train", "-m", "hydra/launcher=submitit_local", f"+experiment={EXPERIMENT}", "trainer.max_steps=2",
            "logger=csv", "eval.grid_queries=0", f"paths.data_dir={toy_data_dir}", f"paths.log_dir={tmp_path}",
            "hydra.launcher.timeout_min=10", cwd=tmp_path)
    metrics = glob.glob(str(tmp_path / EXPERIMENT / "multiruns" / "*" / "0" / "metrics.json"))
    assert len(metrics) == 1
    assert glob.glob(str(tmp_path / EXPERIMENT / "multiruns" / "*" / ".submitit" / "*" / "*_log.out"))
