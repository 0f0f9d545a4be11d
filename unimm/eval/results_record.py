"""One self-describing results record per evaluation: ``results.json`` in the evaluation's output folder.

The leaderboard (:mod:`unimm.leaderboard`) reads these files in place with DuckDB, so the record is flat at the
top (one column per field) with one list of per-evaluation rows::

    {"schema": "unimm.results/1", "record_id": "...",
     "model_family": "uniir", "experiment": "uniir_clip_sf_tiny", "model_class": "UniIRModule",
     "checkpoint": "/abs/.../last.ckpt", "checkpoint_sha256": "...", "weights_fingerprint": "...",
     "released_from": "unimm.models.clip.clip_from_pretrained:/models/clip-vit-l14" | null, "step": 200,
     "benchmark": "toy", "split": "eval" | null, "pool": "local" | "global", "evaluator": "...RetrievalEvaluator",
     "headline_metric": "average", "headline_value": 41.2,
     "results": [{"evaluation": "toy_t2i", "task": "t2i", "dataset": "toy", "metric": "hit@5", "value": 38.0,
                  "n_queries": 100, "reported": true}, ...],
     "unimm_version": "0.1.0", "git_commit": "...", "git_dirty": false, "date": "2026-12-02T03:00:00+00:00",
     "config_hash": "...", "eval_settings": {...}, "eval_settings_hash": "1a2b3c4d", "wall_time_s": 12.3, "hardware": "2 x CPU (...)", "hostname": "...",
     "run_dir": "/abs/run", "per_query": "per_query/manifest.json" | null, "task_name": "train" | "eval"}

``eval_settings`` is the evaluator's resolved config (absolute paths reduced to their last component, so the same
settings on two machines hash alike) and ``eval_settings_hash`` its short sha256: two evaluations of one model on
one benchmark with different settings (e.g. MLCD's swept-C linear probe and the suite's fixed-C one) are different
leaderboard cells, never one replacing the other.

Writing is atomic and needs no shared writer: each record goes to its own folder through a temporary file with a
unique name (host, pid, random) and ``os.replace``; readers see the old file or the new one, never a partial one,
while any number of SLURM jobs write at once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA = "unimm.results/1"
RESULTS_FILE = "results.json"
# LightningModule class -> family id (one table; the leaderboard shows the label of reported.yaml's `families`).
FAMILIES = {
    "UniIRModule": "uniir",
    "VLMEmbedModule": "vlm_embed",
    "FrozenLLMModule": "frozen_llm",
    "VLMoModule": "vlmo",
    "ClusterDiscModule": "cluster_disc",
}
# Aggregates an evaluator writes as ``<prefix>/<benchmark>/<name>``, in order of preference for the headline.
HEADLINE_AGGREGATES = ("average", "overall")
# Config nodes that differ between runs of the same setup (run folders, logger ids): left out of config_hash.
CONFIG_HASH_SKIPS = ("paths", "hydra", "logger", "ckpt_path", "resume_from")


# -- identities ----------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """sha256 of a file's bytes (reads ``chunk`` bytes at a time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fast_weights_hash(module) -> str:
    """A quick fingerprint of a module's weights: names, shapes, dtypes and values (tensors over 1M elements are
    sampled at a fixed stride, so two models that differ only between the sampled elements collide; used only
    when :func:`unimm.eval.cache.weights_fingerprint` is not available)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if t.numel() > 1_000_000:  # sample on the device: never copy a whole large tensor to the host
            t = t[:: t.numel() // 1_000_000 + 1]
        t = t.cpu().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash its bit pattern
            t = t.view(torch.int16)
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def weights_fingerprint(module) -> tuple[str, str]:
    """``(fingerprint, how)``: the shared cache fingerprint when unimm.eval.cache provides one, else
    :func:`fast_weights_hash`."""
    try:
        from unimm.eval.cache import weights_fingerprint as shared
    except ImportError:
        return fast_weights_hash(module), "unimm.eval.results_record.fast_weights_hash"
    return str(shared(module)), "unimm.eval.cache.weights_fingerprint"


def config_hash(cfg: Any) -> str | None:
    """sha256 of the resolved config as sorted JSON, without the nodes of :data:`CONFIG_HASH_SKIPS`.

    Values that cannot be resolved outside Hydra (``${hydra:...}``) are hashed as written."""
    if cfg is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        try:
            data = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # an interpolation that only Hydra can resolve
            data = OmegaConf.to_container(cfg, resolve=False)
    else:
        data = dict(cfg)
    data = {k: v for k, v in data.items() if k not in CONFIG_HASH_SKIPS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


SETTINGS_HASH_CHARS = 8
# Evaluator arguments that change no number (what is shown or written, where caches live, how long to wait):
# left out of eval_settings so that e.g. a training run's evaluation and the suite's share a cell.
SETTINGS_SKIPS = ("grid_queries", "grid_k", "per_query_top_k", "cache_wait_s", "cache_dir", "prefix")


def eval_settings(eval_cfg: Any) -> dict[str, Any] | None:
    """The evaluator's resolved config as plain data, absolute paths reduced to their last component (the data
    folder differs between machines; the benchmark and its name are recorded separately)."""
    if eval_cfg is None:
        return None
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(eval_cfg, DictConfig | ListConfig):
        try:
            eval_cfg = OmegaConf.to_container(eval_cfg, resolve=True)
        except Exception:  # an interpolation that only Hydra can resolve
            eval_cfg = OmegaConf.to_container(eval_cfg, resolve=False)

    def clean(node):
        if isinstance(node, Mapping):
            return {str(k): clean(v) for k, v in node.items() if k not in SETTINGS_SKIPS}
        if isinstance(node, list | tuple):
            return [clean(v) for v in node]
        if isinstance(node, str) and os.path.isabs(node):
            return Path(node).name
        return node

    return clean(eval_cfg)


def settings_hash(settings: Mapping[str, Any] | None) -> str | None:
    """Short sha256 (:data:`SETTINGS_HASH_CHARS` hex digits) of :func:`eval_settings` as sorted JSON."""
    if settings is None:
        return None
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:SETTINGS_HASH_CHARS]


def released_origin(model_cfg: Any) -> str | None:
    """Where pretrained weights came from: every builder in the model config whose ``_target_`` loads released
    weights (``*from_pretrained*`` / ``*from_checkpoint*``), as ``target:source``; None for random init."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=False)
    found: list[str] = []

    def walk(node):
        if isinstance(node, Mapping):
            target = str(node.get("_target_", ""))
            if "from_pretrained" in target or "from_checkpoint" in target or "from_retrieval_pretrained" in target:
                sources = [str(v) for k, v in node.items() if not k.startswith("_") and isinstance(v, str)
                           and any(s in k for s in ("path", "name", "checkpoint", "pretrained", "model_id", "repo"))]
                found.append(f"{target}:{','.join(sources) or '?'}")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(model_cfg)
    if isinstance(model_cfg, Mapping) and model_cfg.get("init_from"):
        found.append(f"init_from:{model_cfg['init_from']}")
    return "; ".join(found) or None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the unimm source tree, or (None, None) outside a git checkout."""
    src = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=20).stdout.strip() != ""
        return commit or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def hardware() -> dict[str, Any]:
    """What ran the evaluation: CPU model and count, the accelerators torch sees, the process count."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
    summary = f"{len(gpus)} x {gpus[0]}" if gpus else f"{os.cpu_count()} CPU cores ({cpu})"
    return {"summary": summary, "cpu": cpu, "cpu_count": os.cpu_count(), "gpus": gpus, "world_size": world,
            "torch": torch.__version__}


# -- rows ----------------------------------------------------------------------------------------------------
def _benchmark_info(evaluator) -> tuple[str | None, dict[str, Any]]:
    """(benchmark name, {evaluation: spec}) for evaluators over a benchmark folder; (None, {}) otherwise."""
    path = getattr(evaluator, "benchmark", None)
    if not isinstance(path, str | os.PathLike):
        return None, {}
    try:
        from unimm.data.benchmark import load_benchmark

        bench = load_benchmark(path)
    except (FileNotFoundError, ValueError, KeyError):
        return None, {}
    return bench.name, {spec.name: spec for spec in bench.evaluations}


def _n_queries(spec) -> int | None:
    from unimm.data.shards import read_index

    try:
        return read_index(spec.queries).total
    except (FileNotFoundError, KeyError, ValueError):
        return None


def result_rows(metrics: Mapping[str, float], prefix: str, specs: Mapping[str, Any] | None = None
                ) -> tuple[str | None, list[dict[str, Any]]]:
    """Split ``<prefix>/<benchmark>/<evaluation...>/<metric>`` names into rows.

    Returns (benchmark, rows). An aggregate ``<prefix>/<benchmark>/<name>`` becomes a row with ``evaluation ""``.
    ``specs`` (evaluation name -> :class:`~unimm.data.benchmark.EvaluationSpec`) adds task, dataset, the number
    of queries and ``reported`` (the metric is the one the benchmark reports, e.g. M-BEIR's hit@5)."""
    specs = specs or {}
    rows, benchmarks = [], []
    head = prefix.rstrip("/") + "/"
    for name, value in metrics.items():
        if not name.startswith(head):
            continue
        parts = name[len(head):].split("/")
        if len(parts) < 2:
            continue
        benchmarks.append(parts[0])
        evaluation = "/".join(parts[1:-1])
        spec = specs.get(evaluation)
        row = {"evaluation": evaluation, "task": getattr(spec, "task", None), "dataset": getattr(spec, "dataset", None),
               "metric": parts[-1], "value": float(value), "n_queries": _n_queries(spec) if spec else None,
               "reported": bool(spec) and parts[-1] == f"hit@{spec.report_k}"}
        rows.append(row)
    bench = max(set(benchmarks), key=benchmarks.count) if benchmarks else None
    return bench, rows


def headline(rows: list[dict[str, Any]]) -> tuple[str | None, float | None]:
    """The benchmark's one number for the leaderboard: an aggregate (average / overall) when the evaluator wrote
    one, else the single evaluation's single metric, else the mean of the reported metrics, else the first metric
    the evaluator wrote."""
    aggregates = {r["metric"]: r["value"] for r in rows if r["evaluation"] == ""}
    for name in HEADLINE_AGGREGATES:
        if name in aggregates:
            return name, aggregates[name]
    if len(rows) == 1:
        return f"{rows[0]['evaluation']}/{rows[0]['metric']}".strip("/"), rows[0]["value"]
    reported = [r["value"] for r in rows if r["reported"]]
    if reported:
        return "mean of reported", sum(reported) / len(reported)
    if rows:  # e.g. k-NN top1@k for several k: the first the evaluator reports (the smallest k)
        return f"{rows[0]['evaluation']}/{rows[0]['metric']}".strip("/"), rows[0]["value"]
    return None, None


# -- the record ----------------------------------------------------------------------------------------------
def build_record(
    metrics: Mapping[str, float],
    evaluator,
    *,
    output_dir: str | os.PathLike,
    cfg: Any = None,
    train_cfg: Any = None,
    module=None,
    ckpt_path: str | os.PathLike | None = None,
    step: int | None = None,
    wall_time_s: float | None = None,
    suite: str | None = None,
    fingerprint: tuple[str, str] | None = None,
    eval_cfg: Any = None,
) -> dict[str, Any]:
    """The results record of one evaluation run (see the module docstring for the fields).

    Args:
        metrics: what ``evaluator.run`` returned (``<prefix>/<benchmark>/...`` -> value).
        cfg: this command's config (hashed); ``train_cfg``: the training config (from the checkpoint for
            ``unimm.eval``; the same as ``cfg`` for ``unimm.train``): gives the experiment and the model origin.
        module: the evaluated LightningModule (family and weights fingerprint).
        fingerprint: ``(fingerprint, how)`` already computed (see :func:`record_results`).
        eval_cfg: the evaluator's config (its ``_target_`` and arguments); default ``cfg.eval``.
    """
    from unimm import __version__

    train_cfg = train_cfg if train_cfg is not None else cfg
    prefix = getattr(evaluator, "prefix", "val")
    bench_name, specs = _benchmark_info(evaluator)
    parsed_bench, rows = result_rows(metrics, prefix, specs)
    benchmark = bench_name or parsed_bench or getattr(evaluator, "name", None) or type(evaluator).__name__
    evaluations = {r["evaluation"] for r in rows}
    if bench_name is None and len(evaluations) == 1 and "" not in evaluations:
        # no benchmark folder (probe / k-NN / image retrieval share a dataset name): the protocol names it
        benchmark = f"{benchmark}/{evaluations.pop()}"
    head_metric, head_value = headline(rows)
    commit, dirty = git_state()
    hw = hardware()
    fingerprint, how = fingerprint or (weights_fingerprint(module) if module is not None else (None, None))
    ckpt = Path(ckpt_path).resolve() if ckpt_path else None
    experiment = _get(train_cfg, "task_name")
    output_dir = Path(output_dir).resolve()
    settings = eval_settings(eval_cfg if eval_cfg is not None else _get(cfg, "eval"))
    if settings is not None and _get(_get(_get(cfg, "data"), "collator"), "reduced_decode"):
        # approximate pixels (README "Data at scale"): never the leaderboard cell of an exact decode
        settings["reduced_decode"] = True
    manifest = output_dir / "per_query" / "manifest.json"
    return {
        "schema": SCHEMA,
        "record_id": uuid.uuid4().hex,
        "model_family": FAMILIES.get(type(module).__name__, type(module).__name__) if module is not None else None,
        "model_class": type(module).__name__ if module is not None else None,
        "experiment": experiment,
        "checkpoint": str(ckpt) if ckpt else None,
        "checkpoint_sha256": file_sha256(ckpt) if ckpt and ckpt.is_file() else None,
        "weights_fingerprint": fingerprint,
        "weights_fingerprint_kind": how,
        "released_from": released_origin(_get(train_cfg, "model")),
        "step": step,
        "benchmark": benchmark,
        "split": _split(evaluator),
        "pool": getattr(evaluator, "pool_mode", "local"),
        "evaluator": f"{type(evaluator).__module__}.{type(evaluator).__name__}",
        "suite": suite,
        "headline_metric": head_metric,
        "headline_value": head_value,
        "results": rows,
        "unimm_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": config_hash(cfg),
        "eval_settings": settings,
        "eval_settings_hash": settings_hash(settings),
        "wall_time_s": wall_time_s,
        "hardware": hw["summary"],
        "hardware_detail": hw,
        "hostname": socket.gethostname(),
        "run_dir": str(output_dir),
        "task_name": _get(cfg, "task_name"),
        "per_query": str(manifest.relative_to(output_dir)) if manifest.is_file() else None,
    }


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    try:
        return cfg.get(key)
    except Exception:  # an unresolvable interpolation
        return None


def _split(evaluator) -> str | None:
    """The benchmark's split when benchmark.json states one (``"split"``), else the evaluator's ``split``."""
    path = getattr(evaluator, "benchmark", None)
    if isinstance(path, str | os.PathLike):
        try:
            return json.loads((Path(path) / "benchmark.json").read_text()).get("split")
        except (OSError, ValueError):
            pass
    return getattr(evaluator, "split", None)


def write_record(output_dir: str | os.PathLike, record: Mapping[str, Any], name: str = RESULTS_FILE) -> Path:
    """Write ``record`` to ``output_dir/name`` atomically (unique temporary name + ``os.replace``)."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def last_checkpoint(trainer) -> str | None:
    """The checkpoint file a training run just wrote (``last.ckpt``, else the best one), or None."""
    callback = getattr(trainer, "checkpoint_callback", None)
    return (getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")) or None


def record_results(metrics: Mapping[str, float], evaluator, output_dir: str | os.PathLike, **kwargs) -> Path | None:
    """Build and write the results record (rank 0 only; other ranks return None). Never fails the evaluation
    that produced ``metrics``: a record that cannot be written is reported on stderr."""
    from unimm.utils.progress import is_rank_zero

    module = kwargs.get("module")
    # every rank computes the fingerprint: under torch.distributed the shared one gathers over all ranks
    fingerprint = weights_fingerprint(module) if module is not None else None
    if not metrics or not is_rank_zero():
        return None
    try:
        path = write_record(output_dir, build_record(metrics, evaluator, output_dir=output_dir, fingerprint=fingerprint,
                                                     **kwargs))
    except Exception as err:  # the metrics are already on disk; losing the record must not lose the run
        import sys

        print(f"warning: results record not written to {output_dir}: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    print(f"results record: {path}")
    return path
