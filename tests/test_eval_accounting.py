"""Evaluation data accounting (issue 15 item 1): what was embedded against what index.json promises, for the pool and
the queries, by reason and shard; in the console, metrics.json, accounting.json and beside the number in the table;
fatal with data.strict=true. Before: a pool shard cut to half and queries without text changed R@k silently."""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from tests._word_modules import OneHotWordModule, word_datamodule, write_text_benchmark
from unimm.data.shards import read_index
from unimm.data.stream import DataError
from unimm.eval.retrieval import Embeddings, RetrievalEvaluator, shard_accounting

WORDS = [f"w{i}" for i in range(40)]
N_POOL, N_QUERIES, NO_TEXT = 40, 20, 4


def _write(root, shard_size=20, no_text=NO_TEXT):
    """Pool of 40 text candidates "w<i>" in 2 shards of 20; 20 queries "w<2i>" -> candidate 2i, the last
    ``no_text`` of them without any text (a record with only meta.json)."""
    return write_text_benchmark(
        root, WORDS, [(f"c{i:03d}", f"d{i}", f"w{i}") for i in range(N_POOL)],
        [(f"q{i:03d}", f"q{i}", f"w{2 * i}" if i < N_QUERIES - no_text else None) for i in range(N_QUERIES)],
        [f"q{i} 0 d{2 * i} 1 0" for i in range(N_QUERIES)], shard_kwargs={"max_count": shard_size})


def _evaluate(root, out, strict=False):
    datamodule = word_datamodule(root / "vocab.txt", 8, strict=strict)
    return RetrievalEvaluator(str(root / "eval"), grid_queries=0).run(OneHotWordModule(4 + len(WORDS)), datamodule, out)


def _whole_samples(path) -> int:
    """Complete samples Python's tarfile can read from a (possibly cut) shard: 2 members each (cand.txt, meta.json)."""
    names = []
    with tarfile.open(path) as tar:
        try:
            for member in tar:
                names.append(member.name)
        except tarfile.ReadError:
            pass
    return len(names) // 2


@pytest.fixture()
def damaged(tmp_path):
    root = _write(tmp_path / "bench")
    shard = read_index(root / "eval" / "pools" / "pool").shards[1].path
    with open(shard, "r+b") as f:  # cut the second pool shard to half its bytes
        f.truncate(os.path.getsize(shard) // 2)
    return root, shard


def test_pool_and_query_shortfalls_are_reported_beside_the_number(damaged, tmp_path, capsys):
    root, shard = damaged
    metrics = _evaluate(root, tmp_path / "out")
    out = capsys.readouterr().out
    embedded = metrics["accounting/toy/t2t/pool_embedded"]
    assert metrics["accounting/toy/t2t/pool_promised"] == N_POOL
    assert 20 <= embedded < N_POOL and embedded <= 20 + _whole_samples(shard)
    assert metrics["accounting/toy/t2t/pool_skipped/truncated_tar"] == N_POOL - embedded
    assert metrics["accounting/toy/t2t/queries_promised"] == N_QUERIES
    assert metrics["accounting/toy/t2t/queries_embedded"] == N_QUERIES - NO_TEXT
    assert metrics["accounting/toy/t2t/queries_skipped/empty_sample"] == NO_TEXT
    # console: both shortfalls, by reason and shard
    assert f"pool pool: embedded {int(embedded)} of {N_POOL} promised by index.json" in out
    assert f"truncated_tar {N_POOL - int(embedded)} in shard-000001.tar" in out
    assert f"queries of t2t: embedded {N_QUERIES - NO_TEXT} of {N_QUERIES}" in out
    assert f"empty_sample {NO_TEXT} in shard-000000.tar" in out
    # metrics.json and accounting.json keep it; the table says it beside the number
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["accounting/toy/t2t/pool_embedded"] == embedded
    detail = json.loads((tmp_path / "out" / "accounting.json").read_text())["t2t"]
    assert detail["pool"]["shards"]["shard-000001.tar"]["promised"] == 20
    table = (tmp_path / "out" / "retrieval_toy.md").read_text()
    assert f"| t2t / toy (pool: {int(embedded)}/{N_POOL} candidates; queries: {N_QUERIES - NO_TEXT}/{N_QUERIES} queries)" \
        in table
    assert "a pool that lost candidates is a different benchmark" in table


def test_complete_data_print_no_note(tmp_path, capsys):
    root = _write(tmp_path / "bench", no_text=0)  # nothing to report when every promised record is there
    metrics = _evaluate(root, tmp_path / "out")
    assert metrics["accounting/toy/t2t/pool_embedded"] == N_POOL
    assert "(pool:" not in (tmp_path / "out" / "retrieval_toy.md").read_text()
    assert "pool pool: embedded" not in capsys.readouterr().out


def test_strict_stops_on_any_shortfall(tmp_path):
    """data.strict=true: a shard holding fewer samples than index.json promises, a truncated shard, a record
    without text: the evaluation stops naming the shard (in the stream, or in the evaluator's accounting for what
    the stream only counts)."""
    root = _write(tmp_path / "bench", no_text=0)
    index_path = root / "eval" / "pools" / "pool" / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["count"] += 5
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"(?s)shard-000000.tar.*data.strict=true|data.strict=true.*shard-000000.tar"):
        _evaluate(root, tmp_path / "out", strict=True)
    with pytest.raises(DataError, match="data.strict=true"):  # textless queries
        _evaluate(_write(tmp_path / "bench2"), tmp_path / "out2", strict=True)


def test_the_evaluator_check_itself_is_strict(tmp_path):
    """The evaluator's own check (behind the stream's): accounting that differs from the promise stops a strict run
    before any number is computed, naming the shard set, shard and reason."""
    root = _write(tmp_path / "bench", no_text=0)
    evaluator = RetrievalEvaluator(str(root / "eval"), grid_queries=0)
    pool_set = str(root / "eval" / "pools" / "pool")
    accounting = shard_accounting(pool_set, [s.path for s in read_index(pool_set).shards for _ in range(s.count)][:33],
                                  Counter({("bad_image", read_index(pool_set).shards[1].path): 7}))
    assert accounting["missing"] == 7 and accounting["unexplained"] == 0
    pool = Embeddings(np.zeros((33, 2)), [], [], [], accounting)
    queries = Embeddings(np.zeros((0, 2)), [], [], [], None)
    evaluator.account("t2t", "pool", queries, pool, SimpleNamespace(strict=False))  # counted, not fatal
    assert evaluator.row_note("t2t") == " (pool: 33/40 candidates)"
    with pytest.raises(DataError, match=r"(?s)data.strict=true.*pool pool: embedded 33 of 40.*bad_image 7 in shard-000001"):
        evaluator.account("t2t", "pool", queries, pool, SimpleNamespace(strict=True))


def test_benchmark_json_errors_name_the_file_and_field(tmp_path):
    from unimm.data.benchmark import load_benchmark

    root = _write(tmp_path / "bench", no_text=0) / "eval"
    path = root / "benchmark.json"
    good = path.read_text()
    path.write_text(good[:-5])
    with pytest.raises(ValueError, match=r"benchmark.json is not valid JSON"):
        load_benchmark(root)
    data = json.loads(good)
    del data["evaluations"][0]["qrels"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"benchmark.json: evaluation #0 \('t2t'\) lacks \['qrels'\]"):
        load_benchmark(root)
    path.write_text(json.dumps({"pools": {}}))
    with pytest.raises(ValueError, match="has no 'evaluations' field"):
        load_benchmark(root)
