"""Embedding caches keyed by everything that determines their content, with one writer at a time.

An evaluation caches the embeddings of each shard set it encodes, so that several evaluations over one pool
encode it once. A cache is only valid for the exact model, inputs and settings that produced it, so its folder
name is a hash of:

- the **weights fingerprint** of the module (:func:`weights_fingerprint`: every tensor of its state dict, bit for
  bit) and its class,
- which encoder ran (query or candidate side),
- the **processor and collator configuration** (:func:`describe`: tokenizer vocabulary and settings, image
  processor settings, collator arguments, evaluation batch size and sort window: with ``padding="longest"``
  the batch composition can enter the embedding),
- the **shard set identity** (:func:`shard_set_identity`: resolved path, hash of ``index.json``'s bytes, size of
  every shard file),
- the store dtype and autocast setting.

Two runs of different models (or checkpoints, or processors) into one folder therefore never share a cache, and
``embeddings.json`` repeats the full key, which is checked again on reading.

Concurrent writers: the first writer of a cache folder holds ``writer.lock`` (pid, host, start time) while it
embeds; another process wanting the same cache waits for it to finish (up to ``wait_s``) and then reads it; a
lock whose process is dead (same host) is taken over; after ``wait_s`` the waiter embeds into a private folder
of its own (``<folder>.<host>-<pid>``) instead of mixing parts with the other writer.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

# bump when the cached files change meaning. 3: reduced-size decoding (data.collator.reduced_decode) now decodes
# JPEGs at m/8 scale and resizes them in the worker, so caches written with the earlier decoder differ; the
# collator settings in the key are the same, hence the bump
CACHE_FORMAT = 3
LOCK_FILE = "writer.lock"
DONE_FILE = "embeddings.npy"  # a cache counts as complete once this exists (written last, by os.replace)
_CHUNK_BYTES = 64 << 20  # device -> host copies of at most this many bytes at a time


# -- weights ---------------------------------------------------------------------------------------------------
def _tensor_bytes(tensor: torch.Tensor):
    """The raw bytes of a tensor, in chunks (host memory views; a device tensor is copied chunk by chunk)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return
    if not flat.is_contiguous():
        flat = flat.contiguous()
    raw = flat.view(torch.uint8) if flat.element_size() > 0 else flat
    step = _CHUNK_BYTES
    for start in range(0, raw.numel(), step):
        yield raw[start : start + step].cpu().numpy()


def local_weights_fingerprint(module: torch.nn.Module) -> str:
    """xxh3-128 (hex) of this process's view of the module's state dict: for every entry, sorted by name, its
    name, dtype, shape and raw bytes (non-tensor entries: their ``repr``). Bit-exact: any changed element,
    dtype or shape changes it; the device does not."""
    digest = xxhash.xxh3_128()
    digest.update(type(module).__qualname__.encode())
    # DeepSpeed ZeRO-3 leaves empty placeholders in the state dict and keeps this rank's share in `ds_tensor`:
    # hash the share (weights_fingerprint combines the ranks), never the placeholder alone
    shares = {n: p.ds_tensor for n, p in module.named_parameters() if getattr(p, "ds_tensor", None) is not None}
    for name, value in sorted(module.state_dict().items()):
        if name in shares:
            value = shares[name]
            digest.update(b"\0zero3-share")
        if isinstance(value, torch.Tensor):
            digest.update(f"\0{name}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
            for chunk in _tensor_bytes(value):
                digest.update(memoryview(chunk))
        else:
            digest.update(f"\0{name}\0{value!r}\0".encode())
    return digest.hexdigest()


def weights_fingerprint(module: torch.nn.Module, all_ranks: bool = False) -> str:
    """A 32-hex-digit fingerprint of a module's weights (its full state dict, bit for bit, with names, dtypes and
    shapes), the same on CPU and GPU. Reads every byte once (xxh3, several GB/s).

    With ``all_ranks=True`` (a collective: every rank must call it, as the evaluator does) ranks holding different
    views (sharded parameters: FSDP, ZeRO-3 partitions) are combined in rank order; when every rank holds the same
    weights (DDP) the result equals the single-process fingerprint. The default is this process's view only, safe
    to call from rank 0 alone (exact unless the parameters are sharded).
    """
    local = local_weights_fingerprint(module)
    if not (all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    views: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(views, local)
    if len(set(views)) == 1:
        return local
    return xxhash.xxh3_128_hexdigest("|".join(views).encode())


# -- processor / collator ---------------------------------------------------------------------------------------
def describe(obj: Any, depth: int = 0, _seen: set[int] | None = None) -> Any:
    """A JSON-able description of a processor / collator configuration, to hash into a cache key.

    Hugging Face tokenizers are described by their class, full serialised backend (vocabulary, normaliser,
    post-processor) or vocabulary, and their init settings; image processors by ``to_dict()``; partials by their
    function and arguments; other objects by their class and public attributes (recursively, 6 levels deep).
    Tensors and arrays by dtype, shape and a hash of their bytes.
    """
    _seen = set() if _seen is None else _seen
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [describe(v, depth + 1, _seen) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, depth + 1, _seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (set, frozenset)):
        return sorted(repr(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        digest = xxhash.xxh3_64()
        for chunk in _tensor_bytes(obj):
            digest.update(memoryview(chunk))
        return {"tensor": str(obj.dtype), "shape": list(obj.shape), "xxh3": digest.hexdigest()}
    if isinstance(obj, np.ndarray):
        return {"array": str(obj.dtype), "shape": list(obj.shape),
                "xxh3": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(obj).tobytes())}
    if isinstance(obj, functools.partial):
        return {"partial": describe(obj.func, depth + 1, _seen), "args": describe(list(obj.args), depth + 1, _seen),
                "kwargs": describe(dict(obj.keywords), depth + 1, _seen)}
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    if id(obj) in _seen or depth > 6:
        return f"<{type(obj).__qualname__}>"
    _seen.add(id(obj))
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    backend = getattr(obj, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):  # HF fast tokenizer: vocabulary and pipeline
        return {"class": name, "backend_xxh3": xxhash.xxh3_64_hexdigest(backend.to_str().encode()),
                "init": describe(getattr(obj, "init_kwargs", {}), depth + 1, _seen),
                "padding_side": getattr(obj, "padding_side", None), "truncation_side": getattr(obj, "truncation_side", None)}
    if hasattr(obj, "get_vocab") and hasattr(obj, "init_kwargs"):  # HF slow tokenizer
        vocab = json.dumps(sorted(obj.get_vocab().items()))
        return {"class": name, "vocab_xxh3": xxhash.xxh3_64_hexdigest(vocab.encode()),
                "init": describe(obj.init_kwargs, depth + 1, _seen)}
    if hasattr(obj, "to_dict") and callable(obj.to_dict) and type(obj).__module__.startswith("transformers"):
        try:
            return {"class": name, "config": describe(obj.to_dict(), depth + 1, _seen)}
        except Exception:  # noqa: BLE001 - a processor whose to_dict fails is described by its attributes below
            pass
    if isinstance(obj, torch.nn.Module):  # a module inside a collator: its weights decide what it produces
        return {"class": name, "weights": local_weights_fingerprint(obj)}
    attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_")} if hasattr(obj, "__dict__") else {}
    if not attrs:
        return {"class": name, "repr": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))[:200]}  # no memory address
    return {"class": name, "attrs": describe(attrs, depth + 1, _seen)}


# -- shard sets -----------------------------------------------------------------------------------------------
def shard_set_identity(root: str | os.PathLike) -> dict[str, Any]:
    """What identifies the content of a shard set without reading it: its resolved path, the xxh3 of its
    ``index.json`` bytes and the byte size of each shard file (a truncated or replaced shard changes it)."""
    root = Path(root).resolve()
    index_bytes = (root / "index.json").read_bytes()
    sizes = {}
    for shard in json.loads(index_bytes).get("shards", []):
        path = root / shard["name"]
        sizes[shard["name"]] = path.stat().st_size if path.exists() else None
    return {"path": str(root), "index_xxh3": xxhash.xxh3_128_hexdigest(index_bytes), "shard_bytes": sizes}


def cache_key(parts: dict[str, Any]) -> str:
    """xxh3-128 (hex) of the canonical JSON of ``parts``."""
    return xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True, default=repr).encode())


# -- one writer at a time ---------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def try_lock(cache_dir: Path) -> bool:
    """Create ``cache_dir/writer.lock`` atomically (O_EXCL); a lock of a dead process on this host is replaced.
    Returns whether this process now holds the lock."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / LOCK_FILE
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not lock_is_stale(path):
                return False
            path.unlink(missing_ok=True)  # the writer died: take over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(info)
        return True
    return False


def lock_is_stale(path: Path) -> bool:
    """A lock whose writer process is gone (same host), or that cannot be read (left half-written)."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return False  # released meanwhile: not stale, simply free (the caller retries)
    except (OSError, ValueError):
        return time.time() - path.stat().st_mtime > 60 if path.exists() else False
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))


def release(cache_dir: Path) -> None:
    """Remove this process's lock on ``cache_dir`` (a lock held by another process is left alone)."""
    path = cache_dir / LOCK_FILE
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def claim(cache_dir: Path, wait_s: float, poll_s: float = 0.5) -> tuple[Path, bool]:
    """Decide where this process reads or writes the cache ``cache_dir``.

    Returns ``(folder, must_write)``: the folder is complete (``must_write`` False), or this process holds its
    lock and must fill it. Another live writer is waited for up to ``wait_s`` seconds; then this process uses a
    private folder ``<cache_dir>.<host>-<pid>`` of its own.
    """
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        if (cache_dir / DONE_FILE).exists():
            return cache_dir, False
        if try_lock(cache_dir):
            if (cache_dir / DONE_FILE).exists():  # finished between the check and the lock
                release(cache_dir)
                return cache_dir, False
            return cache_dir, True
        if time.monotonic() >= deadline:
            own = cache_dir.with_name(f"{cache_dir.name}.{socket.gethostname()}-{os.getpid()}")
            print(f"[eval] {cache_dir} is being written by another process ({_holder(cache_dir)}); "
                  f"embedding into a private cache {own.name} instead")
            if (own / DONE_FILE).exists():
                return own, False
            try_lock(own)
            return own, True
        if not announced:
            print(f"[eval] waiting for another process writing {cache_dir} ({_holder(cache_dir)}), up to {wait_s:.0f} s")
            announced = True
        time.sleep(poll_s)


def _holder(cache_dir: Path) -> str:
    try:
        holder = json.loads((cache_dir / LOCK_FILE).read_text())
        return f"pid {holder.get('pid')} on {holder.get('host')}"
    except (OSError, ValueError):
        return "unknown writer"
