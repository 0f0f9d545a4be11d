"""Shard sets read from HTTP, S3 (moto's server) and pipe: URLs keep every guarantee of the local reader.

Both servers run on 127.0.0.1 (ephemeral ports) in this process; DataLoader workers reach them over TCP. The
expected records always come from the same shard set read from local disk, or from Python's tarfile.
"""

from __future__ import annotations

import functools
import http.server
import logging
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from unimm.data.datamodule import ShardDataModule
from unimm.data.records import Item, make_sample
from unimm.data.remote import RemoteOptions, ShardUnreadable, is_remote, join
from unimm.data.shards import DataError, ShardSetWriter, iter_raw_samples, read_index
from unimm.data.stream import ShardStream, Source, StreamStats

FAST = RemoteOptions(retries=2, backoff_s=0.0)


# -- servers -------------------------------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves files from the server's folder; logs every GET; can drop or stall chosen files (see _HttpServer)."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real servers
    disable_nagle_algorithm = True  # TCP_NODELAY, as real servers (else small responses wait for delayed ACKs)

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        server = self.server
        name = self.path.lstrip("/")
        with server.lock:
            server.requests[name] += 1
            nth = server.requests[name]
        rule = server.rules.get(name)
        if rule is None:
            return super().do_GET()
        data = (Path(server.folder) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if "drop_after" in rule and nth <= rule["drop_times"]:
            # the connection dies mid-body: the client sees fewer bytes than Content-Length promised
            self.wfile.write(data[: rule["drop_after"]])
            self.wfile.flush()
            time.sleep(0.2)  # the client consumes the bytes sent, then meets the reset (at byte drop_after)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if "stall_after" in rule:
            self.wfile.write(data[: rule["stall_after"]])
            self.wfile.flush()
            rule["event"].wait(30)
            data = data[rule["stall_after"]:]
        self.wfile.write(data)


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path):
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
        self.folder = folder
        self.lock = threading.Lock()
        self.requests: Counter = Counter()
        self.rules: dict[str, dict] = {}

    def handle_error(self, request, client_address):  # the dropped connections are deliberate
        pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def http_server(tmp_path):
    server = _HttpServer(tmp_path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _s3_options(endpoint: str) -> RemoteOptions:
    return RemoteOptions(retries=2, backoff_s=0.0, block_size=1 << 16,
                         storage_options={"endpoint_url": endpoint, "key": "testing", "secret": "testing"})


def _upload_s3(endpoint: str, folder: Path, bucket: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(**_s3_options(endpoint).storage_options)
    fs.mkdir(bucket)
    for f in sorted(folder.iterdir()):
        fs.put_file(str(f), f"{bucket}/set/{f.name}")
    return f"s3://{bucket}/set"


# -- data ----------------------------------------------------------------------------------------------------

def _write_set(root: Path, n: int = 60, per_shard: int = 10) -> None:
    with ShardSetWriter(root, max_count=per_shard, source="test") as w:
        for i in range(n):
            w.write(make_sample(f"s{i:04d}", {"i": i}, image_format="png", query=Item(text=f"text {i}"),
                                pos=Item(image=Image.new("RGB", (6, 6), (i, 2 * i % 256, 7)))))


def _collate(records):
    return {"keys": [r.key for r in records], "texts": [r.sides["query"].text for r in records],
            "pixels": [r.sides["pos"].image.getpixel((1, 1)) for r in records]}


def _run(root: str, workers: int = 0, train: bool = True, remote: RemoteOptions = FAST, batch: int = 4,
         resume: int | None = None, strict: bool = False, shuffle_buffer: int = 8):
    stream = ShardStream([Source(read_index(root, remote))], batch, _collate, train=train, seed=3,
                         shuffle_buffer=shuffle_buffer,
                         remote=remote, strict=strict)
    stream.configure(0, 1, workers)
    stream.set_epoch(1)
    if resume is not None:
        stream.resume(1, resume)
    batches = list(DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda b: b))
    stats = StreamStats()
    for b in batches:
        stats.add(b.pop("stats"))
    return batches, stats


def _strip(stats: StreamStats) -> StreamStats:
    """The stats with shard paths relative to their shard set (to compare a remote run with a local one)."""
    def rel(path):
        return path.rpartition("/")[2]
    return StreamStats(stats.delivered, Counter({(r, rel(s)): n for (r, s), n in stats.skipped.items()}),
                       stats.refilled, Counter({rel(s): n for s, n in stats.unused.items()}),
                       Counter({rel(s): n for s, n in stats.beyond_index.items()}))


# -- the same records in the same order ----------------------------------------------------------------------

def test_url_forms():
    assert [is_remote(p) for p in ("s3://b/x", "gs://b/x", "https://h/x", "pipe:cat /x", "/x", "file:///x", "rel/x")] \
        == [True, True, True, True, False, False, False]
    assert join("s3://b/set/", "index.json") == "s3://b/set/index.json"
    assert join("pipe:cat /data/set", "shard-000000.tar") == "pipe:cat /data/set/shard-000000.tar"


@pytest.mark.parametrize("workers,train", [(0, True), (2, True), (2, False)])
def test_http_gives_the_records_of_local_disk_in_the_same_order(tmp_path, http_server, workers, train):
    _write_set(tmp_path / "set")
    local, local_stats = _run(str(tmp_path / "set"), workers, train)
    remote, remote_stats = _run(f"{http_server.url}/set", workers, train)
    assert remote == local and sum(len(b["keys"]) for b in local) == (56 if train and workers == 2 else 60)
    assert _strip(remote_stats) == _strip(local_stats)
    shards_read = {k for k in http_server.requests if k.endswith(".tar")}
    assert all(http_server.requests[k] == 1 for k in shards_read)  # one GET per shard, no retries


def test_s3_gives_the_records_of_local_disk_in_the_same_order(tmp_path, s3_endpoint):
    _write_set(tmp_path / "set")
    url = _upload_s3(s3_endpoint, tmp_path / "set", "same-order")
    options = _s3_options(s3_endpoint)
    for train in (True, False):
        local, local_stats = _run(str(tmp_path / "set"), 0, train)
        remote, remote_stats = _run(url, 0, train, remote=options)
        assert remote == local
        assert _strip(remote_stats) == _strip(local_stats)


def test_s3_shard_set_through_the_datamodule_with_two_workers(tmp_path, s3_endpoint):
    _write_set(tmp_path / "set")
    url = _upload_s3(s3_endpoint, tmp_path / "set", "datamodule")
    dm = ShardDataModule({"s": {"path": url}}, collator=lambda processor, sides: _collate, batch_size=4,
                         eval_batch_size=16, num_workers=2, shuffle_buffer=8,
                         remote={"retries": 1, "backoff_s": 0, "storage_options": _s3_options(s3_endpoint).storage_options})
    dm.attach_processor(object())
    keys = [k for b in dm.eval_loader(url, ("query", "pos")) for k in b["keys"]]
    assert sorted(keys) == [f"s{i:04d}" for i in range(60)]
    train_keys = [k for b in dm.train_dataloader() for k in b["keys"]]
    assert len(train_keys) == len(set(train_keys)) == 2 * (30 // 4) * 4  # 2 workers x 7 full batches of 4


def test_pipe_urls_read_through_webdataset_gopen(tmp_path):
    _write_set(tmp_path / "set")
    local, _ = _run(str(tmp_path / "set"), 0, True)
    piped, _ = _run(f"pipe:cat {tmp_path / 'set'}", 0, True)
    assert piped == local


# -- the stream parser is the local parser: same samples, same damage, same messages -------------------------

def _outcome(path: str):
    keys, error = [], None
    try:
        for raw in iter_raw_samples(path, FAST):
            keys.append((raw["__key__"], sorted(raw)))
    except Exception as err:  # noqa: BLE001 - the damage itself is compared
        error = (type(err).__name__, str(err).replace(path, "<shard>"))
    return keys, error


def test_streamed_cut_and_corrupt_shards_match_the_memory_mapped_reader(tmp_path):
    _write_set(tmp_path / "set", n=12, per_shard=12)
    path = tmp_path / "set" / "shard-000000.tar"
    intact = path.read_bytes()
    with tarfile.open(path) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    cuts = sorted({0, 100, len(intact) - 1, len(intact) - 1024} | {o + d for o in offsets[10:20] for d in (0, 1, 99, 100, 512, 513, 700)})
    variants = [intact[:c] for c in cuts]
    corrupt = bytearray(intact)
    corrupt[offsets[7] + 10] ^= 0x20  # a header byte: its checksum no longer holds
    variants.append(bytes(corrupt))
    seen_errors = set()
    for data in variants:
        path.write_bytes(data)
        local = _outcome(str(path))
        streamed = _outcome(f"pipe:cat {path}")
        assert streamed[0] == local[0]
        if local[1] is not None:  # pipe: paths name the shard as "pipe:cat <path>"
            assert streamed[1] == (local[1][0], local[1][1])
            seen_errors.add(local[1][1].split(":")[1].split("(")[0].strip())
    assert len(seen_errors) >= 3  # empty file, cut member, cut header, corrupt header all met


# -- streaming: the first sample arrives before the shard is downloaded --------------------------------------

def test_the_first_sample_arrives_before_the_rest_of_the_shard_is_sent(tmp_path, http_server):
    _write_set(tmp_path / "set", n=50, per_shard=50)
    with tarfile.open(tmp_path / "set" / "shard-000000.tar") as tar:
        third = [m for m in tar.getmembers()][9].offset  # inside sample 3
    released = threading.Event()
    http_server.rules["set/shard-000000.tar"] = {"stall_after": third, "event": released}
    samples = iter_raw_samples(f"{http_server.url}/set/shard-000000.tar", FAST)
    got = []
    timer = threading.Timer(20, released.set)  # never hang the suite
    timer.start()
    try:
        got = [next(samples)["__key__"] for _ in range(2)]
        assert not released.is_set(), "the reader waited for the whole shard"
        released.set()
        got += [raw["__key__"] for raw in samples]
    finally:
        released.set()
        timer.cancel()
    assert got == [f"s{i:04d}" for i in range(50)]


# -- exact resume over HTTP ----------------------------------------------------------------------------------

@pytest.mark.parametrize("done", [3, 4])
def test_resume_over_http_continues_with_exactly_the_unseen_batches(tmp_path, http_server, done):
    _write_set(tmp_path / "set")
    url = f"{http_server.url}/set"
    full, full_stats = _run(url, workers=2)
    resumed, after = _run(url, workers=2, resume=done)
    assert resumed == full[done:]
    assert full == _run(str(tmp_path / "set"), workers=2)[0]


def test_datamodule_state_round_trip_over_http(tmp_path, http_server):
    _write_set(tmp_path / "set")
    url = f"{http_server.url}/set"

    def module():
        dm = ShardDataModule({"s": {"path": url}}, collator=lambda processor, sides: _collate, batch_size=4,
                             num_workers=2, shuffle_buffer=8, seed=3, remote={"retries": 1, "backoff_s": 0})
        dm.attach_processor(object())
        dm.train_stream().set_epoch(0)
        return dm

    full = [b["keys"] for b in module().train_dataloader()]
    dm = module()
    dm.load_state_dict({"epoch": 0, "batches_done": 5})  # what a checkpoint after 5 optimizer steps holds
    assert [b["keys"] for b in dm.train_dataloader()] == full[5:]


# -- transient errors are retried; a shard that stays unreadable is counted -----------------------------------

def _drop(http_server, root: Path, shard: str, times: int) -> tuple[int, list[str]]:
    """Make the server drop ``shard`` inside sample 5 ``times`` times; returns (cut byte, keys in the shard)."""
    with tarfile.open(root / shard) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.partition(".")[0] for m in members))
    cut = next(m.offset for m in members if m.name.startswith(keys[5] + ".")) + 100
    http_server.rules[f"set/{shard}"] = {"drop_after": cut, "drop_times": times}
    return cut, keys


def test_a_dropped_connection_is_retried_and_the_records_are_the_same(tmp_path, http_server):
    _write_set(tmp_path / "set")
    _drop(http_server, tmp_path / "set", "shard-000002.tar", times=2)
    local, local_stats = _run(str(tmp_path / "set"), 0, train=False)
    remote, remote_stats = _run(f"{http_server.url}/set", 0, train=False, remote=RemoteOptions(retries=2, backoff_s=0))
    assert remote == local and remote_stats.n_skipped == 0
    assert http_server.requests["set/shard-000002.tar"] == 3  # two drops, then whole (read from the cut on)


def test_a_failing_pipe_is_retried_from_the_byte_it_reached(tmp_path):
    """A pipe command that writes part of the shard and exits with an error, twice, then succeeds."""
    _write_set(tmp_path / "set")
    counter = tmp_path / "tries"
    counter.write_text("0")
    script = tmp_path / "flaky.sh"
    script.write_text(f"""case "$1" in *shard-000001.tar)
  n=$(cat {counter}); echo $((n+1)) > {counter}
  if [ "$n" -lt 2 ]; then head -c 3000 "$1"; sleep 0.2; exit 3; fi;;
esac
cat "$1"
""")
    local, _ = _run(str(tmp_path / "set"), 0, train=False)
    piped, stats = _run(f"pipe:sh {script} {tmp_path / 'set'}", 0, train=False)
    assert piped == local and stats.n_skipped == 0
    assert counter.read_text().strip() == "3"  # two failures, then whole
    counter.write_text("-10")  # now it keeps failing: lost after the retries, at the byte it reached
    with pytest.raises(ShardUnreadable, match=r"shard-000001.tar: unreadable at byte (\d+) after 2 retries") as err:
        list(iter_raw_samples(f"pipe:sh {script} {tmp_path / 'set'}/shard-000001.tar", FAST))
    # the byte reached: 3000 when the output came before the exit was seen, 0 when the one read that met the
    # exit (a pipe read waits for a whole chunk or the end) raised instead of returning it
    assert int(str(err.value).split("unreadable at byte ")[1].split()[0]) in (0, 3000)


@pytest.mark.parametrize("train", [False, True])
def test_a_shard_that_stays_unreadable_is_counted_lost_with_its_promised_samples(tmp_path, http_server, train):
    _write_set(tmp_path / "set")
    shard = "shard-000002.tar"
    cut, keys = _drop(http_server, tmp_path / "set", shard, times=100)
    url = f"{http_server.url}/set"
    batches, stats = _run(url, 0, train=train, remote=RemoteOptions(retries=2, backoff_s=0))
    assert http_server.requests[f"set/{shard}"] >= 3  # the first try and 2 retries (again on a re-read pass)
    delivered = [k for b in batches for k in b["keys"]]
    # samples 0-3 are delivered when the client hands over the bytes before the reset (the server waits 0.2 s
    # first): a sample is known whole once a member of the next one is read, and the cut falls inside sample
    # 5's first header; sample 4, the one being read, is dropped. On a loaded machine aiohttp may meet the
    # reset first and raise without handing over what it buffered: then fewer, still a prefix.
    from_shard = [k for k in dict.fromkeys(delivered) if k in keys]
    assert sorted(from_shard) == keys[: len(from_shard)] and len(from_shard) <= 4
    assert stats.skipped == {("unreadable_shard", f"{url}/{shard}"): 10 - len(from_shard)}
    assert stats.delivered - stats.refilled + stats.n_skipped + stats.n_unused == 60
    # each retry re-opens, skips the bytes already parsed and fails again at the same byte
    with pytest.raises(DataError, match=f"unreadable shard .*{shard}: unreadable at byte .* after 1 retries") as err:
        _run(url, 0, train=train, remote=RemoteOptions(retries=1, backoff_s=0), strict=True)
    assert int(str(err.value).split("unreadable at byte ")[1].split()[0]) <= cut


def test_a_missing_remote_shard_is_lost_at_once_and_a_missing_index_is_named(tmp_path, http_server):
    _write_set(tmp_path / "set")
    (tmp_path / "set" / "shard-000004.tar").unlink()
    url = f"{http_server.url}/set"
    _, stats = _run(url, 0, train=False)
    assert stats.skipped == {("unreadable_shard", f"{url}/shard-000004.tar"): 10} and stats.delivered == 50
    with pytest.raises(ShardUnreadable, match="shard-000004.tar: FileNotFoundError"):
        next(iter_raw_samples(f"{url}/shard-000004.tar", FAST))
    with pytest.raises(FileNotFoundError, match="not a unimm shard set: .*/nothing/index.json is missing"):
        read_index(f"{http_server.url}/nothing", FAST)


# -- unused samples of a remote set: counted from index.json, not downloaded ---------------------------------

def test_unused_samples_of_a_remote_set_are_counted_without_reading_them(tmp_path, http_server):
    _write_set(tmp_path / "set", n=250, per_shard=50)  # 5 shards of 50; batches of 100: 2 batches, 50 unused
    local, local_stats = _run(str(tmp_path / "set"), 0, batch=100, shuffle_buffer=0)
    remote, remote_stats = _run(f"{http_server.url}/set", 0, batch=100, shuffle_buffer=0)
    assert remote == local
    assert remote_stats.n_unused == local_stats.n_unused == 50
    assert _strip(remote_stats) == _strip(local_stats)
    # without a shuffle buffer every sample read is used: the unused shard was never requested
    (unused_shard,) = _strip(remote_stats).unused
    assert http_server.requests[f"set/{unused_shard}"] == 0
    assert sum(http_server.requests[f"set/shard-{i:06d}.tar"] for i in range(5)) == 4


# -- evaluation shard sets: a benchmark folder served over HTTP ----------------------------------------------

def test_a_benchmark_over_http_reads_its_pools_queries_and_qrels(tmp_path, http_server):
    from unimm.data.benchmark import BenchmarkWriter, load_benchmark, read_qrels

    bench = BenchmarkWriter(tmp_path / "bench", name="toy")
    with bench.pool_writer("texts", max_count=4) as w:
        for i in range(10):
            w.write(make_sample(f"d{i}", {"did": f"d{i}", "modality": "text"}, cand=Item(text=f"cand {i}")))
    with bench.query_writer("t2t", max_count=4) as w:
        for i in range(6):
            w.write(make_sample(f"q{i}", {"qid": f"q{i}"}, query=Item(text=f"query {i}")))
    bench.write_qrels("t2t", [f"q{i} 0 d{i} 1 0" for i in range(6)])
    bench.add_evaluation("t2t", dataset="toy", task="t2t", query_modality="text", cand_modality="text", pool="texts")
    bench.save()
    url = f"{http_server.url}/bench"
    spec = load_benchmark(url).evaluation("t2t")
    assert spec.queries == f"{url}/queries/t2t" and spec.pool_path == f"{url}/pools/texts"
    assert read_qrels(spec.qrels) == read_qrels(tmp_path / "bench" / "qrels" / "t2t.txt")
    dm = ShardDataModule({}, collator=lambda processor, sides: (lambda rs: {"keys": [r.key for r in rs]}),
                         eval_batch_size=4, num_workers=2, remote={"retries": 1, "backoff_s": 0})
    dm.attach_processor(object())
    pool = [k for b in dm.eval_loader(spec.pool_path, ("cand",)) for k in b["keys"]]
    assert sorted(pool) == sorted(f"d{i}" for i in range(10))
    with pytest.raises(FileNotFoundError, match="not a unimm benchmark"):
        load_benchmark(f"{http_server.url}/elsewhere")
