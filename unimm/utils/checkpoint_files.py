"""Is this path a checkpoint at all? Answered before torch.load, whose answer to a text file is ``KeyError: 101``."""

from __future__ import annotations

import zipfile
from pathlib import Path

from unimm.utils.errors import UserError

_PICKLE_PROTOCOL_2_PLUS = b"\x80"  # the legacy (non-zip) torch.save format is a pickle: it starts with PROTO


def check_checkpoint_file(path: str | Path, key: str) -> Path:
    """Return ``path`` when it can be a Lightning checkpoint; else a :class:`UserError` naming ``key``.

    Accepted: a ``torch.save`` file (zip archive, or the legacy pickle format) or a folder (DeepSpeed writes a
    checkpoint as a folder). Whether its content is a unimm run is for the loader to say.
    """
    path = Path(path)
    hint = "expected a Lightning checkpoint such as <run folder>/checkpoints/last.ckpt"
    if not path.exists():
        raise UserError(f"{key}={path}: no such file; {hint}")
    if path.is_dir():
        return path
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path) or head.startswith(_PICKLE_PROTOCOL_2_PLUS):
        return path
    shown = head.decode("utf-8", "replace") if head else "(empty file)"
    raise UserError(f"{key}={path} is not a Lightning checkpoint (not a torch.save file; it starts with {shown!r}); {hint}")
