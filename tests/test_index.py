"""The faiss index against brute-force numpy ranking, ties, IVF-PQ quality, persistence and errors."""

import faiss
import numpy as np
import pytest

from unimm.eval.index import EmbeddingIndex, exact_search


def normalised(rng, n, d=32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_topk(queries, pool, k):
    """Reference written without the code under test: full argsort by (-score, index)."""
    s = queries @ pool.T
    idx = np.array([np.lexsort((np.arange(len(row)), -row))[:k] for row in s])
    return np.take_along_axis(s, idx, 1), idx


def test_flat_equals_brute_force():
    rng = np.random.default_rng(0)
    pool, queries = normalised(rng, 1000), normalised(rng, 50)
    index = EmbeddingIndex(32, use_gpu=False, search_batch=16)  # several query batches
    seen = []
    index.add(pool, progress=seen.append)
    assert index.ntotal == 1000 and sum(seen) == 1000
    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = numpy_topk(queries, pool, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (50, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    np.testing.assert_array_equal(exact_search(queries, pool, 10)[1], ref_ids)


@pytest.mark.parametrize("n_queries", [1, 40])  # faiss uses a different kernel from 20 queries on
def test_flat_ties_by_lower_index(n_queries):
    # one-hot vectors give exact scores (1 or 0) whatever the summation order, so ties are real ties
    rng = np.random.default_rng(1)
    eye = np.eye(8, dtype=np.float32)
    labels = rng.integers(0, 3, 300)
    pool = eye[labels]
    qlabels = rng.integers(0, 3, n_queries)
    index = EmbeddingIndex(8, use_gpu=False)
    index.add(pool)
    for k in (5, 120, 200):  # inside the score-1 ties, and across the 1 -> 0 boundary into the 0 ties
        _, ids = index.search(eye[qlabels], k)
        for q, lab in enumerate(qlabels):
            same = np.flatnonzero(labels == lab)  # score 1, in index order
            other = np.flatnonzero(labels != lab)  # score 0, in index order
            assert ids[q].tolist() == np.concatenate([same, other])[:k].tolist()


def test_fp16_input_and_padding():
    rng = np.random.default_rng(2)
    pool, queries = normalised(rng, 20), normalised(rng, 3)
    index = EmbeddingIndex(32, use_gpu=False)
    index.add(pool.astype(np.float16))
    scores, ids = index.search(queries.astype(np.float16), 25)
    # reference on the fp16-rounded vectors, renormalised as the index does
    pool16, queries16 = (x.astype(np.float16).astype(np.float32) for x in (pool, queries))
    pool16 /= np.linalg.norm(pool16, axis=1, keepdims=True)
    queries16 /= np.linalg.norm(queries16, axis=1, keepdims=True)
    ref_scores, ref_ids = numpy_topk(queries16, pool16, 20)
    np.testing.assert_array_equal(ids[:, :20], ref_ids)
    np.testing.assert_allclose(scores[:, :20], ref_scores, atol=1e-5)
    assert (ids[:, 20:] == -1).all()  # pool smaller than k: faiss pads


def test_ivf_pq_recall_on_clustered_data():
    rng = np.random.default_rng(3)
    centres = normalised(rng, 20)
    pool = centres[rng.integers(0, 20, 2000)] + 0.3 * rng.standard_normal((2000, 32)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = pool[rng.choice(2000, 50, replace=False)] + 0.05 * normalised(rng, 50)
    index = EmbeddingIndex(32, kind="ivf_pq", nlist=16, pq_m=16, nprobe=4, use_gpu=False)  # visits 1/4 of the cells
    index.add(pool)
    _, approx = index.search(queries, 10)
    _, exact = numpy_topk(queries / np.linalg.norm(queries, axis=1, keepdims=True), pool, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.8, recall


@pytest.mark.parametrize("kind", ["flat", "ivf_flat"])
def test_save_load_round_trip(tmp_path, kind):
    rng = np.random.default_rng(4)
    pool, queries = normalised(rng, 500), normalised(rng, 10)
    index = EmbeddingIndex(32, kind=kind, nlist=8, nprobe=3, use_gpu=False)
    index.add(pool)
    before = index.search(queries, 7)
    index.save(tmp_path / "pool.faiss")
    loaded = EmbeddingIndex.load(tmp_path / "pool.faiss", use_gpu=False)
    assert (loaded.kind, loaded.ntotal, loaded.dim) == (kind, 500, 32)
    assert kind == "flat" or loaded.nprobe == 3
    after = loaded.search(queries, 7)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_unknown_kind_lists_choices():
    with pytest.raises(ValueError, match="'hnsw'.*flat, flat_fp16, ivf_flat, ivf_pq"):
        EmbeddingIndex(32, kind="hnsw")


def test_too_few_vectors_to_train():
    index = EmbeddingIndex(32, kind="ivf_flat", nlist=64, use_gpu=False)
    with pytest.raises(ValueError, match=r"nlist=64 needs at least 64 vectors.*got 10"):
        index.add(normalised(np.random.default_rng(5), 10))


def test_caller_array_not_modified():
    x = np.full((4, 32), 2.0, np.float32)  # not unit length: the index normalises its own copy
    index = EmbeddingIndex(32, use_gpu=False)
    index.add(x)
    index.search(x, 1)
    assert (x == 2.0).all()


def test_flat_fp16_halves_memory_and_keeps_exact_ranking_on_separated_data():
    rng = np.random.default_rng(1)
    pool = rng.standard_normal((500, 32)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = pool[:40] + 0.01 * rng.standard_normal((40, 32)).astype(np.float32)
    index = EmbeddingIndex(32, kind="flat_fp16", use_gpu=False)
    index.add(pool)
    _, idx = index.search(queries, 1)
    assert idx[:, 0].tolist() == list(range(40))  # each query's own vector, despite fp16 storage
    assert faiss.serialize_index(index.index).nbytes < 0.6 * 500 * 32 * 4
