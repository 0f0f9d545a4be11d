"""``python -m unimm.eval [+experiment=NAME] ckpt_path=RUN/checkpoints/last.ckpt [eval=...]``.

The model and its processor are rebuilt from the config stored in the checkpoint, so no training
command line is needed; data, evaluation and runtime settings come from this command's config.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, MissingMandatoryValue

from unimm.checkpoints import load_run
from unimm.eval.results_record import record_results
from unimm.eval.suite import run_suite
from unimm.runtime import (
    CONF_DIR,
    close_loggers,
    first_logger_with,
    instantiate_dict,
    require_complete,
    set_environment_defaults,
)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    if not cfg.get("eval"):
        raise ValueError("eval: no evaluation chosen; pick one, e.g. eval=toy")
    run = load_run(cfg.ckpt_path)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.attach_processor(run.processor)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")
    module = run.module.to(device)
    loggers = instantiate_dict(cfg.get("logger"))
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("suite"):  # every benchmark of conf/suite/<name>.yaml that fits the model (unimm.eval.suite)
        metrics = run_suite(cfg, run, module, datamodule, out_dir, logger=first_logger_with(loggers, "log_image"))
    else:
        evaluator = instantiate(cfg.eval)
        started = time.perf_counter()
        metrics = evaluator.run(module, datamodule, out_dir, logger=first_logger_with(loggers, "log_image"), tag=f"step{run.step}")
        record_results(metrics, evaluator, out_dir, cfg=cfg, train_cfg=run.config, module=module, ckpt_path=cfg.ckpt_path,
                       step=run.step, wall_time_s=time.perf_counter() - started)
    close_loggers(loggers)
    print(f"\nevaluated {cfg.ckpt_path} (step {run.step}); results in {out_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    set_environment_defaults()
    require_complete(cfg)
    try:
        evaluate(cfg)
    except MissingMandatoryValue as err:
        sys.exit(f"error: the config value '{err.full_key}' is required but not set; e.g. {err.full_key}=...")
