"""``python -m unimm.eval [+experiment=NAME] ckpt_path=RUN/checkpoints/last.ckpt [eval=...]``.

The model and its processor are rebuilt from the config stored in the checkpoint, so no training
command line is needed; data, evaluation and runtime settings come from this command's config.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from unimm.checkpoints import load_run
from unimm.checkpoints.released import pretrained_path, released_run, require_ckpt_path
from unimm.eval.results_record import record_results
from unimm.eval.suite import run_suite
from unimm.runtime import (
    CONF_DIR,
    close_loggers,
    first_logger_with,
    instantiate_dict,
    run_main,
)
from unimm.utils.checkpoint_files import check_checkpoint_file
from unimm.utils.errors import UserError


def evaluate(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    if not cfg.get("eval"):
        raise UserError("eval: no evaluation chosen; pick one, e.g. eval=toy")
    if pretrained_path(cfg):  # a released checkpoint through the experiment's loader (README "Released checkpoints")
        run = released_run(cfg)
    else:
        run = load_run(check_checkpoint_file(require_ckpt_path(cfg), "ckpt_path"))
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
    # console copied into <run>/cli.log; config checked before building; explained errors without a traceback
    run_main(evaluate, cfg)
