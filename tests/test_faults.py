"""Faults in data and in saving: each is counted or survived, nothing else is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import REPO
from unimm.checkpoints import load_checkpoint
from unimm.data.records import Item, make_sample
from unimm.data.shards import ShardSetWriter, read_index
from unimm.data.stream import DataError, ShardStream, Source


def _write(root, n=20, per_shard=10, bad_json_key=None):
    with ShardSetWriter(root, max_count=per_shard) as w:
        for i in range(n):
            sample = make_sample(f"k{i:03d}", {"i": i}, query=Item(text=f"q{i}"), pos=Item(text=f"p{i}"))
            if f"k{i:03d}" == bad_json_key:
                sample["meta.json"] = b'{"i": 3,,'
            w.write(sample)
    return read_index(root)


def _read(index, strict=False):
    stream = ShardStream([Source(index)], 4, lambda rs: {"keys": [r.key for r in rs]}, train=False, strict=strict)
    stream.configure(0, 1, 0)
    batches = list(DataLoader(stream, batch_size=None, num_workers=0, collate_fn=lambda b: b))
    skipped = Counter()
    for b in batches:
        for (reason, _shard), n in b["stats"].skipped.items():
            skipped[reason] += n
    return [k for b in batches for k in b["keys"]], skipped


def test_malformed_json_is_counted_and_the_rest_survives(tmp_path):
    keys, skipped = _read(_write(tmp_path / "s", bad_json_key="k003"))
    assert skipped == {"bad_json": 1}
    assert len(keys) == 19 and "k003" not in keys


def test_empty_shard_is_reported_against_its_promise(tmp_path):
    index = _write(tmp_path / "s")
    open(index.shards[1].path, "wb").close()  # the file exists but holds nothing
    keys, skipped = _read(index)
    assert keys == [f"k{i:03d}" for i in range(10)]
    assert skipped == {"truncated_tar": 10}  # index.json promised 10 samples there


def test_strict_mode_names_the_shard_of_a_malformed_json(tmp_path):
    with pytest.raises(DataError, match=r"k003\.meta\.json in .*shard-000000\.tar"):
        _read(_write(tmp_path / "s", bad_json_key="k003"), strict=True)


def test_a_rank_without_shards_fails_at_start(tmp_path):
    index = _write(tmp_path / "s", n=10, per_shard=10)
    stream = ShardStream([Source(index)], 4, lambda rs: {}, train=True)
    with pytest.raises(DataError, match="2 ranks x 1 workers"):
        stream.configure(rank=1, world_size=2, num_workers=1)


SAVER = textwrap.dedent("""
    import sys, torch
    from unimm.training.checkpoint_io import AtomicCheckpointIO
    # the checkpoint writer of our Trainer (conf/trainer/default.yaml), writing a big checkpoint over an old one
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(150_000_000)}}, sys.argv[1])
""")


def test_a_crash_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "global_step": 7}, path)
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    # kill it once it is writing: a temporary file appears beside the checkpoint
    while not [p for p in tmp_path.iterdir() if p.name != "last.ckpt"] and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the save finished before it could be killed"
    ckpt = load_checkpoint(path)
    assert ckpt["global_step"] == 7 and torch.equal(ckpt["state_dict"]["w"], torch.zeros(3))


def test_the_trainer_config_uses_the_atomic_writer():
    import yaml

    trainer = yaml.safe_load((REPO / "conf" / "trainer" / "default.yaml").read_text())
    assert {"_target_": "unimm.training.checkpoint_io.AtomicCheckpointIO"} in trainer["plugins"]
