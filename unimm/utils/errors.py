"""Errors unimm explains: printed as one ``error: ...`` message, without a Hydra / Lightning traceback.

The traceback stays one environment variable away (``HYDRA_FULL_ERROR=1`` re-raises as Hydra would) and is
always written to the run's log file, so nothing is lost by keeping the console short.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
# Types that unimm raises with a message naming the key / file / sample and the valid choices. Raised from a
# unimm frame they are explained errors; raised elsewhere (torch, a dependency) they are bugs to show in full.
EXPLAINED_TYPES = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError, KeyError)


class UserError(Exception):
    """A problem with the input (config, data, checkpoint) that the message explains completely."""


class UnsupportedSetting(UserError, NotImplementedError):
    """A combination of settings unimm refuses rather than silently reinterpreting (the message names the fix)."""


def is_explained(err: BaseException) -> bool:
    """True for :class:`UserError` and for the :data:`EXPLAINED_TYPES` raised by unimm's own code."""
    if isinstance(err, UserError):
        return True
    if not isinstance(err, EXPLAINED_TYPES):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(PACKAGE_DIR)


_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


def _message(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)  # KeyError quotes its message
    if _WORKER_TRACEBACK in text:  # re-raised from a DataLoader worker: keep the original message, not its stack
        lines = text.split(_WORKER_TRACEBACK, 1)[1].splitlines()
        name = type(err).__name__
        starts = [i for i, line in enumerate(lines) if re.match(rf"^([\w.]+\.)?{name}: ", line)]
        if starts:
            text = "\n".join(lines[starts[-1]:]).split(": ", 1)[1]
    return text or type(err).__name__


def report_errors(fn: Callable[[], T], log_path: str | Path | None = None) -> T:
    """Run ``fn``; an explained error exits with status 1 and its message alone (full traceback in ``log_path``).

    ``HYDRA_FULL_ERROR=1`` re-raises instead, for the whole stack.
    """
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - filtered just below; anything else is re-raised untouched
        if not is_explained(err) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        where = ""
        if log_path is not None:
            try:
                with open(log_path, "a") as f:
                    f.write("".join(traceback.format_exception(err)))
                where = f" (traceback in {log_path}; HYDRA_FULL_ERROR=1 shows it here)"
            except OSError:
                where = " (HYDRA_FULL_ERROR=1 shows the traceback)"
        sys.stdout.flush()
        print(f"error: {_message(err)}{where}", file=sys.stderr)
        sys.exit(1)
