"""The Lightning DataModule over shard sets: a weighted training mixture and evaluation loaders."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from unimm.data.remote import RemoteOptions, set_default
from unimm.data.shards import read_index
from unimm.data.stream import SampleAccounting, ShardStream, Source


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _passthrough(batch: dict[str, Any]) -> dict[str, Any]:
    """The stream batches inside the worker; the DataLoader must leave batches as they are."""
    return batch


class _TrainLoader(DataLoader):
    """The training DataLoader. Its position in the epoch is the DataModule's state (:meth:`ShardDataModule.state_dict`,
    restored before the loader starts, exact mid-epoch), so it has nothing of its own to save; the interface tells
    Lightning that it resumes (else every mid-epoch resume warns "your dataloader is not resumable")."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ShardDataModule(L.LightningDataModule):
    """Streams records from shard sets.

    Args:
        train_sets: ``{name: {"path": shard_set_dir, "weight": float}}``; the training mixture. A path (here and
            for every evaluation shard set) is a local folder or a URL: ``s3://``, ``gs://``, ``http(s)://``,
            ``pipe:`` (:mod:`unimm.data.remote`).
        collator: a partial taking ``processor`` and ``sides`` (e.g. :class:`~unimm.data.collate.RetrievalCollator`).
        batch_size: per-rank training batch.
        eval_batch_size: per-rank batch when embedding queries and pools.
        num_workers: DataLoader worker processes (each takes whole shards).
        strict: fail on the first bad sample, damaged shard or shard whose sample count differs from its
            ``index.json`` entry, instead of counting it (:class:`~unimm.data.shards.DataError`).
        prepare: optional callable run once before anything reads data (e.g. building the toy dataset).
        train_sides: the sides every training record must have.
        seed: shuffling seed (the epoch is mixed in).
        shuffle_buffer: records kept in the in-worker shuffle buffer (0 = shard order only).
        eval_sort_window: when embedding for evaluation, sort each window of this many records by text length
            so batches pad less (0 = arrival order); see experiments/benchmarks/bench_length_bucketing.py.
        remote: reading shard sets at URLs: ``{retries, backoff_s, block_size, storage_options}``
            (:class:`~unimm.data.remote.RemoteOptions`; a shard still unreadable after ``retries`` re-opens is
            counted as lost with its promised samples, or stops the run under ``strict``).
    """

    def __init__(
        self,
        train_sets: Mapping[str, Mapping[str, Any]],
        collator: Callable[..., Callable],
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        strict: bool = False,
        prepare: Callable[[], Any] | None = None,
        train_sides: Sequence[str] = ("query", "pos"),
        seed: int = 0,
        shuffle_buffer: int = 1000,
        eval_sort_window: int = 0,
        remote: Mapping[str, Any] | RemoteOptions | None = None,
    ):
        super().__init__()
        self.train_sets = {name: dict(spec) for name, spec in train_sets.items()}
        self.collator = collator
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.strict = strict
        self.prepare = prepare
        self.train_sides = tuple(train_sides)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.eval_sort_window = eval_sort_window
        self.remote = RemoteOptions.from_config(remote)
        set_default(self.remote)  # for the evaluation helpers that read qrels and records at the same URLs
        self.processor = None
        self.accounting = SampleAccounting()
        self._train_stream: ShardStream | None = None

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        from unimm.utils.batches import to_device

        return to_device(batch, device)  # skips lists of plain values (keys, texts): see unimm.utils.batches

    def attach_processor(self, processor) -> None:
        """The backbone's processor (tokenizer + image preprocessing); set before the first loader."""
        self.processor = processor

    def _collate(self, sides: Sequence[str]) -> Callable:
        if self.processor is None:
            raise RuntimeError("ShardDataModule.attach_processor(processor) must be called before loading data")
        return self.collator(processor=self.processor, sides=tuple(sides))

    def train_stream(self) -> ShardStream:
        if self._train_stream is None:
            sources = [
                Source(read_index(spec["path"], self.remote), float(spec.get("weight", 1.0)), name)
                for name, spec in self.train_sets.items()
            ]
            self._train_stream = ShardStream(
                sources, self.batch_size, self._collate(self.train_sides), train=True, required_sides=self.train_sides,
                strict=self.strict, seed=self.seed, shuffle_buffer=self.shuffle_buffer, remote=self.remote,
            )
        rank, world = _rank_world()
        self._train_stream.configure(rank, world, self.num_workers)
        return self._train_stream

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_stream(), _TrainLoader)

    # -- exact resume: Lightning stores this in every checkpoint and restores it before the loaders start ----
    def state_dict(self) -> dict[str, int]:
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        # `processed` = batches whose optimizer step is done, i.e. what the saved weights have seen
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self.train_stream().resume(state["epoch"], state["batches_done"])

    def eval_loader(self, shard_set: str, sides: Sequence[str]) -> DataLoader:
        """Every sample of ``shard_set`` exactly once over all ranks and workers (no padding), in batches."""
        stream = ShardStream(
            [Source(read_index(shard_set, self.remote))], self.eval_batch_size, self._collate(sides), train=False,
            required_sides=sides, strict=self.strict, sort_window=self.eval_sort_window, remote=self.remote,
        )
        rank, world = _rank_world()
        stream.configure(rank, world, self.num_workers)
        return self._loader(stream)

    def _loader(self, stream: ShardStream, kind: type[DataLoader] = DataLoader) -> DataLoader:
        return kind(
            stream, batch_size=None, num_workers=self.num_workers, collate_fn=_passthrough,
            persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
        )
