"""Data accounting of the shard stream: every sample index.json promises is delivered, skipped or unused, once.

The identity checked everywhere: delivered (without re-reads) + skipped + unused = promised + found beyond
index.json. Expected numbers come from how the test damaged the data, never from the stream itself.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from unimm.data.records import Item, make_sample
from unimm.data.shards import DataError, ShardIndexError, ShardSetWriter, iter_raw_samples, read_index
from unimm.data.stream import SampleAccounting, ShardStream, Source, StreamStats
from unimm.utils.errors import is_explained


def _write(root, n=400, per_shard=100):
    with ShardSetWriter(root, max_count=per_shard) as w:
        for i in range(n):
            w.write(make_sample(f"k{i:04d}", {"i": i}, query=Item(text=f"q{i}"), pos=Item(text=f"p{i}")))
    return read_index(root)


def _set_index_count(root, shard_no: int, count: int) -> None:
    path = root / "index.json"
    data = json.loads(path.read_text())
    data["shards"][shard_no]["count"] = count
    data["total"] = sum(s["count"] for s in data["shards"])
    path.write_text(json.dumps(data))


def _keys(records):
    return {"keys": [r.key for r in records]}


def _epoch(index, train=True, workers=0, batch_size=8, strict=False, resume=None, shuffle_buffer=0):
    stream = ShardStream([Source(index)], batch_size, _keys, train=train, strict=strict, seed=1,
                         shuffle_buffer=shuffle_buffer)
    stream.configure(0, 1, workers)
    if resume is not None:
        stream.resume(0, resume)
    batches = list(DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda b: b))
    total = StreamStats()
    for b in batches:
        total.add(b["stats"])
    return stream, batches, total


def _identity_holds(stats: StreamStats, promised: int) -> bool:
    return stats.delivered - stats.refilled + stats.n_skipped + stats.n_unused == promised + stats.n_beyond_index


def _truncate_to(path, keep_bytes: int) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep_bytes])


# -- item 3: index.json counts that do not match the shard ---------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
def test_a_shard_holding_more_than_index_json_says_is_reported(tmp_path, train):
    root = tmp_path / "s"
    _write(root)
    _set_index_count(root, 2, 50)  # shard 2 really holds 100
    index = read_index(root)
    stream, batches, stats = _epoch(index, train=train)
    shard = index.shards[2].path
    assert stats.beyond_index == {shard: 50}
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys))
    # every sample that really exists (400) is delivered or counted unused; none silently lost
    assert stats.delivered - stats.refilled + stats.n_unused == 400
    assert _identity_holds(stats, index.total)
    report = SampleAccounting().summary(stats, stream)
    assert f"{shard} holds 100 samples, index.json promises 50" in report


def test_a_shard_holding_fewer_than_index_json_says_is_reported(tmp_path):
    root = tmp_path / "s"
    _write(root)
    _set_index_count(root, 1, 130)
    index = read_index(root)
    stream, _, stats = _epoch(index, train=True)
    shard = index.shards[1].path
    assert stats.skipped == {("fewer_than_indexed", shard): 30}
    assert _identity_holds(stats, index.total)
    assert f"{shard} holds 100 samples, index.json promises 130" in SampleAccounting().summary(stats, stream)


@pytest.mark.parametrize("count", [50, 130])
def test_strict_mode_stops_at_an_index_mismatch_naming_the_shard(tmp_path, count):
    root = tmp_path / "s"
    _write(root)
    _set_index_count(root, 3, count)
    with pytest.raises(DataError, match=rf"shard-000003\.tar holds 100 samples.*index\.json promises {count}"):
        _epoch(read_index(root), train=True, strict=True)


def test_index_json_with_a_syntax_error_names_the_file(tmp_path):
    root = tmp_path / "s"
    _write(root, n=10)
    (root / "index.json").write_text('{"shards": [{"name": "shard-000000.tar", "count": 10},]}')
    with pytest.raises(ShardIndexError, match=r"s/index\.json is not valid JSON \(line 1 column"):
        read_index(root)


def test_index_json_errors_are_explained_errors(tmp_path):
    """The CLIs print explained errors as one line without a traceback (unimm.utils.errors)."""
    _write(tmp_path / "s", n=10)
    (tmp_path / "s" / "index.json").write_text("{")
    with pytest.raises(ShardIndexError) as err:
        read_index(tmp_path / "s")
    assert is_explained(err.value) and isinstance(err.value, ValueError)


def test_the_cli_stops_at_an_index_mismatch_with_one_clear_line(toy_data_dir, tmp_path):
    """data.strict=true, data workers: the shard, its real count and its promise, no traceback."""
    from tests.conftest import run_cli

    data = tmp_path / "data"
    shutil.copytree(toy_data_dir, data)
    for i in range(len(read_index(data / "toy" / "train").shards)):
        _set_index_count(data / "toy" / "train", i, 99)  # each shard holds 100: every worker stops at its first
    proc = run_cli("unimm.train", "+experiment=uniir_clip_sf_tiny", f"paths.data_dir={data}",
                   f"paths.log_dir={tmp_path / 'logs'}", "logger=csv", "eval=none", "data.strict=true",
                   "data.num_workers=2", "trainer.enable_progress_bar=false", cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "holds 100 samples but its index.json promises 99 (data.strict=true)" in line
    assert "in DataLoader worker process" in line and "Traceback" not in proc.stderr


@pytest.mark.parametrize("data,field", [
    ({"total": 10}, "'shards'"),
    ({"shards": [{"name": "shard-000000.tar"}]}, r"shards\[0\] has no 'count'"),
    ({"shards": [{"count": 10}]}, r"shards\[0\] has no 'name'"),
    ({"shards": [{"name": "shard-000000.tar", "count": "ten"}]}, r"shards\[0\]\.count"),
])
def test_index_json_with_a_missing_field_names_the_file_and_the_field(tmp_path, data, field):
    root = tmp_path / "s"
    _write(root, n=10)
    (root / "index.json").write_text(json.dumps(data))
    with pytest.raises(ShardIndexError, match=rf"s/index\.json.*{field}"):
        read_index(root)


# -- item 4: damage is counted once, re-reads are not damage -------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_shard_is_counted_once_when_its_worker_refills(tmp_path, workers):
    index = _write(tmp_path / "s", n=400, per_shard=100)
    path = index.shards[0].path
    members = tarfile.open(path).getmembers()
    # cut inside the data of the first member of sample 49: samples 0..48 survive, 51 are lost
    cut = next(m for m in members if m.name.startswith("k0049.")).offset_data + 2
    _truncate_to(path, cut)
    _, batches, stats = _epoch(index, train=True, workers=workers)
    assert stats.skipped == {("truncated_tar", path): 51}
    assert stats.refilled > 0  # the worker holding the damaged shard re-read its own shards to stay in step
    assert _identity_holds(stats, 400)
    delivered = [k for b in batches for k in b["keys"]]
    assert len(delivered) - stats.refilled == len(set(delivered))


@pytest.mark.parametrize("workers,empty", [(0, (1,)), (2, (1,)), (0, (1, 2, 3))])
def test_an_empty_shard_is_counted_once(tmp_path, workers, empty):
    """However many passes a worker re-reads its shards to stay in step (4 with three empty shards of four)."""
    index = _write(tmp_path / "s", n=400, per_shard=100)
    for i in empty:
        open(index.shards[i].path, "wb").close()
    _, _, stats = _epoch(index, train=True, workers=workers)
    assert stats.skipped == {("truncated_tar", index.shards[i].path): 100 for i in empty}
    assert stats.refilled == 100 * len(empty)
    assert _identity_holds(stats, 400)


def test_unused_samples_are_counted_where_the_quota_stops(tmp_path):
    index = _write(tmp_path / "s", n=400, per_shard=100)
    # 2 workers, 200 samples each, batch 64: 3 full batches (192) each, 8 unused per worker
    _, _, stats = _epoch(index, train=True, workers=2, batch_size=64, shuffle_buffer=50)
    assert (stats.delivered, stats.n_unused, stats.n_skipped, stats.refilled) == (384, 16, 0, 0)


@pytest.mark.parametrize("workers,done", [(0, 7), (2, 7), (2, 8)])
def test_accounting_of_a_resumed_epoch_adds_up_to_the_uninterrupted_one(tmp_path, workers, done):
    index = _write(tmp_path / "s", n=400, per_shard=100)
    _truncate_to(index.shards[3].path, 30_000)
    _, full_batches, full = _epoch(index, workers=workers, shuffle_buffer=20)
    before = StreamStats()
    for b in full_batches[:done]:
        before.add(b["stats"])  # what the checkpoint of step `done` holds
    _, resumed_batches, after = _epoch(index, workers=workers, shuffle_buffer=20, resume=done)
    assert [b["keys"] for b in resumed_batches] == [b["keys"] for b in full_batches[done:]]
    before.add(after)
    assert before == full and _identity_holds(full, 400)


# -- item 7: a cut keeps every complete sample before it -----------------------------------------------------

def _layout(path):
    """(key, header offset, data end) of every member of an intact tar, read with Python's tarfile."""
    with tarfile.open(path) as tar:
        return [(m.name.partition(".")[0], m.offset, m.offset_data + m.size, m.name) for m in tar.getmembers()]


def _whole_before(layout, cut: int) -> list[str]:
    """The samples a reader can know to be whole in a tar cut at byte ``cut``: every member's data lies before
    the cut, and the cut leaves enough of the next sample's first header to read its name (without it, no
    reader can tell whether the sample had another member). Python's tarfile, reading the cut file, reads each
    of these members in full (checked below)."""
    keys = list(dict.fromkeys(k for k, *_ in layout))
    whole = [k for k in keys if all(end <= cut for key, _, end, _ in layout if key == k)]
    following = [(off, name) for key, off, _, name in layout if key not in whole]
    if whole and following:
        off, name = following[0]
        if cut < off + len(name) + 1:  # the name (and its NUL terminator) of the next member is cut
            whole.pop()
    return whole


def test_a_cut_delivers_every_sample_whole_before_it(tmp_path):
    index = _write(tmp_path / "s", n=60, per_shard=60)
    path = index.shards[0].path
    intact = open(path, "rb").read()
    layout = _layout(path)
    with tarfile.open(path) as tar:
        original = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    start = next(off for key, off, _, _ in layout if key == "k0048")
    end = next(off for key, off, _, _ in layout if key == "k0052")
    cuts = list(range(start, end, 53)) + [off + d for _, off, _, _ in layout[48 * 3:52 * 3] for d in (0, 1, 30, 512, 513)]
    cuts += [len(intact) - 1, len(intact) - 1024]  # inside the end-of-archive blocks: nothing is lost
    cut_in_first_member = next(off for key, off, _, _ in layout if key == "k0050") + 512 + 1
    assert cut_in_first_member in cuts
    for cut in sorted(set(cuts)):
        open(path, "wb").write(intact[:cut])
        delivered = []
        try:
            for raw in iter_raw_samples(path):
                delivered.append(raw["__key__"])
        except Exception:  # noqa: BLE001 - the damage itself; only what came before matters here
            pass
        expected = _whole_before(layout, cut)
        assert delivered == expected, f"cut at byte {cut}"
        # the reference: tarfile reads every member of the expected samples in full from the cut file
        got = {}
        with tarfile.open(path) as tar:
            try:
                for m in tar:
                    if m.name.partition(".")[0] in expected:
                        got[m.name] = tar.extractfile(m).read()
            except tarfile.ReadError:  # tarfile meets the damage after the members that matter here
                pass
        assert got == {name: original[name] for name in got} and len(got) == 3 * len(expected)
    open(path, "wb").write(intact[:cut_in_first_member])
    assert len(list(_whole_before(layout, cut_in_first_member))) == 50  # the case: 50, not 49
    _, _, stats = _epoch(read_index(tmp_path / "s"), train=False)
    assert stats.delivered == 50 and stats.skipped == Counter({("truncated_tar", path): 10})


# -- item 4: the epoch tally of a run resumed from a mid-epoch checkpoint -------------------------------------

class _TinyModule:
    """A one-parameter LightningModule: the data path and the callbacks are what is under test here."""

    @staticmethod
    def build():
        import lightning as L
        import torch

        class Tiny(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(1))

            def training_step(self, batch, batch_idx):
                return (self.w * len(batch["keys"])).pow(2).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=1e-3)

        return Tiny()


def _fit(index_root, ckpt_dir, ckpt_path=None, max_steps=-1):
    """Fit one epoch (batch 8) of the shard set; returns the ``data/*`` metrics the run logged."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import Logger

    from unimm.data.datamodule import ShardDataModule
    from unimm.training.callbacks import DataAccounting

    class Recorder(Logger):
        name, version = "recorder", 0
        logged: list[dict] = []

        def log_metrics(self, metrics, step=None):
            self.logged.append({k: v for k, v in metrics.items() if k.startswith("data/")})

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    dm = ShardDataModule({"s": {"path": str(index_root)}}, collator=lambda processor, sides: _keys, batch_size=8,
                         num_workers=0, shuffle_buffer=20, seed=3)
    dm.attach_processor(object())
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", every_n_train_steps=4, save_top_k=-1,
                           auto_insert_metric_name=False)
    recorder = Recorder()
    recorder.logged = []
    trainer = L.Trainer(max_epochs=1, max_steps=max_steps, callbacks=[DataAccounting(), ckpt], logger=recorder,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        num_sanity_val_steps=0)
    trainer.fit(_TinyModule.build(), datamodule=dm, ckpt_path=ckpt_path)
    return [m for m in recorder.logged if m]


def test_a_resumed_run_reports_the_whole_epoch(tmp_path, recwarn):
    index = _write(tmp_path / "s", n=200, per_shard=50)
    _truncate_to(index.shards[2].path, 20_000)
    full = _fit(tmp_path / "s", tmp_path / "a")
    # the same run, stopped after step 12 (its checkpoint holds the tally of 12 batches), then resumed
    _fit(tmp_path / "s", tmp_path / "b", max_steps=12)
    resumed = _fit(tmp_path / "s", tmp_path / "c", ckpt_path=str(tmp_path / "b" / "step12.ckpt"))
    assert resumed == full
    [epoch] = full
    lost = epoch["data/skipped"]
    assert lost > 0 and epoch["data/delivered"] + lost + epoch["data/unused"] == 200
    # the stream resumes exactly: Lightning is told so (no "your dataloader is not resumable" warning)
    assert not [w for w in recwarn if "not resumable" in str(w.message)]
