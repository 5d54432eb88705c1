"""Logging: the stderr format and the in-memory ring buffer behind ``GET /api/logs/recent``.

The ring keeps the last ``capacity`` records (1000 by default) as frozen :class:`LogEntry` values
with the API's level names (``DEBUG``, ``INFO``, ``WARN``, ``ERROR``; WARNING shows as WARN,
CRITICAL as ERROR). It is safe to use from any thread: pynetdicom, hypercorn and Trio's
``to_thread`` workers may all log.

Messages can carry what a peer sent (a calling AE title, a file name, a URL): every control
character in a message is escaped (``\\n``, ``\\r``, ``\\t``, ``\\xNN``, ``\\u2028``) in both
the stderr line and the ring, whoever logs it (our code, pynetdicom, hypercorn), so that no
record can print a line of its own. A traceback keeps its lines, each indented on stderr, so
that it cannot pass for a record either.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import TextIO

import attrs

LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARN", "ERROR")
_RANK = {name: i for i, name in enumerate(LEVELS)}
_ALIASES = {"WARNING": "WARN", "CRITICAL": "ERROR", "FATAL": "ERROR"}


def level_name(levelno: int) -> str:
    """The API level name of a ``logging`` level number."""
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARN"
    if levelno >= logging.INFO:
        return "INFO"
    return "DEBUG"


def parse_level(text: str) -> str:
    """Normalise a level name from the API or CLI (any case; WARNING, CRITICAL accepted)."""
    name = str(text).strip().upper()
    name = _ALIASES.get(name, name)
    if name not in _RANK:
        raise ValueError(f"unknown log level {text!r}; expected one of {', '.join(LEVELS)}")
    return name


_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
_ESCAPES.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029)})  # line/paragraph separators
#: how each line of a traceback starts on stderr
TRACEBACK_INDENT = "    "


def escape_controls(text: str) -> str:
    """`text` with its control characters (C0, DEL, C1, the Unicode line separators) escaped."""
    return text.translate(_ESCAPES)


def _indented(text: str) -> str:
    """A traceback as lines that cannot pass for a record: each escaped and indented."""
    return "\n".join(TRACEBACK_INDENT + escape_controls(line) for line in text.splitlines())


def _timestamp(created: float) -> str:
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


@attrs.frozen
class LogEntry:
    """One log record as the API shows it."""

    timestamp: str
    level: str
    message: str
    logger: str

    def to_json(self) -> dict[str, str]:
        """The API's JSON object for this entry."""
        return {
            "timestamp": self.timestamp,
            "level": self.level,
            "message": self.message,
            "logger": self.logger,
        }


class RingBufferHandler(logging.Handler):
    """A handler that keeps the last ``capacity`` records in memory."""

    def __init__(self, capacity: int = 1000, level: int = logging.NOTSET) -> None:
        if capacity < 1:
            raise ValueError(f"ring buffer capacity must be >= 1, got {capacity!r}")
        super().__init__(level)
        self.capacity = capacity
        self._entries: collections.deque[LogEntry] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = escape_controls(record.getMessage())
            if record.exc_info:
                message = f"{message}\n{logging.Formatter().formatException(record.exc_info)}"
            elif record.exc_text:
                message = f"{message}\n{record.exc_text}"
            entry = LogEntry(
                timestamp=_timestamp(record.created),
                level=level_name(record.levelno),
                message=message,
                logger=record.name,
            )
        except Exception:
            self.handleError(record)
            return
        with self._guard:
            self._entries.append(entry)

    def recent(self, lines: int = 100, level: str | None = None) -> list[LogEntry]:
        """Up to ``lines`` newest entries at ``level`` or above, oldest first."""
        if lines <= 0:
            return []
        with self._guard:
            entries = list(self._entries)
        if level is not None:
            floor = _RANK[parse_level(level)]
            entries = [e for e in entries if _RANK[e.level] >= floor]
        return entries[-lines:]

    def clear(self) -> None:
        """Drop every entry."""
        with self._guard:
            self._entries.clear()

    def __len__(self) -> int:
        with self._guard:
            return len(self._entries)


class _LevelFormatter(logging.Formatter):
    """``LEVEL: message`` with the API's level names, the message escaped (`escape_controls`),
    a traceback or stack below it indented (`_indented`)."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        text = f"{level_name(record.levelno)}: {escape_controls(record.message)}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + _indented(record.exc_text)
        if record.stack_info:
            text += "\n" + _indented(self.formatStack(record.stack_info))
        return text


_INSTALLED = "_capacitor_trio_installed"


def setup_logging(
    level: str | int = "INFO",
    ring: RingBufferHandler | None = None,
    *,
    stream: TextIO | None = None,
) -> None:
    """Configure root logging: ``LEVEL: message`` lines on stderr, plus the ring buffer if given.

    Calling it again replaces what an earlier call installed (handy in tests and on reload).
    ``level`` takes the CLI's names (``DEBUG``, ``INFO``, ``WARNING``/``WARN``, ``ERROR``) or a
    ``logging`` number.
    """
    if isinstance(level, str):
        name = parse_level(level)
        levelno = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING}.get(
            name, logging.ERROR
        )
    else:
        levelno = level
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _INSTALLED, False):
            root.removeHandler(handler)
    console = logging.StreamHandler(stream if stream is not None else sys.stderr)
    console.setFormatter(_LevelFormatter())
    setattr(console, _INSTALLED, True)
    root.addHandler(console)
    if ring is not None:
        setattr(ring, _INSTALLED, True)
        root.addHandler(ring)
    root.setLevel(levelno)
