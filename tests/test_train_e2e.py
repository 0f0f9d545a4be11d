"""The toy experiment end to end through the real CLIs: it learns, reloads, sweeps and logs."""

from __future__ import annotations

import csv
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
from unimm.data.shards import read_index

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
                   "trainer.max_epochs=4", "logger=[wandb,csv]", cwd=log_dir)
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
    assert "== unimm run summary ==" in proc.stdout and "non-finite steps skipped: 0 of " in proc.stdout
    assert "R@5" in (run_dir / "retrieval_toy.md").read_text()
    assert (run_dir / "examples_toy_toy_t2i.png").stat().st_size > 1000


def _csv_metric(run_dir: Path, name: str) -> list[float]:
    rows = list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))
    return [float(r[name]) for r in rows if r.get(name)]


def test_loss_falls(trained_run):
    run_dir, _ = trained_run
    losses = _csv_metric(run_dir, "train/loss")
    assert len(losses) >= 10
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.6 * first, (first, last)
    assert _csv_metric(run_dir, "train/samples_per_sec") and _csv_metric(run_dir, "train/lr")
    assert _csv_metric(run_dir, "data/delivered")[0] > 2500  # the epoch accounting reached the logger


def test_checkpoint_reloads_through_eval_to_the_same_metrics(trained_run, toy_data_dir, tmp_path):
    run_dir, _ = trained_run
    trained = json.loads((run_dir / "metrics.json").read_text())
    run_cli("unimm.eval", f"+experiment={EXPERIMENT}", f"ckpt_path={run_dir}/checkpoints/last.ckpt",
            f"paths.data_dir={toy_data_dir}", f"paths.log_dir={tmp_path}", "logger=csv", cwd=tmp_path)
    reloaded = json.loads((single_run_dir(tmp_path, EXPERIMENT, "evals") / "metrics.json").read_text())
    assert reloaded.keys() == trained.keys()
    for key, value in trained.items():
        assert reloaded[key] == pytest.approx(value, abs=1e-6), key


def test_wandb_offline_run_has_history_and_examples(trained_run):
    run_dir, _ = trained_run
    runs = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*")))
    assert len(runs) == 1, "exactly one wandb offline run folder"
    run = Path(runs[0])
    assert next(run.glob("run-*.wandb")).stat().st_size > 10_000  # the logged history (binary, synced later)
    images = glob.glob(str(run / "files" / "media" / "images" / "val" / "toy" / "examples_*.png"))
    assert len(images) == 3  # one retrieval grid per evaluation
    tables = glob.glob(str(run / "files" / "media" / "table" / "val" / "toy" / "*.table.json"))
    table = json.loads(Path(tables[0]).read_text())
    assert [row[0] for row in table["data"]] == ["t2i / toy", "i2t / toy", "it2i / toy"]


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
