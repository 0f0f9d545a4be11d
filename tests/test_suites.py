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

# A smaller toy set than the default (120 training records, 60 pool images, 20 queries per task): the tests are
# about the suite, the records and the probe's inputs, not the scores. Both CLI calls pass the same sizes, so
# their prepare step (ensure_toy) finds the set built and keeps it.
SMALL = {"n_train_per_task": 40, "n_eval_queries": 20, "n_pool_images": 60}
SMALL_OVERRIDES = [f"+data.prepare.{k}={v}" for k, v in SMALL.items()]


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory):
    from unimm.data.toy import ensure_toy

    data_dir = tmp_path_factory.mktemp("small_data")
    ensure_toy(data_dir / "toy", seed=0, **SMALL)
    return data_dir


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


def test_plan_skips_what_does_not_fit_with_the_reason(small_toy, tmp_path):
    toy = suite_cfg("toy", small_toy)
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
def trained_ckpt(small_toy, tmp_path_factory):
    """One training step of the tiny UniIR model, in this process (unimm.train's ``train``: the same code as the
    CLI without a second interpreter start and Lightning import); its last.ckpt feeds the one CLI call below."""
    from unimm.train import train

    log_dir = tmp_path_factory.mktemp("logs")
    run_dir = log_dir / "uniir_clip_sf_tiny" / "runs" / "r0"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=uniir_clip_sf_tiny", f"paths.data_dir={small_toy}",
                                          f"paths.log_dir={log_dir}", f"paths.root_dir={log_dir}",
                                          f"paths.output_dir={run_dir}", "trainer.max_epochs=1",
                                          "+trainer.limit_train_batches=1", "logger=csv", "eval=none",
                                          "data.num_workers=0", *SMALL_OVERRIDES])
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt", log_dir


def test_toy_suite_through_the_eval_cli(trained_ckpt, small_toy):
    """The one real ``python -m unimm.eval ... suite=toy`` call: four benchmarks, four records, one leaderboard row."""
    ckpt, log_dir = trained_ckpt
    proc = run_cli("unimm.eval", f"ckpt_path={ckpt}", "suite=toy", f"paths.data_dir={small_toy}",
                   f"paths.log_dir={log_dir}", "logger=csv", "data.num_workers=0", *SMALL_OVERRIDES,
                   "suite.benchmarks.toy_linear_probe.eval.max_iter=100", cwd=log_dir)
    run = single_run_dir(log_dir, "eval", kind="evals")
    summary = json.loads((run / "suite.json").read_text())
    assert [b["name"] for b in summary["benchmarks"]] == ["toy", "toy_linear_probe", "toy_knn", "toy_image_retrieval"]
    assert all(b["skipped"] is None for b in summary["benchmarks"]), summary
    assert summary["modalities"] == ["image", "text"]
    expected = {"toy": ("toy", "average"), "toy_linear_probe": ("toy_digits/linear_probe", "linear_probe/top1"),
                "toy_knn": ("toy_digits/knn", "knn/top1@10"), "toy_image_retrieval": ("toy_digits/retrieval", "retrieval/recall@1")}
    hashes = set()
    for entry, (benchmark, metric) in expected.items():
        rec = json.loads((run / entry / "results.json").read_text())
        metrics = json.loads((run / entry / "metrics.json").read_text())
        assert (rec["benchmark"], rec["suite"], rec["experiment"], rec["model_family"]) == (
            benchmark, "toy", "uniir_clip_sf_tiny", "uniir")
        assert rec["checkpoint"] == str(ckpt.resolve()) and len(rec["checkpoint_sha256"]) == 64
        assert rec["headline_metric"] == metric
        assert rec["headline_value"] == metrics[f"val/{benchmark.split('/')[0]}/{metric}"]
        # the evaluator's settings as configured (conf/eval/*.yaml + this command's overrides), paths reduced
        assert rec["eval_settings"]["_target_"].startswith("unimm.eval.") and len(rec["eval_settings_hash"]) == 8
        hashes.add(rec["eval_settings_hash"])
    probe = json.loads((run / "toy_linear_probe" / "results.json").read_text())["eval_settings"]
    assert (probe["c"], probe["max_iter"], probe["train"]) == (0.601, 100, {"path": "train", "sides": ["pos", "query"]})
    assert len(hashes) == 4
    assert "evaluated 4 of 4 benchmarks" in proc.stdout
    # the leaderboard puts the four benchmarks of this checkpoint on one row
    board = build_board([run], reported=False)
    assert [r.kind for r in board.rows] == ["measured"] and len(board.rows[0].cells) == 4


def test_probe_embeds_vlmo_images_alone(small_toy, tmp_path):
    """VLMo's collator builds training pairs when asked for query+pos together (no `pos` side: KeyError before);
    the probe asks one side at a time and embeds, per record, the first side holding an image alone. Checked
    against the records read directly from the shards: every toy training record, its own digit label."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from unimm.data.records import decode_sample
    from unimm.data.shards import iter_raw_samples, read_index
    from unimm.eval.probe import LinearProbeEvaluator, embed_labelled

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=vlmo_tiny", f"paths.data_dir={small_toy}",
                                          f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}",
                                          "data.num_workers=0"])
    datamodule = instantiate(cfg.data)
    datamodule.attach_processor(instantiate(cfg.processor))
    model = instantiate(cfg.model).eval()
    train = {"path": str(small_toy / "toy" / "train"), "sides": ["pos", "query"]}
    digits = {}
    for shard in read_index(train["path"]).shards:
        for raw in iter_raw_samples(shard.path):
            rec = decode_sample(raw)
            side = next(s for s in train["sides"] if rec.sides[s].image is not None and rec.sides[s].text is None)
            assert side  # every toy training record has an image alone on pos (t2i, it2i) or query (i2t)
            digits[rec.key] = int(rec.meta["digit"])
    feats, labels, keys = embed_labelled(model, datamodule, train, "digit", with_keys=True)
    assert sorted(keys) == sorted(digits) and feats.shape == (len(digits), feats.shape[1])
    assert labels.tolist() == [digits[k] for k in keys]
    test = {"path": str(small_toy / "toy" / "eval" / "pools" / "toy_images"), "sides": ["cand"]}
    metrics = LinearProbeEvaluator("toy_digits", train, test, max_iter=20).run(model, datamodule, tmp_path / "probe")
    assert 0.0 <= metrics["val/toy_digits/linear_probe/top1"] <= 100.0
