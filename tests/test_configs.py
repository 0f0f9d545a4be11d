"""Every experiment composes, every `_target_` in conf/ imports, and config mistakes give clear errors."""

from __future__ import annotations

import importlib

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import REPO, run_cli
from unimm.runtime import missing_keys
from unimm.utils.config_types import type_errors

CONF = REPO / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def _import(target: str):
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # a nested attribute such as Class.method
        parent, _, cls = module.rpartition(".")
        return getattr(getattr(importlib.import_module(parent), cls), name)


def test_every_target_in_conf_imports():
    targets = set()
    for path in CONF.rglob("*.yaml"):
        targets.update(_targets(yaml.safe_load(path.read_text()) or {}))
    assert len(targets) > 10
    for target in sorted(targets):
        assert callable(_import(target)), target


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={experiment}", f"paths.root_dir={tmp_path}",
                                          f"paths.output_dir={tmp_path}/run"])
    assert cfg.task_name == experiment
    for node in ("model", "data", "trainer", "processor"):
        assert "_target_" in cfg[node], f"{experiment}: {node} has no _target_"
    # everything resolves except values the user must supply (checkpoint paths of real models)
    missing = missing_keys(cfg)
    assert all(key.endswith(("path", "_dir")) for key in missing), missing
    assert not type_errors(cfg)  # every known numeric key holds a number (the CLI checks this before building)
    checkpoint = cfg.callbacks.model_checkpoint
    if "tiny" not in experiment:  # large runs: last.ckpt every N steps, so that a killed job resumes mid-epoch
        assert checkpoint.every_n_train_steps and checkpoint.every_n_epochs is None, experiment


def test_default_root_config_is_the_toy_run(tmp_path):
    """`make train` (no experiment) trains exactly what +experiment=uniir_clip_sf_tiny trains."""
    common = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        default = compose("train", overrides=common)
        tiny = compose("train", overrides=["+experiment=uniir_clip_sf_tiny", *common])
    assert default.data.prepare._target_ == "unimm.data.toy.ensure_toy"
    assert not missing_keys(default)
    for node in ("model", "processor", "data", "trainer", "eval"):
        assert OmegaConf.to_container(default[node]) == OmegaConf.to_container(tiny[node]), node
    assert default.model.optimizer.lr == 2.0e-3  # not the fine-tuning lr of the paper recipe


def test_unknown_experiment_lists_the_available_ones(tmp_path):
    proc = run_cli("unimm.train", "+experiment=no_such_experiment", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "no_such_experiment" in proc.stderr and "uniir_clip_sf_tiny" in proc.stderr


def test_missing_required_path_names_the_key(tmp_path):
    proc = run_cli("unimm.train", "+experiment=uniir_clip_sf_large", f"paths.log_dir={tmp_path}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "model.encoder.path" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_choice_names_the_group_and_options(tmp_path):
    proc = run_cli("unimm.train", "strategy=ddp_typo", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "strategy" in proc.stderr and "deepspeed_stage_2" in proc.stderr


def test_unimoco_qwen2vl_7b_is_the_seed_recipe(tmp_path):
    """UniMoCo's README command (seed 000), value by value, on Qwen2-VL-7B."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=unimoco_qwen2vl_7b", f"paths.root_dir={tmp_path}"])
    assert cfg.model.encoder._target_.endswith("qwen2vl_from_pretrained") and cfg.model.encoder.dtype == "bfloat16"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == 8        # --bf16, 8 GPUs
    assert cfg.model.optimizer.lr == 6e-5 and cfg.model.scheduler.warmup_steps == 200   # lr 6e-5 linear, warmup 200
    assert cfg.model.scheduler._target_.endswith("linear_with_warmup")
    assert cfg.trainer.max_steps == 2000 and cfg.data.batch_size == 128                # 2000 steps, 128 per GPU
    assert cfg.model.loss.temperature == 0.02 and cfg.model.lora.rank == 8             # tau 0.02, LoRA r8
    assert cfg.model.gradcache and cfg.data.collator.chunk_size == 2                   # GC chunks 2/2
    assert cfg.processor.max_length == 256                                             # max_len 256
    assert cfg.data.collator.completion_tokens == cfg.model.completion.num_tokens > 0  # modality completion on
