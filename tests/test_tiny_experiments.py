"""Every tiny twin runs with one command on a fresh clone: its ``prepare`` step builds all the data it needs.

Each ``conf/experiment/*tiny*.yaml`` is composed as ``python -m unimm.train +experiment=X`` composes it and run
in-process with ``trainer.fast_dev_run=true`` (one training batch) from a data folder that starts empty (shared
by the parametrized cases in name order, so the toy set is built once, as on a user's machine).
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import REPO
from unimm.train import train

TINY = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*tiny*.yaml"))


@pytest.fixture(scope="module")
def empty_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fresh_clone_data")


def test_every_family_has_a_tiny_twin():
    assert {"e5v_tiny", "unicom_tiny", "mlcd_tiny", "uniir_clip_sf_tiny", "vlmo_tiny", "unimur_tiny"} <= set(TINY)


@pytest.mark.parametrize("experiment", TINY)  # all 13 in about 26 s on 2 idle cores
def test_tiny_experiment_runs_from_an_empty_data_folder(experiment, empty_data_dir, tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"+experiment={experiment}", f"paths.root_dir={tmp_path}", f"paths.data_dir={empty_data_dir}",
            f"paths.output_dir={tmp_path / 'run'}", "logger=none", "++trainer.fast_dev_run=true",
            "trainer.enable_progress_bar=false", "data.num_workers=0",
        ])
        train(cfg)  # raises on any missing input (pytest --durations reports the time)
