"""Inner-product search over L2-normalised embeddings with faiss (flat exact by default; IVF options for
pools in the millions; sharded over all GPUs when faiss has GPU support, as UniIR does)."""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

KINDS = ("flat", "ivf_flat", "ivf_pq")


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class EmbeddingIndex:
    """A faiss inner-product index.

    Args:
        dim: embedding size D.
        kind: ``flat`` (exact), ``ivf_flat`` or ``ivf_pq`` (approximate, for very large pools).
        nlist: IVF cells; pq_m: PQ sub-quantisers (must divide D); nprobe: cells visited per query.
        use_gpu: True, False or ``"auto"`` (GPU when faiss was built with it and a GPU is visible).
        gpu_shard: split the index over all GPUs instead of replicating it.
        add_batch, search_batch: chunk sizes that bound memory (fp16 input is converted chunk by chunk).
    """

    def __init__(self, dim: int, kind: str = "flat", nlist: int = 4096, pq_m: int = 64, nprobe: int = 32,
                 use_gpu: bool | str = "auto", gpu_shard: bool = True, add_batch: int = 262144, search_batch: int = 4096):
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; valid kinds: {list(KINDS)}")
        self.dim, self.kind, self.nlist, self.pq_m, self.nprobe = dim, kind, nlist, pq_m, nprobe
        self.add_batch, self.search_batch = add_batch, search_batch
        self.use_gpu = _gpu_available() if use_gpu == "auto" else bool(use_gpu)
        self.gpu_shard = gpu_shard
        if kind == "flat":
            cpu = faiss.IndexFlatIP(dim)
        else:
            quantizer = faiss.IndexFlatIP(dim)
            cpu = (faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT) if kind == "ivf_flat"
                   else faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT))
            cpu.nprobe = nprobe
            self._quantizer = quantizer  # keep alive: the IVF index borrows it
        self.index = self._to_gpu(cpu) if self.use_gpu else cpu

    def _to_gpu(self, cpu_index):
        options = faiss.GpuMultipleClonerOptions()
        options.shard = self.gpu_shard
        return faiss.index_cpu_to_all_gpus(cpu_index, co=options)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def add(self, embeddings: np.ndarray, progress: Callable[[int], None] | None = None) -> None:
        """Add ``[N, D]`` float32/float16 vectors (IVF kinds train on a seeded sample of the first call)."""
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings have dim {embeddings.shape[1]}, index expects {self.dim}")
        if not self.index.is_trained:
            if len(embeddings) < self.nlist:
                raise ValueError(f"{self.kind} with nlist={self.nlist} needs at least {self.nlist} vectors to train, "
                                 f"got {len(embeddings)}; lower eval.index.nlist or use kind=flat")
            sample = np.random.default_rng(0).choice(len(embeddings), min(len(embeddings), self.nlist * 64), replace=False)
            self.index.train(np.ascontiguousarray(embeddings[np.sort(sample)], dtype=np.float32))
        for start in range(0, len(embeddings), self.add_batch):
            chunk = np.ascontiguousarray(embeddings[start : start + self.add_batch], dtype=np.float32)
            self.index.add(chunk)
            if progress:
                progress(len(chunk))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: scores ``[Q, k]`` float32 and indices ``[Q, k]`` int64 (-1 past the pool size).

        Rows are re-sorted by (score desc, index asc) so ties never depend on faiss internals.
        """
        scores, indices = [], []
        for start in range(0, len(queries), self.search_batch):
            chunk = np.ascontiguousarray(queries[start : start + self.search_batch], dtype=np.float32)
            s, i = self.index.search(chunk, k)
            scores.append(s)
            indices.append(i)
        scores = np.concatenate(scores) if scores else np.zeros((0, k), np.float32)
        indices = np.concatenate(indices) if indices else np.zeros((0, k), np.int64)
        big = np.where(indices < 0, np.iinfo(np.int64).max, indices)
        order = np.lexsort((big, -scores), axis=1) if len(scores) else np.zeros_like(indices)
        return np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)

    def save(self, path: str) -> None:
        index = faiss.index_gpu_to_cpu(self.index) if self.use_gpu else self.index
        faiss.write_index(index, str(path))

    @classmethod
    def load(cls, path: str, use_gpu: bool | str = "auto") -> EmbeddingIndex:
        cpu = faiss.read_index(str(path))
        self = cls.__new__(cls)
        self.dim, self.kind = cpu.d, "flat" if isinstance(cpu, faiss.IndexFlat) else "ivf"
        self.add_batch, self.search_batch, self.gpu_shard = 262144, 4096, True
        self.use_gpu = _gpu_available() if use_gpu == "auto" else bool(use_gpu)
        self.index = self._to_gpu(cpu) if self.use_gpu else cpu
        return self


def exact_search(queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: ``queries [Q, D] @ candidates [N, D].T``, top-k with ties by lower index."""
    from unimm.eval.metrics import rank_candidates

    scores = np.asarray(queries, np.float32) @ np.asarray(candidates, np.float32).T
    idx = rank_candidates(scores, k)
    return np.take_along_axis(scores, idx, 1), idx
