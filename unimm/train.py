"""``python -m unimm.train [+experiment=NAME] [overrides]``: compose, build, fit, evaluate, summarise."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from unimm.checkpoints.released import apply_pretrained
from unimm.eval.results_record import last_checkpoint, record_results
from unimm.runtime import (
    CONF_DIR,
    build_trainer,
    close_loggers,
    first_logger_with,
    instantiate_dict,
    run_main,
    set_environment_defaults,
)
from unimm.training.callbacks import DataAccounting, NonFiniteGuard, StoreConfig, Throughput
from unimm.utils.checkpoint_files import check_checkpoint_file


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and evaluate one run; returns the evaluation metrics (empty without an ``eval`` node)."""
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # e.g. build the toy set: the processor and model may need its vocabulary
    processor = instantiate(cfg.processor)
    datamodule.attach_processor(processor)
    model = instantiate(cfg.model)
    apply_pretrained(model, cfg)  # pretrained.path: a released checkpoint (README "Released checkpoints")

    throughput = Throughput()
    guard = NonFiniteGuard(**(cfg.get("nonfinite_guard") or {}))
    callbacks = instantiate_dict(cfg.get("callbacks")) + [StoreConfig(cfg), DataAccounting(), throughput, guard]
    loggers = instantiate_dict(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    resume = cfg.get("resume_from")
    if resume and resume not in ("last", "hpc"):  # Lightning's own names for checkpoints it finds itself
        resume = check_checkpoint_file(resume, "resume_from")
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume)

    metrics: dict[str, float] = {}
    if cfg.get("eval") and not trainer.fast_dev_run:
        evaluator = instantiate(cfg.eval)
        eval_started = time.perf_counter()
        metrics = evaluator.run(
            model, datamodule, run_dir, logger=first_logger_with(loggers, "log_image"), tag=f"step{trainer.global_step}"
        )
        record_results(metrics, evaluator, run_dir, cfg=cfg, module=model, ckpt_path=last_checkpoint(trainer),
                       step=trainer.global_step, wall_time_s=time.perf_counter() - eval_started)
    close_loggers(loggers)
    if trainer.is_global_zero:
        summary = [
            f"run folder: {run_dir}",
            f"checkpoint: {last if (last := run_dir / 'checkpoints' / 'last.ckpt').is_file() else 'none written'}",
            f"steps: {trainer.global_step}, time: {time.perf_counter() - started:.1f} s, "
            f"train throughput: {throughput.samples_per_sec:.1f} samples/s",
            guard.summary(),
        ]
        if cfg.get("optimized_metric") in metrics:
            summary.append(f"{cfg.optimized_metric}: {metrics[cfg.optimized_metric]:.2f}")
        print("\n".join(["", "== unimm run summary ==", *summary]))
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    # console copied into <run>/train.log; config checked before building; explained errors without a traceback
    metrics = run_main(train, cfg)
    return metrics.get(cfg.get("optimized_metric")) if metrics else None


if __name__ == "__main__":
    set_environment_defaults()
    main()
