"""Streaming records out of shard sets: split across ranks and workers, batched, and accounted for.

Splitting is by shard: after a per-epoch seeded shuffle (training) or in order (evaluation), shard ``i``
of every shard set goes to the global worker slot ``i % (world_size * num_workers)``. No sample is read by
two slots and none is padded or duplicated.

Training needs every rank to take the same number of optimizer steps (DDP would hang otherwise). Every
worker slot yields the same number of batches, computed up front from the counts promised by
``index.json`` (the fewest full batches any slot can make); samples beyond that are counted as unused for
the epoch (a worker reaching its quota counts what is left in its buffer and its shards, without decoding
it; for a remote shard set, see :mod:`unimm.data.remote`, the rest of its shards is not downloaded to be
counted: their unused samples are the counts index.json promises, less what was read). A worker whose shards deliver fewer samples than promised (corrupt samples) tops up by re-reading its
own shards; the accounting says so, and counts the damage met on the re-read only once.

A remote shard that stays unreadable after ``data.remote.retries`` is counted as ``unreadable_shard`` with
the samples index.json promises beyond those read whole before the failure (``strict=True``: fatal).

Accounting identity, per epoch: delivered (re-reads excluded) + skipped + unused = promised by index.json +
found beyond index.json. A shard holding more or fewer samples than its index entry is counted per shard
(``beyond_index`` / ``fewer_than_indexed``) and stops the run with ``strict=True``.

Exact resume: because every worker yields the same number of batches and the DataLoader takes batches from
its workers in turn, batch ``j`` of an epoch comes from worker ``j % num_workers``. Knowing how many batches
a rank had consumed (:meth:`ShardStream.resume`), each worker replays its deterministic record sequence
(seeded by seed, epoch and slot) and drops the records it had already delivered, without collating them.

Every batch carries ``batch["stats"]``: a :class:`StreamStats` with the samples delivered, skipped (by reason
and shard), unused and found beyond the index since the previous batch. :class:`SampleAccounting` adds them up.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from unimm.data.records import CorruptSample, Record, decode_sample
from unimm.data.remote import RemoteOptions, ShardUnreadable, is_remote
from unimm.data.shards import DataError, ShardIndex, ShardInfo, TruncatedShard, iter_raw_samples

__all__ = ["DataError", "SampleAccounting", "ShardStream", "Source", "StreamStats", "fetch_records"]


@dataclass
class StreamStats:
    """What happened to the samples of some span of a stream.

    ``delivered``: samples in batches, re-reads included; ``refilled``: re-reads among them (a worker topping
    up to keep ranks in step); ``skipped``: ``(reason, shard) -> n`` samples promised and not delivered
    (damage, bad samples, a shard holding fewer than promised); ``unused``: ``shard -> n`` samples left out of
    a training epoch by the equal per-worker quota; ``beyond_index``: ``shard -> n`` samples a shard holds
    beyond its ``index.json`` count.
    """

    delivered: int = 0
    skipped: Counter = field(default_factory=Counter)
    refilled: int = 0
    unused: Counter = field(default_factory=Counter)
    beyond_index: Counter = field(default_factory=Counter)

    def add(self, other: StreamStats) -> None:
        self.delivered += other.delivered
        self.skipped.update(other.skipped)
        self.refilled += other.refilled
        self.unused.update(other.unused)
        self.beyond_index.update(other.beyond_index)

    def take(self) -> StreamStats:
        """Return the stats so far and reset (attach to the next emitted batch)."""
        out = StreamStats(self.delivered, self.skipped, self.refilled, self.unused, self.beyond_index)
        self.delivered, self.skipped, self.refilled, self.unused, self.beyond_index = 0, Counter(), 0, Counter(), Counter()
        return out

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def n_unused(self) -> int:
        return sum(self.unused.values())

    @property
    def n_beyond_index(self) -> int:
        return sum(self.beyond_index.values())

    @property
    def used(self) -> int:
        """Distinct samples delivered (re-reads excluded)."""
        return self.delivered - self.refilled

    def index_mismatches(self, counts: dict[str, int]) -> dict[str, tuple[int, int]]:
        """``shard -> (held, promised)`` for every shard seen holding another count than ``counts`` (index.json)."""
        out = {shard: counts.get(shard, 0) + n for shard, n in self.beyond_index.items() if n}
        for (reason, shard), n in self.skipped.items():
            if reason == "fewer_than_indexed":
                out[shard] = counts.get(shard, 0) - n
        return {shard: (held, counts.get(shard, 0)) for shard, held in sorted(out.items())}

    def to_dict(self) -> dict[str, Any]:
        """Plain types (for checkpoints and json)."""
        return {"delivered": self.delivered, "refilled": self.refilled,
                "skipped": [[reason, shard, n] for (reason, shard), n in self.skipped.items()],
                "unused": [[shard, n] for shard, n in self.unused.items()],
                "beyond_index": [[shard, n] for shard, n in self.beyond_index.items()]}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StreamStats:
        return cls(state.get("delivered", 0), Counter({(r, sh): n for r, sh, n in state.get("skipped", [])}),
                   state.get("refilled", 0), Counter(dict(state.get("unused", []))),
                   Counter(dict(state.get("beyond_index", []))))


class SampleAccounting:
    """Adds up the ``stats`` of every batch of an epoch and prints what was promised vs delivered."""

    def __init__(self) -> None:
        self.stats = StreamStats()

    def update(self, batch: dict[str, Any]) -> None:
        if "stats" in batch:
            self.stats.add(batch["stats"])

    def reduce(self) -> StreamStats:
        """Sum over ranks (a no-op without torch.distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.stats
        gathered: list[StreamStats | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self.stats)
        total = StreamStats()
        for s in gathered:
            total.add(s)
        return total

    def summary(self, stats: StreamStats, stream: ShardStream | None = None) -> str:
        """Lines: delivered / skipped / unused against what ``stream``'s index.json files promise, then the
        re-reads, the skips by reason and shard and every shard whose count differs from its index entry."""
        promised = stream.promised if stream is not None else None
        lines = [f"samples delivered: {stats.used}" + (f" of {promised} promised by index.json" if promised is not None else "")
                 + f", skipped: {stats.n_skipped}, not used this epoch (equal full batches per worker): {stats.n_unused}"]
        if stats.n_beyond_index:
            lines.append(f"found beyond index.json: {stats.n_beyond_index}")
        if promised is not None:
            missing = promised + stats.n_beyond_index - stats.used - stats.n_skipped - stats.n_unused
            if missing:
                lines.append(f"not reached (the epoch stopped before its end): {missing}")
        if stats.refilled:
            lines.append(f"re-read to keep ranks in step: {stats.refilled}")
        for (reason, shard), n in sorted(stats.skipped.items()):
            lines.append(f"skipped {n} ({reason}) in {shard}")
        for shard, (held, count) in stats.index_mismatches(stream.shard_counts if stream is not None else {}).items():
            lines.append(f"index mismatch: {shard} holds {held} samples, index.json promises {count}")
        return "\n".join(lines)

    def reset(self) -> None:
        self.stats = StreamStats()


@dataclass(frozen=True)
class Source:
    """One shard set in a mixture. ``weight`` is its relative sampling rate (training only)."""

    index: ShardIndex
    weight: float = 1.0
    name: str = ""


def assign_shards(shards: Sequence[ShardInfo], n_slots: int, seed: int | None) -> list[list[ShardInfo]]:
    """Deal shards to ``n_slots`` worker slots round robin, after a seeded shuffle when ``seed`` is set."""
    order = list(shards)
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [order[slot::n_slots] for slot in range(n_slots)]


class ShardStream(IterableDataset):
    """Batches of collated records from a weighted mixture of shard sets.

    Args:
        sources: the shard sets (with weights).
        batch_size: records per batch.
        collate: turns ``list[Record]`` into a batch dict (runs inside the worker).
        train: shuffle shards per epoch, mix by weight, equal batch count per rank, drop the last partial
            batch. Otherwise: every sample exactly once, in shard order, last batch partial.
        required_sides: a record lacking one of these sides is skipped as ``missing_side``.
        strict: raise :class:`DataError` on the first bad sample instead of counting it.
        seed: base seed; the epoch (``set_epoch``) changes the shuffle.
        shuffle_buffer: training: records held in the in-worker shuffle buffer (0 = shard order).
        sort_window: evaluation: records sorted by text length per window before batching (0 = arrival order).
        remote: retries and client options for shard sets at URLs (``data.remote``).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        batch_size: int,
        collate: Callable[[list[Record]], dict[str, Any]],
        train: bool = True,
        required_sides: Sequence[str] = ("query", "pos"),
        strict: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 0,
        sort_window: int = 0,
        remote: RemoteOptions | None = None,
    ):
        if not sources:
            raise ValueError("ShardStream needs at least one shard set")
        self.sources = list(sources)
        self.batch_size = batch_size
        self.collate = collate
        self.train = train
        self.required_sides = tuple(required_sides)
        self.strict = strict
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.sort_window = sort_window
        self.remote = remote
        self.epoch = 0
        self.rank, self.world_size, self.num_workers = 0, 1, 1
        self._resume: tuple[int, int] | None = None

    # -- set by the DataModule before workers start ---------------------------------------------------------
    def configure(self, rank: int, world_size: int, num_workers: int) -> None:
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        if self.train:
            n_slots = self.world_size * self.num_workers
            for src in self.sources:
                if len(src.index.shards) < n_slots:
                    raise DataError(
                        f"shard set {src.index.root} has {len(src.index.shards)} shards but training needs at least "
                        f"one per worker slot ({self.world_size} ranks x {self.num_workers} workers = {n_slots}); "
                        f"re-shard it smaller or lower data.num_workers"
                    )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def promised(self) -> int:
        return sum(src.index.total for src in self.sources)

    @property
    def shard_counts(self) -> dict[str, int]:
        """``shard path -> count`` promised by index.json."""
        return {s.path: s.count for src in self.sources for s in src.index.shards}

    def _plan(self) -> list[list[list[ShardInfo]]]:
        """``plan[slot][source]`` = the shards that worker slot reads from each source this epoch."""
        n_slots = self.world_size * self.num_workers
        per_source = [
            assign_shards(src.index.shards, n_slots, self.seed + 1000 * self.epoch + i if self.train else None)
            for i, src in enumerate(self.sources)
        ]
        return [[per_source[i][slot] for i in range(len(self.sources))] for slot in range(n_slots)]

    def _quota(self, plan: list[list[list[ShardInfo]]]) -> int:
        """Full batches every worker slot yields per epoch: the fewest any slot can make from its shards."""
        return min(sum(s.count for shards in slot for s in shards) // self.batch_size for slot in plan)

    @property
    def unused_per_epoch(self) -> int:
        """Samples (over all ranks) that the equal per-slot quota leaves out of each training epoch, as planned
        from index.json (the stream's ``unused`` stats count what really was)."""
        return self.promised - self._quota(self._plan()) * self.batch_size * len(self._plan()) if self.train else 0

    def __len__(self) -> int:
        """Batches this rank yields per epoch (exact for training; from the index for evaluation)."""
        plan = self._plan()
        if self.train:
            return self._quota(plan) * self.num_workers
        slots = range(self.rank * self.num_workers, (self.rank + 1) * self.num_workers)
        return sum(-(-sum(s.count for shards in plan[slot] for s in shards) // self.batch_size) for slot in slots)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue ``epoch`` after the ``batches_done`` batches this rank had already consumed."""
        self._resume = (epoch, batches_done)

    def _batches_to_skip(self, role: int, resume: tuple[int, int] | None) -> int:
        """Batches the worker in ``role`` had delivered before the interruption (batch j came from j % W)."""
        if resume is None:
            return 0
        done = resume[1]
        return done // self.num_workers + (1 if role < done % self.num_workers else 0)

    # -- iteration -------------------------------------------------------------------------------------------
    def _read_shard(self, shard: ShardInfo, stats: StreamStats, progress: _Progress | None = None
                    ) -> Iterator[tuple[dict[str, Any], str]]:
        """Raw samples ``(fields, shard path)`` in file order; damage to the tar, a remote shard that stays
        unreadable and a count that differs from index.json are counted here (once the shard is read to its end).
        ``progress`` learns the samples read so far and when the shard is done."""
        found = 0
        try:
            for raw in iter_raw_samples(shard.path, self.remote):
                found += 1
                if progress is not None:
                    progress.found[shard.path] = found
                yield raw, shard.path
        except (TruncatedShard, ShardUnreadable) as err:
            if progress is not None:
                progress.done.add(shard.path)
            truncated = isinstance(err, TruncatedShard)
            if self.strict:
                what = "truncated shard" if truncated else "unreadable shard"
                raise DataError(f"{what} (data.strict=true): {err}") from err
            # everything after the damage is lost: count it against what index.json promised (the key is kept
            # at 0 when the shard held more than promised before its damage: the damage is still reported)
            stats.skipped[("truncated_tar" if truncated else "unreadable_shard", shard.path)] += max(shard.count - found, 0)
            if found > shard.count:
                stats.beyond_index[shard.path] += found - shard.count
            return
        if progress is not None:
            progress.done.add(shard.path)
        if found != shard.count:
            if self.strict:
                raise DataError(f"{shard.path} holds {found} samples but its index.json promises {shard.count} "
                                f"(data.strict=true); rebuild the shard set or its index.json")
            if found < shard.count:
                stats.skipped[("fewer_than_indexed", shard.path)] += shard.count - found
            else:
                stats.beyond_index[shard.path] += found - shard.count

    def _read_source(self, shards: list[ShardInfo], stats: StreamStats, progress: _Progress | None = None
                     ) -> Iterator[tuple[dict[str, Any], str]]:
        for shard in shards:
            yield from self._read_shard(shard, stats, progress)

    def _decoded(self, raws: Iterator[tuple[dict[str, Any], str]], stats: StreamStats) -> Iterator[Record]:
        """Decode raw samples into records; a bad one is counted by reason and shard (or raises when strict).

        Decoding comes after the shuffle buffer, as in webdataset: the buffer holds encoded bytes (a fraction
        of the decoded pixels) and a worker's first batch waits for one decode per record, not a full buffer.
        """
        hint = getattr(self.collate, "decode_hint", None)  # only the images the collator uses (records.DecodeHint)
        for raw, shard in raws:
            try:
                record = decode_sample(raw, shard=shard, hint=hint)
                missing = [s for s in self.required_sides if s not in record.sides]
                if missing:
                    raise CorruptSample("missing_side", f"{record.key} in {shard} lacks {missing}")
            except CorruptSample as err:
                if self.strict:
                    raise DataError(f"bad sample (data.strict=true): {err}") from err
                stats.skipped[(err.reason, shard)] += 1
                continue
            yield record

    def _mixture(self, shard_lists: list[list[ShardInfo]], stats: StreamStats, rng: random.Random,
                 progress: _Progress | None = None) -> Iterator[tuple[dict[str, Any], str]]:
        """Interleave the sources by weight until all are exhausted (weights renormalised as sources end).
        ``progress`` (first training pass) keeps each source's reader, to count what is left at the quota."""
        streams = []
        for shards, src in zip(shard_lists, self.sources):
            if shards:
                reader = self._read_source(shards, stats, progress)
                streams.append((reader, src.weight))
                if progress is not None:
                    progress.readers.append((is_remote(src.index.root), reader, shards))
        if len(streams) == 1:  # nothing to mix: skip a random draw per sample
            yield from streams[0][0]
            return
        while streams:
            i = rng.choices(range(len(streams)), weights=[w for _, w in streams])[0] if self.train else 0
            try:
                yield next(streams[i][0])
            except StopIteration:
                streams.pop(i)

    def _shuffled(self, records: Iterator[Any], rng: random.Random, buffer: list[Any]) -> Iterator[Any]:
        """Shuffle through ``buffer`` (the caller's list: what it holds when the quota is reached is unused)."""
        if not (self.train and self.shuffle_buffer > 1):
            yield from records
            return
        for record in records:
            buffer.append(record)
            if len(buffer) >= self.shuffle_buffer:
                # swap the drawn record to the end: popping from the middle would shift the whole buffer
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        rng.shuffle(buffer)
        buffer.reverse()  # popped from the end: the shuffled order, and the buffer holds only what is not yet out
        while buffer:
            yield buffer.pop()

    def _length_sorted(self, records: Iterator[Record]) -> Iterator[Record]:
        """Evaluation only: sort each window of ``sort_window`` records by text length, so that batches hold
        texts of similar length and pad less (the order of embeddings does not matter: they are keyed)."""
        if self.sort_window <= 1:
            yield from records
            return

        def length(record: Record) -> int:
            return sum(len(item.text or "") for item in record.sides.values())

        window: list[Record] = []
        for record in records:
            window.append(record)
            if len(window) == self.sort_window:
                yield from sorted(window, key=length)
                window = []
        yield from sorted(window, key=length)

    def _batch(self, records: list[Record], stats: StreamStats) -> dict[str, Any]:
        stats.delivered += len(records)
        batch = self.collate(records) if records else {"keys": []}
        batch["stats"] = stats.take()
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Take the resume point now (iter() runs eagerly when the loader starts; workers get their own copy):
        # it applies to this pass only.
        resume, self._resume = self._resume, None
        return self._iterate(resume)

    def _iterate(self, resume: tuple[int, int] | None) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise DataError(f"stream configured for {self.num_workers} workers but runs in {info.num_workers}")
        resume = resume if resume is not None and resume[0] == self.epoch else None
        # On resume the DataLoader starts again at worker 0, while the next batch was due from worker
        # `done % num_workers`: rotate roles so the interrupted round-robin order continues unchanged.
        role = (worker + resume[1]) % self.num_workers if resume else worker
        slot = self.rank * self.num_workers + role
        plan = self._plan()
        shard_lists = plan[slot]
        stats = StreamStats()
        rng = random.Random(hash((self.seed, self.epoch, slot)))
        if not self.train:
            pending: list[Record] = []
            for record in self._length_sorted(self._decoded(self._mixture(shard_lists, stats, rng), stats)):
                pending.append(record)
                if len(pending) == self.batch_size:
                    yield self._batch(pending, stats)
                    pending = []
            if pending or stats.skipped or stats.beyond_index:
                yield self._batch(pending, stats)
            return

        quota = self._quota(plan)
        skip = self._batches_to_skip(role, resume)
        emitted, pending, passes = 0, [], 0
        while emitted < quota:
            got_any = False
            # a re-read pass counts its re-reads only: its damage and bad samples were counted on the first pass
            pass_stats = stats if passes == 0 else StreamStats()
            progress = _Progress() if passes == 0 else None
            raws = self._mixture(shard_lists, pass_stats, rng, progress)
            buffer: list[Any] = []
            for record in self._decoded(self._shuffled(raws, rng, buffer), pass_stats):
                got_any = True
                if passes:
                    stats.refilled += 1
                pending.append(record)
                if len(pending) == self.batch_size:
                    if emitted + 1 == quota and passes == 0:
                        self._count_unused(progress, buffer, stats)  # goes out with the last batch
                    if emitted < skip:
                        stats.take()  # delivered before the interruption: already in the saved accounting
                    else:
                        yield self._batch(pending, stats)
                    pending, emitted = [], emitted + 1
                    if emitted == quota:
                        break
            passes += 1
            if not got_any:
                raise DataError(f"worker slot {slot} has no readable sample in {[s.path for shards in shard_lists for s in shards]}")


    @staticmethod
    def _count_unused(progress: _Progress, buffer: list[Any], stats: StreamStats) -> None:
        """At the quota: what the shuffle buffer holds and what the worker's shards still hold is unused this
        epoch. Local shards are read to their end without decoding (their damage and index counts are checked
        as on any read). Remote shards are not downloaded for a count: the rest of each is what index.json
        promises less what was read (damage or extra samples in that rest go unseen); the open stream is closed.
        ``progress`` holds the first pass's per-source readers, suspended under the buffer."""
        stats.unused.update(shard for _, shard in buffer)
        buffer.clear()
        for remote, reader, shards in progress.readers:
            if not remote:
                for _, shard in reader:
                    stats.unused[shard] += 1
                continue
            reader.close()
            for s in shards:
                left = s.count - progress.found.get(s.path, 0)
                if s.path not in progress.done and left > 0:
                    stats.unused[s.path] += left


@dataclass
class _Progress:
    """A first training pass's readers ``(remote, generator, shards)`` per source, and how far each shard got."""

    readers: list[tuple[bool, Iterator[tuple[dict[str, Any], str]], list[ShardInfo]]] = field(default_factory=list)
    found: dict[str, int] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)


def fetch_records(wanted: dict[str, set[str]], remote: RemoteOptions | None = None) -> dict[str, Record]:
    """Read a few records back by key: ``{shard_path: {key, ...}}`` -> ``{key: Record}`` (for reports)."""
    found: dict[str, Record] = {}
    for shard, keys in wanted.items():
        try:
            for raw in iter_raw_samples(shard, remote):
                if raw["__key__"] in keys:
                    found[raw["__key__"]] = decode_sample(raw, shard=shard)
        except (TruncatedShard, ShardUnreadable, CorruptSample):
            continue  # a report shows what it can; the stream's accounting already counted the damage
    return found
