"""Embedding caches (issue 15 item 2): keyed by the weights fingerprint, the processor / collator and the shard set,
so two models evaluated into one folder at the same step never share embeddings; one writer at a time.
Before: the cache was keyed by the step tag inside the run folder and a second model printed the first one's table."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests._word_modules import word_datamodule, write_text_benchmark
from unimm.eval.cache import (
    LOCK_FILE,
    claim,
    describe,
    release,
    shard_set_identity,
    try_lock,
    weights_fingerprint,
)
from unimm.eval.retrieval import RetrievalEvaluator

WORDS = [f"w{i}" for i in range(40)]


class WordEmbedder(torch.nn.Module):
    """Mean of learned word vectors over the text (a real parametric encoder: its weights decide the ranking)."""

    def __init__(self, seed: int, dim: int = 8):
        super().__init__()
        self.table = torch.nn.Embedding(4 + len(WORDS), dim)
        with torch.no_grad():
            self.table.weight.copy_(torch.randn(self.table.weight.shape, generator=torch.Generator().manual_seed(seed)))

    @property
    def device(self):
        return self.table.weight.device

    def encode_query(self, side):
        mask = side["attention_mask"].unsqueeze(-1).float()
        return (self.table(side["input_ids"]) * mask).sum(1) / mask.sum(1)

    encode_candidate = encode_query


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """40 text candidates "w<i>"; 40 queries "w<i> w<i+7> w<i+13>" (mod 40) -> candidate i: which candidate
    comes first depends on the word vectors, i.e. on the weights."""
    return write_text_benchmark(
        tmp_path_factory.mktemp("cachebench"), WORDS, [(f"c{i:02d}", f"d{i}", word) for i, word in enumerate(WORDS)],
        [(f"q{i:02d}", f"q{i}", f"{word} {WORDS[(i + 7) % 40]} {WORDS[(i + 13) % 40]}") for i, word in enumerate(WORDS)],
        [f"q{i} 0 d{i} 1 0" for i in range(len(WORDS))], ks=(1, 3), report_k=3)


def _datamodule(bench, max_length=32):
    return word_datamodule(bench / "vocab.txt", 4, max_length=max_length)


def _run(bench, module, out, tag="step10", **kwargs):
    return RetrievalEvaluator(str(bench / "eval"), grid_queries=0, **kwargs).run(module, _datamodule(bench), out, tag=tag)


def _table(out):
    return (out / "retrieval_toy.md").read_text()


def test_two_models_into_one_folder_at_the_same_step_give_their_own_tables(bench, tmp_path):
    """Two runs (other seeds) writing into one folder with the same tag: each table is its own model's, equal to
    that model evaluated alone in a fresh folder."""
    a, b = WordEmbedder(seed=1), WordEmbedder(seed=2)
    alone_a, alone_b = _run(bench, a, tmp_path / "a"), _run(bench, b, tmp_path / "b")
    assert alone_a != alone_b  # the two models rank differently (else the test proves nothing)
    shared = tmp_path / "shared"
    first = _run(bench, a, shared)
    table_a = _table(shared)
    second = _run(bench, b, shared)
    assert first == alone_a and second == alone_b
    assert _table(shared) != table_a and _table(shared) == _table(tmp_path / "b")
    # and evaluating A again reuses A's cache (nothing re-encoded) with A's numbers
    caches = sorted(p.name for p in (shared / "embeddings").iterdir())
    assert len(caches) == 4  # {pool, queries} x {A, B}
    assert _run(bench, a, shared) == alone_a
    assert sorted(p.name for p in (shared / "embeddings").iterdir()) == caches


def test_two_checkpoints_of_one_model_at_the_same_step_do_not_mix(bench, tmp_path):
    """Same class, same step tag, weights differing in one element only: different caches, own results."""
    a = WordEmbedder(seed=3)
    b = WordEmbedder(seed=3)
    with torch.no_grad():
        b.table.weight[4 + 0, 0] += 10.0  # word "w0" moves
    assert weights_fingerprint(a) != weights_fingerprint(b)
    out = tmp_path / "eval"
    ra, rb = _run(bench, a, out), _run(bench, b, out)
    assert ra != rb  # the changed weight changes the result (with a step-keyed cache B printed A's numbers)
    assert rb == _run(bench, b, tmp_path / "fresh")
    assert ra == _run(bench, a, tmp_path / "fresh_a")
    queries = [p for p in (out / "embeddings").iterdir() if p.name.startswith("query-")]
    assert len(queries) == 2


def test_weights_fingerprint_is_bit_exact_and_device_free():
    a, b = WordEmbedder(seed=0), WordEmbedder(seed=0)
    assert weights_fingerprint(a) == weights_fingerprint(b)  # equal weights, other instance
    assert len(weights_fingerprint(a)) == 32
    with torch.no_grad():
        b.table.weight.view(-1)[-1] = torch.nextafter(b.table.weight.view(-1)[-1], torch.tensor(1e9))  # one ulp
    assert weights_fingerprint(a) != weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(WordEmbedder(seed=0).half())  # dtype counts
    if torch.cuda.is_available():
        assert weights_fingerprint(WordEmbedder(seed=0).cuda()) == weights_fingerprint(a)


def test_processor_and_shard_set_changes_change_the_key(bench, tmp_path):
    assert describe(_datamodule(bench).processor) == describe(_datamodule(bench).processor)
    assert describe(_datamodule(bench).processor) != describe(_datamodule(bench, max_length=3).processor)
    assert "0x" not in json.dumps(describe(_datamodule(bench).collator))  # no memory addresses in a key
    pool = bench / "eval" / "pools" / "pool"
    before = shard_set_identity(pool)
    index = pool / "index.json"
    text = index.read_text()
    try:
        index.write_text(text.replace('"total"', '"total" ', 1))  # other bytes, same set: another identity
        assert shard_set_identity(pool) != before
    finally:
        index.write_text(text)
    # a shorter processor max_length gives other embeddings, in another cache folder
    m = WordEmbedder(seed=5)
    out = tmp_path / "out"
    RetrievalEvaluator(str(bench / "eval"), grid_queries=0).run(m, _datamodule(bench), out)
    RetrievalEvaluator(str(bench / "eval"), grid_queries=0).run(m, _datamodule(bench, max_length=3), out)
    assert len(list((out / "embeddings").iterdir())) == 4


def test_a_second_writer_waits_then_uses_its_own_folder(bench, tmp_path):
    """A cache folder locked by a live process is not written into: after cache_wait_s the evaluation embeds into
    a private folder (same numbers); a lock left by a dead process is taken over."""
    m = WordEmbedder(seed=7)
    expected = _run(bench, m, tmp_path / "alone")
    out = tmp_path / "busy"
    _run(bench, m, out)  # find the folder names, then pretend another process is still writing them
    folders = list((out / "embeddings").iterdir())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for folder in folders:
            (folder / "embeddings.npy").unlink()
            (folder / LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "started": 0}))
        assert _run(bench, m, out, cache_wait_s=0.2) == expected
        private = [p for p in (out / "embeddings").iterdir() if p.name.endswith(f"{socket.gethostname()}-{os.getpid()}")]
        assert len(private) == 2
        assert all((f / LOCK_FILE).exists() for f in folders)  # the other writer's locks are left alone
    finally:
        other.kill()
        other.wait()
    # the other writer died: its lock is stale and taken over, the shared folder is filled
    assert _run(bench, m, out, cache_wait_s=0.2) == expected
    assert all((f / "embeddings.npy").exists() and not (f / LOCK_FILE).exists() for f in folders)


def test_lock_primitives(tmp_path):
    folder = tmp_path / "c"
    assert try_lock(folder) and not try_lock(folder)  # held by this process: a second claim fails
    release(folder)
    assert not (folder / LOCK_FILE).exists()
    (folder / "embeddings.npy").write_bytes(b"")
    assert claim(folder, wait_s=0) == (folder, False)  # complete: read it


def _fingerprints(rank, world):
    module = WordEmbedder(seed=11)
    alone = weights_fingerprint(module) if rank == 0 else ""  # rank 0 alone: must not wait for the others
    same = weights_fingerprint(module, all_ranks=True)
    with torch.no_grad():  # each rank now holds other weights, as a sharded model's ranks hold other parts
        module.table.weight.add_(rank)
    return [alone, same, weights_fingerprint(module, all_ranks=True), weights_fingerprint(module)]


def test_fingerprint_across_ranks():
    """2 processes: a rank-0-only call (results records) does not block; with all_ranks, identical weights (DDP) give
    the single-process value and differing ranks (sharded) a combination of both."""
    from tests._dist import run_distributed

    single = weights_fingerprint(WordEmbedder(seed=11))
    r0, r1 = run_distributed(_fingerprints, 2, timeout_s=60)
    assert r0[0] == single and r0[1] == r1[1] == single
    assert r0[2] == r1[2] and r0[2] not in (r0[3], r1[3])
