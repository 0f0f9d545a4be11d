"""Shard sets on disk: webdataset tar shards plus an ``index.json`` that promises the sample counts.

A shard set is a folder::

    train/
      index.json            {"shards": [{"name": "shard-000000.tar", "count": 1000}, ...], "total": ..., ...}
      shard-000000.tar
      ...

The index lets a reader prove it delivered every sample (see :mod:`unimm.data.stream`). The folder may also be
a URL (``s3://``, ``gs://``, ``http(s)://``, ``pipe:``): see :mod:`unimm.data.remote`.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from unimm.data.remote import (
    RemoteOptions,
    RetryingStream,
    ShardUnreadable,
    is_remote,
    join,
    local_path,
    open_remote,
    read_bytes,
)
from unimm.utils.errors import UserError

INDEX_FILE = "index.json"
Buffer = bytes | mmap.mmap  # what a shard is read from (collections.abc.Buffer needs Python 3.12)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    path: str
    count: int


@dataclass(frozen=True)
class ShardIndex:
    """What a shard set promises: its shards (in order) and their sample counts."""

    root: str
    shards: tuple[ShardInfo, ...]
    source: str = ""
    converter: str = ""

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)


class DataError(UserError, RuntimeError):
    """Bad data met with ``strict=True``, a shard set that cannot be read, or a split that cannot work; the
    message names the file, shard or key (and the field). The CLIs print it without a traceback."""

    def __init__(self, message: str = ""):
        # Raised in a DataLoader worker, it comes back to the main process as DataError("Caught DataError in
        # DataLoader worker process N.\nOriginal Traceback ...\n<module>.DataError: <message>"): keep the message
        # (the worker's traceback stays in ``worker_traceback``).
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        self.worker_traceback = ""
        if message.startswith("Caught ") and "Original Traceback" in message and marker in message:
            self.worker_traceback = message
            where = message.split("\n", 1)[0].removeprefix(f"Caught {type(self).__name__} ").rstrip(".")
            message = f"{message.rsplit(marker, 1)[1].strip()} ({where})"
        super().__init__(message)


class ShardIndexError(DataError, ValueError):
    """An ``index.json`` that cannot be used: not JSON, or a missing or ill-typed field (named)."""


def read_index(root: str | os.PathLike, remote: RemoteOptions | None = None) -> ShardIndex:
    """Read ``<root>/index.json``, ``root`` a local folder or a URL (:mod:`unimm.data.remote`). Fails naming the
    folder when it is not a shard set, and the file and the field when the index is malformed.

    The shards of a local set must exist; those of a remote set are not probed (a request per shard): a shard
    that cannot be read is counted when the stream reaches it (``unreadable_shard``)."""
    if is_remote(root):
        root = os.fspath(root)
        index_path = join(root, INDEX_FILE)
        try:
            text = read_bytes(index_path, remote)
        except ShardUnreadable as err:
            if isinstance(err.__cause__, FileNotFoundError):
                raise FileNotFoundError(f"not a unimm shard set: {index_path} is missing") from None
            raise DataError(f"cannot read the index of shard set {root}: {err}") from err
    else:
        root = Path(local_path(root))
        index_path = root / INDEX_FILE
        if not index_path.is_file():
            hint = " (folder does not exist)" if not root.exists() else ""
            raise FileNotFoundError(f"not a unimm shard set: {index_path} is missing{hint}")
        text = index_path.read_bytes()
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" (line {err.lineno} column {err.colno}: {err.msg})" if isinstance(err, json.JSONDecodeError) else ""
        raise ShardIndexError(f"{index_path} is not valid JSON{where}; rewrite it with the converter that made "
                              f"the shard set") from None
    if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
        raise ShardIndexError(f"{index_path} has no 'shards' list (expected {{\"shards\": [{{\"name\": ..., "
                              f"\"count\": ...}}, ...]}})")
    shards = []
    for i, entry in enumerate(data["shards"]):
        for key in ("name", "count"):
            if not isinstance(entry, dict) or key not in entry:
                raise ShardIndexError(f"{index_path}: shards[{i}] has no {key!r} field")
        count = entry["count"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ShardIndexError(f"{index_path}: shards[{i}].count must be a sample count >= 0, got {count!r}")
        shards.append(ShardInfo(join(root, str(entry["name"])), count))
    missing = [] if is_remote(root) else [s.path for s in shards if not os.path.exists(s.path)]
    if missing:
        raise FileNotFoundError(f"{index_path} lists shards that do not exist: {missing[:5]}")
    return ShardIndex(str(root), tuple(shards), data.get("source", ""), data.get("converter", ""))


class ShardSetWriter:
    """Write records into numbered tar shards and an ``index.json`` on close.

    Example::

        with ShardSetWriter("data/toy/train", max_count=500, source="sklearn digits") as w:
            w.write(make_sample(key, meta, query=Item(text=...), pos=Item(image=...)))
    """

    def __init__(self, root: str | os.PathLike, max_count: int = 1000, source: str = "", converter: str = ""):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_count = max_count
        self.source = source
        self.converter = converter
        self._shards: list[dict[str, Any]] = []
        self._writer: wds.TarWriter | None = None
        self._keys: set[str] = set()
        self._mtime = int(time.time())

    def _open_next(self) -> None:
        self._close_current()
        name = f"shard-{len(self._shards):06d}.tar"
        # An integer mtime: webdataset's default (a float time.time()) makes tarfile put a pax header before
        # every member, doubling the headers a reader parses per sample.
        self._writer = wds.TarWriter(str(self.root / name), mtime=self._mtime)
        self._shards.append({"name": name, "count": 0})

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard set {self.root}")
        self._keys.add(key)
        if self._writer is None or self._shards[-1]["count"] >= self.max_count:
            self._open_next()
        self._writer.write(sample)
        self._shards[-1]["count"] += 1

    def close(self) -> ShardIndex:
        self._close_current()
        index = {
            "format_version": FORMAT_VERSION,
            "shards": self._shards,
            "total": sum(s["count"] for s in self._shards),
            "source": self.source,
            "converter": self.converter,
        }
        tmp = self.root / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.root / INDEX_FILE)  # the index appears only once every shard is complete
        return read_index(self.root)

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_current()


class TruncatedShard(Exception):
    """Raised (after yielding every intact member) when a tar ends in the middle of a member or a header is damaged.

    ``next_member``: the name of the member the damage fell in, when its header could still be read (its data
    is cut, or the file ends inside its header after the name): the member before it is then known to be the
    last of its sample. None when nothing tells.
    """

    def __init__(self, message: str, next_member: str | None = None):
        super().__init__(message)
        self.next_member = next_member


BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
NAME_FIELD = 100  # bytes of the name field at the start of a tar header


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.rstrip(b"\0 ")
    return int(field, 8) if field else 0


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header (``"<len> path=<value>\n"`` records)."""
    pos = 0
    while pos < len(data):
        length = int(data[pos : data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


@contextmanager
def open_shard(path: str, remote: RemoteOptions | None = None) -> Iterator[Buffer | RetryingStream]:
    """One tar shard: a buffer (a read-only memory map) for a local file, a sequential stream with bounded
    retries (:class:`~unimm.data.remote.RetryingStream`) for a URL. The one place that opens shards.

    Raises :class:`~unimm.data.remote.ShardUnreadable` (naming the shard) when a remote shard cannot be read.
    """
    if is_remote(path):
        with open_remote(path, remote) as stream:
            yield stream
        return
    with open(local_path(path), "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            yield buf


def iter_tar_members(path: str, remote: RemoteOptions | None = None) -> Iterator[tuple[str, bytes]]:
    """Yield ``(member name, bytes)`` of the regular files of the tar shard at ``path``, in file order.

    A small reader of the tar format (ustar, GNU long names, pax paths) over the shard's bytes, instead of
    :mod:`tarfile`, whose per-member Python objects cost more than decoding a small JPEG. Header checksums are
    verified, so a damaged or truncated shard raises :class:`TruncatedShard` at the damage, after every
    intact member. A local shard is read from a memory map, a remote one as it streams in (the same parser).
    """
    with open_shard(path, remote) as shard:
        blocks = _StreamBlocks(shard) if isinstance(shard, RetryingStream) else _BufferBlocks(shard)
        yield from _parse_tar(blocks, path)


def _block_sums(buf: Buffer) -> list[int]:
    """Byte sum of every 512-byte block, in one vectorised pass: the header checksums then cost a lookup
    instead of a Python-level sum over 512 bytes per member (a third of the reader's time on small samples)."""
    if len(buf) < BLOCK:
        return []
    blocks = np.frombuffer(buf, dtype=np.uint8, count=(len(buf) // BLOCK) * BLOCK).reshape(-1, BLOCK)
    sums = blocks.sum(axis=1, dtype=np.int64).tolist()
    del blocks  # release the buffer export, or the mmap cannot close
    return sums


class _BufferBlocks:
    """A whole shard in memory (a memory map): slices, and header sums from one vectorised pass."""

    def __init__(self, buf: Buffer):
        self.buf = buf
        self.reached = len(buf)  # bytes known to exist (here: all of them)
        self._sums = _block_sums(buf)

    def take(self, pos: int, n: int) -> bytes:
        """``n`` bytes at ``pos`` (fewer where the file ends)."""
        return self.buf[pos : pos + n]

    def header_sum(self, pos: int, header: bytes) -> int:
        return self._sums[pos // BLOCK]


class _StreamBlocks:
    """A shard arriving as a stream: the parser only moves forward, so ``take`` reads up to ``pos`` (the
    padding after a member) and then ``n`` bytes. The stream is read in chunks of up to ``CHUNK`` bytes (what
    has arrived, for HTTP): a read of fsspec's HTTP file is a round trip to its event-loop thread, too slow to
    make per tar header (measured: 3x slower than the chunked reads on small samples)."""

    CHUNK = 256 * 1024

    def __init__(self, stream: RetryingStream):
        self.stream = stream
        self.reached = 0  # bytes handed to the parser: the file's length once a read came back short
        self._chunk, self._at = b"", 0

    def _read(self, n: int) -> bytes:
        parts, left = [], n
        while left > 0:
            if self._at >= len(self._chunk):
                self._chunk, self._at = self.stream.read(max(self.CHUNK, left)), 0
                if not self._chunk:
                    break
            part = self._chunk[self._at : self._at + left]
            self._at += len(part)
            parts.append(part)
            left -= len(part)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.reached += len(data)
        return data

    def take(self, pos: int, n: int) -> bytes:
        if pos < self.reached:
            raise AssertionError(f"stream parser moved back from byte {self.reached} to {pos}")
        if pos > self.reached and len(self._read(pos - self.reached)) < pos - self.reached:
            return b""  # the file ends inside the padding
        return self._read(n)

    def header_sum(self, pos: int, header: bytes) -> int:
        return sum(header)


def _cut_header_name(partial: bytes) -> str | None:
    """The member name in a header the file ends inside of, when the cut left all of it (up to its NUL or the
    full 100-byte field). The bytes before a cut are as written, so the name is trusted though the header's
    checksum cannot be checked. Only its base name is used (a ustar prefix may be cut off)."""
    field = partial[:NAME_FIELD]
    if b"\0" not in field and len(field) < NAME_FIELD:
        return None
    try:
        return field.split(b"\0", 1)[0].decode("utf-8") or None
    except UnicodeDecodeError:
        return None


def _parse_tar(blocks: _BufferBlocks | _StreamBlocks, path: str) -> Iterator[tuple[str, bytes]]:
    """The tar parser for both sources: it reads forward only (``blocks.take`` at increasing offsets)."""
    pos, long_name = 0, None
    while True:
        header = blocks.take(pos, BLOCK)
        if len(header) < BLOCK:
            end = blocks.reached
            if end == 0:
                raise TruncatedShard(f"{path}: empty file")
            if header and header.count(0) == len(header):
                return  # the end-of-archive blocks are cut short: no member is lost
            name = long_name or _cut_header_name(bytes(header))
            raise TruncatedShard(f"{path}: no end-of-archive marker (file cut short at byte {end})", name)
        if header == _ZERO_BLOCK:
            return  # the end-of-archive marker every tar writer puts last
        # checksum: byte sum of the header with its own 8-byte field counted as spaces
        checksum_field = header[148:156]
        if _octal(checksum_field) != blocks.header_sum(pos, header) - sum(checksum_field) + 8 * 32:
            raise TruncatedShard(f"{path}: corrupt tar header at byte {pos}")
        size = _octal(header[124:136])
        start = pos + BLOCK
        kind = header[156:157]
        name = long_name or _header_name(header)
        data = blocks.take(start, size)
        if len(data) < size:
            # the header is intact: the damage is inside this member, whose name tells which sample it starts
            regular = kind in (b"0", b"\0", b"7")
            raise TruncatedShard(f"{path}: member ends after {len(data)} of {size} bytes", name if regular else None)
        pos = start + size + (-size) % BLOCK
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind == b"x":  # pax extended header for the next member
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):
            yield name, data
            long_name = None
        # other kinds (directories, links, global pax headers) carry no sample data


def _header_name(header: bytes) -> str:
    name = header[:NAME_FIELD].rstrip(b"\0").decode("utf-8")
    prefix = header[345:500].rstrip(b"\0").decode("utf-8") if header[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def sample_key(member: str) -> tuple[str, str] | None:
    """``(key, field)`` of a member name, as webdataset splits it: the key is the path up to the first dot of
    the base name (``"a/k1.pos.jpg" -> ("a/k1", "pos.jpg")``); None for a name without a field."""
    directory, _, base = member.rpartition("/")
    key, dot, field = base.partition(".")
    if not dot:
        return None
    return (f"{directory}/{key}" if directory else key), field


def _same_sample(member: str, key: str) -> bool:
    """Whether ``member`` may belong to sample ``key``, comparing base names (a cut header may lack its prefix)."""
    parsed = sample_key(member)
    return parsed is None or parsed[0].rpartition("/")[2] == key.rpartition("/")[2]


def iter_raw_samples(path: str, remote: RemoteOptions | None = None) -> Iterator[dict[str, Any]]:
    """Yield raw webdataset samples (``{"__key__": ..., "<field>.<ext>": bytes}``) from one tar shard.

    Fields are grouped by key in file order, as webdataset does. A damaged tar yields every sample known to be
    whole before the damage and then raises :class:`TruncatedShard`. A sample is known whole when a member of
    another sample follows it: when the damage falls in the first member of the next sample (its header still
    names it), the sample before the damage is complete and delivered; when the cut leaves no readable name
    after a sample, the sample may have had more members and counts as lost.

    A remote shard that stays unreadable raises :class:`~unimm.data.remote.ShardUnreadable` (after the samples
    read whole before the failure; the one being read is dropped, as nothing tells whether it was complete).
    """
    current: dict[str, Any] | None = None
    try:
        for name, data in iter_tar_members(path, remote):
            parsed = sample_key(name)
            if parsed is None:
                continue
            key, field = parsed
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[field] = data
    except TruncatedShard as err:
        if current is not None and err.next_member is not None and not _same_sample(err.next_member, current["__key__"]):
            yield current  # the damaged member starts the next sample: this one is whole
        raise
    except ShardUnreadable:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise TruncatedShard(f"{path}: {err}") from err
    # a sample interrupted by damage is incomplete: TruncatedShard propagates before it is yielded
    if current is not None:
        yield current
