"""Checkpoint writing that a crash cannot corrupt.

Lightning's default writer serialises to memory and moves a temporary file from the system temp folder into
place; when that folder is on another filesystem (a local /tmp, checkpoints on a network mount), the move is
a copy, and a crash during it leaves a truncated checkpoint. Here the temporary file is written in the
checkpoint's own folder, flushed to disk, and renamed over the target (atomic on POSIX): a reader sees the
old complete file or the new complete file, never a partial one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic on local filesystems (remote URLs use Lightning's writer)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():  # an exception before the rename: do not leave the partial file behind
                tmp.unlink()
