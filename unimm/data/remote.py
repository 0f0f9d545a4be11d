"""Shard sets on object storage and HTTP: ``s3://``, ``gs://``, ``http(s)://``, ``pipe:`` and other fsspec URLs.

A remote shard set has the local layout under a URL prefix: ``<url>/index.json`` and ``<url>/<shard name>``.
Files are opened through fsspec (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``, aiohttp for HTTP) or, for
``pipe:<command>``, through webdataset's ``gopen`` (the command's standard output is the file; the name is
appended to the command, so its last argument is the folder: ``pipe:curl -sf https://host/train`` opens
``pipe:curl -sf https://host/train/shard-000000.tar``; a tool that needs arguments after the path goes in a
small wrapper script). No client is written here: this module only adds the bounded retries and the
resume-at-offset that a streaming reader of a long file needs.

Exact resume holds as for local sets as long as every shard reads the same in both runs: a shard lost in one
run (retries spent) and read in the other changes what the workers deliver.

Shards are streamed: :class:`RetryingStream` reads sequentially (HTTP: one GET per shard; S3/GCS: ranged reads
of ``block_size`` bytes), so the first sample arrives after one block, not after the whole shard. A transient
error (dropped connection, timeout, 5xx) re-opens the file and continues at the byte reached, up to
``retries`` times; then :class:`ShardUnreadable` names the shard, the byte and the last error.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RemoteOptions", "RetryingStream", "ShardUnreadable", "is_remote", "join", "open_remote", "read_bytes",
           "set_default"]

# errors that retrying cannot fix: the file is not there or not ours to read
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shard sets are read (``data.remote`` in the configs).

    Args:
        retries: re-opens after a transient error, per file (0 = fail at the first error).
        backoff_s: wait before the first retry; doubled for each further one.
        block_size: bytes per ranged read on object stores (s3, gs); HTTP streams one GET per file.
        storage_options: passed to the fsspec filesystem (e.g. ``{"endpoint_url": ..., "anon": true}``
            for s3fs); credentials are best left to the client's own environment variables.
    """

    retries: int = 3
    backoff_s: float = 0.5
    block_size: int = 8 * 2**20
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.block_size <= 0:
            raise ValueError(f"data.remote: retries and backoff_s must be >= 0 and block_size > 0, got {self}")

    @classmethod
    def from_config(cls, config: RemoteOptions | dict[str, Any] | None) -> RemoteOptions:
        if isinstance(config, RemoteOptions):
            return config
        config = dict(config or {})
        unknown = sorted(set(config) - {"retries", "backoff_s", "block_size", "storage_options"})
        if unknown:
            raise ValueError(f"data.remote has unknown keys {unknown}; valid: retries, backoff_s, block_size, "
                             f"storage_options")
        config["storage_options"] = dict(config.get("storage_options") or {})
        return cls(**config)


DEFAULT = RemoteOptions()


def set_default(options: RemoteOptions) -> None:
    """The options used where none are passed (evaluation helpers reading qrels, benchmark.json or records
    back for reports). The DataModule sets its ``data.remote`` here; worker processes forked later inherit it."""
    global DEFAULT
    DEFAULT = options


class ShardUnreadable(OSError):
    """A remote file that stayed unreadable after the retries (or at once, when missing); names it."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read through fsspec or a pipe rather than the local file system (``file://`` is local)."""
    path = os.fspath(path)
    if path.startswith("pipe:"):
        return True
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def local_path(path: str | os.PathLike) -> str:
    """A local path with any ``file://`` prefix removed."""
    path = os.fspath(path)
    return path[len("file://"):] if path.startswith("file://") else path


def join(root: str | os.PathLike, name: str) -> str:
    """``root/name`` for a URL, a pipe command or a local folder."""
    root = os.fspath(root)
    if is_remote(root):
        return f"{root.rstrip('/')}/{name}"
    return os.path.join(local_path(root), name)


def _open_once(url: str, options: RemoteOptions):
    """One file-like object over ``url`` (no retries), positioned at byte 0."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb", bufsize=options.block_size)
    from fsspec.core import url_to_fs

    fs, fs_path = url_to_fs(url, **options.storage_options)
    if url.startswith(("http://", "https://")):
        # block_size=0: one streaming GET per file (ranged reads would cost a request per block, and
        # http.server and many CDNs answer ranges poorly)
        return fs.open(fs_path, "rb", block_size=0)
    return fs.open(fs_path, "rb", block_size=options.block_size, cache_type="readahead")


def open_remote(url: str, options: RemoteOptions | None = None) -> RetryingStream:
    """A sequential reader of ``url`` that retries transient errors (see :class:`RetryingStream`)."""
    return RetryingStream(url, options or DEFAULT)


def read_bytes(url: str, options: RemoteOptions | None = None) -> bytes:
    """The whole of a small remote file (``index.json``, ``benchmark.json``, qrels), with retries."""
    with open_remote(url, options) as f:
        return f.read()


class RetryingStream(io.RawIOBase):
    """Reads ``url`` from its start to its end; on a transient error re-opens it and continues where it was.

    The continuation seeks when the file object can (object stores: a ranged read) and otherwise reads and
    drops the bytes already delivered (a streaming HTTP GET or a pipe), so the bytes returned are exactly the
    file's, whatever number of reconnections it took.
    """

    def __init__(self, url: str, options: RemoteOptions):
        super().__init__()
        self.url, self.options = url, options
        self.pos = 0
        self.reopens = 0  # re-opens so far (for tests and logs)
        self._file = None
        self._eof = False
        self._failures = 0
        self._call(lambda: None)  # open now: a missing file fails here, naming it

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        self._close_file()
        f = _open_once(self.url, self.options)
        if self.pos:
            # a streaming GET or a pipe cannot seek (fsspec's HTTPStreamFile says it can, then refuses)
            seekable = not self.url.startswith(("http://", "https://", "pipe:"))
            if seekable:
                f.seek(self.pos)
            else:
                left = self.pos
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        raise EOFError(f"{self.url} ended at byte {self.pos - left} on re-open, before byte {self.pos}")
                    left -= len(chunk)
        self._file = f

    def _call(self, action):
        """Run ``action`` on the open file, re-opening after a transient error up to ``retries`` times in all."""
        while True:
            try:
                if self._file is None:
                    self._reopen()
                return action()
            except _PERMANENT as err:
                self._close_file()
                raise ShardUnreadable(f"{self.url}: {type(err).__name__}: {err}") from err
            except Exception as err:  # noqa: BLE001 - clients raise unrelated types (aiohttp, botocore, OSError)
                self._close_file()
                if self._failures >= self.options.retries:
                    raise ShardUnreadable(
                        f"{self.url}: unreadable at byte {self.pos} after {self._failures} retries "
                        f"(data.remote.retries={self.options.retries}): {type(err).__name__}: {err}") from err
                time.sleep(self.options.backoff_s * 2**self._failures)
                self._failures += 1
                self.reopens += 1

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is left for ``n < 0``); ``b""`` only at the end of the file."""
        if n is None or n < 0:
            parts = []
            while chunk := self.read(1 << 22):
                parts.append(chunk)
            return b"".join(parts)

        if self._eof:
            return b""

        def read_some() -> bytes:
            data = self._file.read(n) or b""
            if not data and n:
                # the end: close here, where an error counts as a failed read (a pipe's command reports its
                # exit status only when waited for, after its output ended)
                f, self._file = self._file, None
                f.close()
                self._eof = True
            return data

        data = self._call(read_some)
        self.pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing a broken connection (or a pipe whose command failed)
                pass

    def close(self) -> None:
        self._close_file()
        super().close()
