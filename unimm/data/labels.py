"""Cluster labels beside a shard set, and the collator that turns records + labels into training tensors.

A labels folder (written by ``python -m unimm.clustering assign``) holds:

    keys.npy        [N] unicode, sorted sample keys
    labels.npy      [N, l] int32, the top-l nearest cluster centres of each key, nearest first
    clusters.json   {"num_classes", "top_l", "count", ...}

Keys are sorted so a lookup is a binary search over a flat array (no per-key Python objects: this stays
small for hundreds of millions of keys). The images are never rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimm.data.records import Record

KEYS_FILE, LABELS_FILE, INFO_FILE = "keys.npy", "labels.npy", "clusters.json"


def write_labels(out_dir: str | Path, keys: Sequence[str], labels: np.ndarray, info: dict[str, Any]) -> Path:
    """Write a labels folder; ``labels`` ``[N, l]`` is in the order of ``keys`` (sorted here)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = np.asarray(keys, dtype=np.str_)
    if len(np.unique(keys)) != len(keys):
        raise ValueError(f"duplicate sample keys in the labels written to {out_dir}")
    order = np.argsort(keys, kind="stable")
    np.save(out_dir / KEYS_FILE, keys[order])
    np.save(out_dir / LABELS_FILE, np.asarray(labels, dtype=np.int32)[order])
    (out_dir / INFO_FILE).write_text(json.dumps({**info, "count": int(len(keys))}, indent=1) + "\n")
    return out_dir


class ClusterLabels:
    """Key -> top-l cluster ids lookup over a labels folder.

    Args:
        labels_dir: the folder written by :func:`write_labels`.
        num_labels: use only the ``num_labels`` nearest centres (1 for UNICOM's single label); default all.
    """

    def __init__(self, labels_dir: str | Path, num_labels: int | None = None):
        labels_dir = Path(labels_dir)
        if not (labels_dir / INFO_FILE).is_file():
            raise FileNotFoundError(f"no cluster labels at {labels_dir} (expected {INFO_FILE}); run "
                                    "`python -m unimm.clustering assign` first")
        self.info = json.loads((labels_dir / INFO_FILE).read_text())
        self.keys = np.load(labels_dir / KEYS_FILE, allow_pickle=False)
        self.labels = np.load(labels_dir / LABELS_FILE, mmap_mode="r", allow_pickle=False)
        if num_labels is not None and num_labels > self.labels.shape[1]:
            raise ValueError(f"{labels_dir} holds top-{self.labels.shape[1]} labels, {num_labels} requested")
        self.num_labels = num_labels or self.labels.shape[1]
        self.num_classes = int(self.info["num_classes"])

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """``[len(keys), num_labels]`` int64 labels; rows of keys without labels are -1."""
        keys = np.asarray(keys, dtype=np.str_)
        pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        found = self.keys[pos] == keys
        out = np.full((len(keys), self.num_labels), -1, dtype=np.int64)
        out[found] = self.labels[pos[found], : self.num_labels]
        return out


def first_image_side(record: Record, sides: Sequence[str]) -> str | None:
    """The first of ``sides`` that carries an image in ``record`` (None if none does)."""
    return next((s for s in sides if s in record.sides and record.sides[s].image is not None), None)


class ClusterLabelCollator:
    """Records -> one image per record + its cluster labels.

    The image of a record is taken from the first of ``sides`` that has one (toy training records keep the
    image on ``pos`` for t2i/it2i and on ``query`` for i2t: ``sides = [pos, query]``).

    Batch: ``keys``, ``meta``, ``shards``; ``image`` = ``{size, pixel_values [B, 3, H, W], image_rows [B]}`` (the
    side layout of :class:`~unimm.data.collate.RetrievalCollator`); with a labels folder also ``labels``
    ``[B, l]`` int64 (-1 rows for keys without labels: evaluation sets, or a training set it was not made for).

    Args:
        processor: a :class:`~unimm.models.processors.TextImageProcessor`.
        sides: where to look for the image, in order.
        labels_dir: the labels folder (None: no labels, e.g. feature extraction or evaluation only).
        num_labels: nearest centres used per record (MLCD: 8, UNICOM: 1).
    """

    def __init__(self, processor, sides: Sequence[str] = ("pos", "query"), labels_dir: str | None = None,
                 num_labels: int | None = None):
        self.processor = processor
        self.sides = tuple(sides)
        self.labels = ClusterLabels(labels_dir, num_labels) if labels_dir else None

    def __call__(self, records: list[Record]) -> dict[str, Any]:
        images = []
        for r in records:
            side = first_image_side(r, self.sides)
            if side is None:
                raise ValueError(f"record {r.key} in {r.shard} has no image on any of the sides {list(self.sides)}")
            images.append(r.sides[side].image)
        keys = [r.key for r in records]
        batch: dict[str, Any] = {
            "keys": keys,
            "meta": [r.meta for r in records],
            "shards": [r.shard for r in records],
            "image": {
                "size": len(records),
                "pixel_values": self.processor.images(images) if images else torch.zeros(0, 3, 1, 1),
                "image_rows": torch.arange(len(records)),
            },
        }
        if self.labels is not None:
            batch["labels"] = torch.from_numpy(self.labels.lookup(keys))
        return batch
