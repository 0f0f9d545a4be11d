"""Rich progress bars that only the rank-0 process draws."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def is_rank_zero() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (rank 0, interactive or CI logs alike; disable with UNIMM_PROGRESS=0)."""
    if not is_rank_zero() or os.environ.get("UNIMM_PROGRESS", "1") == "0":
        yield from iterable
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=not sys.stdout.isatty()) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)


@contextmanager
def counter(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar driven by ``advance(n)`` calls (for work reported in chunks, e.g. faiss add/search)."""
    if not is_rank_zero() or os.environ.get("UNIMM_PROGRESS", "1") == "0":
        yield lambda n: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, transient=not sys.stdout.isatty()) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
