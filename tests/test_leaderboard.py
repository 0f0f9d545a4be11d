"""Results records and the leaderboard: what a record holds, atomic concurrent writes, the DuckDB gathering, the
Markdown / CSV tables, the reported rows, and the HTML page in headless Chromium (one row per run, values in the
right cells, sorting and filtering)."""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing as mp
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from unimm.eval.results_record import RESULTS_FILE, headline, result_rows, write_record
from unimm.leaderboard.gather import build_board, load_reported
from unimm.leaderboard.headless import find_chromium
from unimm.leaderboard.render import write_all


# -- records -------------------------------------------------------------------------------------------------
class _Spec:
    def __init__(self, task, report_k):
        self.task, self.dataset, self.report_k, self.queries = task, "toy", report_k, "/nonexistent"


def test_result_rows_split_metric_names_and_pick_the_headline():
    metrics = {"val/toy/toy_t2i/hit@5": 40.0, "val/toy/toy_t2i/hit@1": 10.0, "val/toy/toy_i2t/hit@10": 70.0,
               "val/toy/average": 55.0, "train/loss": 1.0}
    bench, rows = result_rows(metrics, "val", {"toy_t2i": _Spec("t2i", 5), "toy_i2t": _Spec("i2t", 10)})
    assert bench == "toy"
    by = {(r["evaluation"], r["metric"]): r for r in rows}
    assert set(by) == {("toy_t2i", "hit@5"), ("toy_t2i", "hit@1"), ("toy_i2t", "hit@10"), ("", "average")}
    assert by[("toy_t2i", "hit@5")]["reported"] and by[("toy_i2t", "hit@10")]["reported"]
    assert not by[("toy_t2i", "hit@1")]["reported"] and by[("toy_t2i", "hit@5")]["task"] == "t2i"
    assert headline(rows) == ("average", 55.0)
    # no aggregate: the mean of the reported metrics; a prefix with a slash (val/global) is split correctly
    _, rows = result_rows({"val/global/mb/a/hit@5": 20.0, "val/global/mb/b/hit@5": 40.0, "val/global/mb/b/hit@1": 1.0},
                          "val/global", {"a": _Spec("t2i", 5), "b": _Spec("i2t", 5)})
    assert headline(rows) == ("mean of reported", 30.0)


def _writer(args):
    folder, i = args
    for j in range(20):
        write_record(folder, {"writer": i, "j": j, "pad": "x" * 20000})
    write_record(Path(folder) / f"own{i}", {"writer": i})


def test_concurrent_writers_never_leave_a_partial_record(tmp_path):
    """8 processes write the same results.json 20 times each (a reader in between always parses a whole record)
    and one record each into their own folder; no temporary file remains."""
    path = tmp_path / RESULTS_FILE
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        job = pool.map_async(_writer, [(str(tmp_path), i) for i in range(8)])
        reads = 0
        while not job.ready():
            if path.exists():
                assert json.loads(path.read_text())["pad"] == "x" * 20000
                reads += 1
        job.get()
    assert reads > 0
    assert sorted(json.loads((tmp_path / f"own{i}" / RESULTS_FILE).read_text())["writer"] for i in range(8)) == list(range(8))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_record_of_a_real_evaluation(toy_data_dir, tmp_path):
    """The toy retrieval evaluation of the tiny UniIR model, recorded: fields checked against independent sources
    (the checkpoint file's sha256, index.json query counts, metrics.json, the config's task_name)."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from unimm.data.benchmark import load_benchmark
    from unimm.data.shards import read_index
    from unimm.eval.results_record import record_results

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=uniir_clip_sf_tiny", f"paths.data_dir={toy_data_dir}",
                                          f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}",
                                          "data.num_workers=0", "eval.grid_queries=0",
                                          "eval.evaluations=[toy_t2i]"])
    datamodule = instantiate(cfg.data)
    datamodule.attach_processor(instantiate(cfg.processor))
    model, evaluator = instantiate(cfg.model), instantiate(cfg.eval)
    ckpt = tmp_path / "weights.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    metrics = evaluator.run(model, datamodule, tmp_path / "run", tag="t")
    path = record_results(metrics, evaluator, tmp_path / "run", cfg=cfg, module=model, ckpt_path=ckpt, step=7,
                          wall_time_s=1.5)
    rec = json.loads(path.read_text())
    assert path == tmp_path / "run" / RESULTS_FILE
    assert (rec["model_family"], rec["experiment"], rec["benchmark"], rec["pool"], rec["step"]) == (
        "uniir", "uniir_clip_sf_tiny", "toy", "local", 7)
    assert rec["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    if (REPO / ".git").exists():  # a source tree without git records null
        assert re.fullmatch(r"[0-9a-f]{40}", rec["git_commit"])
    assert rec["unimm_version"] and rec["hardware"] and rec["wall_time_s"] == 1.5
    assert rec["released_from"] is None  # random init
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    bench = load_benchmark(toy_data_dir / "toy" / "eval")
    for spec in bench.evaluations[:1]:
        assert spec.name == "toy_t2i"
        row = next(r for r in rec["results"] if r["evaluation"] == spec.name and r["metric"] == f"hit@{spec.report_k}")
        assert row["reported"] and row["value"] == on_disk[f"val/toy/{spec.name}/hit@{spec.report_k}"]
        assert row["n_queries"] == read_index(spec.queries).total
    assert (rec["headline_metric"], rec["headline_value"]) == ("average", on_disk["val/toy/average"])
    # other weights, another fingerprint; the config hash ignores the run folder
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    other = record_results(metrics, evaluator, tmp_path / "run2", cfg=cfg, module=model)
    rec2 = json.loads(other.read_text())
    assert rec2["weights_fingerprint"] != rec["weights_fingerprint"]
    assert rec2["config_hash"] == rec["config_hash"]
    # the evaluator's settings: its config with the data folder reduced to names, and their short hash
    settings = rec["eval_settings"]
    assert (settings["_target_"], settings["benchmark"], settings["evaluations"]) == (
        "unimm.eval.retrieval.RetrievalEvaluator", "eval", ["toy_t2i"])
    assert "grid_queries" not in settings  # changes no number
    assert rec["eval_settings_hash"] == hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    # reduced-size decoding (data.collator.reduced_decode) gives other pixels: another settings cell
    from omegaconf import OmegaConf

    OmegaConf.update(cfg, "data.collator.reduced_decode", True, force_add=True)
    approximate = json.loads(record_results(metrics, evaluator, tmp_path / "run3", cfg=cfg, module=model).read_text())
    assert approximate["eval_settings"] == {**settings, "reduced_decode": True}
    assert approximate["eval_settings_hash"] != rec["eval_settings_hash"]


# -- the leaderboard -----------------------------------------------------------------------------------------
def record(run_dir: Path, family: str, experiment: str, sha: str, benchmark: str, value: float, pool: str = "local",
           metric: str = "average", date: str = "2026-12-01T00:00:00+00:00", results=None, settings=None) -> None:
    """A record as an evaluation writes it (only the fields the leaderboard reads); ``settings``: the evaluator's
    config (hashed by hand here, as sha256 of its sorted JSON, first 8 hex digits)."""
    write_record(run_dir, {"schema": "unimm.results/1", "model_family": family, "experiment": experiment,
                           "checkpoint_sha256": sha, "step": 100, "benchmark": benchmark, "pool": pool,
                           "headline_metric": metric, "headline_value": value, "results": results or [],
                           "date": date, "run_dir": str(run_dir), "checkpoint": f"/ckpt/{experiment}.ckpt",
                           "eval_settings": settings, "eval_settings_hash": None if settings is None else
                           hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]})


# run -> {column label: value}; the expectations of every test below
EXPECTED = {
    "uniir_clip_sf_tiny": {"toy: average": 41.5, "toy_digits/linear_probe: linear_probe/top1": 52.0},
    "vlmo_tiny": {"toy: average": 63.25, "coco: average": 30.0, "coco: coco_tr/hit@1": 12.5},
    "mlcd_tiny": {"toy_digits/linear_probe: linear_probe/top1": 31.5},
    "vlm2vec_tiny": {"toy: average": 20.0, "mbeir (global): average": 5.0},
}


@pytest.fixture(scope="module")
def results_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    record(root / "a/train", "uniir", "uniir_clip_sf_tiny", "a" * 64, "toy", 41.5)
    record(root / "a/eval/toy_linear_probe", "uniir", "uniir_clip_sf_tiny", "a" * 64, "toy_digits/linear_probe", 52.0,
           metric="linear_probe/top1")
    # an earlier evaluation of the same weights on the same benchmark: replaced by the later one
    record(root / "a/old", "uniir", "uniir_clip_sf_tiny", "a" * 64, "toy", 1.0, date="2026-11-01T00:00:00+00:00")
    record(root / "b", "vlmo", "vlmo_tiny", "b" * 64, "toy", 63.25)
    # a coco run fills the reported rows' coco_tr/hit@1 column from its result rows
    record(root / "b/coco", "vlmo", "vlmo_tiny", "b" * 64, "coco", 30.0,
           results=[{"evaluation": "coco_tr", "metric": "hit@1", "value": 12.5},
                    {"evaluation": "coco_ir", "metric": "hit@5", "value": 50.0}])
    record(root / "c", "cluster_disc", "mlcd_tiny", "c" * 64, "toy_digits/linear_probe", 31.5, metric="linear_probe/top1")
    record(root / "d/x", "vlm_embed", "vlm2vec_tiny", "d" * 64, "toy", 20.0)
    record(root / "d/y", "vlm_embed", "vlm2vec_tiny", "d" * 64, "eval_local", 5.0, pool="global")  # alias -> mbeir
    (root / "d/y/.results.json.host.1.abcd.tmp").write_text("{ partial")  # a writer mid-way: never read
    return root


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["model"]: row for row in csv.DictReader(f)}


def test_leaderboard_cli_writes_one_row_per_run_with_the_right_cells(results_root, tmp_path):
    proc = run_cli("unimm.leaderboard", str(results_root), "--out", str(tmp_path), cwd=tmp_path, timeout=120)
    assert "4 runs from 8 results files" in proc.stdout
    rows = _csv_rows(tmp_path / "leaderboard.csv")
    measured = {name.split(" (")[0]: row for name, row in rows.items() if row["kind"] == "measured"}
    assert set(measured) == set(EXPECTED)
    for experiment, cells in EXPECTED.items():
        filled = {k: float(v) for k, v in measured[experiment].items()
                  if k not in ("model", "family", "kind", "checkpoint_or_source") and v != ""}
        assert filled == cells, experiment
    reported = {name: row for name, row in rows.items() if row["kind"] == "reported"}
    assert reported["UniIR CLIP_SF (L) (reported)"]["mbeir (global): average"] == "48.9000"
    assert reported["UniIR CLIP_SF (L) (reported)"]["mbeir: average"] == "50.6000"
    assert reported["VLMo-Base (reported)"]["coco: coco_tr/hit@1"] == "74.8000"
    md = (tmp_path / "leaderboard.md").read_text()
    measured_md, reported_md = md.split("**Reported**")
    assert "**63.2**" in measured_md and "**52.0**" in measured_md  # best of toy, best probe
    assert "**" not in reported_md.split("Sources:")[0].replace("**Reported**", "")  # reported rows never "best"
    assert "UniIR (Wei et al., ECCV 2024) Table 2" in reported_md


def test_reported_numbers_are_those_of_the_family_readmes():
    """Each reported value appears in the README of its family beside the model's name (a transcription check)."""
    readmes = {p.parent.name: p.read_text() for p in (REPO / "experiments").glob("*/README.md")}
    folder = {"uniir": "uniir", "vlm_embed": "unimoco", "vlmo": "vlmo", "cluster_disc": "mlcd"}
    for entry in load_reported()["reported"]:
        text = readmes[folder[entry["family"]]]
        assert f"{entry['value']:.1f}" in text, entry


@pytest.fixture(scope="module")
def board_html(results_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("board")
    return write_all(build_board([results_root]), out)["html"]


@pytest.fixture(scope="module")
def chromium():
    from unimm.leaderboard.headless import Chromium

    with Chromium(width=1600, height=900) as browser:
        yield browser


BROWSER_ROWS = "[...document.querySelectorAll('#board tbody tr.measured')].map(r => r.dataset.name.split(' (')[0])"


def _select(chromium, sel: str, value: str) -> None:
    chromium.eval(f"(() => {{ const s = document.getElementById('{sel}'); s.value = '{value}'; "
                  "s.dispatchEvent(new Event('change')); })()")


@pytest.mark.browser
@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_leaderboard_page_rows_and_cells(board_html, chromium):
    chromium.open(board_html)
    assert sorted(chromium.eval(BROWSER_ROWS)) == sorted(EXPECTED)
    cells = chromium.eval("""(() => { const heads = [...document.querySelectorAll('#board thead th')].map(h => h.textContent);
        const out = {};
        for (const r of document.querySelectorAll('#board tbody tr.measured')) {
            const row = {};
            [...r.children].forEach((td, i) => { if (td.dataset.value !== undefined) row[heads[i]] = parseFloat(td.dataset.value); });
            out[r.dataset.name.split(' (')[0]] = row; }
        return out; })()""")
    assert cells == EXPECTED
    best = chromium.eval("[...document.querySelectorAll('#board tbody td.best')].map(td => td.textContent)")
    assert sorted(best) == sorted(["63.3", "52.0", "30.0", "12.5", "5.0"])  # 63.25 prints as 63.3 (one decimal)
    assert chromium.eval("document.querySelectorAll('#board tbody tr.reported td.best').length") == 0
    # measured rows come before every reported row
    kinds = chromium.eval("[...document.querySelectorAll('#board tbody tr')].map(r => r.className)")
    assert kinds.index("reported") > max(i for i, k in enumerate(kinds) if k == "measured")


@pytest.mark.browser
@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_leaderboard_page_sorts_and_filters(board_html, chromium):
    chromium.open(board_html)
    click = "(() => {{ [...document.querySelectorAll('#board thead th')].find(h => h.textContent === '{}').click(); }})()"
    chromium.eval(click.format("toy: average"))  # numeric columns sort best first; missing values last
    assert chromium.eval(BROWSER_ROWS) == ["vlmo_tiny", "uniir_clip_sf_tiny", "vlm2vec_tiny", "mlcd_tiny"]
    chromium.eval(click.format("toy: average"))
    assert chromium.eval(BROWSER_ROWS) == ["vlm2vec_tiny", "uniir_clip_sf_tiny", "vlmo_tiny", "mlcd_tiny"]
    _select(chromium, "f-family", "vlmo")
    assert chromium.eval(BROWSER_ROWS) == ["vlmo_tiny"]
    assert chromium.eval("[...document.querySelectorAll('#board tbody tr.reported')].map(r => r.dataset.name)") == [
        "VLMo-Base (reported)", "VLMo-Large (reported)"]
    _select(chromium, "f-family", "")
    _select(chromium, "f-benchmark", "toy_digits/linear_probe")  # rows without a value in the shown columns go
    assert sorted(chromium.eval(BROWSER_ROWS)) == ["mlcd_tiny", "uniir_clip_sf_tiny"]
    heads = chromium.eval("[...document.querySelectorAll('#board thead th')].map(h => h.textContent)")
    assert heads == ["model", "family", "toy_digits/linear_probe: linear_probe/top1"]
    _select(chromium, "f-benchmark", "")
    _select(chromium, "f-pool", "global")
    assert chromium.eval(BROWSER_ROWS) == ["vlm2vec_tiny"]
    chromium.eval("(() => { const c = document.getElementById('f-reported'); c.checked = false; "
                  "c.dispatchEvent(new Event('change')); })()")
    assert chromium.eval("document.querySelectorAll('#board tbody tr.reported').length") == 0


PROBE = "toy_digits/linear_probe: linear_probe/top1"


def test_other_evaluation_settings_are_other_cells(tmp_path):
    """mlcd_tiny's own probe (its C sweep) and the suite's default probe (C = 0.601) on the same weights: two
    cells, in two columns tagged with the settings hash and what differs; a later run of the same settings still
    replaces the earlier one; a benchmark measured with one setting keeps its plain column."""
    swept = {"_target_": "unimm.eval.probe.LinearProbeEvaluator", "c": [10.0, 100.0, 1000.0], "max_iter": 300}
    fixed = {"_target_": "unimm.eval.probe.LinearProbeEvaluator", "c": 0.601, "max_iter": 1000}
    tag = {name: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:8]
           for name, v in (("swept", swept), ("fixed", fixed))}
    kw = {"metric": "linear_probe/top1"}
    record(tmp_path / "m/train", "cluster_disc", "mlcd_tiny", "c" * 64, "toy_digits/linear_probe", 40.0, settings=swept, **kw)
    record(tmp_path / "m/suite_old", "cluster_disc", "mlcd_tiny", "c" * 64, "toy_digits/linear_probe", 1.0,
           settings=fixed, date="2026-11-01T00:00:00+00:00", **kw)
    record(tmp_path / "m/suite", "cluster_disc", "mlcd_tiny", "c" * 64, "toy_digits/linear_probe", 20.0, settings=fixed, **kw)
    record(tmp_path / "m/toy", "cluster_disc", "mlcd_tiny", "c" * 64, "toy_digits/knn", 30.0, metric="knn/top1@10",
           settings={"ks": [10]})
    record(tmp_path / "u/suite", "uniir", "uniir_clip_sf_tiny", "a" * 64, "toy_digits/linear_probe", 50.0, settings=fixed, **kw)
    paths = write_all(build_board([tmp_path], reported=False), tmp_path / "board")
    rows = _csv_rows(paths["csv"])
    swept_col = f"{PROBE} [{tag['swept']}: c=[10.0, 100.0, 1000.0], max_iter=300]"
    fixed_col = f"{PROBE} [{tag['fixed']}: c=0.601, max_iter=1000]"
    cells = {name.split(" (")[0]: {k: v for k, v in row.items() if k not in ("model", "family", "kind",
                                                                           "checkpoint_or_source") and v}
             for name, row in rows.items()}
    assert cells == {"mlcd_tiny": {swept_col: "40.0000", fixed_col: "20.0000", "toy_digits/knn: knn/top1@10": "30.0000"},
                     "uniir_clip_sf_tiny": {fixed_col: "50.0000"}}
    # the page's column tooltip holds the full settings
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>',
                                paths["html"].read_text(), re.S).group(1))
    col = next(c for c in data["columns"] if c["label"] == swept_col)
    assert col["settings_hash"] == tag["swept"] and json.loads(col["settings"]) == swept


def test_wandb_table_holds_the_board(results_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from unimm.leaderboard.wandb_table import log_board

    board = build_board([results_root])
    table = log_board(board, project="unimm-test", dir=str(tmp_path))
    rows = {r[0].split(" (")[0]: dict(zip(table.columns, r)) for r in table.data if r[2] == "measured"}
    for experiment, cells in EXPECTED.items():
        assert {k: v for k, v in rows[experiment].items() if k not in ("model", "family", "kind") and v is not None} == cells
    assert list((tmp_path / "wandb").glob("offline-run-*"))
