"""VLM2Vec on a tiny random Qwen2-VL through the real CLI, with GradCache: the loss falls and retrieval on the toy
benchmark beats the untrained model."""

from __future__ import annotations

import csv
import json

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.conftest import REPO, run_cli, single_run_dir

EXPERIMENT = "vlm2vec_tiny"


def untrained_average(data_dir, out_dir) -> float:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={EXPERIMENT}", f"paths.data_dir={data_dir}",
                                          f"paths.root_dir={out_dir}", f"paths.output_dir={out_dir}",
                                          "data.num_workers=0"])
    datamodule = instantiate(cfg.data)
    datamodule.attach_processor(instantiate(cfg.processor))
    return instantiate(cfg.eval).run(instantiate(cfg.model), datamodule, out_dir, tag="untrained")["val/toy/average"]


def test_vlm2vec_tiny_learns(toy_data_dir, tmp_path):
    log_dir = tmp_path / "logs"
    run_cli("unimm.train", f"+experiment={EXPERIMENT}", f"paths.data_dir={toy_data_dir}", f"paths.log_dir={log_dir}",
            "logger=csv", "trainer.max_epochs=2", cwd=tmp_path)
    run_dir = single_run_dir(log_dir, EXPERIMENT)
    rows = list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2]), losses
    trained = json.loads((run_dir / "metrics.json").read_text())["val/toy/average"]
    assert trained > untrained_average(toy_data_dir, tmp_path / "untrained") + 5, trained
