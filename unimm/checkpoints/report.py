"""What a released-checkpoint load did: one :class:`LoadReport` shared by every loader in :mod:`unimm.checkpoints`.

A loader fills the report while it maps the file onto the model: each file key it loaded (``mapped``, file key ->
our key), dropped (``dropped``, file key -> reason), each tensor whose shape it changed (``reshaped``, file key ->
(file shape, loaded shape)) or whose dtype it changed (``cast``, our key -> (file dtype, model dtype)), and each of
our tensors the file does not provide and that keeps its built value (``kept``, our key -> reason). Everything not in
one of these lists is an error raised by the loader before any weight changes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("unimm.checkpoints")


@dataclass
class LoadReport:
    """The record of one load (see the module docstring). ``source``: the file or folder; ``loader``: its loader."""

    source: str = ""
    loader: str = ""
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    reshaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    cast: dict[str, tuple[str, str]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    # -- the names older callers read --------------------------------------------------------------------------
    @property
    def loaded(self) -> list[str]:
        """File keys loaded (sorted)."""
        return sorted(self.mapped)

    @property
    def unused(self) -> list[str]:
        """Our keys left as built (sorted): the UniIR loader's name."""
        return sorted(self.kept)

    @property
    def missing(self) -> list[str]:
        """Our keys left as built (sorted): the VLMo loader's name."""
        return sorted(self.kept)

    @property
    def truncated(self) -> dict[str, tuple[int, int]]:
        """``{file key: (old size, new size)}`` of the first resized axis of each reshaped tensor of equal rank."""
        out = {}
        for key, (old, new) in self.reshaped.items():
            if len(old) == len(new):
                axis = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), None)
                if axis is not None:
                    out[key] = (old[axis], new[axis])
        return out

    # -- recording -----------------------------------------------------------------------------------------------
    def note_reshape(self, key: str, before: Tensor, after: Tensor) -> Tensor:
        """Record ``before -> after`` under ``key`` when the shape changed; returns ``after``."""
        if tuple(before.shape) != tuple(after.shape):
            self.reshaped[key] = (tuple(before.shape), tuple(after.shape))
        return after

    def cast_to(self, key: str, value: Tensor, like: Tensor) -> Tensor:
        """``value`` in ``like``'s dtype, recording the cast under our ``key`` when the dtypes differ."""
        if value.dtype != like.dtype:
            self.cast[key] = (str(value.dtype).removeprefix("torch."), str(like.dtype).removeprefix("torch."))
            value = value.to(like.dtype)
        return value

    # -- output --------------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in ("mapped", "dropped", "reshaped", "cast", "kept")}

    def summary(self, max_names: int = 8) -> str:
        """A few lines for the console / run log: counts, then the names (and reasons) of everything not mapped."""
        counts = ", ".join(f"{n} {c}" for n, c in self.counts().items())
        lines = [f"loaded {self.source} with {self.loader}: {counts}"]

        def names(label: str, items: Mapping) -> None:
            if items:
                shown = [f"{k} ({v})" if isinstance(v, str) else f"{k} {v}" for k, v in list(items.items())[:max_names]]
                more = f" ... and {len(items) - max_names} more" if len(items) > max_names else ""
                lines.append(f"  {label}: {'; '.join(shown)}{more}")

        names("dropped", self.dropped)
        names("reshaped", {k: f"{list(a)} -> {list(b)}" for k, (a, b) in self.reshaped.items()})
        names("cast", {k: f"{a} -> {b}" for k, (a, b) in self.cast.items()})
        names("kept as built", self.kept)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "counts": self.counts()}

    def log(self) -> LoadReport:
        log.info(self.summary())
        return self

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def rename_by_rules(key: str, rules: tuple[tuple[str, str], ...],
                    accept: Callable[[str], bool] | None = None) -> str | None:
    """``key`` rewritten by the first of ``rules`` (``(regex, replacement)`` pairs, in order) that matches it and whose
    result ``accept`` takes (default: any); None when no rule does. The loaders' explicit key maps are such tables."""
    for pattern, repl in rules:
        if re.match(pattern, key):
            name = re.sub(pattern, repl, key)
            if accept is None or accept(name):
                return name
    return None


def strict_fit(state: Mapping[str, Tensor], ours: Mapping[str, Tensor], report: LoadReport,
               what: str, kept: Mapping[str, str] | None = None) -> dict[str, Tensor]:
    """Check that ``state`` (already in our names) fills ``ours`` exactly, cast to our dtypes.

    Args:
        state: our key -> tensor from the file.
        ours: the model's ``state_dict()``.
        what: names the checkpoint kind in errors.
        kept: our keys the file may lack, with the reason (they keep their built values and go to ``report.kept``).

    Raises:
        KeyError: keys of ``state`` the model lacks, or keys of ``ours`` neither in ``state`` nor in ``kept``.
        ValueError: shape mismatches, naming each key with both shapes.
    """
    kept = dict(kept or {})
    unexpected = sorted(set(state) - set(ours))
    missing = sorted(k for k in ours if k not in state and k not in kept)
    if unexpected or missing:
        raise KeyError(f"{what} does not match the model: {len(unexpected)} unexpected keys {unexpected[:20]}; "
                       f"{len(missing)} missing keys {missing[:20]}")
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(ours[k].shape)}" for k, v in state.items()
           if v.shape != ours[k].shape]
    if bad:
        raise ValueError(f"{what}: shape mismatches {bad[:20]}")
    report.kept.update({k: reason for k, reason in kept.items() if k in ours and k not in state})
    return {k: report.cast_to(k, v, ours[k]) for k, v in state.items()}


def read_safetensors_folder(path: str | Path, stem: str = "model") -> dict[str, Tensor]:
    """Every tensor of a Hugging Face folder: ``<stem>.safetensors`` or the shards of ``<stem>.safetensors.index.json``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    index = path / f"{stem}.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / f"{stem}.safetensors").is_file():
        files = [f"{stem}.safetensors"]
    elif (path / "pytorch_model.bin").is_file() and stem == "model":
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has neither {stem}.safetensors nor {stem}.safetensors.index.json")
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state
