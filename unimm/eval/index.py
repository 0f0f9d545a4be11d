"""Inner-product search over L2-normalised embeddings with faiss.

``flat`` is exact (UniIR's ``IDMap,Flat`` with ``METRIC_INNER_PRODUCT``; unimm returns pool row numbers, the
caller maps them to ids). ``ivf_flat`` / ``ivf_pq`` are approximate options for pools in the millions. When
faiss has GPU support the index is sharded over all GPUs (``index_cpu_to_all_gpus(shard=True)``, as UniIR).

Ties: faiss's heaps do not prefer the lower index (they return equal scores in reverse order and may drop
a lower index at the k boundary). :meth:`EmbeddingIndex.search` therefore re-sorts every row by
(score desc, index asc) and, for the exact CPU ``flat`` kind, re-resolves rows whose k-th score is tied with
a candidate outside the top k, so its results equal :func:`exact_search` whenever the scores are equal.
On GPU and for IVF kinds only the within-row order is guaranteed.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

KINDS = ("flat", "flat_fp16", "ivf_flat", "ivf_pq")


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _sort_rows(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (score desc, index asc); -1 padding (score -FLT_MAX) stays last."""
    order = np.lexsort((np.where(indices < 0, np.iinfo(np.int64).max, indices), -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)


class EmbeddingIndex:
    """A faiss inner-product index over a pool of N embeddings of size D.

    Args:
        dim: embedding size D.
        kind: ``flat`` (exact), ``ivf_flat`` or ``ivf_pq`` (approximate).
        nlist: IVF cells; pq_m: PQ sub-quantisers of 8 bits (must divide D); nprobe: cells visited per query.
        use_gpu: True, False or ``"auto"`` (GPU when faiss was built with it and a GPU is visible).
        gpu_shard: split the pool over all GPUs (True, UniIR's setting) instead of replicating it.
        normalize: L2-normalise pool and queries (UniIR calls ``faiss.normalize_L2``), so scores are cosines
            even for embeddings stored in fp16.
        add_batch, search_batch: chunk sizes that bound the float32 copies made of the inputs.
    """

    def __init__(self, dim: int, kind: str = "flat", nlist: int = 4096, pq_m: int = 64, nprobe: int = 32,
                 use_gpu: bool | str = "auto", gpu_shard: bool = True, normalize: bool = True,
                 add_batch: int = 262144, search_batch: int = 4096):
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        if kind == "ivf_pq" and dim % pq_m:
            raise ValueError(f"ivf_pq needs pq_m to divide dim; got pq_m={pq_m}, dim={dim}")
        self.dim, self.kind, self.nlist, self.pq_m, self.nprobe = dim, kind, nlist, pq_m, nprobe
        self.gpu_shard, self.normalize, self.add_batch, self.search_batch = gpu_shard, normalize, add_batch, search_batch
        self.use_gpu = _gpu_available() if use_gpu == "auto" else bool(use_gpu)
        if kind == "flat":
            self.index = self._to_gpu(faiss.IndexFlatIP(dim)) if self.use_gpu else faiss.IndexFlatIP(dim)
        elif kind == "flat_fp16":  # exhaustive search over vectors stored in half precision: half the memory
            self.index = (self._to_gpu(faiss.IndexFlatIP(dim)) if self.use_gpu else
                          faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT))
        else:
            self._quantizer = faiss.IndexFlatIP(dim)  # keep a Python reference: the IVF index borrows it
            self.index = (faiss.IndexIVFFlat(self._quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT) if kind == "ivf_flat"
                          else faiss.IndexIVFPQ(self._quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT))
            # IVF stays on CPU until trained (see add): training a sharded index would train every shard apart

    # -- GPU plumbing ------------------------------------------------------------------------------------
    def _to_gpu(self, cpu_index):
        options = faiss.GpuMultipleClonerOptions()
        options.shard = self.gpu_shard
        # fp16 storage for flat_fp16; for PQ, lookup tables of m=64 exceed shared memory in fp32
        options.useFloat16 = self.kind in ("ivf_pq", "flat_fp16")
        return faiss.index_cpu_to_all_gpus(cpu_index, co=options)

    def _set_nprobe(self) -> None:
        if self.kind.startswith("ivf"):
            space = faiss.GpuParameterSpace() if self.use_gpu else faiss.ParameterSpace()
            space.set_index_parameter(self.index, "nprobe", self.nprobe)

    def _as_float32(self, x: np.ndarray) -> np.ndarray:
        if not self.normalize:
            return np.ascontiguousarray(x, dtype=np.float32)
        x = np.array(x, dtype=np.float32, order="C", copy=True)  # normalize_L2 works in place: never on the caller's array
        faiss.normalize_L2(x)
        return x

    # -- public API -----------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self.index.ntotal)

    def add(self, embeddings: np.ndarray, progress: Callable[[int], None] | None = None) -> None:
        """Add ``[N, D]`` float32/float16 vectors; their rows become indices ``ntotal .. ntotal + N - 1``.

        IVF kinds train on the first call, on a seeded random sample of at most ``max(256 * nlist, 65536)``
        of its vectors (faiss's k-means itself never uses more than 256 points per centroid).
        ``progress(n)`` is called after each chunk with the number of vectors just added.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [N, {self.dim}], got shape {embeddings.shape}")
        if not self.index.is_trained:
            self._train(embeddings)
        for start in range(0, len(embeddings), self.add_batch):
            chunk = self._as_float32(embeddings[start : start + self.add_batch])
            self.index.add(chunk)
            if progress:
                progress(len(chunk))

    def _train(self, embeddings: np.ndarray) -> None:
        need = max(self.nlist, 256 if self.kind == "ivf_pq" else 0)  # 8-bit PQ needs 256 points per codebook
        if len(embeddings) < need:
            raise ValueError(f"{self.kind} with nlist={self.nlist} needs at least {need} vectors to train, got "
                             f"{len(embeddings)}; lower nlist or use kind=flat")
        size = min(len(embeddings), max(256 * self.nlist, 65536))
        rows = np.sort(np.random.default_rng(0).choice(len(embeddings), size, replace=False))
        sample = self._as_float32(embeddings[rows])
        if self.use_gpu:  # train on one GPU, then shard the trained index over all of them
            trainer = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self.index)
            trainer.train(sample)
            self.index = self._to_gpu(faiss.index_gpu_to_cpu(trainer))
        else:
            self.index.train(sample)
        self._set_nprobe()

    def search(self, queries: np.ndarray, k: int, progress: Callable[[int], None] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of ``[Q, D]`` queries in batches.

        Returns:
            scores ``[Q, k]`` float32 and indices ``[Q, k]`` int64, best first, ties by lower index; rows are
            padded with index -1 (score -3.4e38) when the pool has fewer than k vectors.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        exact_ties = self.kind == "flat" and not self.use_gpu
        scores, indices = [np.zeros((0, k), np.float32)], [np.zeros((0, k), np.int64)]
        for start in range(0, len(queries), self.search_batch):
            chunk = self._as_float32(queries[start : start + self.search_batch])
            # one extra result reveals a tie between the k-th best and a candidate left out
            s, i = _sort_rows(*self.index.search(chunk, k + 1 if exact_ties else k))
            if exact_ties:
                for r in np.flatnonzero((s[:, k] == s[:, k - 1]) & (i[:, k] >= 0)):
                    s[r, :k], i[r, :k] = self._resolve_tie(chunk[r], s[r, k - 1], k)
                s, i = s[:, :k], i[:, :k]
            scores.append(s)
            indices.append(i)
            if progress:
                progress(len(chunk))
        return np.concatenate(scores), np.concatenate(indices)

    def _resolve_tie(self, query: np.ndarray, kth: float, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of one query whose k-th score ``kth`` is shared with candidates outside the top k."""
        # every candidate scoring >= kth (with a little slack for rounding) can be in the top k
        lims, s, i = self.index.range_search(query[None], float(kth) - 1e-6 * max(1.0, abs(float(kth))))
        s, i = _sort_rows(s[None], i[None].astype(np.int64))
        return s[0, :k], i[0, :k]

    def save(self, path) -> None:
        """Write the index with ``faiss.write_index`` (a GPU index is copied to CPU first)."""
        faiss.write_index(faiss.index_gpu_to_cpu(self.index) if self.use_gpu else self.index, str(path))

    @classmethod
    def load(cls, path, use_gpu: bool | str = "auto", gpu_shard: bool = True, nprobe: int | None = None,
             normalize: bool = True) -> EmbeddingIndex:
        """Read an index written by :meth:`save`; ``nprobe`` defaults to the saved one."""
        cpu = faiss.read_index(str(path))
        self = cls.__new__(cls)
        ivf = faiss.try_extract_index_ivf(cpu)
        if ivf is None:
            self.kind = "flat_fp16" if isinstance(cpu, faiss.IndexScalarQuantizer) else "flat"
        else:
            self.kind = "ivf_pq" if isinstance(ivf, faiss.IndexIVFPQ) else "ivf_flat"
        self.dim, self.nlist = cpu.d, ivf.nlist if ivf is not None else 0
        self.pq_m = ivf.pq.M if self.kind == "ivf_pq" else 0
        self.nprobe = nprobe if nprobe is not None else (ivf.nprobe if ivf is not None else 0)
        self.gpu_shard, self.normalize, self.add_batch, self.search_batch = gpu_shard, normalize, 262144, 4096
        self.use_gpu = _gpu_available() if use_gpu == "auto" else bool(use_gpu)
        self.index = self._to_gpu(cpu) if self.use_gpu else cpu
        self._set_nprobe()
        return self


def exact_search(queries: np.ndarray, candidates: np.ndarray, k: int, batch: int = 1024
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: plain inner products ``queries [Q, D] @ candidates [N, D].T`` (no normalising).

    Returns scores ``[Q, min(k, N)]`` float32 and indices ``[Q, min(k, N)]`` int64, ties by lower index.
    """
    from unimm.eval.metrics import rank_candidates

    candidates = np.asarray(candidates, np.float32)
    scores, indices = [np.zeros((0, min(k, len(candidates))), np.float32)], [np.zeros((0, min(k, len(candidates))), np.int64)]
    for start in range(0, len(queries), batch):  # bounds the [batch, N] score matrix
        s = np.asarray(queries[start : start + batch], np.float32) @ candidates.T
        idx = rank_candidates(s, k)
        scores.append(np.take_along_axis(s, idx, 1))
        indices.append(idx)
    return np.concatenate(scores), np.concatenate(indices)
