"""Benchmark suites: which benchmarks fit a model's modalities, skip reasons, and ``suite=toy`` through the real
eval CLI writing one results record per benchmark."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import REPO, run_cli, single_run_dir
from unimm.eval.suite import model_modalities, plan_suite
from unimm.leaderboard.gather import build_board


def suite_cfg(name: str, data_dir):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=[f"suite={name}", "ckpt_path=x", f"paths.data_dir={data_dir}",
                                         "paths.root_dir=/tmp", "paths.output_dir=/tmp"])
    return cfg.suite


@pytest.mark.parametrize("name", ["toy", "universal"])
def test_suites_compose_with_their_benchmarks(name, tmp_path):
    suite = suite_cfg(name, tmp_path)
    assert suite.name == name
    for entry in suite.benchmarks.values():
        assert OmegaConf.select(entry, "eval._target_"), entry
    if name == "universal":
        assert set(suite.benchmarks) == {"mbeir_local", "mbeir_global", "mmeb", "coco", "f30k", "visdial", "linear_probe"}
        assert suite.benchmarks.mbeir_global.eval.pool_mode == "global"
        assert suite.benchmarks.f30k.eval.benchmark.endswith("vlmo/f30k_test")


def test_plan_skips_what_does_not_fit_with_the_reason(toy_data_dir, tmp_path):
    toy = suite_cfg("toy", toy_data_dir)
    both = {p["name"]: p for p in plan_suite(toy, {"text", "image"})}
    assert all(p["skip"] is None for p in both.values())
    assert both["toy"]["evaluations"] == ["toy_t2i", "toy_i2t", "toy_it2i"]
    image_only = {p["name"]: p for p in plan_suite(toy, {"image"})}
    assert "no evaluation fits the model's modalities ['image']" in image_only["toy"]["skip"]
    assert "toy_t2i (text -> image)" in image_only["toy"]["skip"]
    assert [n for n, p in image_only.items() if p["skip"] is None] == ["toy_linear_probe", "toy_knn", "toy_image_retrieval"]
    text_only = {p["name"]: p for p in plan_suite(toy, {"text"})}
    assert text_only["toy_linear_probe"]["skip"] == "needs ['image']; the model embeds ['text']"
    # data not prepared: the entry names the missing folder and the command that builds it
    universal = {p["name"]: p for p in plan_suite(suite_cfg("universal", tmp_path), {"text", "image"})}
    assert universal["mmeb"]["skip"].startswith("data not prepared: not a unimm benchmark")
    assert "python -m unimm.data.convert.mmeb eval" in universal["mmeb"]["skip"]


def test_model_modalities_from_the_processor():
    from hydra.utils import instantiate

    assert model_modalities(instantiate({"_target_": "unimm.models.image_processor.clip_image_processor",
                                         "image_size": 32})) == {"image"}


@pytest.fixture(scope="module")
def trained_ckpt(toy_data_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    run_cli("unimm.train", "+experiment=uniir_clip_sf_tiny", f"paths.data_dir={toy_data_dir}", f"paths.log_dir={log_dir}",
            "trainer.max_epochs=1", "+trainer.limit_train_batches=1", "logger=csv", "eval=none", "data.num_workers=0",
            cwd=log_dir)
    return single_run_dir(log_dir, "uniir_clip_sf_tiny") / "checkpoints" / "last.ckpt", log_dir


def test_toy_suite_through_the_eval_cli(trained_ckpt, toy_data_dir):
    ckpt, log_dir = trained_ckpt
    proc = run_cli("unimm.eval", f"ckpt_path={ckpt}", "suite=toy", f"paths.data_dir={toy_data_dir}",
                   f"paths.log_dir={log_dir}", "logger=csv", "data.num_workers=0",
                   # fewer probe / k-NN training images (the pos side only): the test is about the suite, not the probe
                   "suite.benchmarks.toy_linear_probe.eval.train.sides=[pos]", "suite.benchmarks.toy_knn.eval.train.sides=[pos]",
                   cwd=log_dir)
    run = single_run_dir(log_dir, "eval", kind="evals")
    summary = json.loads((run / "suite.json").read_text())
    assert [b["name"] for b in summary["benchmarks"]] == ["toy", "toy_linear_probe", "toy_knn", "toy_image_retrieval"]
    assert all(b["skipped"] is None for b in summary["benchmarks"]), summary
    assert summary["modalities"] == ["image", "text"]
    expected = {"toy": ("toy", "average"), "toy_linear_probe": ("toy_digits/linear_probe", "linear_probe/top1"),
                "toy_knn": ("toy_digits/knn", "knn/top1@10"), "toy_image_retrieval": ("toy_digits/retrieval", "retrieval/recall@1")}
    for entry, (benchmark, metric) in expected.items():
        rec = json.loads((run / entry / "results.json").read_text())
        metrics = json.loads((run / entry / "metrics.json").read_text())
        assert (rec["benchmark"], rec["suite"], rec["experiment"], rec["model_family"]) == (
            benchmark, "toy", "uniir_clip_sf_tiny", "uniir")
        assert rec["checkpoint"] == str(ckpt.resolve()) and len(rec["checkpoint_sha256"]) == 64
        assert rec["headline_metric"] == metric
        assert rec["headline_value"] == metrics[f"val/{benchmark.split('/')[0]}/{metric}"]
    assert "evaluated 4 of 4 benchmarks" in proc.stdout
    # the leaderboard puts the four benchmarks of this checkpoint on one row
    board = build_board([run], reported=False)
    assert [r.kind for r in board.rows] == ["measured"] and len(board.rows[0].cells) == 4
