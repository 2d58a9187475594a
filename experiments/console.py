"""The console of a job: recorded to `run.log` in its output folder, and errors told apart.

`record(path)` copies everything the job prints (Python's stdout and stderr, and the logging handlers that write
to them: Lightning's, Hydra's) into `path`, while the terminal sees what it always saw. Live progress bars
(lines redrawn with carriage returns or cursor codes) are kept in the file only in their last state before the
next ordinary line, without colour codes, so `run.log` reads like the finished console.

`user_error(exc, cfg)` says whether an exception is the user's (a config value, a data file, a resume path, a
non-finite loss): then it returns the one-line message to print instead of a traceback, else None (an internal
error keeps its traceback). `advice(exc)` says whether resuming makes sense after such a failure.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_REDRAW = re.compile(r"\r(?!\n)|\x1b\[[0-9]*[AK]")  # a carriage return or cursor up / erase line: a live redraw


class _Transcript:
    """The file side of the console: ordinary lines as they come, a live display only in its last state."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self.partial = ""  # text of the current line not yet ended
        self.live = ""  # the latest redraw of a live display, not yet written

    def write(self, text: str) -> None:
        if _REDRAW.search(text):
            self.live = _ANSI.sub("", text.rsplit("\r", 1)[-1] if "\r" in text.rstrip("\r") else text)
            return
        text = _ANSI.sub("", text)
        if not text:
            return
        if self.live.strip():
            lines = [line.rstrip() for line in self.live.splitlines() if line.strip()]
            self.file.write("\n".join(lines) + "\n")
            self.live = ""
            text = text[1:] if text.startswith("\n") else text  # the live line's own end
            if not text:
                return
        self.partial += text
        if "\n" in self.partial:
            done, self.partial = self.partial.rsplit("\n", 1)
            self.file.write(done + "\n")
            self.file.flush()

    def close(self) -> None:
        self.write("\n" if self.partial else "")
        if self.live.strip():
            self.file.write(_ANSI.sub("", self.live).rstrip() + "\n")
        self.file.flush()


class _Tee(io.TextIOBase):
    """A text stream that writes to the terminal stream and to the transcript; answers like the terminal."""

    def __init__(self, stream: TextIO, transcript: _Transcript) -> None:
        self.stream, self.transcript = stream, transcript

    def write(self, text: str) -> int:
        self.stream.write(text)
        try:
            self.transcript.write(text)
        except (OSError, ValueError):  # the file is closed or the disk full: the console goes on
            pass
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class Recording:
    """The open `run.log` of a job (see `record`)."""

    def __init__(self, path: Path, transcript: _Transcript) -> None:
        self.path, self.transcript = path, transcript

    def file_only(self, text: str) -> None:
        """Write to run.log but not to the terminal (e.g. the traceback of an error told in one line)."""
        self.transcript.write(text if text.endswith("\n") else text + "\n")


@contextmanager
def record(path: str | Path) -> Iterator[Recording]:
    """Copy the console into `path` (appended) while the block runs; see the module docstring."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    transcript = _Transcript(file)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(old_out, transcript), _Tee(old_err, transcript)
    # Handlers created before (Lightning's, Hydra's console handler) hold the old streams: point them here.
    tees = {id(sys.stdout): old_out, id(sys.stderr): old_err}
    for handler in _stream_handlers():
        if handler.stream is old_out or handler.stream is old_err:
            handler.setStream(sys.stdout if handler.stream is old_out else sys.stderr)
    try:
        yield Recording(path, transcript)
    finally:
        # Back to the terminal: the handlers pointed here, and those created meanwhile (a first import of
        # Lightning inside the job) that took the recording streams for the console's.
        for handler in _stream_handlers():
            if id(handler.stream) in tees:
                handler.setStream(tees[id(handler.stream)])
        sys.stdout, sys.stderr = old_out, old_err
        transcript.close()
        file.close()


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    return [h for logger in loggers for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


# -- errors ----------------------------------------------------------------------------------------------------------
TOP_LEVEL_KEYS = ("trainer", "model", "data", "callbacks", "dp", "logger", "strategy", "paths", "loop", "sweep",
                  "ckpt_path", "seed", "task", "threads", "experiment", "run_name", "tags", "optimized_metric", "inpaint")
# "model.sample.prompts=x: no such file", "trainer.max_steps: ...": a message that starts by naming a config key.
_NAMES_KEY = re.compile(r"^\s*\+?(?:" + "|".join(TOP_LEVEL_KEYS) + r")(?:\.[\w\-]+)*\s*(?:=|:|\s)")


def _user_types() -> tuple[type[BaseException], ...]:
    """The project's error types that are always the user's (imported lazily: `list` must stay fast)."""
    from callbacks.nonfinite import NonFiniteLossError
    from callbacks.privacy import DPConfigError
    from datamodules.stream_dataset import BadDataError
    from experiments.config_check import ConfigTypeError
    from experiments.runner import ConfigError

    return ConfigError, ConfigTypeError, DPConfigError, BadDataError, NonFiniteLossError


def user_error(exc: BaseException) -> str | None:
    """The message to print (no traceback) when `exc` is the user's to fix, else None."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, _user_types()):
        return _without_worker_traceback(exc)
    if isinstance(exc, InstantiationException):
        # A constructor refused a config value (ValueError, TypeError, Lightning's MisconfigurationException) or
        # could not find its target.
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        cause = exc.__cause__
        if cause is None or isinstance(cause, (ValueError, TypeError, FileNotFoundError, ImportError,
                                               MisconfigurationException)):
            message = str(exc).strip()
            full_key = re.search(r"full_key:\s*(\S+)", message)
            detail = str(cause).strip() if cause is not None else message.splitlines()[0]
            key = full_key.group(1) if full_key else None
            return f"{key}: {detail}" if key and not detail.startswith(key) else detail
        return None
    if isinstance(exc, OmegaConfBaseException):
        return str(exc).strip().replace("\n", "; ")
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError, KeyError)) and _NAMES_KEY.match(str(exc).strip("'\"")):
        return str(exc).strip("'\" \n")
    return None


def _without_worker_traceback(exc: BaseException) -> str:
    """The message; for an error re-raised from a DataLoader worker, the worker's own message (torch puts the
    worker's traceback into the message it re-raises)."""
    message = str(exc).strip()
    if "Original Traceback" in message:
        last = message.splitlines()[-1]
        name = type(exc).__name__
        message = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return message


def advice(exc: BaseException | None) -> str | None:
    """What to do before resuming a run that failed with `exc`; None when resuming as is makes sense (an
    interruption, a crash, an internal error: the checkpoint is good)."""
    if exc is None or isinstance(exc, KeyboardInterrupt):
        return None
    name = type(exc).__name__
    if name == "NonFiniteLossError":
        return ("the same steps would diverge again: lower model.optimizer.lr (or set "
                "callbacks.nonfinite.policy=skip) first, or start over")
    if name == "BadDataError":
        return "fix or remove the shard named below (or raise data.max_bad_fraction) first"
    if isinstance(exc, Exception) and user_error(exc) is not None:
        return "fix the config value named below first"
    return None


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
