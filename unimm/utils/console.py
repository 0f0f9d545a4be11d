"""The run's console in its log file, and the third-party noise a user did not ask for kept off the console.

:func:`log_console` copies everything written to ``sys.stdout`` / ``sys.stderr`` (prints, rich tables and
progress, warnings, Lightning's log lines) into the run folder's log file (``train.log`` / ``cli.log``, the file
Hydra's job logging appends to), without terminal control codes: the file reads like the console did.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path
from typing import TextIO

# CSI sequences (colours, cursor moves, line erases) and OSC sequences (hyperlinks) rich writes to a terminal
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)")
# A live display (rich progress) on a terminal redraws in place: each refresh is one write of "erase the previous
# frame" (carriage return, erase line, cursor up; one cursor-up per frame line after the first), then whatever was
# printed meanwhile, then the new frame. The log keeps the printed text and drops the frames.
_ERASE_FRAME = re.compile(r"^(?:\r|\x1b\[2K|\x1b\[1A|\x1b\[\?25[lh])+")


def clean_for_log(text: str) -> str:
    """``text`` as a log file should hold it: without live-display frames and terminal control codes."""
    erase = _ERASE_FRAME.match(text)
    if erase and "\x1b[2K" in erase.group(0):
        height = erase.group(0).count("\x1b[1A") + 1  # the new frame has the height of the one it replaces
        lines = text[erase.end():].split("\n")
        text = "\n".join(lines[:-height]) + "\n" if len(lines) > height else ""
    return _ANSI.sub("", text).replace("\r", "")


class _Tee:
    """A text stream writing to the console stream and, cleaned, to an open log file."""

    def __init__(self, stream: TextIO, log: TextIO):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        clean = clean_for_log(text)
        if clean:
            try:
                self._log.write(clean)
                self._log.flush()
            except (OSError, ValueError):  # a full disk or a closed file must not take the run down
                pass
        return n

    def write_log(self, text: str) -> None:
        """Write to the log file only (a plain-text copy of what a live display shows)."""
        try:
            self._log.write(text)
            self._log.flush()
        except (OSError, ValueError):
            pass

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:  # rich and tqdm decide on live display from this: keep the terminal's answer
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str):  # encoding, errors, buffer...: those of the console stream
        return getattr(self._stream, name)


_active: _Tee | None = None  # sys.stdout may be wrapped again meanwhile (rich's live display redirects it)


def log_console(log_path: str | Path) -> None:
    """From now on, copy this process's console output to ``log_path`` (appending). Idempotent per path."""
    if isinstance(sys.stdout, _Tee) and getattr(sys.stdout._log, "name", None) == str(log_path):
        return
    log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - open for the life of the process
    out, err = _unwrap(sys.stdout), _unwrap(sys.stderr)
    global _active
    sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
    _active = sys.stdout
    # Loggers that do not reach the root logger (and so Hydra's file handler), e.g. Lightning's own stream
    # handler made at import time, hold the console streams: repoint them. Root handlers stay (no double lines).
    for logger in logging.Logger.manager.loggerDict.values():
        if getattr(logger, "propagate", True):
            continue
        for handler in logger.handlers:
            if type(handler) is not logging.StreamHandler:  # file handlers already write to a file
                continue
            stream = _unwrap(handler.stream)
            if stream is out or stream is sys.__stdout__ and out is sys.__stdout__:
                handler.setStream(sys.stdout)
            elif stream is err or stream is sys.__stderr__ and err is sys.__stderr__:
                handler.setStream(sys.stderr)


def _unwrap(stream: TextIO) -> TextIO:
    return stream._stream if isinstance(stream, _Tee) else stream


def write_log(text: str) -> None:
    """Write ``text`` to the run's log file only (no-op before :func:`log_console`)."""
    if _active is not None:
        _active.write_log(text)


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Silence, one by one, third-party messages that are not news to a unimm user (each says why)."""
    # Lightning advertises its hosted loggers / model registry on every run (rank_zero_info, not a warning)
    # and says it found our ModelSummary (unimm.training.callbacks: Lightning's without the always-0 FLOPs row)
    tips = _DropMessages("💡 Tip:", "Trainer already configured with model summary callbacks")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(tips)
    # Lightning's own _pytree builds torch's deprecated LeafSpec; nothing in unimm can change that call
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    # a non-finite step is skipped on purpose and reported by unimm's NonFiniteGuard, with step, loss and keys
    warnings.filterwarnings("ignore", message=r"`training_step` returned `None`\. If this was on purpose")
