"""The one retrieval evaluation of unimm: embed -> index -> metrics -> report.

Every rank embeds the shards it is dealt (no padding, no duplicates) and writes its part to disk; rank 0
merges the parts **sorted by sample key**, so the index and therefore every metric is identical with 1 or N
processes. Embeddings are cached on disk, keyed by everything that determines them (weights fingerprint,
processor and collator configuration, shard set identity, store dtype; :mod:`unimm.eval.cache`): several
evaluations over one pool encode it once, and a cache of another model is never read.

Data accounting: what was embedded is compared with what each shard set's ``index.json`` promises (queries and
pool), shortfalls are printed by reason and shard, stored under ``accounting/...`` in metrics.json and in
``accounting.json``, marked beside the number in the table, and fatal with ``data.strict=true``.
A query whose positives are all outside the pool counts as a miss (UniIR's rule); how many there were is reported.
Per-query outputs (TREC run file and JSONL per evaluation, :mod:`unimm.eval.per_query`) land in ``per_query/``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unimm.data.benchmark import EvaluationSpec, load_benchmark, read_qrels
from unimm.data.shards import read_index
from unimm.data.stream import DataError, fetch_records
from unimm.eval.cache import (
    CACHE_FORMAT,
    cache_key,
    claim,
    describe,
    release,
    shard_set_identity,
    weights_fingerprint,
)
from unimm.eval.index import EmbeddingIndex
from unimm.eval.metrics import count_no_positive, retrieval_metrics
from unimm.eval.per_query import PerQueryWriter, safe_name
from unimm.eval.report import grid_title, markdown_table, retrieval_grid, write_metrics_json
from unimm.utils.batches import to_device
from unimm.utils.progress import counter, is_rank_zero, track


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _from_rank_zero(obj):
    """``obj`` of rank 0 on every rank (itself without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def shard_accounting(shard_set: str, row_shards: Sequence[str], skipped: Counter) -> dict:
    """What was embedded from ``shard_set`` against what its ``index.json`` promises.

    Args:
        row_shards: the shard path of every embedded row; skipped: ``{(reason, shard path): n}`` from the stream.
    Returns:
        ``{"shard_set", "promised", "embedded", "missing", "skipped": {reason: n}, "unexplained",
        "shards": {shard name: {"promised", "embedded", "skipped": {reason: n}}}}`` (``shards``: only those that
        differ from their promise or skipped something; ``missing`` < 0 means more rows than promised).
    """
    index = read_index(shard_set)
    embedded = Counter(row_shards)
    by_reason: Counter = Counter()
    shards = {}
    for shard in index.shards:
        reasons = {r: n for (r, path), n in sorted(skipped.items()) if path == shard.path}
        by_reason.update(reasons)
        if embedded[shard.path] != shard.count or reasons:
            shards[os.path.basename(shard.path)] = {"promised": shard.count, "embedded": embedded[shard.path],
                                                    "skipped": reasons}
    missing = index.total - len(row_shards)
    return {"shard_set": str(shard_set), "promised": index.total, "embedded": len(row_shards), "missing": missing,
            "skipped": dict(by_reason), "unexplained": missing - sum(by_reason.values()), "shards": shards}


def describe_shortfall(what: str, acc: dict) -> str:
    """One console line: ``<what>: embedded 500 of 600 promised by index.json; missing 100: truncated_tar 100 in
    shard-000001.tar``."""
    line = f"{what}: embedded {acc['embedded']} of {acc['promised']} promised by index.json ({acc['shard_set']})"
    details = [f"{reason} {n} in {name}" for name, s in acc["shards"].items() for reason, n in s["skipped"].items()]
    details += [f"{name} holds {s['embedded']} of {s['promised']}" for name, s in acc["shards"].items() if not s["skipped"]]
    if acc["missing"] > 0 and acc["unexplained"] > 0:
        details.append(f"{acc['unexplained']} not explained by a skip reason")
    return line + (f"; {'missing ' + str(acc['missing']) if acc['missing'] > 0 else 'extra ' + str(-acc['missing'])}: "
                   + ", ".join(details) if details else "")


@dataclass
class Embeddings:
    """Embeddings of one shard set in key order: ``vectors`` ``[N, D]``, with the key, meta and shard of each row."""

    vectors: np.ndarray
    keys: list[str]
    metas: list[dict]
    shards: list[str]
    accounting: dict | None = None  # see shard_accounting: embedded vs promised by index.json


def aligned_scores(sims: np.ndarray, ranked: np.ndarray, reranked: np.ndarray) -> np.ndarray:
    """The search scores ``[Q, K]`` of ``reranked`` ``[Q, K]`` (a per-row permutation of ``ranked`` ``[Q, K]``, whose
    scores are ``sims`` ``[Q, K]``); a candidate not in its row of ``ranked`` gets NaN."""
    if reranked is ranked or np.array_equal(reranked, ranked):
        return sims
    out = np.empty(reranked.shape, np.float32)
    for q in range(len(ranked)):
        score_of = dict(zip(ranked[q].tolist(), sims[q].tolist()))
        out[q] = [score_of.get(c, np.nan) for c in reranked[q].tolist()]
    return out


class RetrievalEvaluator:
    """Evaluate an embedding module on a benchmark folder (see :mod:`unimm.data.benchmark`).

    Args:
        benchmark: the benchmark folder (with ``benchmark.json``).
        evaluations: names of the evaluations to run (default: all).
        index: keyword arguments of :class:`~unimm.eval.index.EmbeddingIndex` (kind, nlist, ...).
        store_dtype: dtype of cached embeddings on disk (``float16`` halves the footprint of large pools).
        autocast: ``bf16`` to embed under bfloat16 autocast (GPU), or null for full precision.
        grid_queries: how many queries per evaluation to draw in the examples grid (0 = none).
        grid_k: candidates per query in the grid.
        prefix: metric name prefix; names are ``<prefix>/<benchmark>/<evaluation>/<metric>``.
        per_query_top_k: results written per query in ``per_query/`` (None = the largest reported k, at least 10).
        cache_wait_s: how long to wait for another process writing the same embedding cache before embedding
            into a private one (:func:`unimm.eval.cache.claim`).
        cache_dir: where embedding caches live (None = ``<output_dir>/embeddings``). Caches are keyed by content
            (weights, processor, shard set), so one folder can be shared by runs and benchmarks safely.
    """

    def __init__(
        self,
        benchmark: str,
        evaluations: Sequence[str] | None = None,
        index: dict | None = None,
        store_dtype: str = "float16",
        autocast: str | None = None,
        grid_queries: int = 4,
        grid_k: int = 5,
        prefix: str = "val",
        per_query_top_k: int | None = None,
        cache_wait_s: float = 600.0,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.benchmark = benchmark
        self.evaluations = list(evaluations) if evaluations else None
        self.index_kwargs = dict(index or {})
        self.store_dtype = np.dtype(store_dtype)
        self.autocast = autocast
        self.grid_queries = grid_queries
        self.grid_k = grid_k
        self.prefix = prefix
        self.per_query_top_k = per_query_top_k
        self.cache_wait_s = cache_wait_s
        self.cache_dir = cache_dir
        self._index: tuple[Embeddings, EmbeddingIndex] | None = None  # (pool, its index) while run() is in progress
        self._model_key: tuple[object, dict] | None = None  # (module, its cache-key parts) while run() is in progress
        self._last: dict = {}  # the last score(): result scores aligned with the ranking, no-positive count
        self.accounting: dict[str, dict] = {}  # evaluation -> its data accounting (rank 0)
        self._reported: set[str] = set()  # shard sets whose shortfall was already printed

    def begin_run(self, module) -> None:
        """Forget what belongs to a previous run (the weights may have changed since)."""
        self._index, self._model_key, self._last = None, None, {}
        self.accounting, self._reported = {}, set()

    def cache_root(self, output_dir: str | os.PathLike) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(output_dir) / "embeddings"

    def cache_parts(self, module, datamodule, shard_set: str, side: str) -> dict:
        """Everything that determines the embeddings of ``shard_set`` (hashed into the cache folder name)."""
        if self._model_key is None or self._model_key[0] is not module:
            self._model_key = (module, {
                "format": CACHE_FORMAT, "weights": weights_fingerprint(module, all_ranks=True),
                "module": type(module).__qualname__,
                "processor": describe(datamodule.processor), "collator": describe(datamodule.collator),
                "eval_batch_size": getattr(datamodule, "eval_batch_size", None),
                "eval_sort_window": getattr(datamodule, "eval_sort_window", None),
                "store_dtype": str(self.store_dtype), "autocast": self.autocast,
            })
        return {**self._model_key[1], "side": side, "shard_set": shard_set_identity(shard_set)}

    # -- embedding -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, module, datamodule, shard_set: str, side: str, cache_root: Path) -> Embeddings | None:
        """Embed every record of ``shard_set`` over all ranks; rank 0 returns the merged result (others None).

        Cached under ``cache_root/<side>-<set>-<key>``, ``key`` the hash of :meth:`cache_parts`; a folder being
        written by another process is waited for (or left to it: :func:`unimm.eval.cache.claim`).
        """
        rank, world = _rank_world()
        parts = self.cache_parts(module, datamodule, shard_set, side)
        key = cache_key(parts)
        cache_dir = Path(cache_root) / f"{side}-{safe_name(Path(shard_set).name)}-{key}"
        cache_dir, must_write = _from_rank_zero(claim(cache_dir, self.cache_wait_s) if rank == 0 else None)
        if must_write:
            try:
                self._embed_part(module, datamodule, shard_set, side, cache_dir, rank)
                _barrier()
                if rank == 0:
                    self._merge(cache_dir, world, shard_set, key, parts)
            finally:
                if rank == 0:
                    release(cache_dir)
            _barrier()
        if rank != 0:
            return None
        with open(cache_dir / "embeddings.json") as f:
            info = json.load(f)
        if info.get("key") != key:  # belt and braces: the folder name already is the key
            raise RuntimeError(f"embedding cache {cache_dir} was written for other inputs (key {info.get('key')}, "
                               f"expected {key}); delete it")
        return Embeddings(np.load(cache_dir / "embeddings.npy", mmap_mode="r"), info["keys"], info["metas"],
                          info["shards"], info.get("accounting"))

    def _embed_part(self, module, datamodule, shard_set: str, side: str, cache_dir: Path, rank: int) -> None:
        """This rank's share of ``shard_set``: ``part-<rank>.npy`` (vectors) and ``part-<rank>.json`` (keys, metas,
        shards, skipped samples by reason and shard)."""
        encode = module.encode_query if side == "query" else module.encode_candidate
        loader = datamodule.eval_loader(shard_set, sides=(side,))
        vectors, keys, metas, shards = [], [], [], []
        skipped: Counter = Counter()
        dtype = torch.bfloat16 if self.autocast == "bf16" else None
        for batch in track(loader, f"embedding {Path(shard_set).name}", total=len(loader.dataset)):
            skipped.update(batch["stats"].skipped)
            if not batch["keys"]:
                continue
            with torch.autocast(module.device.type, dtype=dtype, enabled=dtype is not None):
                emb = encode(to_device(batch[side], module.device))
            vectors.append(emb.float().cpu().numpy().astype(self.store_dtype))
            keys += batch["keys"]
            metas += batch["meta"]
            shards += batch["shards"]
        dim = vectors[0].shape[1] if vectors else 0
        np.save(cache_dir / f"part-{rank}.npy", np.concatenate(vectors) if vectors else np.zeros((0, dim), self.store_dtype))
        with open(cache_dir / f"part-{rank}.json", "w") as f:
            json.dump({"keys": keys, "metas": metas, "shards": shards,
                       "skipped": [[reason, shard, n] for (reason, shard), n in skipped.items()]}, f)

    def _merge(self, cache_dir: Path, world: int, shard_set: str, key: str, parts: dict) -> None:
        arrays = [np.load(cache_dir / f"part-{r}.npy") for r in range(world)]
        infos = [json.load(open(cache_dir / f"part-{r}.json")) for r in range(world)]
        nonempty = [p for p in arrays if len(p)]
        dim = max((p.shape[1] for p in arrays), default=0)
        vectors = np.concatenate(nonempty) if nonempty else np.zeros((0, dim), self.store_dtype)
        keys = [k for i in infos for k in i["keys"]]
        metas = [m for i in infos for m in i["metas"]]
        shards = [s for i in infos for s in i["shards"]]
        if len(set(keys)) != len(keys):
            raise RuntimeError(f"duplicate sample keys while merging embeddings in {cache_dir}")
        skipped: Counter = Counter()
        for info in infos:
            skipped.update({(reason, shard): n for reason, shard, n in info["skipped"]})
        order = sorted(range(len(keys)), key=keys.__getitem__)  # rank-count independent order
        tmp = cache_dir / "embeddings.tmp.npy"
        np.save(tmp, vectors[order])
        with open(cache_dir / "embeddings.json", "w") as f:
            json.dump({
                "key": key, "key_parts": parts,
                "keys": [keys[i] for i in order], "metas": [metas[i] for i in order], "shards": [shards[i] for i in order],
                "accounting": shard_accounting(shard_set, shards, skipped),
            }, f, default=str)
        os.replace(tmp, cache_dir / "embeddings.npy")  # the cache counts as complete only once this exists
        for r in range(world):
            (cache_dir / f"part-{r}.npy").unlink()
            (cache_dir / f"part-{r}.json").unlink()

    # -- scoring -------------------------------------------------------------------------------------------
    def score(self, spec: EvaluationSpec, queries: Embeddings, pool: Embeddings) -> tuple[dict[str, float], np.ndarray, list[set[int]]]:
        """Metrics of one evaluation, plus the ranked candidate indices ``[Q, K]`` and positives per query."""
        qrels = read_qrels(spec.qrels)
        did_to_row = {m.get("did", k): i for i, (k, m) in enumerate(zip(pool.keys, pool.metas))}
        qids = [m.get("qid", k) for k, m in zip(queries.keys, queries.metas)]
        # positives outside the pool can never be retrieved: a query left with none counts as a miss (UniIR)
        positives = [{did_to_row[d] for d in qrels.get(qid, ()) if d in did_to_row} for qid in qids]
        index = self.pool_index(pool, spec.pool)
        k = max(max(spec.ks), self.grid_k, self.search_depth(len(pool.keys)), self.per_query_depth(spec.ks))
        with counter(f"searching {spec.name}", len(queries.keys)) as advance:
            sims, ranked = index.search(np.asarray(queries.vectors, dtype=np.float32), k, progress=advance)
        reranked = self.rerank(spec, queries, pool, sims, ranked)
        self._last = {"scores": aligned_scores(sims, ranked, reranked), "no_positive": count_no_positive(positives)}
        metrics = retrieval_metrics(reranked, positives, list(spec.ks), query_ids=qids, pool_size=len(pool.keys),
                                    no_positive="miss")
        return metrics, reranked, positives

    def per_query_depth(self, ks: Sequence[int]) -> int:
        """Results written per query: ``per_query_top_k``, or the largest reported k and at least 10."""
        return int(self.per_query_top_k) if self.per_query_top_k else max(max(ks), 10)

    def pool_index(self, pool: Embeddings, name: str = "pool") -> EmbeddingIndex:
        """The faiss index of ``pool``, built once per pool and run (the 16 M-BEIR evaluations share a global pool)."""
        if self._index is None or self._index[0] is not pool:
            index = EmbeddingIndex(pool.vectors.shape[1], **self.index_kwargs)
            with counter(f"indexing {name}", len(pool.keys)) as advance:
                index.add(pool.vectors, progress=advance)
            self._index = (pool, index)
        return self._index[1]

    def search_depth(self, pool_size: int) -> int:
        """Hook: candidates :meth:`rerank` needs per query, beyond the reported cutoffs (none here)."""
        return 0

    def rerank(self, spec: EvaluationSpec, queries: Embeddings, pool: Embeddings, sims: np.ndarray,
               ranked: np.ndarray) -> np.ndarray:
        """Hook: re-order the search results ``ranked`` ``[Q, K]`` (scores ``sims``); the embedding order here."""
        return ranked

    def run(self, module, datamodule, output_dir: str | os.PathLike, logger=None, tag: str = "") -> dict[str, float]:
        """Evaluate on every rank (all ranks must call it); returns the metrics on every rank."""
        self.begin_run(module)
        bench = load_benchmark(self.benchmark)
        wanted = self.evaluations or [e.name for e in bench.evaluations]
        by_name = {e.name: e for e in bench.evaluations}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(f"unknown evaluation(s) {unknown} in {self.benchmark}; available: {sorted(by_name)}")
        output_dir = Path(output_dir)
        cache = self.cache_root(output_dir)
        writer = PerQueryWriter(output_dir, bench.name, tag) if is_rank_zero() else None
        was_training = module.training
        module.eval()
        pools = {}
        results: dict[str, float] = {}
        table: dict[tuple[str, str], float] = {}
        rows, grids = [], {}
        for name in wanted:
            spec = by_name[name]
            if spec.pool not in pools:
                pools[spec.pool] = self.embed(module, datamodule, bench.pools[spec.pool], "cand", cache)
            queries = self.embed(module, datamodule, spec.queries, "query", cache)
            if is_rank_zero():
                self.account(name, spec.pool, queries, pools[spec.pool], datamodule)  # before any number is shown
                metrics, ranked, positives = self.score(spec, queries, pools[spec.pool])
                self.note_no_positive(name, len(queries.keys))
                self.write_per_query(writer, spec, queries, pools[spec.pool], ranked, positives, metrics)
                row = (f"{spec.task} / {spec.dataset}" if spec.task else name) + self.row_note(name)
                rows.append(row)
                for metric, value in metrics.items():
                    results[f"{self.prefix}/{bench.name}/{name}/{metric}"] = value
                    table[(row, metric)] = value
                table[(row, f"R@{spec.report_k}")] = metrics[f"hit@{spec.report_k}"]
                if self.grid_queries:
                    grids[name] = self._grid(queries, pools[spec.pool], ranked, positives,
                                             title=grid_title(bench.name, row, module, tag))
        if was_training:
            module.train()
        if is_rank_zero():
            results[f"{self.prefix}/{bench.name}/average"] = float(np.mean([table[(r, c)] for (r, c) in table if c.startswith("R@")]))
            results.update(self.accounting_metrics(bench.name))
            self.write_accounting(output_dir)
            self._report(bench.name, rows, table, results, grids, output_dir, logger)
            writer.close(logger)
        return self._broadcast(results)

    # -- data accounting -----------------------------------------------------------------------------------
    def account(self, evaluation: str, pool_name: str | None, queries: Embeddings, pool: Embeddings | None, datamodule,
                extra: dict | None = None) -> None:
        """Compare what was embedded with what ``index.json`` promises (queries and pool; rank 0): print each
        shortfall once per shard set, keep it for metrics.json and the table, stop under ``data.strict=true``."""
        record = {"queries": queries.accounting, "pool": pool.accounting if pool is not None else None,
                  "pool_name": pool_name, **(extra or {})}
        self.accounting[evaluation] = record
        problems = []
        for what, acc in ((f"queries of {evaluation}", record["queries"]), (f"pool {pool_name}", record["pool"])):
            if acc and (acc["missing"] or acc["shards"]):
                problems.append(describe_shortfall(what, acc))
                if acc["shard_set"] not in self._reported:
                    self._reported.add(acc["shard_set"])
                    print(f"[eval] {problems[-1]}")
        if problems and getattr(datamodule, "strict", False):
            raise DataError("evaluation data differs from index.json (data.strict=true):\n  " + "\n  ".join(problems))

    def note_no_positive(self, evaluation: str, n_queries: int) -> None:
        """Record (and print) how many queries of the last :meth:`score` had no positive in the pool."""
        n = int(self._last.get("no_positive", 0))
        self.accounting.setdefault(evaluation, {})["no_positive_queries"] = n
        if n:
            print(f"[eval] {evaluation}: {n} of {n_queries} queries have no positive in the pool; counted as misses "
                  "(as UniIR)")

    def row_note(self, evaluation: str) -> str:
        """What to print beside an evaluation's number when its data differ from the promise, e.g.
        `` (pool: 500/600 candidates)``; empty when everything promised was embedded."""
        record = self.accounting.get(evaluation, {})
        notes = []
        for what, unit in (("pool", "candidates"), ("queries", "queries")):
            acc = record.get(what)
            if acc and acc["embedded"] != acc["promised"]:
                notes.append(f"{what}: {acc['embedded']}/{acc['promised']} {unit}")
        if record.get("no_positive_queries"):
            notes.append(f"{record['no_positive_queries']} queries without positive in pool")
        return f" ({'; '.join(notes)})" if notes else ""

    def table_footnote(self) -> str:
        """A line under the table when some row carries a note (empty otherwise)."""
        if not any(self.row_note(e) for e in self.accounting):
            return ""
        return ("\n\nNotes in brackets: data that differ from what index.json promises (a pool that lost candidates "
                "is a different benchmark; details by reason and shard in accounting.json), and queries whose "
                "positives are all outside the pool (counted as misses, as UniIR).")

    def accounting_metrics(self, bench_name: str) -> dict[str, float]:
        """Flat numbers for metrics.json and the logger: ``accounting/<benchmark>/<evaluation>/<what>``."""
        out: dict[str, float] = {}
        for evaluation, record in self.accounting.items():
            head = f"accounting/{bench_name}/{evaluation}"
            for what in ("queries", "pool"):
                acc = record.get(what)
                if not acc:
                    continue
                out[f"{head}/{what}_promised"] = float(acc["promised"])
                out[f"{head}/{what}_embedded"] = float(acc["embedded"])
                for reason, n in acc["skipped"].items():
                    out[f"{head}/{what}_skipped/{reason}"] = float(n)
            for name, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{head}/{name}"] = float(value)
        return out

    def write_accounting(self, output_dir: Path) -> None:
        """``accounting.json``: every evaluation's accounting by reason and shard (rank 0)."""
        if self.accounting:
            write_metrics_json(Path(output_dir) / "accounting.json", self.accounting)

    # -- per-query outputs ---------------------------------------------------------------------------------
    def write_per_query(self, writer: PerQueryWriter, spec: EvaluationSpec, queries: Embeddings, pool: Embeddings,
                        ranked: np.ndarray, positives: list[set[int]], metrics: dict[str, float]) -> None:
        """``per_query/<evaluation>.trec`` and ``.jsonl`` of the last :meth:`score` (see docs/per_query_outputs.md)."""
        ks = sorted(int(m.split("@")[1]) for m in metrics if m.startswith("hit@"))
        main = f"hit@{spec.report_k}" if f"hit@{spec.report_k}" in metrics else f"hit@{ks[0]}"
        writer.pool(spec.name, dataset=spec.dataset, task=spec.task, query_modality=spec.query_modality,
                    query_keys=queries.keys, query_metas=queries.metas, pool_keys=pool.keys, ranked=ranked,
                    scores=self._last["scores"], positives=positives, ks=ks,
                    k=min(self.per_query_depth(ks), ranked.shape[1]), queries_path=spec.queries,
                    pool_path=self.pool_path(spec), metric=main, value=metrics[main])

    def pool_path(self, spec: EvaluationSpec) -> str | None:
        """The shard set holding the candidates an evaluation ranks (the M-BEIR global pool has several: None)."""
        return spec.pool_path

    # -- output --------------------------------------------------------------------------------------------
    def _grid(self, queries: Embeddings, pool: Embeddings, ranked: np.ndarray, positives: list[set[int]],
              title: str | None = None):
        n = min(self.grid_queries, len(queries.keys))
        wanted: dict[str, set[str]] = {}
        for q in range(n):
            wanted.setdefault(queries.shards[q], set()).add(queries.keys[q])
            for c in ranked[q, : self.grid_k]:
                if c >= 0:
                    wanted.setdefault(pool.shards[c], set()).add(pool.keys[c])
        records = fetch_records(wanted)
        rows, notes = [], []
        for q in range(n):
            query = records[queries.keys[q]]
            # the tile shows the query's own text (e.g. the it2i modification); the instruction goes aside (a
            # header line when shared by the rows): on the tile it crowded out the text that differs between rows
            notes.append(query.instruction)
            cands = [int(c) for c in ranked[q, : self.grid_k] if c >= 0]
            rows.append((query.sides["query"], [records[pool.keys[c]].sides["cand"] for c in cands],
                         [c in positives[q] for c in cands]))
        return retrieval_grid(rows, title=title, notes=notes)

    def _report(self, bench_name, rows, table, results, grids, output_dir: Path, logger) -> None:
        columns = sorted({c for (_, c) in table}, key=lambda c: (not c.startswith("R@"), c.split("@")[0], int(c.split("@")[1])))
        text = markdown_table(rows, columns, table, title=f"Retrieval on {bench_name} (R@k = hit@k, M-BEIR's 'Recall@k')",
                              average_over="each_column", row_header="task / dataset")
        text += self.table_footnote()
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / f"retrieval_{bench_name}.md").write_text(text + "\n")
        write_metrics_json(output_dir / "metrics.json", results)
        for name, image in grids.items():
            image.save(output_dir / f"examples_{bench_name}_{name}.png")
        print(text)
        if logger is not None:
            if hasattr(logger, "log_table"):
                logger.log_table(key=f"{self.prefix}/{bench_name}/table", columns=["task / dataset", *columns],
                                 data=[[r, *[table.get((r, c)) for c in columns]] for r in rows])
            if hasattr(logger, "log_image") and grids:
                logger.log_image(key=f"{self.prefix}/{bench_name}/examples", images=list(grids.values()), caption=list(grids))
            logger.log_metrics(results)

    @staticmethod
    def _broadcast(results: dict[str, float]) -> dict[str, float]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            box = [results]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]
        return results
