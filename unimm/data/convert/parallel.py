"""Write one shard set with several processes, resumably, with the same bytes whatever the worker count.

Shard ``i`` holds the records built from input items ``[i * shard_size, (i + 1) * shard_size)`` (items the
build function skips leave it shorter), so which record lands in which shard depends on the input alone, not
on the number of workers or the order they finish in. Every tar member carries one integer mtime given by
the caller (derived from the input files), so two conversions of the same input are byte-identical.

While it runs, the set is built in ``.<name>.partial`` beside the output folder::

    .train.partial/convert.json                 what is being converted (a different input starts over)
    .train.partial/shard-000003.tar             a finished shard: written to a temporary name, renamed
    .train.partial/shard-000003.tar.done.json   its record count and the build function's accounting

A shard is finished only when both files exist and the tar holds the count (re-read on resume), so a run that
is killed or interrupted resumes where it stopped, redoing only the unfinished shards. When every shard is
finished, ``index.json`` is written and the folder replaces the output.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from unimm.data.shards import FORMAT_VERSION, INDEX_FILE, TruncatedShard, iter_raw_samples, read_index
from unimm.utils.progress import is_rank_zero

STATE_FILE = "convert.json"
DONE_SUFFIX = ".done.json"

# build(items, write) -> accounting: writes the records of one shard's items through write(sample) (webdataset
# dicts) and returns picklable accounting (problems, kept counts ...) that the caller merges in shard order.
BuildFn = Callable[[list[Any], Callable[[dict[str, Any]], None]], Any]


def default_workers() -> int:
    """The number of cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def input_mtime(*paths: str | os.PathLike) -> int:
    """The integer mtime written into every tar member: the newest input file's, so the same input gives the
    same bytes on every run (the time of the run would change them every second)."""
    return max(int(os.stat(p).st_mtime) for p in paths)


@dataclass(frozen=True)
class ShardSetResult:
    """``accounting``: what the build function returned for each shard, in shard order (empty shards included)."""

    root: Path
    shards: int
    total: int
    accounting: list[Any]
    resumed_shards: int


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


class TarWriter:
    """Writes the same bytes as ``webdataset.TarWriter(path, mtime=mtime)`` for samples of byte (or str) fields,
    at a fraction of its cost per member: the ustar header of a short ASCII member name is filled in directly
    instead of through :mod:`tarfile`'s TarInfo copy and pax checks (which took more time than reading and
    verifying a small JPEG). Other names go through tarfile's own header code (pax, as webdataset writes them).

    The file is written through a 1 MiB buffer: one system call per ~200 small records instead of one or two
    per record.
    """

    BUFFER = 1 << 20

    def __init__(self, path: str, mtime: int, user: str = "bigdata", group: str = "bigdata", mode: int = 0o444):
        self._file = open(path, "wb", buffering=self.BUFFER)  # noqa: SIM115 - closed by close()
        self._written = 0
        self.mtime, self.user, self.group, self.mode = int(mtime), user, group, mode
        # ustar header: name[100] mode[8] uid[8] gid[8] size[12] mtime[12] chksum[8] typeflag[1] linkname[100]
        # magic+version[8] uname[32] gname[32] devmajor[8] devminor[8] prefix[155] padding[12]; only the name,
        # the size and the checksum vary between members
        self._ids = b"%07o\0" % (mode & 0o7777) + b"0000000\0" * 2  # mode, uid, gid
        self._mtime = b"%011o\0" % self.mtime
        self._rest = b"".join((b"0", bytes(100), tarfile.POSIX_MAGIC, user.encode().ljust(32, b"\0"),
                               group.encode().ljust(32, b"\0"))).ljust(tarfile.BLOCKSIZE - 156, b"\0")
        # the checksum is the sum of the header's bytes with its own field as 8 spaces: the constant fields' part
        self._constant_sum = sum(self._ids) + sum(self._mtime) + 8 * ord(" ") + sum(self._rest)
        self._chksum_format = b"%06o\0 "  # six octal digits, NUL, and the last space left as it was

    def _header(self, name: str, size: int) -> bytes:
        raw = name.encode("utf-8", "surrogateescape")
        if len(raw) > 100 or not raw.isascii() or size >= 8**11:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = size, self.mtime, self.mode, self.user, self.group
            return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        size_field = b"%011o\0" % size
        checksum = self._constant_sum + sum(raw) + sum(size_field)
        return b"".join((raw.ljust(100, b"\0"), self._ids, size_field, self._mtime,
                         self._chksum_format % checksum, self._rest))

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        parts = []
        for field in sorted(sample):
            if field.startswith("_"):
                continue
            value = sample[field]
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            parts += (self._header(f"{key}.{field}", len(data)), data, bytes(-len(data) % tarfile.BLOCKSIZE))
        chunk = b"".join(parts)
        self._file.write(chunk)
        self._written += len(chunk)

    def close(self) -> None:
        # tarfile's stream mode ends with two zero blocks and pads the file to whole 10240-byte records
        end = self._written + 2 * tarfile.BLOCKSIZE
        self._file.write(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._file.close()


def _write_shard(build: BuildFn, items: list[Any], path: str, mtime: int) -> tuple[int, Any]:
    """Write one shard (runs in a worker): tar to a temporary name, renamed when whole; then its done file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    count = 0
    writer = TarWriter(tmp, mtime=mtime)

    def write(sample: dict[str, Any]) -> None:
        nonlocal count
        writer.write(sample)
        count += 1

    try:
        accounting = build(items, write)
    finally:
        writer.close()
    if count == 0:
        os.remove(tmp)  # nothing survived: no shard, only the accounting
    else:
        os.replace(tmp, path)
    done = {"count": count, "items": len(items), "accounting": accounting}
    _write_json_atomic(Path(path + DONE_SUFFIX), done)
    return count, accounting


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _finished(partial: Path, i: int, n_items: int) -> tuple[int, Any] | None:
    """(count, accounting) of shard ``i`` when it was finished by an earlier run, else None (to be redone).

    The tar is re-read: one cut short by a crash after its rename (a full disk, a lost page cache) is redone."""
    path = partial / _shard_name(i)
    done_path = Path(str(path) + DONE_SUFFIX)
    try:
        done = json.loads(done_path.read_text())
        count = int(done["count"])
        if done["items"] != n_items:
            return None
        if count:
            held = sum(1 for _ in iter_raw_samples(str(path)))
            if held != count:
                return None
        elif path.exists():
            return None
    except (OSError, ValueError, KeyError, TypeError, TruncatedShard):
        return None
    return count, done["accounting"]


def _prepare_partial(partial: Path, state: dict[str, Any]) -> bool:
    """Create (or keep, when it converts the same thing) the partial folder; True when it was kept."""
    state_path = partial / STATE_FILE
    try:
        kept = json.loads(state_path.read_text()) == state
    except (OSError, ValueError):
        kept = False
    if not kept:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _write_json_atomic(state_path, state)
    return kept


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class _RateColumn(ProgressColumn):
    """Records per second since the start (rich's own speed column averages over the last seconds only)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} records/s", style="progress.data.speed")


def _progress(label: str, total: int | None) -> Progress:
    disable = not is_rank_zero() or os.environ.get("UNIMM_PROGRESS", "1") == "0"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
               TimeElapsedColumn())
    return Progress(*columns, console=Console(stderr=True), transient=not sys.stderr.isatty(), disable=disable)


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork: workers inherit the imported modules (no per-worker import of PIL, webdataset ... as with spawn);
    # the pool is started before the progress bar's thread exists (see write_shard_set)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    return ProcessPoolExecutor(max_workers=workers, mp_context=context)


def _noop() -> None:
    return None


def write_shard_set(
    out: str | os.PathLike,
    items: Iterable[Any],
    build: BuildFn,
    *,
    shard_size: int,
    mtime: int,
    source: str = "",
    converter: str = "",
    workers: int | None = None,
    label: str = "records",
    total: int | None = None,
) -> ShardSetResult:
    """Write the shard set ``out`` (replaced when complete) from ``items`` with ``workers`` processes.

    Args:
        items: the input, one item per record to build (picklable: sent to the workers); read lazily, at most
            ``2 * workers`` shards ahead of the writers.
        build: a module-level function (sent to the workers by name), see ``BuildFn``.
        shard_size: items per shard (the shard's record count when none is skipped).
        mtime: integer mtime of every tar member (:func:`input_mtime`).
        source, converter: written to index.json; with ``shard_size`` and ``mtime`` they identify the
            conversion: a partial folder left by a run with other values is started over.
        workers: processes (default: the cores); 1 writes in this process.
        total: the number of items, for the progress bar (None: a bar without an end).

    Returns the shard set's summary with every shard's accounting in shard order, on resume too (read from
    the done files of the shards finished by the earlier run).
    """
    out = Path(out)
    workers = max(1, workers or default_workers())
    partial = out.with_name(f".{out.name}.partial")
    state = {"source": source, "converter": converter, "shard_size": shard_size, "mtime": mtime,
             "format_version": FORMAT_VERSION}
    kept = _prepare_partial(partial, state)
    results: dict[int, tuple[int, Any]] = {}
    resumed = 0
    pool = _pool(workers) if workers > 1 else None
    try:
        if pool is not None:
            pool.submit(_noop).result()  # fork the workers now, before the progress bar starts its thread
        with _progress(label, total) as progress:
            task = progress.add_task(label, total=total)
            pending: dict[Future, tuple[int, int]] = {}

            def collect(block: bool) -> None:
                done, _ = wait(pending, return_when=FIRST_COMPLETED) if block else (
                    [f for f in pending if f.done()], None)
                for future in done:
                    i, n = pending.pop(future)
                    results[i] = future.result()  # a worker's error (strict mode) stops the conversion here
                    progress.advance(task, n)

            for i, chunk in enumerate(_chunks(items, shard_size)):
                previous = _finished(partial, i, len(chunk)) if kept else None
                if previous is not None:
                    results[i] = previous
                    resumed += 1
                    progress.advance(task, len(chunk))
                    continue
                path = str(partial / _shard_name(i))
                if pool is None:
                    results[i] = _write_shard(build, chunk, path, mtime)
                    progress.advance(task, len(chunk))
                    continue
                pending[pool.submit(_write_shard, build, chunk, path, mtime)] = (i, len(chunk))
                while len(pending) >= 2 * workers:
                    collect(block=True)
                collect(block=False)
            while pending:
                collect(block=True)
            if total is None or progress.tasks[0].completed != total:
                progress.update(task, total=progress.tasks[0].completed)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # finished shards stay for the next run
        raise
    if pool is not None:
        pool.shutdown()
    shards = [{"name": _shard_name(i), "count": results[i][0]} for i in sorted(results) if results[i][0]]
    index = {"format_version": FORMAT_VERSION, "shards": shards, "total": sum(s["count"] for s in shards),
             "source": source, "converter": converter}
    for i in results:
        Path(str(partial / _shard_name(i)) + DONE_SUFFIX).unlink(missing_ok=True)
    (partial / STATE_FILE).unlink(missing_ok=True)
    for leftover in partial.iterdir():  # temporary files of writers that were killed
        if leftover.name != INDEX_FILE and not any(leftover.name == s["name"] for s in shards):
            leftover.unlink()
    # same text as ShardSetWriter.close writes
    tmp = partial / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, partial / INDEX_FILE)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    read_index(out)  # every listed shard exists
    return ShardSetResult(out, len(shards), index["total"], [results[i][1] for i in sorted(results)], resumed)


def parallel_map(fn: Callable[[Any], Any], items: list[Any], workers: int | None = None, chunk: int = 256,
                 label: str = "items") -> list[Any]:
    """``[fn(x) for x in items]`` in ``workers`` processes (default: the cores; 1 = this process), in order,
    with a progress bar. ``fn`` must be a module-level function or a partial of one (sent by name)."""
    workers = max(1, workers or default_workers())
    if workers == 1 or len(items) <= chunk:
        return [fn(x) for x in items]
    pool = _pool(workers)
    try:
        pool.submit(_noop).result()  # fork before the progress bar's thread exists
        with _progress(label, len(items)) as progress:
            task = progress.add_task(label, total=len(items))
            out: list[Any] = []
            for result in pool.map(_map_chunk, [(fn, items[i:i + chunk]) for i in range(0, len(items), chunk)]):
                out += result
                progress.advance(task, len(result))
        return out
    finally:
        pool.shutdown(cancel_futures=True)


def _map_chunk(job: tuple[Callable[[Any], Any], list[Any]]) -> list[Any]:
    fn, items = job
    return [fn(x) for x in items]
