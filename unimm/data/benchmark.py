"""Benchmark folders: the candidate pools, query sets and qrels that the retrieval evaluator reads.

Layout::

    <root>/benchmark.json
    <root>/pools/<pool>/              shard set; side "cand" (cand.txt and/or cand.<png|jpg>);
                                      meta {"did": str, "modality": "text"|"image"|"image,text", "dataset": str}
    <root>/queries/<evaluation>/      shard set; side "query" (+ optional instruction.txt);
                                      meta {"qid", "dataset", "task", "query_modality", "pos_cand_list": [did]}
    <root>/qrels/<evaluation>.txt     M-BEIR qrels, one "qid 0 did rel task_id" per line

``benchmark.json`` (paths relative to the root)::

    {"name": "toy",
     "pools": {"toy_images": "pools/toy_images"},
     "evaluations": [{"name": "toy_t2i", "dataset": "toy", "task": "t2i", "query_modality": "text",
                      "cand_modality": "image", "queries": "queries/toy_t2i", "pool": "toy_images",
                      "qrels": "qrels/toy_t2i.txt", "ks": [1, 5, 10], "report_k": 5}]}

Several writers (e.g. one converter call per M-BEIR task) can add to one benchmark: :class:`BenchmarkWriter`
merges its additions into the benchmark.json it finds on disk.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unimm.data.remote import ShardUnreadable, is_remote, join, read_bytes
from unimm.data.shards import ShardSetWriter, read_index

BENCHMARK_FILE = "benchmark.json"
_REQUIRED_FIELDS = ("name", "dataset", "task", "query_modality", "cand_modality", "queries", "pool", "qrels")


@dataclass(frozen=True)
class EvaluationSpec:
    """One evaluation: a query set searched against one pool, scored with qrels. Paths are absolute."""

    name: str
    dataset: str
    task: str
    query_modality: str
    cand_modality: str
    queries: str
    pool: str
    pool_path: str
    qrels: str
    ks: tuple[int, ...] = (1, 5, 10)
    report_k: int = 5


@dataclass(frozen=True)
class BenchmarkSpec:
    """A loaded benchmark. ``pools`` maps pool name to the absolute path of its shard set."""

    name: str
    root: str
    pools: dict[str, str]
    evaluations: tuple[EvaluationSpec, ...]

    def evaluation(self, name: str) -> EvaluationSpec:
        for spec in self.evaluations:
            if spec.name == name:
                return spec
        raise KeyError(
            f"benchmark {self.name!r} has no evaluation {name!r}; it has {[e.name for e in self.evaluations]}"
        )


def load_benchmark(root: str | os.PathLike) -> BenchmarkSpec:
    """Read ``<root>/benchmark.json`` and check that every shard set and qrels file it names exists.

    Raises:
        FileNotFoundError: benchmark.json, a pool or query shard set, or a qrels file is missing (named).
        ValueError: an evaluation uses a pool that ``pools`` does not declare, or ``report_k`` not in ``ks``.
    """
    if is_remote(root):  # a benchmark at a URL (unimm.data.remote): its shard sets and qrels under it
        root = os.fspath(root).rstrip("/")
        path = join(root, BENCHMARK_FILE)
        try:
            text = read_bytes(path).decode("utf-8")
        except ShardUnreadable as err:
            raise FileNotFoundError(f"not a unimm benchmark: {path} cannot be read ({err})") from err
    else:
        root = Path(root).resolve()
        path = root / BENCHMARK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"not a unimm benchmark: {path} is missing")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    for field in ("pools", "evaluations"):
        if field not in data:
            raise ValueError(f"{path} has no {field!r} field (a benchmark.json needs 'pools' and 'evaluations')")
    pools = {name: join(root, rel) for name, rel in data["pools"].items()}
    for name, pool_path in pools.items():
        _require_shard_set(pool_path, f"pool {name!r} of {path}")
    evaluations = []
    for i, entry in enumerate(data["evaluations"]):
        missing = [f for f in _REQUIRED_FIELDS if f not in entry]
        if missing:
            raise ValueError(f"{path}: evaluation #{i} ({entry.get('name', 'unnamed')!r}) lacks {missing}")
        name = entry["name"]
        if entry["pool"] not in pools:
            raise ValueError(
                f"{path}: evaluation {name!r} uses pool {entry['pool']!r}, not declared in 'pools' {sorted(pools)}"
            )
        spec = EvaluationSpec(
            name=name,
            dataset=entry["dataset"],
            task=entry["task"],
            query_modality=entry["query_modality"],
            cand_modality=entry["cand_modality"],
            queries=join(root, entry["queries"]),
            pool=entry["pool"],
            pool_path=pools[entry["pool"]],
            qrels=join(root, entry["qrels"]),
            ks=tuple(int(k) for k in entry.get("ks", (1, 5, 10))),
            report_k=int(entry.get("report_k", 5)),
        )
        if spec.report_k not in spec.ks:
            raise ValueError(f"{path}: evaluation {name!r} reports k={spec.report_k}, not among ks {spec.ks}")
        _require_shard_set(spec.queries, f"queries of evaluation {name!r} in {path}")
        if not is_remote(spec.qrels) and not os.path.isfile(spec.qrels):  # a remote one is named when read
            raise FileNotFoundError(f"qrels of evaluation {name!r} in {path}: {spec.qrels} is missing")
        evaluations.append(spec)
    return BenchmarkSpec(data.get("name", os.path.basename(str(root))), str(root), pools, tuple(evaluations))


def _require_shard_set(path: str, what: str) -> None:
    try:
        read_index(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{what}: {err}") from err


def read_qrels(path: str | os.PathLike) -> dict[str, set[str]]:
    """Read M-BEIR qrels (``qid 0 did rel task_id`` per line) into ``{qid: {did with rel > 0}}``.

    A qid whose every line has rel <= 0 is absent from the result. Raises ValueError naming the line when a
    line has fewer than 4 fields or a non-integer rel.
    """
    qrels: dict[str, set[str]] = {}
    with io.StringIO(read_bytes(os.fspath(path)).decode("utf-8")) if is_remote(path) else open(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                qid, _, did, rel = fields[:4]
                relevant = int(rel) > 0
            except ValueError as err:
                raise ValueError(
                    f"{path}:{lineno}: not a qrels line 'qid 0 did rel task_id': {line.strip()!r}"
                ) from err
            if relevant:
                qrels.setdefault(qid, set()).add(did)
    return qrels


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def replacing_shard_set(path: Path, **writer_kwargs: Any) -> Iterator[ShardSetWriter]:
    """Write a shard set beside ``path`` and swap it in only when complete, so no half-written set remains."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with ShardSetWriter(tmp, **writer_kwargs) as writer:
            yield writer
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


class BenchmarkWriter:
    """Add pools, query sets, qrels and evaluations to a benchmark folder; :meth:`save` writes benchmark.json.

    Example::

        bench = BenchmarkWriter("data/toy/eval", name="toy")
        with bench.pool_writer("toy_images") as w:
            w.write(make_sample(did, {"did": did, "modality": "image", "dataset": "toy"}, cand=Item(image=img)))
        with bench.query_writer("toy_t2i") as w:
            w.write(make_sample(qid, {...}, instruction="...", query=Item(text="a large red digit seven")))
        bench.write_qrels("toy_t2i", [f"{qid} 0 {did} 1 0"])
        bench.add_evaluation("toy_t2i", dataset="toy", task="t2i", query_modality="text",
                             cand_modality="image", pool="toy_images")
        bench.save()
    """

    def __init__(self, root: str | os.PathLike, name: str | None = None):
        self.root = Path(root)
        self.name = name
        self._pools: dict[str, str] = {}
        self._evaluations: dict[str, dict[str, Any]] = {}

    def pool_path(self, pool: str) -> Path:
        return self.root / "pools" / pool

    def queries_path(self, evaluation: str) -> Path:
        return self.root / "queries" / evaluation

    def qrels_path(self, evaluation: str) -> Path:
        return self.root / "qrels" / f"{evaluation}.txt"

    def existing(self) -> dict[str, Any]:
        """The benchmark.json on disk (an empty benchmark when there is none)."""
        path = self.root / BENCHMARK_FILE
        if path.is_file():
            return json.loads(path.read_text())
        return {"name": self.name or self.root.name, "pools": {}, "evaluations": []}

    @contextmanager
    def pool_writer(self, pool: str, **writer_kwargs: Any) -> Iterator[ShardSetWriter]:
        """Yield a ShardSetWriter (kwargs: max_count, source, converter) for pool ``pool``; declares it on success."""
        with replacing_shard_set(self.pool_path(pool), **writer_kwargs) as writer:
            yield writer
        self._pools[pool] = f"pools/{pool}"

    def query_writer(self, evaluation: str, **writer_kwargs: Any):
        """Context manager yielding a ShardSetWriter for the queries of ``evaluation``."""
        return replacing_shard_set(self.queries_path(evaluation), **writer_kwargs)

    def add_pool(self, pool: str) -> None:
        """Declare an already-written pool shard set (e.g. one reused from an earlier conversion)."""
        _require_shard_set(str(self.pool_path(pool)), f"pool {pool!r}")
        self._pools[pool] = f"pools/{pool}"

    def write_qrels(self, evaluation: str, lines: Iterable[str]) -> Path:
        """Write ``qid 0 did rel task_id`` lines (with or without trailing newlines) to qrels/<evaluation>.txt."""
        path = self.qrels_path(evaluation)
        _write_text_atomic(path, "".join(line.rstrip("\n") + "\n" for line in lines))
        return path

    def add_evaluation(
        self,
        name: str,
        *,
        dataset: str,
        task: str,
        query_modality: str,
        cand_modality: str,
        pool: str,
        ks: Iterable[int] = (1, 5, 10),
        report_k: int = 5,
    ) -> None:
        """Declare an evaluation whose queries and qrels were written with this writer (or earlier)."""
        ks = sorted(int(k) for k in ks)
        if report_k not in ks:
            raise ValueError(f"evaluation {name!r}: report_k={report_k} is not among ks {ks}")
        if pool not in self._pools and pool not in self.existing()["pools"]:
            raise ValueError(
                f"evaluation {name!r} uses pool {pool!r}, which is neither written nor declared in {self.root}"
            )
        _require_shard_set(str(self.queries_path(name)), f"queries of evaluation {name!r}")
        if not self.qrels_path(name).is_file():
            raise FileNotFoundError(f"qrels of evaluation {name!r}: {self.qrels_path(name)} is missing")
        self._evaluations[name] = {
            "name": name,
            "dataset": dataset,
            "task": task,
            "query_modality": query_modality,
            "cand_modality": cand_modality,
            "queries": f"queries/{name}",
            "pool": pool,
            "qrels": f"qrels/{name}.txt",
            "ks": ks,
            "report_k": report_k,
        }

    def save(self) -> Path:
        """Merge this writer's pools and evaluations into benchmark.json (same names are replaced) atomically.

        The file is re-read right before writing so that additions made by another writer since this one
        started are kept.
        """
        data = self.existing()
        if self.name:
            data["name"] = self.name
        data["pools"].update(self._pools)
        evaluations = {e["name"]: e for e in data["evaluations"]}
        evaluations.update(self._evaluations)  # a re-converted evaluation keeps its place in the list
        data["evaluations"] = list(evaluations.values())
        path = self.root / BENCHMARK_FILE
        _write_text_atomic(path, json.dumps(data, indent=1) + "\n")
        return path
