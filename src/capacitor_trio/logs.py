"""Logging: the stderr format, the log files and the in-memory ring buffer behind
``GET /api/logs/recent``.

Besides stderr, the daemon writes ``log/capacitor_service.log`` in the data directory (or the
``--log`` directory), one line per record, rotated at 100 MB with 5 numbered backups, and the
API's request lines to ``capacitor_service_web.log`` unless ``suppressWebLog``; the directory is
0700, the files 0600. Lines about one instance end with its identity in ``logSuffix``'s format
(`instance_identity`). Every line logged while serving an association from a calling AE in
``suppressLogAeTitles`` is muted (`SuppressCallingAes`, keyed on the `CALLING_AE` context
variable the acceptor sets).

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
import contextvars
import io
import logging
import logging.handlers
import os
import re
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
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

#: the calling AE title of the DICOM association the current task serves ("" elsewhere); the
#: acceptor sets it as soon as it reads the A-ASSOCIATE-RQ, so every line logged for that
#: association (the acceptor's, the receiver's) can be muted (`SuppressCallingAes`)
CALLING_AE: contextvars.ContextVar[str] = contextvars.ContextVar("capacitor_calling_ae", default="")


class SuppressCallingAes(logging.Filter):
    """Drops the records logged while serving an association from one of `titles`
    (suppressLogAeTitles: a monitoring probe's association every minute is not news)."""

    def __init__(self, titles: Iterable[str]) -> None:
        super().__init__()
        self.titles = frozenset(t.strip() for t in titles if t.strip())

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.titles or CALLING_AE.get() not in self.titles


#: main log file: rotated at 100 MB, 5 backups (Capacitor's figures)
MAIN_LOG = "capacitor_service.log"
#: API/web request log (unless suppressWebLog)
WEB_LOG = "capacitor_service_web.log"
LOG_MAX_BYTES = 100 * 1024 * 1024
LOG_BACKUPS = 5
#: the logger of the API's request lines (hypercorn's access log; api/server.py)
ACCESS_LOGGER = "capacitor_trio.api.access"


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file that only its owner may read or write (0600, whatever the umask);
    a file found with a looser mode is tightened."""

    def _open(self) -> io.TextIOWrapper:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.baseFilename, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
            return open(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


class _FileFormatter(_LevelFormatter):
    """``2026-03-22T10:01:00.123Z LEVEL logger: message`` (escaped as on stderr)."""

    def format(self, record: logging.LogRecord) -> str:
        level, _, rest = super().format(record).partition(": ")
        return f"{_timestamp(record.created)} {level} {record.name}: {rest}"


def private_log_dir(path: Path) -> Path:
    """Make `path` (a log directory) the owner's only: created 0700, an existing one chmod 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _remove_installed(logger: logging.Logger) -> None:
    """Take the handlers an earlier setup installed off `logger` and close them (a file
    handler's file is closed, not left to the garbage collector)."""
    for handler in list(logger.handlers):
        if getattr(handler, _INSTALLED, False):
            logger.removeHandler(handler)
            handler.close()


def setup_file_logging(
    log_dir: Path,
    *,
    suppress_calling_aes: Iterable[str] = (),
    web_log: bool = True,
    max_bytes: int = LOG_MAX_BYTES,
    backups: int = LOG_BACKUPS,
) -> list[logging.Handler]:
    """Add the main log file (every record the root logger passes but the API's request lines)
    and, when `web_log`, the request log (`ACCESS_LOGGER` only) in `log_dir` (0700, files 0600).
    Both rotate at `max_bytes` with `backups` numbered backups. Returns the handlers added."""
    private_log_dir(log_dir)
    mute = SuppressCallingAes(suppress_calling_aes)
    main = PrivateRotatingFileHandler(log_dir / MAIN_LOG, maxBytes=max_bytes, backupCount=backups)
    main.setFormatter(_FileFormatter())
    main.addFilter(mute)
    added: list[logging.Handler] = [main]
    setattr(main, _INSTALLED, True)
    logging.getLogger().addHandler(main)
    access = logging.getLogger(ACCESS_LOGGER)
    access.propagate = False  # its own file, not the main log nor stderr
    _remove_installed(access)
    if web_log:
        web = PrivateRotatingFileHandler(log_dir / WEB_LOG, maxBytes=max_bytes, backupCount=backups)
        web.setFormatter(logging.Formatter("%(message)s"))
        setattr(web, _INSTALLED, True)
        access.addHandler(web)
        access.setLevel(logging.INFO)
        added.append(web)
    return added


#: a `logSuffix` placeholder: #{group,element}, both hex
_PLACEHOLDER = re.compile(r"#\{\s*([0-9A-Fa-f]{1,4})\s*,\s*([0-9A-Fa-f]{1,4})\s*\}")
#: the tags an instance's identity may name -> the attribute of an instance header or queue
#: item holding it (others are shown empty: the index keeps no more of the data set)
IDENTITY_TAGS: dict[tuple[int, int], str] = {
    (0x0002, 0x0002): "sop_class_uid",
    (0x0008, 0x0016): "sop_class_uid",
    (0x0002, 0x0003): "sop_instance_uid",
    (0x0008, 0x0018): "sop_instance_uid",
    (0x0002, 0x0010): "transfer_syntax_uid",
    (0x0008, 0x0050): "accession_number",
    (0x0008, 0x0060): "modality",
    (0x0010, 0x0010): "patient_name",
    (0x0010, 0x0020): "patient_id",
    (0x0020, 0x000D): "study_instance_uid",
    (0x0020, 0x000E): "series_instance_uid",
}


def instance_identity(suffix: str, instance: object) -> str:
    """`logSuffix` (e.g. ``#{2,2}-#{8,50}-#{10,20}``) with each placeholder replaced by the
    instance's value of that tag (an `InstanceHeader` or a queue `Item`); "" for a tag it does
    not carry."""

    def value(m: re.Match[str]) -> str:
        name = IDENTITY_TAGS.get((int(m.group(1), 16), int(m.group(2), 16)))
        return str(getattr(instance, name, "") or "") if name else ""

    return _PLACEHOLDER.sub(value, suffix)


def setup_logging(
    level: str | int = "INFO",
    ring: RingBufferHandler | None = None,
    *,
    stream: TextIO | None = None,
    suppress_calling_aes: Iterable[str] = (),
) -> None:
    """Configure root logging: ``LEVEL: message`` lines on stderr, plus the ring buffer if given.

    Calling it again replaces what an earlier call installed (handy in tests and on reload).
    `suppress_calling_aes`: the lines of associations from these calling AE titles are muted.
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
    _remove_installed(root)
    console = logging.StreamHandler(stream if stream is not None else sys.stderr)
    console.setFormatter(_LevelFormatter())
    mute = SuppressCallingAes(suppress_calling_aes)
    console.addFilter(mute)
    setattr(console, _INSTALLED, True)
    root.addHandler(console)
    if ring is not None:
        for old in [f for f in ring.filters if isinstance(f, SuppressCallingAes)]:
            ring.removeFilter(old)
        ring.addFilter(mute)
        setattr(ring, _INSTALLED, True)
        root.addHandler(ring)
    root.setLevel(levelno)
