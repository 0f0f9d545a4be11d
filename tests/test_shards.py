"""Shard sets: write -> read every sample exactly once across workers; corrupt data is counted, not lost."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from unimm.data.records import Item, decode_sample, make_sample
from unimm.data.shards import ShardSetWriter, iter_raw_samples, read_index
from unimm.data.stream import DataError, ShardStream, Source


def _keys_collate(records):
    return {"keys": [r.key for r in records], "texts": [r.sides["query"].text for r in records]}


def _write_set(root, n=40, per_shard=10, image=True):
    with ShardSetWriter(root, max_count=per_shard, source="test") as w:
        for i in range(n):
            img = Image.new("RGB", (4, 4), (i, 0, 0)) if image else None
            w.write(make_sample(f"s{i:04d}", {"i": i}, query=Item(text=f"text {i}"), pos=Item(image=img)))
    return read_index(root)


def _loader(stream, workers):
    return DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda b: b)


def test_index_promises_counts(tmp_path):
    index = _write_set(tmp_path / "set", n=25, per_shard=10)
    assert [s.count for s in index.shards] == [10, 10, 5]
    assert index.total == 25


def test_round_trip_decodes_content(tmp_path):
    index = _write_set(tmp_path / "set", n=3, per_shard=10)
    records = [decode_sample(raw) for raw in iter_raw_samples(index.shards[0].path)]
    assert [r.key for r in records] == ["s0000", "s0001", "s0002"]
    assert records[2].sides["query"].text == "text 2"
    assert records[2].sides["pos"].image.getpixel((0, 0)) == (2, 0, 0)
    assert records[2].meta == {"i": 2}


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_stream_reads_every_sample_once(tmp_path, workers):
    index = _write_set(tmp_path / "set", n=45, per_shard=10)
    stream = ShardStream([Source(index)], batch_size=4, collate=_keys_collate, train=False)
    stream.configure(rank=0, world_size=1, num_workers=workers)
    keys = [k for b in _loader(stream, workers) for k in b["keys"]]
    assert sorted(keys) == [f"s{i:04d}" for i in range(45)]


def test_eval_stream_split_over_two_ranks_is_a_partition(tmp_path):
    index = _write_set(tmp_path / "set", n=45, per_shard=10)
    seen = []
    for rank in range(2):
        stream = ShardStream([Source(index)], batch_size=4, collate=_keys_collate, train=False)
        stream.configure(rank=rank, world_size=2, num_workers=2)
        seen.append([k for b in _loader(stream, 2) for k in b["keys"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"s{i:04d}" for i in range(45)]


def test_train_stream_equal_steps_per_rank_and_no_duplicates(tmp_path):
    index = _write_set(tmp_path / "set", n=50, per_shard=5)  # 10 shards
    counts, seen = [], []
    for rank in range(2):
        stream = ShardStream([Source(index)], batch_size=4, collate=_keys_collate, train=True, seed=3)
        stream.configure(rank=rank, world_size=2, num_workers=2)
        batches = list(_loader(stream, 2))
        assert len(batches) == len(stream)
        counts.append(len(batches))
        seen += [k for b in batches for k in b["keys"]]
    assert counts[0] == counts[1]
    assert len(seen) == len(set(seen))  # no sample twice within an epoch


def test_train_stream_shuffles_differently_per_epoch(tmp_path):
    index = _write_set(tmp_path / "set", n=40, per_shard=5)
    orders = []
    for epoch in range(2):
        stream = ShardStream([Source(index)], batch_size=4, collate=_keys_collate, train=True, seed=0, shuffle_buffer=16)
        stream.configure(0, 1, 0)
        stream.set_epoch(epoch)
        orders.append([k for b in _loader(stream, 0) for k in b["keys"]])
    assert sorted(orders[0]) == sorted(orders[1])
    assert orders[0] != orders[1]


def test_too_few_shards_for_workers_is_a_clear_error(tmp_path):
    index = _write_set(tmp_path / "set", n=10, per_shard=10)
    stream = ShardStream([Source(index)], batch_size=2, collate=_keys_collate, train=True)
    with pytest.raises(DataError, match="1 shards but training needs at least one per worker slot"):
        stream.configure(rank=0, world_size=2, num_workers=2)


def _corrupt_one_image(shard_path, key):
    """Rewrite a shard with one image replaced by garbage bytes."""
    members = []
    with tarfile.open(shard_path) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name.startswith(key) and m.name.endswith(".png"):
                data = b"not a png at all"
            members.append((m.name, data))
    with tarfile.open(shard_path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _truncate(shard_path, keep_fraction=0.5):
    data = open(shard_path, "rb").read()
    open(shard_path, "wb").write(data[: int(len(data) * keep_fraction)])


def _stats(batches):
    skipped = Counter()
    delivered = 0
    for b in batches:
        skipped.update(b["stats"].skipped)
        delivered += b["stats"].delivered
    return delivered, skipped


def test_corrupt_image_and_truncated_shard_are_counted_and_the_rest_survives(tmp_path):
    index = _write_set(tmp_path / "set", n=30, per_shard=10)
    _corrupt_one_image(index.shards[0].path, "s0003")
    _truncate(index.shards[1].path)
    stream = ShardStream([Source(index)], batch_size=4, collate=_keys_collate, train=False)
    stream.configure(0, 1, 2)
    batches = list(_loader(stream, 2))
    keys = {k for b in batches for k in b["keys"]}
    delivered, skipped = _stats(batches)
    by_reason = Counter()
    for (reason, _shard), n in skipped.items():
        by_reason[reason] += n
    assert by_reason["bad_image"] == 1
    assert ("bad_image", index.shards[0].path) in skipped
    lost = by_reason["truncated_tar"]
    # the truncated shard keeps the samples before the damage; the count reports exactly what is missing
    assert 1 <= lost <= 10
    assert delivered == len(keys) == 30 - 1 - lost
    assert {f"s{i:04d}" for i in range(20, 30)} <= keys  # the intact shard is untouched
    assert "s0003" not in keys and "s0004" in keys


def test_strict_mode_fails_naming_shard_and_key(tmp_path):
    index = _write_set(tmp_path / "set", n=10, per_shard=10)
    _corrupt_one_image(index.shards[0].path, "s0003")
    stream = ShardStream([Source(index)], batch_size=4, collate=_keys_collate, train=False, strict=True)
    stream.configure(0, 1, 0)
    with pytest.raises(DataError, match=r"s0003.*shard-000000\.tar"):
        list(_loader(stream, 0))


def test_missing_side_is_counted(tmp_path):
    root = tmp_path / "set"
    with ShardSetWriter(root, max_count=10) as w:
        w.write(make_sample("a", {}, query=Item(text="x"), pos=Item(text="y")))
        w.write(make_sample("b", {}, query=Item(text="x")))  # no positive
    stream = ShardStream([Source(read_index(root))], batch_size=4, collate=_keys_collate, train=False,
                         required_sides=("query", "pos"))
    stream.configure(0, 1, 0)
    batches = list(_loader(stream, 0))
    assert [k for b in batches for k in b["keys"]] == ["a"]
    assert sum(n for (reason, _), n in _stats(batches)[1].items() if reason == "missing_side") == 1


def test_weighted_mixture_draws_by_weight(tmp_path):
    a = _write_set(tmp_path / "a", n=400, per_shard=100)
    with ShardSetWriter(tmp_path / "b", max_count=100) as w:
        for i in range(400):
            w.write(make_sample(f"b{i:04d}", {}, query=Item(text="b"), pos=Item(text="b")))
    b = read_index(tmp_path / "b")
    stream = ShardStream([Source(a, 3.0), Source(b, 1.0)], batch_size=10, collate=_keys_collate, train=True)
    stream.configure(0, 1, 0)
    first = next(iter(_loader(stream, 0)))
    batches = list(_loader(stream, 0))
    early = [k for bt in batches[:20] for k in bt["keys"]]
    share_a = sum(k.startswith("s") for k in early) / len(early)
    assert 0.65 < share_a < 0.85  # 3:1 weights -> 75% from set a while both last
    assert len({k for bt in batches for k in bt["keys"]}) == 800  # and every sample is used in the epoch
    assert first["keys"]


def test_missing_index_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        read_index(tmp_path / "nowhere")


def test_index_json_is_readable(tmp_path):
    _write_set(tmp_path / "set", n=3)
    data = json.loads((tmp_path / "set" / "index.json").read_text())
    assert data["total"] == 3 and data["source"] == "test"


@pytest.mark.parametrize("workers,done", [(0, 3), (2, 3), (2, 4)])
def test_resume_continues_with_exactly_the_unseen_batches(tmp_path, workers, done):
    index = _write_set(tmp_path / "set", n=100, per_shard=10)

    def epoch_batches(resume=None):
        stream = ShardStream([Source(index)], batch_size=4, collate=_keys_collate, train=True, seed=5, shuffle_buffer=8)
        stream.configure(0, 1, workers)
        stream.set_epoch(1)
        if resume is not None:
            stream.resume(*resume)
        return [b["keys"] for b in _loader(stream, workers)]

    full = epoch_batches()
    resumed = epoch_batches(resume=(1, done))
    assert resumed == full[done:]
    assert epoch_batches(resume=(0, done)) == full  # a resume point of another epoch does not apply
