"""The audit trail: `log/capacitor_service_audit.log`, one JSON line per event, each chained to the
one before it with an HMAC-SHA256, so that an edited, inserted or removed line is detected.

What is recorded (`AuditEvent`):

- `OperatorAction`: every change asked through the control port (actors/control.py): who (the
  API's credential: a bearer token, a session, or an open API, with the client's address; the
  `OPERATOR` context variable the API sets for the request), what, which items or node;
- `Delivery`: every recorded send outcome, one line per outcome batch of a node (actors/sending.py);
- `RoutingDecision`, `TagMutation`: what the filter chain decided for an item, once its node's
  prepare stage has applied it (actors/prepare.py): kept or dropped, the destinations it goes
  to, the files saved; and each attribute the chain changed, before and after. These lines hold
  patient data (the values a mutation changed): the trail's files are the service user's only.

The chain. A line is its event's JSON object (keys sorted, no spaces) with a last member
``"mac"``: HMAC-SHA256 under the key, over the previous line's MAC (hex, "" for the first line
of a trail) and the line without its MAC. Lines carry a sequence number (`seq`). The chain goes
on across rotated files and across restarts (a starting trail reads the last line it wrote).
`verify` (``capacitor-trio audit-verify``) recomputes it over the archived files and the
current one, in order, and names the first line that does not match. What a chain cannot show:
lines cut from the end of the newest file while the router was stopped (the next start chains
from what is left).

The key: `audit.key` in the data directory, 32 random bytes made on first start, 0600 (a key
found with a looser mode is made 0600). Whoever can read it can forge a chain: back it up with
the data directory, and keep both the service user's only.

Files. The current file rotates at `max_bytes` (100 MB): it is renamed to
``audit_archive/capacitor_service_audit.log.N`` (N counting up, never reused) and compressed to
``.N.gz`` by the writer thread; archives are never deleted automatically. Directory 0700, files
0600.

Never stalling the event loop. Events go through a bounded queue (`QUEUE_SIZE`) to a writer
task that formats, chains and writes them in a worker thread, a batch at a time. When the queue
is full, `record` waits: the operator action or the node's outcome recording that wanted the
line is held up rather than the line dropped (backpressure; a full queue means the disk is
slower than the events). Operator actions wait until their line is written and flushed
(`record(..., written=True)`); deliveries only until it is queued, so a crash can lose the
delivery lines still queued (the deliveries themselves are in the store). After the writer has
stopped (shutdown), `record` writes synchronously, so that nothing recorded during shutdown is
lost either.
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from capacitor_trio.domain.filtering import TagChange

log = logging.getLogger("capacitor_trio.audit")

AUDIT_LOG = "capacitor_service_audit.log"
ARCHIVE_DIR = "audit_archive"
KEY_FILE = "audit.key"
KEY_BYTES = 32
MAX_BYTES = 100 * 1024 * 1024
#: events queued for the writer at most; `record` waits beyond
QUEUE_SIZE = 4096
#: events written in one worker-thread call at most
BATCH = 512
#: seconds between attempts when the trail cannot be written
WRITE_RETRY = 1.0

#: who is acting, for the operator actions recorded while it is set (the API sets it per
#: request: "token@127.0.0.1", "session:3f2a…@127.0.0.1", "open@127.0.0.1"); "system" otherwise
OPERATOR: contextvars.ContextVar[str] = contextvars.ContextVar("capacitor_operator", default="system")

_MAC_TAIL = re.compile(r',"mac":"([0-9a-f]{64})"\}$')


# ---- events ---------------------------------------------------------------------------------


@attrs.frozen
class OperatorAction:
    """A change an operator asked for through the control port."""

    who: str
    action: str  # pause, resume, override, echo, edit-node, item-retry, bulk-delete, reload, ...
    target: str  # what it names: a node "AE (role)", an item "item 17", a filter, "service"
    items: tuple[int, ...] = ()
    count: int | None = None  # items a bulk action changed
    outcome: str = "ok"  # ok, or the error that refused it


@attrs.frozen
class Delivery:
    """One outcome batch a node recorded: the SOP Instance UIDs per outcome."""

    node: str
    role: str
    delivered: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()


@attrs.frozen
class RoutingDecision:
    """The filter chain's routing of one instance for one node (issue 21): where it goes (the
    node itself unless dropped, and the destinations a route added), and the files it saved."""

    sop_instance_uid: str
    source_ae: str
    destinations: tuple[str, ...]
    rule: str = ""
    #: the node whose item the chain ran on
    node: str = ""
    #: "kept", "changed" (kept, with a prepared copy of its own) or "dropped"
    verdict: str = ""
    saved_files: tuple[str, ...] = ()


@attrs.frozen
class TagMutation:
    """A filter's changes to one instance for one destination (issue 21)."""

    sop_instance_uid: str
    destination: str
    changes: tuple[TagChange, ...]
    rule: str = ""


AuditEvent = OperatorAction | Delivery | RoutingDecision | TagMutation

_KINDS: dict[type, str] = {
    OperatorAction: "operator", Delivery: "delivery", RoutingDecision: "routing", TagMutation: "mutation",
}


class AuditPort(Protocol):
    """What producers of audit events ask of the trail."""

    async def record(self, event: AuditEvent, *, written: bool = False) -> None: ...


def event_json(event: AuditEvent) -> dict[str, Any]:
    """The event as JSON members (TagChange tags as "(gggg,eeee)")."""
    body: dict[str, Any] = {"event": _KINDS[type(event)]}
    for name, value in attrs.asdict(event, recurse=False).items():
        if isinstance(value, tuple):
            value = [_change_json(v) if isinstance(v, TagChange) else v for v in value]
        body[name] = value
    return body


def _change_json(change: TagChange) -> dict[str, Any]:
    return {
        "tag": f"({change.tag >> 16:04X},{change.tag & 0xFFFF:04X})", "keyword": change.keyword,
        "before": change.before, "after": change.after,
    }


# ---- the chain ------------------------------------------------------------------------------


def mac_of(key: bytes, previous: str, body: str) -> str:
    return hmac.new(key, f"{previous}\n{body}".encode(), hashlib.sha256).hexdigest()


def chained_line(key: bytes, previous: str, body: dict[str, Any]) -> tuple[str, str]:
    """(the line, its MAC) for `body` after the line whose MAC is `previous`."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    mac = mac_of(key, previous, text)
    return f'{text[:-1]},"mac":"{mac}"}}', mac


def split_line(line: str) -> tuple[str, str] | None:
    """(the line without its MAC, the MAC), or None for a line that has none."""
    m = _MAC_TAIL.search(line)
    if m is None:
        return None
    return line[: m.start()] + "}", m.group(1)


def load_key(data_dir: Path, *, create: bool) -> bytes:
    """The trail's key; made (0600) when `create` and there is none."""
    path = data_dir / KEY_FILE
    if create:
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, secrets.token_bytes(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(path, 0o600)
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise ValueError(f"{path} holds {len(key)} bytes, not a key of {KEY_BYTES}")
    return key


def archives(log_dir: Path) -> list[Path]:
    """The rotated files, oldest first (by their number); of a file found both compressed and
    not (a stop while it was being compressed), the uncompressed one."""
    found: dict[int, Path] = {}
    for p in (log_dir / ARCHIVE_DIR).glob(f"{AUDIT_LOG}.*"):
        m = re.fullmatch(re.escape(AUDIT_LOG) + r"\.(\d+)(\.gz)?", p.name)
        if m and (m.group(2) is None or int(m.group(1)) not in found):
            found[int(m.group(1))] = p
    return [found[n] for n in sorted(found)]


def _lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        for line in f:
            yield line.rstrip("\n")


def trail_files(log_dir: Path) -> list[Path]:
    current = log_dir / AUDIT_LOG
    return [*archives(log_dir), *([current] if current.exists() else [])]


@attrs.frozen
class Broken:
    """The first line that does not continue the chain."""

    path: Path
    line_number: int  # 1-based, in its file
    line: str
    reason: str


def verify(data_dir: Path, log_dir: Path) -> tuple[int, Broken | None]:
    """Check the whole trail: (lines checked, the first broken line or None)."""
    key = load_key(data_dir, create=False)
    previous, seq, count = "", 0, 0
    for path in trail_files(log_dir):
        for number, line in enumerate(_lines(path), 1):
            split = split_line(line)
            if split is None:
                return count, Broken(path, number, line, "no MAC")
            body, mac = split
            if not hmac.compare_digest(mac_of(key, previous, body), mac):
                return count, Broken(path, number, line, "MAC does not match (edited, or a line before it removed)")
            try:
                line_seq = int(json.loads(body)["seq"])
            except (ValueError, KeyError, TypeError):
                return count, Broken(path, number, line, "no sequence number")
            if line_seq != seq + 1:
                return count, Broken(path, number, line, f"sequence {line_seq} after {seq}")
            previous, seq, count = mac, line_seq, count + 1
    return count, None


# ---- the writer -----------------------------------------------------------------------------


class AuditTrail:
    """The running trail: `record` from the loop, `run` writes (see the module's docstring)."""

    def __init__(
        self, data_dir: Path, log_dir: Path, *, max_bytes: int = MAX_BYTES, queue_size: int = QUEUE_SIZE
    ) -> None:
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.max_bytes = max_bytes
        self._send, self._receive = trio.open_memory_channel[tuple[dict[str, Any], trio.Event | None]](queue_size)
        self._lock = threading.Lock()  # the file and the chain: the writer thread, or a late record
        self._running = False
        self._key = b""
        self._previous = ""
        self._seq = 0
        self._file: Any = None

    # -- the loop's side

    async def record(self, event: AuditEvent, *, written: bool = False) -> None:
        """Queue `event` (waiting while the queue is full); with `written`, return only once its
        line is written and flushed."""
        body = event_json(event)
        body["time"] = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if not self._running:
            self._write_alone([body])
            return
        done = trio.Event() if written else None
        try:
            await self._send.send((body, done))
        except trio.BrokenResourceError:  # the writer ended while this waited for room
            self._write_alone([body])
            return
        if done is not None:
            await done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the trail (the key, the chain's last line), then write what is recorded until
        cancelled; what is still queued then is written before returning (shielded)."""
        await trio.to_thread.run_sync(self.open)
        self._running = True
        task_status.started()
        try:
            while True:
                batch = [await self._receive.receive()]
                await self._drain_into(batch)
        finally:  # no checkpoint from here on: nothing can be queued meanwhile
            self._running = False
            rest: list[tuple[dict[str, Any], trio.Event | None]] = []
            with contextlib.suppress(trio.WouldBlock):
                while True:
                    rest.append(self._receive.receive_nowait())
            self._receive.close()  # a record still waiting for room writes its own line
            self._write([body for body, _ in rest])
            for _, done in rest:
                if done is not None:
                    done.set()
            self.close()

    async def _drain_into(self, batch: list[tuple[dict[str, Any], trio.Event | None]]) -> None:
        with contextlib.suppress(trio.WouldBlock):
            while len(batch) < BATCH:
                batch.append(self._receive.receive_nowait())
        bodies = [body for body, _ in batch]
        while True:
            try:
                await trio.to_thread.run_sync(self._write, bodies)
                break
            except OSError as exc:  # disk full, I/O error: hold the recorders up, lose nothing
                log.error("audit trail: cannot write (%s); retrying in %g s, actions wait", exc, WRITE_RETRY)
                await trio.sleep(WRITE_RETRY)
        for _, done in batch:
            if done is not None:
                done.set()

    # -- the writer's side (a worker thread, or the loop when the writer is not running)

    def open(self) -> None:
        """The key (made on first start), the directories, the chain's last MAC and number."""
        with self._lock:
            self._open()

    def _open(self) -> None:
        self._key = load_key(self.data_dir, create=True)
        for d in (self.log_dir, self.log_dir / ARCHIVE_DIR):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self._previous, self._seq = _last_link(self.log_dir)
        self._file = _open_private(self.log_dir / AUDIT_LOG)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _write_alone(self, bodies: list[dict[str, Any]]) -> None:
        """Write while no writer runs (recorded before it started or after it ended): the file
        is closed again at once, since no writer's end will close it."""
        try:
            self._write(bodies)
        finally:
            self.close()

    def _write(self, bodies: list[dict[str, Any]]) -> None:
        if not bodies:
            return
        with self._lock:
            if self._file is None:  # recorded before the writer started or after it ended
                self._open()
            lines = []
            seq, previous = self._seq, self._previous
            for body in bodies:
                seq += 1
                body["seq"] = seq
                line, previous = chained_line(self._key, previous, body)
                lines.append(line + "\n")
            self._file.write("".join(lines))
            self._file.flush()
            # the chain moves on only once its lines are out (a failed write is tried again)
            self._seq, self._previous = seq, previous
            if self._file.tell() >= self.max_bytes:
                self._rotate()

    def _rotate(self) -> None:
        """Current file -> audit_archive/…log.N, compressed to .N.gz; a new current file."""
        self._file.close()
        existing = archives(self.log_dir)
        n = 1 + max((_number(p) for p in existing), default=0)
        plain = self.log_dir / ARCHIVE_DIR / f"{AUDIT_LOG}.{n}"
        os.replace(self.log_dir / AUDIT_LOG, plain)
        self._file = _open_private(self.log_dir / AUDIT_LOG)
        packed = plain.with_name(plain.name + ".gz")
        fd = os.open(packed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        with open(plain, "rb") as src, os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as gz:
            shutil.copyfileobj(src, gz)
        shutil.copystat(plain, packed)
        os.chmod(packed, 0o600)
        plain.unlink()


def _number(path: Path) -> int:
    return int(path.name[len(AUDIT_LOG) + 1 :].removesuffix(".gz"))


def _open_private(path: Path) -> Any:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8", newline="\n")


def _last_link(log_dir: Path) -> tuple[str, int]:
    """(MAC, sequence number) of the trail's last line: the current file's, else the newest
    archive's; ("", 0) for a new trail."""
    for path in reversed(trail_files(log_dir)):
        last = None
        for line in _lines(path):
            split = split_line(line)
            if split is not None:
                last = split
            elif line:  # a line cut short by a crash mid-write: audit-verify names it
                log.error("audit trail: %s has a line without a MAC; the chain goes on from the one before", path)
        if last is None:
            continue
        body, mac = last
        return mac, int(json.loads(body)["seq"])
    return "", 0
