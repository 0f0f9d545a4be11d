"""The tiny VLMo experiment through the real CLI: ITC + ITM + MLM on toy caption pairs, then toy retrieval."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.conftest import REPO, run_cli, single_run_dir
from unimm.checkpoints import load_run

EXPERIMENT = "vlmo_tiny"
EVALUATIONS = ("toy_t2i", "toy_i2t")


def compose_cfg(data_dir: Path, out_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"+experiment={EXPERIMENT}", f"paths.data_dir={data_dir}",
                                           f"paths.root_dir={out_dir}", f"paths.output_dir={out_dir}",
                                           "data.num_workers=0", *overrides])


def untrained_metrics(data_dir: Path, out_dir: Path) -> dict[str, float]:
    cfg = compose_cfg(data_dir, out_dir)
    datamodule = instantiate(cfg.data)
    datamodule.attach_processor(instantiate(cfg.processor))
    return instantiate(cfg.eval).run(instantiate(cfg.model), datamodule, out_dir, tag="untrained")


def csv_metric(run_dir: Path, name: str) -> list[float]:
    rows = list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))
    return [float(r[name]) for r in rows if r.get(name)]


def test_short_run_trains_all_objectives_and_reloads(toy_data_dir, tmp_path):
    log_dir = tmp_path / "logs"
    run_cli("unimm.train", f"+experiment={EXPERIMENT}", f"paths.data_dir={toy_data_dir}", f"paths.log_dir={log_dir}",
            "trainer.max_epochs=1", "trainer.max_steps=12", "data.batch_size=16", "logger=csv",
            "trainer.log_every_n_steps=1", cwd=tmp_path)
    run_dir = single_run_dir(log_dir, EXPERIMENT)
    for term in ("itc", "itc_vl", "itm", "mlm", "unpaired"):
        assert csv_metric(run_dir, f"train/{term}"), term
    assert all(np.isfinite(csv_metric(run_dir, "train/loss")))
    assert max(csv_metric(run_dir, "train/unpaired")) > 0  # toy it2i records are not caption pairs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {f"val/toy/{e}/hit@5" for e in EVALUATIONS} <= set(metrics)
    # the run folder's checkpoint rebuilds the same model from its stored config
    run = load_run(run_dir / "checkpoints" / "last.ckpt")
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    side = {"size": 1, "input_ids": ids, "attention_mask": torch.ones_like(ids), "text_rows": torch.tensor([0]),
            "image_rows": torch.tensor([], dtype=torch.long)}
    emb = run.module.encode_query(side)
    assert emb.shape == (1, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(1))


@pytest.mark.slow
def test_full_toy_run_beats_untrained(toy_data_dir, tmp_path):
    """The default experiment (6 toy epochs, ~4-7 min on 2 shared cores) learns retrieval and its losses fall."""
    log_dir = tmp_path / "logs"
    run_cli("unimm.train", f"+experiment={EXPERIMENT}", f"paths.data_dir={toy_data_dir}", f"paths.log_dir={log_dir}",
            "logger=csv", cwd=tmp_path)
    run_dir = single_run_dir(log_dir, EXPERIMENT)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    baseline = untrained_metrics(toy_data_dir, tmp_path / "untrained")
    for evaluation in EVALUATIONS:
        key = f"val/toy/{evaluation}/hit@5"
        assert metrics[key] > baseline[key] + 10, (evaluation, metrics[key], baseline[key])
    itc = csv_metric(run_dir, "train/itc")
    assert np.mean(itc[-3:]) < 0.8 * np.mean(itc[:3]), itc
