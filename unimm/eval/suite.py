"""Benchmark suites: ``python -m unimm.eval ckpt_path=... suite=<name>`` evaluates one checkpoint on every
benchmark of ``conf/suite/<name>.yaml`` that fits the model's modalities.

A suite config lists benchmarks; each entry is an ``eval`` config (composed from ``conf/eval/`` by the suite's
defaults list) plus optional ``modalities`` (what the evaluator feeds the model, for evaluators without a
benchmark folder, e.g. the linear probe: ``[image]``) and ``prepare`` (the command that builds its data, quoted
when the data is missing). Each benchmark is written to ``<run>/<entry>/`` (its own metrics.json, tables,
per-query outputs and ``results.json``); ``<run>/suite.json`` lists what ran and what was skipped, and why.

Benchmark data is prepared once and shared: every entry reads the benchmark folders under ``paths.data_dir``
(built by their converters, or by the toy builder on first use, under a lock), never a per-run copy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unimm.eval.results_record import record_results, write_record
from unimm.utils.progress import is_rank_zero


def model_modalities(processor) -> set[str]:
    """What a model can embed, read from its processor: ``text`` when it tokenizes, ``image`` when it processes
    images (an image-only processor, as UNICOM / MLCD use, gives ``{"image"}``)."""
    found = set()
    if hasattr(processor, "text") or hasattr(processor, "tokenizer"):
        found.add("text")
    if any(hasattr(processor, a) for a in ("images", "image_inputs", "image_processor")):
        found.add("image")
    return found


def fitting_evaluations(benchmark: str, modalities: set[str]) -> tuple[list[str], list[str], str | None]:
    """``(fit, unfit, missing)``: the evaluations of a benchmark folder whose query and candidate modalities are
    within ``modalities``, those that are not (``"name (query text -> image)"``), and a reason when the folder
    cannot be read."""
    from unimm.data.benchmark import load_benchmark

    try:
        bench = load_benchmark(benchmark)
    except (FileNotFoundError, ValueError) as err:
        return [], [], str(err)
    fit, unfit = [], []
    for spec in bench.evaluations:
        needs = set(spec.query_modality.split(",")) | set(spec.cand_modality.split(","))
        if needs <= modalities:
            fit.append(spec.name)
        else:
            unfit.append(f"{spec.name} ({spec.query_modality} -> {spec.cand_modality})")
    return fit, unfit, None


def plan_suite(suite: DictConfig, modalities: set[str]) -> list[dict[str, Any]]:
    """One entry per benchmark of the suite: ``{"name", "eval", "evaluations", "skip": reason | None, "note"}``."""
    plan = []
    for name, entry in suite.benchmarks.items():
        eval_cfg = entry.eval
        item = {"name": name, "eval": eval_cfg, "evaluations": None, "skip": None, "note": ""}
        if entry.get("modalities") is not None:
            needs = set(entry.modalities)
            if not needs <= modalities:
                item["skip"] = f"needs {sorted(needs)}; the model embeds {sorted(modalities)}"
        elif eval_cfg.get("benchmark"):
            fit, unfit, missing = fitting_evaluations(eval_cfg.benchmark, modalities)
            if missing:
                hint = f"; build it with: {entry.prepare}" if entry.get("prepare") else ""
                item["skip"] = f"data not prepared: {missing}{hint}"
            elif not fit:
                item["skip"] = f"no evaluation fits the model's modalities {sorted(modalities)}: {', '.join(unfit)}"
            else:
                wanted = eval_cfg.get("evaluations")
                item["evaluations"] = [e for e in fit if not wanted or e in wanted]
                if unfit:
                    item["note"] = f"skipped (modalities): {', '.join(unfit)}"
        plan.append(item)
    return plan


def probe_joint_sides(module, datamodule, benchmark: str, evaluations: list[str]) -> dict[str, str]:
    """Evaluations whose image+text sides the model refuses, with its message (e.g. VLMo, a dual encoder, embeds
    text or image, not both). Each distinct (shard set, side) with a joint modality is tried once on its first two
    records, read directly from the first shard: the same records, hence the same answer, on every rank."""
    import torch

    from unimm.data.benchmark import load_benchmark
    from unimm.data.records import decode_sample
    from unimm.data.shards import iter_raw_samples, read_index
    from unimm.utils.batches import to_device

    bench = load_benchmark(benchmark)
    refused: dict[str, str] = {}
    tried: dict[tuple[str, str], str | None] = {}
    for spec in bench.evaluations:
        if spec.name not in evaluations:
            continue
        for shard_set, side, modality in ((spec.queries, "query", spec.query_modality),
                                          (spec.pool_path, "cand", spec.cand_modality)):
            if "," not in modality:
                continue
            if (shard_set, side) not in tried:
                records = []
                for raw in iter_raw_samples(read_index(shard_set).shards[0].path):
                    records.append(decode_sample(raw))
                    if len(records) == 2:
                        break
                batch = datamodule._collate((side,))(records)
                encode = module.encode_query if side == "query" else module.encode_candidate
                try:
                    with torch.no_grad():
                        encode(to_device(batch[side], module.device))
                    tried[(shard_set, side)] = None
                except ValueError as err:  # the model states what it cannot embed
                    tried[(shard_set, side)] = f"{spec.name} ({modality} {side}s: {err})"
            if tried[(shard_set, side)]:
                refused[spec.name] = tried[(shard_set, side)]
    return refused


def run_suite(cfg: DictConfig, run, module, datamodule, out_dir: Path, logger=None) -> dict[str, float]:
    """Evaluate ``module`` on every fitting benchmark of ``cfg.suite``; returns all metrics (prefixed by entry).

    Args:
        run: the :class:`~unimm.checkpoints.io.LoadedRun` (its processor decides the modalities, its config and
            step go into each results record).
    """
    suite = cfg.suite
    modalities = set(suite.get("modalities") or model_modalities(run.processor))
    plan = plan_suite(suite, modalities)
    summary = {"suite": suite.name, "modalities": sorted(modalities), "benchmarks": []}
    metrics: dict[str, float] = {}
    for item in plan:
        line = {"name": item["name"], "skipped": item["skip"], "note": item["note"] or None}
        if item["skip"]:
            print(f"[suite {suite.name}] skip {item['name']}: {item['skip']}")
            summary["benchmarks"].append(line)
            continue
        eval_cfg = OmegaConf.to_container(item["eval"], resolve=True)
        # the settings as configured: the modality filter below is in the results rows and in suite.json
        configured = OmegaConf.to_container(item["eval"], resolve=True)
        if item["evaluations"] is not None:
            refused = probe_joint_sides(module, datamodule, eval_cfg["benchmark"], item["evaluations"])
            item["evaluations"] = [e for e in item["evaluations"] if e not in refused]
            if refused:
                item["note"] = "; ".join(filter(None, [item["note"], "skipped (the model refuses joint sides): "
                                                       + ", ".join(refused.values())]))
                line["note"] = item["note"]
            if not item["evaluations"]:
                line["skipped"] = f"no evaluation fits the model: {item['note']}"
                print(f"[suite {suite.name}] skip {item['name']}: {line['skipped']}")
                summary["benchmarks"].append(line)
                continue
            eval_cfg["evaluations"] = item["evaluations"]
        if item["note"]:
            print(f"[suite {suite.name}] {item['name']}: {item['note']}")
        evaluator = instantiate(eval_cfg)
        bench_dir = out_dir / item["name"]
        started = time.perf_counter()
        try:
            results = evaluator.run(module, datamodule, bench_dir, logger=logger, tag=f"step{run.step}")
        except Exception as err:  # the other benchmarks still run; the suite fails at the end, naming this one
            line["failed"] = f"{type(err).__name__}: {err}"
            print(f"[suite {suite.name}] {item['name']} failed: {line['failed']}")
            summary["benchmarks"].append(line)
            continue
        wall = time.perf_counter() - started
        record_results(results, evaluator, bench_dir, cfg=cfg, train_cfg=run.config, module=module,
                       ckpt_path=cfg.ckpt_path, step=run.step, wall_time_s=wall, suite=str(suite.name),
                       eval_cfg=configured)
        metrics.update(results)
        line.update({"wall_time_s": round(wall, 2), "metrics": len(results)})
        summary["benchmarks"].append(line)
    if is_rank_zero():
        write_record(out_dir, summary, name="suite.json")
        ran = [b["name"] for b in summary["benchmarks"] if not b["skipped"] and not b.get("failed")]
        print(f"[suite {suite.name}] evaluated {len(ran)} of {len(plan)} benchmarks: {ran}; details in {out_dir / 'suite.json'}")
    failed = {b["name"]: b["failed"] for b in summary["benchmarks"] if b.get("failed")}
    if failed:
        raise RuntimeError(f"suite {suite.name}: {len(failed)} benchmark(s) failed (the others are recorded): {failed}")
    return metrics

