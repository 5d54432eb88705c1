"""The Store: spool files plus the SQLite queue index (see the package docstring)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from ..domain.instance import Destination, InstanceHeader
from ..domain.states import EXPIRED, FAILED, NEW, PREPARED, REJECTED, RETRYABLE
from .errors import ItemCheckedOut, ItemNotFound, StoreError, StoreFull, StoreInUse, TransitionError
from .fsops import FileOps
from .model import QUEUED_STATES, STATES, Counts, Item, ItemFilter, RecoveryReport
from .recovery import recover, spool_buckets
from .schema import INLINE_PREFIX, migrate
from .spares import SpareFiles
from .writer import Writer, unlinking, write_reserve

log = logging.getLogger("capacitor_trio.store")

#: the file in the cache directory whose flock marks it in use (`Store._lock`)
LOCK_NAME = "lock"

T = TypeVar("T")

#: Files per spool bucket directory before the next one is started. Concurrent commits go to the
#: same bucket, so a group commit usually needs a single directory fsync.
BUCKET_SIZE = 4096
#: Instances up to this size are kept in the index itself: their bytes are committed with their
#: items in one transaction, so one WAL fsync makes both durable (no file fsync, rename or
#: directory fsync). Larger ones get a spool file. Bounds the memory of a checked-out batch too
#: (at most SERIES_BATCH_CAP x this for a node).
INLINE_MAX_BYTES = 32 * 1024
#: At most this many bytes of small instances are handed out by one checkout.
CHECKOUT_INLINE_BYTES = 16 * 1024 * 1024

_ITEM_COLUMNS = (
    "i.id, i.state, i.checked_out, i.source_ae, i.destination_ae, i.destination_role, "
    "i.study_uid, i.series_uid, i.sop_instance_uid, i.sop_class_uid, i.modality, i.patient_id, "
    "i.patient_name, i.accession_number, i.transfer_syntax_uid, i.size_bytes, i.attempt_count, "
    "i.last_error, i.next_attempt_at, i.created_at, i.updated_at, n.rel_path, i.instance_id"
)
_SELECT_ITEMS = f"SELECT {_ITEM_COLUMNS} FROM items i JOIN instances n ON n.id = i.instance_id"
_SELECT_QUEUE = (
    f"SELECT {_ITEM_COLUMNS} FROM items i INDEXED BY items_queue "
    "JOIN instances n ON n.id = i.instance_id"
)

_CHUNK = 500  # ids per IN (...) clause

#: a delivery outcome (params: last_error, next_attempt_at, updated_at, id)
_FAIL_SQL = (
    f"UPDATE items SET state = '{FAILED}', checked_out = 0, attempt_count = attempt_count + 1, "
    "last_error = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?"
)
#: a delivery outcome (params: last_error, updated_at, id)
_REJECT_SQL = (
    f"UPDATE items SET state = '{REJECTED}', checked_out = 0, attempt_count = attempt_count + 1, "
    "last_error = ?, next_attempt_at = NULL, updated_at = ? WHERE id = ?"
)


def _chunks(seq: Sequence[T], n: int = _CHUNK) -> Iterable[Sequence[T]]:
    for k in range(0, len(seq), n):
        yield seq[k : k + n]


def _like_pattern(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _where(f: ItemFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for value, column in (
        (None if f.state is None else _state(f.state), "i.state"),
        (f.source, "i.source_ae"),
        (f.destination, "i.destination_ae"),
        (f.role, "i.destination_role"),
        (f.modality, "i.modality"),
        (f.study_uid, "i.study_uid"),
        (f.series_uid, "i.series_uid"),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if f.search:
        # LIKE is case-insensitive for ASCII; measured faster than instr() here
        clauses.append("i.search_text LIKE ? ESCAPE '\\'")
        params.append(_like_pattern(f.search.lower()))
    return (" AND ".join(clauses) or "1"), params


def _normalise_priorities(priorities: Sequence[str] | None) -> list[str] | None:
    """UIDs stripped, the ``default`` entry in any case spelled "default" (domain/ordering.py)."""
    if not priorities:
        return None
    out = []
    for entry in priorities:
        uid = str(entry).strip()
        out.append("default" if uid.lower() == "default" else uid)
    return out


def _item_rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
    """The rows of an item query (`_SELECT_ITEMS`, `_SELECT_QUEUE`), read by column name."""
    cur = conn.cursor()
    cur.row_factory = sqlite3.Row
    return cur.execute(sql, params).fetchall()


def _blob(conn: sqlite3.Connection, instance_id: int) -> bytes | None:
    row = conn.execute("SELECT data FROM blobs WHERE instance_id = ?", (instance_id,)).fetchone()
    return None if row is None else bytes(row[0])


def _write_file(path: Path, data: bytes) -> None:
    # no O_TRUNC: the path is new, made ahead or reused (see the acceptor's _spill); cut what
    # a reused file held beyond the new bytes
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    with open(fd, "wb") as f:
        f.write(data)
        f.truncate()


def _state(value: str) -> str:
    """Accept plain strings and domain.states.ItemState members alike."""
    state = str(value).strip().lower()
    if state not in STATES:
        raise ValueError(f"unknown state {value!r}")
    return state


def _search_text(header: InstanceHeader, source_ae: str, dest: Destination) -> str:
    return "\x1f".join(
        s.lower()
        for s in (
            header.study_instance_uid,
            header.series_instance_uid,
            header.sop_instance_uid,
            source_ae,
            dest.ae_title,
            header.accession_number,
            header.patient_id,
        )
    )


class Store:
    """Handle on an open store; make one with `open_store`."""

    def __init__(
        self,
        cache_path: Path,
        *,
        durable: bool,
        min_free_space_percent: float,
        cycle_rejected_on_startup: bool,
        clock: Callable[[], float],
        file_ops: FileOps | None,
        read_connections: int,
        reserve_bytes: int = 0,
        inline_max_bytes: int = INLINE_MAX_BYTES,
    ) -> None:
        self.reserve_bytes = max(0, reserve_bytes)
        self.inline_max_bytes = inline_max_bytes
        self._reserve_ok = True
        self.root = Path(cache_path).absolute()
        self.durable = durable
        self.min_free_space_percent = min_free_space_percent
        self._cycle_rejected = cycle_rejected_on_startup
        self._clock = clock
        self._ops = file_ops if file_ops is not None else FileOps(durable=durable)
        self._ops.durable = durable
        self._n_readers = max(1, read_connections)
        self._incoming = self.root / "incoming"
        # delivered instances' files go to the spares thread: with durable writes reused where
        # they are, else emptied for receptions or unlinked (spares.py)
        self._spares = SpareFiles(
            self._incoming, self._ops.fsync_dir if durable else None, gone=self._spool_file_gone
        )
        self._spool = self.root / "spool"
        self._db_path = self.root / "index.db"
        self._reserve_path = self.root / "reserve"
        self._readers: list[sqlite3.Connection] = []
        self._reader_sem = trio.Semaphore(self._n_readers)
        self._writer: Writer | None = None
        self._bucket_lock = trio.Lock()
        self._bucket = 0
        self._bucket_used = BUCKET_SIZE  # forces a fresh bucket on the first commit
        self.recovery_report = RecoveryReport()
        self._lock_fd: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def _connect(self, *, reader: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        if reader:
            conn.execute("PRAGMA query_only = ON")
            conn.execute("PRAGMA cache_size = -16000")
        else:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'OFF'}")
            conn.execute("PRAGMA cache_size = -16000")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            # the writer runs every job in a SAVEPOINT: in a file, its statement journal is a
            # temporary file created and unlinked per group (an ext4 journal round each time,
            # ~0.2-0.3 ms of a 0.9 ms small commit); in memory it costs a few page copies
            conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    def _lock(self) -> None:
        """Take the cache directory for this process: a second router on the same directory
        would run recovery under the first one's feet (moving the files of its receptions in
        progress aside, releasing its checkouts) and deliver the same items twice. An flock on
        `cache/lock`, released by the kernel however this process ends; the file names the
        holder's pid for the error message (written in place, fixed width, best effort: a full
        disk must not keep the router from starting to deliver). Where the file system has no
        locks (some NFS mounts), a warning, and the router runs unguarded."""
        path = self.root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = ""
                with contextlib.suppress(OSError, ValueError, IndexError):
                    holder = f" (pid {int(os.pread(fd, 32, 0).split()[0])})"
                raise StoreInUse(
                    f"the cache directory {self.root} is in use by another capacitor-trio "
                    f"process{holder}; one router per cache directory"
                ) from None
            except OSError as exc:
                log.warning("store: cannot lock %s (%s); nothing stops a second router", path, exc)
            with contextlib.suppress(OSError):
                os.pwrite(fd, f"{os.getpid():<20}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _open_sync(self) -> sqlite3.Connection:
        self._ops.mkdir(self.root)
        self._lock()
        try:
            return self._open_locked()
        except BaseException:
            self._unlock()
            raise

    def _open_locked(self) -> sqlite3.Connection:
        for d in (self._incoming, self._spool):
            self._ops.mkdir(d)
        conn = self._connect(reader=False)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                old = migrate(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if old == 0:
                self._ops.fsync_dir(self.root)
            self.recovery_report = recover(
                conn, self.root, self._ops, now=self._clock(), cycle_rejected=self._cycle_rejected
            )
            self._bucket = max(spool_buckets(self._spool), default=0)
            if self.reserve_bytes:
                try:
                    write_reserve(self._reserve_path, self.reserve_bytes, self._ops)
                except OSError as exc:
                    self._ops.unlink(self._reserve_path)
                    self._reserve_ok = False
                    log.error(
                        "store: no room for the %d-byte reserve (%s); refusing new instances",
                        self.reserve_bytes,
                        exc,
                    )
            for _ in range(self._n_readers):
                self._readers.append(self._connect(reader=True))
        except BaseException:
            conn.close()
            self._close_readers()
            raise
        return conn

    async def _open(self) -> None:
        conn = await trio.to_thread.run_sync(self._open_sync)
        try:
            self._writer = Writer(
                conn,
                self._ops,
                self.root,
                reserve_path=self._reserve_path,
                reserve_bytes=self.reserve_bytes,
                reserve_released=not self._reserve_ok,
                spares=self._spares,
            )
            self._writer.start()
        except BaseException:  # (no thread to start, say): leave nothing open, the lock least
            self._writer = None
            conn.close()
            self._close_readers()
            raise

    async def aclose(self) -> None:
        try:
            await trio.to_thread.run_sync(self._spares.close)
            if self._writer is not None:
                await self._writer.aclose()
            for _ in range(self._n_readers):
                await self._reader_sem.acquire()
        finally:
            self._close_readers()

    def _close_readers(self) -> None:
        """Close the read connections, then give the cache directory back (`_lock`)."""
        try:
            for r in self._readers:
                r.close()
            self._readers.clear()
        finally:
            self._unlock()

    async def _write(
        self, fn: Callable[[sqlite3.Connection], T], dirs: Iterable[Path] = (), *, durable: bool = True
    ) -> T:
        """Run `fn` in the writer's next group. `durable=False` for changes a power cut may undo
        harmlessly (checkouts, releases, new -> prepared): recovery undoes or redoes them anyway,
        so they need no WAL fsync of their own."""
        assert self._writer is not None, "store is not open"
        result: T = await self._writer.run(fn, dirs, durable=durable)
        return result

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._reader_sem:
            conn = self._readers.pop()
            try:

                def in_snapshot() -> T:
                    conn.execute("BEGIN")
                    try:
                        return fn(conn)
                    finally:
                        conn.execute("COMMIT")

                return await trio.to_thread.run_sync(in_snapshot)
            finally:
                self._readers.append(conn)

    @property
    def writer_stats(self) -> Any:
        assert self._writer is not None
        return self._writer.stats

    # -- intake ----------------------------------------------------------------------------------

    def new_incoming_path(self) -> Path:
        """A fresh temporary path in cache/incoming for the acceptor to write a Part 10 file to:
        a ready empty file when there is one (`spares.py`: creating a file is the slow part)."""
        return self._spares.take() or self._incoming / f"{uuid.uuid4().hex}.part"

    def _spool_file_gone(self, path: Path) -> None:
        """A spool file kept in place for reuse left the spool (spares thread)."""
        if self._writer is not None:
            self._writer.forget_trash(path)

    def start_sync(self, temp_path: Path, size: int) -> concurrent.futures.Future[None] | None:
        """Start the fsync of a complete temporary file that will take a spool file (larger than
        `inline_max_bytes`, durable writes), on the writer's pool: pass what this returns to
        `commit_instance` as `sync`. Started as the last byte is written, the flush overlaps the
        work before the commit (the header's parsing, the hand-over to the receiver); the commit
        still renames the file only once the fsync is done. None: nothing to start."""
        if size <= self.inline_max_bytes or self._writer is None:
            return None
        return self._writer.start_sync(Path(temp_path))

    async def discard_incoming(self, temp_path: Path) -> None:
        """Remove a temporary file the acceptor will not commit (association aborted, etc.)."""
        await trio.to_thread.run_sync(self._ops.unlink, Path(temp_path))

    @property
    def index_free_bytes(self) -> int:
        """Free pages inside the index file (left by deleted small instances): SQLite reuses them
        for new ones, so they count as free space for admission."""
        return self._writer.index_free_bytes if self._writer is not None else 0

    def free_space_percent(self) -> float:
        # files kept for reuse (spares.py) count as free: the next receptions write over them
        extra = self.index_free_bytes + self._spares.recycled_bytes
        return self._ops.free_space_percent(self.root, extra_bytes=extra)

    @property
    def accepting(self) -> bool:
        """False while the reserve is given to the index after the disk filled up."""
        return self._writer is None or not self._writer.reserve_released

    def check_admission(self) -> None:
        """Raise StoreFull when free space is below `min_free_space_percent` (one statvfs), or
        while the disk is full (the reserve was given to the index and there is no room yet to
        take it back)."""
        if not self.accepting:
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize + self.index_free_bytes < 2 * self.reserve_bytes:
                raise StoreFull("disk full: the remaining space is kept for deliveries")
        if self.min_free_space_percent <= 0:
            return
        free = self.free_space_percent()
        if free < self.min_free_space_percent:
            raise StoreFull(
                f"free space {free:.1f}% below minimum {self.min_free_space_percent:g}%"
            )

    async def _bucket_dir(self) -> Path:
        async with self._bucket_lock:
            if self._bucket_used >= BUCKET_SIZE:
                nxt = self._bucket + 1
                path = self._spool / f"{nxt:06d}"

                def make() -> None:
                    self._ops.mkdir(path)
                    self._ops.fsync_dir(self._spool)

                await trio.to_thread.run_sync(make)
                self._bucket, self._bucket_used = nxt, 0
            self._bucket_used += 1
            return self._spool / f"{self._bucket:06d}"

    async def commit_instance(
        self,
        temp_path: Path | None,
        header: InstanceHeader,
        source_ae: str,
        destinations: Sequence[Destination],
        *,
        state: str = NEW,
        data: bytes | None = None,
        sync: concurrent.futures.Future[None] | None = None,
    ) -> list[int]:
        """Store a received instance and queue one item per destination, durably.

        The instance is the temporary file `temp_path` (from `new_incoming_path`), or `data`
        (its Part 10 bytes, received in memory) with `temp_path` None. Returns the new item ids
        (one per distinct destination, in order) only once the instance and the items are
        durable; `sync` is the file's fsync from `start_sync`, if one was started. Raises
        StoreFull (and leaves nothing behind: the temporary file is removed) when space is short
        or a write fails. Once started it completes even if the caller is
        cancelled; the caller then sees Cancelled at its next checkpoint.
        """
        if (temp_path is None) == (data is None):
            raise ValueError("commit_instance takes a temporary file or the bytes, not both")
        dests = list(dict.fromkeys(destinations))
        if not dests:
            raise ValueError("commit_instance needs at least one destination")
        state = _state(state)
        final: Path | None = None
        reused = False
        committed = False
        try:
            self.check_admission()
            now = self._clock()
            if data is not None and len(data) > self.inline_max_bytes:
                # bytes too large for the index: they get a spool file like any large instance
                temp_path = self.new_incoming_path()
                await trio.to_thread.run_sync(_write_file, temp_path, data)
                data = None
            if data is not None:
                inline = True
            else:
                assert temp_path is not None
                temp_path = Path(temp_path)
                # a stat of the file just written (page cache): decides where it lives
                try:
                    inline = os.stat(temp_path).st_size <= self.inline_max_bytes
                except OSError as exc:
                    raise StoreError(f"received file vanished: {exc}") from exc
            if inline:
                rel = f"{INLINE_PREFIX}{uuid.uuid4().hex}"
            elif temp_path is not None and temp_path.parent.parent == self._spool:
                # a delivered instance's spool file, written over where it is (spares.py): its
                # name is durable already (no rename, no directory fsync); its trash row goes
                # in the same transaction as the new rows that name it
                reused = True
                final = temp_path
                rel = final.relative_to(self.root).as_posix()
            else:
                bucket = await self._bucket_dir()
                final = bucket / f"{uuid.uuid4().hex}.dcm"
                rel = final.relative_to(self.root).as_posix()
            rows = [
                (
                    state,
                    source_ae,
                    d.ae_title,
                    d.role,
                    header.study_instance_uid,
                    header.series_instance_uid,
                    header.sop_instance_uid,
                    header.sop_class_uid,
                    header.modality,
                    header.patient_id,
                    header.patient_name,
                    header.accession_number,
                    header.transfer_syntax_uid,
                    now,
                    now,
                    _search_text(header, source_ae, d),
                )
                for d in dests
            ]

            def insert(conn: sqlite3.Connection, size: int, blob: bytes | None = None) -> list[int]:
                cur = conn.execute(
                    "INSERT INTO instances(rel_path, size_bytes, created_at) VALUES (?, ?, ?)",
                    (rel, size, now),
                )
                instance_id = cur.lastrowid
                if reused:
                    conn.execute("DELETE FROM trash WHERE rel_path = ?", (rel,))
                if blob is not None:
                    conn.execute(
                        "INSERT INTO blobs(instance_id, data) VALUES (?, ?)", (instance_id, blob)
                    )
                ids = []
                for row in rows:
                    cur = conn.execute(
                        "INSERT INTO items(instance_id, state, source_ae, destination_ae, "
                        "destination_role, study_uid, series_uid, sop_instance_uid, sop_class_uid, "
                        "modality, patient_id, patient_name, accession_number, "
                        "transfer_syntax_uid, created_at, updated_at, search_text, size_bytes) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (instance_id, *row, size),
                    )
                    ids.append(int(cur.lastrowid or 0))
                return ids

            assert self._writer is not None, "store is not open"
            ids: list[int]
            if inline:
                # the bytes go into the group's transaction: its one WAL fsync covers them and
                # the items; the temporary file is removed after the COMMIT
                def insert_inline(conn: sqlite3.Connection) -> list[int]:
                    payload = data if data is not None else temp_path.read_bytes()  # type: ignore[union-attr]
                    return insert(conn, len(payload), payload)

                ids = await self._writer.run(insert_inline, admission=True, discard=temp_path)
            else:
                # the pool fsyncs and renames the file (in parallel with the other commits), then
                # the group fsyncs the bucket once, inserts, and commits
                assert final is not None and temp_path is not None
                ids = await self._writer.run(
                    insert,
                    () if reused else (bucket,),
                    admission=True,
                    place=(temp_path, final),
                    synced=sync,
                )
            committed = True
            return ids
        finally:
            if not committed:
                with trio.CancelScope(shield=True):
                    if temp_path is not None:
                        await trio.to_thread.run_sync(self._ops.unlink, Path(temp_path))
                    if final is not None:
                        # (a reused file keeps its trash row: its unlink is not made durable
                        # here, and the row makes recovery remove it if a power cut brings it
                        # back with this reception's bytes over the old ones)
                        await trio.to_thread.run_sync(self._ops.unlink, final)

    # -- the delivery path (node actors) -----------------------------------------------------------

    async def prepare_ripe(self, now: float, minimum_age: float) -> int:
        """New items received at least `minimum_age` seconds ago become prepared; returns count."""

        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"UPDATE items SET state = '{PREPARED}', updated_at = ? "
                f"WHERE state = '{NEW}' AND checked_out = 0 AND created_at <= ?",
                (now, now - minimum_age),
            ).rowcount

        return await self._write(job, durable=False)

    async def checkout_batch(
        self,
        destination: Destination,
        *,
        now: float,
        limit: int,
        by_series: bool = False,
        sop_class_priorities: Sequence[str] | None = None,
        study_quiet_before: float | None = None,
        exempt_studies: Collection[str] = (),
        series_uid: str | None = None,
    ) -> list[Item]:
        """Check out the next batch for `destination` (see the package docstring for the order).

        `series_uid` restricts the batch to that series (a node topping up an association that
        carries one series)."""
        if limit <= 0:
            return []
        job = partial(
            self._checkout_job,
            destination,
            now,
            limit,
            by_series,
            _normalise_priorities(sop_class_priorities),
            study_quiet_before,
            sorted(exempt_studies),
            series_uid,
        )
        return await self._write(job, durable=False)

    def _checkout_job(
        self,
        dest: Destination,
        now: float,
        limit: int,
        by_series: bool,
        priorities: list[str] | None,
        quiet_before: float | None,
        exempt: list[str],
        series_uid: str | None,
        conn: sqlite3.Connection,
    ) -> list[Item]:
        base = "i.destination_ae = ? AND i.destination_role = ? AND i.checked_out = 0"
        base_params: list[Any] = [dest.ae_title, dest.role]
        if quiet_before is not None:
            quiet = (
                "NOT EXISTS (SELECT 1 FROM items j WHERE j.destination_ae = i.destination_ae "
                "AND j.destination_role = i.destination_role AND j.study_uid = i.study_uid "
                "AND j.created_at > ?)"
            )
            params_q: list[Any] = [quiet_before]
            if exempt:
                quiet = f"(i.study_uid IN (SELECT value FROM json_each(?)) OR {quiet})"
                params_q = [json.dumps(exempt), quiet_before]
            base += f" AND {quiet}"
            base_params += params_q

        # class groups in rank order: (extra clause, params)
        groups: list[tuple[str, list[Any]]]
        if priorities:
            listed = [p for p in priorities if p != "default"]
            groups = []
            for p in dict.fromkeys(priorities):
                if p == "default":
                    groups.append(
                        (
                            "i.sop_class_uid NOT IN (SELECT value FROM json_each(?))",
                            [json.dumps(listed)],
                        )
                    )
                else:
                    groups.append(("i.sop_class_uid = ?", [p]))
            if "default" not in priorities:
                groups.append(
                    (
                        "i.sop_class_uid NOT IN (SELECT value FROM json_each(?))",
                        [json.dumps(listed)],
                    )
                )
        else:
            groups = [("1", [])]

        # is anything failed due at all? (the partial index answers at once; when it is, the
        # failed items are walked in FIFO order rather than sorted by due time)
        row = conn.execute(
            "SELECT MIN(next_attempt_at) FROM items WHERE destination_ae = ? AND "
            f"destination_role = ? AND state = '{FAILED}' AND checked_out = 0 "
            "AND next_attempt_at IS NOT NULL",
            (dest.ae_title, dest.role),
        ).fetchone()
        any_failed_due = row[0] is not None and row[0] <= now

        def fetch(extra: str, extra_params: list[Any], n: int) -> list[sqlite3.Row]:
            prepared = _item_rows(
                conn,
                f"{_SELECT_ITEMS} WHERE {base} AND i.state = '{PREPARED}' AND {extra} "
                "ORDER BY i.created_at, i.id LIMIT ?",
                (*base_params, *extra_params, n),
            )
            if not any_failed_due:
                return prepared
            failed = _item_rows(
                conn,
                f"{_SELECT_QUEUE} WHERE {base} AND i.state = '{FAILED}' "
                "AND i.next_attempt_at IS NOT NULL AND i.next_attempt_at <= ? AND "
                f"{extra} ORDER BY i.created_at, i.id LIMIT ?",
                (*base_params, now, *extra_params, n),
            )
            both = sorted(prepared + failed, key=lambda r: (r["created_at"], r["id"]))
            return both[:n]

        def collect(series_clause: str, series_params: list[Any]) -> list[sqlite3.Row]:
            out: list[sqlite3.Row] = []
            for extra, extra_params in groups:
                if len(out) >= limit:
                    break
                clause = extra if not series_clause else f"{extra} AND {series_clause}"
                out += fetch(clause, extra_params + series_params, limit - len(out))
            return out

        if series_uid is not None:
            rows = collect("i.series_uid = ?", [series_uid])
        else:
            rows = collect("", [])
        if by_series and rows and series_uid is None:
            rows = collect("i.series_uid = ?", [rows[0]["series_uid"]])
        if not rows:
            return []
        # the bytes of small instances come with the batch: bound them (the rest waits for
        # the next checkout or top-up)
        budget, kept = CHECKOUT_INLINE_BYTES, list[sqlite3.Row]()
        for r in rows:
            if r["rel_path"].startswith(INLINE_PREFIX):
                if kept and r["size_bytes"] > budget:
                    break
                budget -= r["size_bytes"]
            kept.append(r)
        rows = kept
        ids = [r["id"] for r in rows]
        for chunk in _chunks(ids):
            conn.execute(
                f"UPDATE items SET checked_out = 1, updated_at = ? WHERE id IN ({','.join('?' * len(chunk))})",
                (now, *chunk),
            )
        items = [self._item(r, checked_out=True, updated_at=now) for r in rows]
        inline_ids = [it.instance_id for it in items if it.inline]
        if not inline_ids:
            return items
        data: dict[int, bytes] = {}
        for chunk in _chunks(inline_ids):
            data.update(
                conn.execute(
                    f"SELECT instance_id, data FROM blobs WHERE instance_id IN "
                    f"({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
            )
        for it in items:
            if it.inline and it.instance_id not in data:
                # the requestor then reports the instance as missing (rejected), with its name
                log.error("store: the stored bytes of %s are missing", it.path.name)
        return [
            attrs.evolve(it, data=data.get(it.instance_id)) if it.inline else it for it in items
        ]

    def _item(self, r: sqlite3.Row, **override: Any) -> Item:
        """An `Item` from a row of `_item_rows`, with `override` taking the place of columns."""
        fields = dict(
            id=r["id"],
            state=r["state"],
            checked_out=bool(r["checked_out"]),
            source_ae=r["source_ae"],
            destination_ae=r["destination_ae"],
            destination_role=r["destination_role"],
            study_instance_uid=r["study_uid"],
            series_instance_uid=r["series_uid"],
            sop_instance_uid=r["sop_instance_uid"],
            sop_class_uid=r["sop_class_uid"],
            modality=r["modality"],
            patient_id=r["patient_id"],
            patient_name=r["patient_name"],
            accession_number=r["accession_number"],
            transfer_syntax_uid=r["transfer_syntax_uid"],
            size_bytes=r["size_bytes"],
            attempt_count=r["attempt_count"],
            last_error=r["last_error"],
            next_attempt_at=r["next_attempt_at"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            path=self.root / r["rel_path"],
            instance_id=r["instance_id"],
            inline=r["rel_path"].startswith(INLINE_PREFIX),
        )
        fields.update(override)
        return Item(**fields)

    def _remove_items(self, conn: sqlite3.Connection, ids: Sequence[int]) -> list[Path]:
        """Delete items; instances left without items go to the trash. Returns files to unlink."""
        instance_ids: set[int] = set()
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            instance_ids.update(
                r[0]
                for r in conn.execute(f"SELECT instance_id FROM items WHERE id IN ({marks})", chunk)
            )
            conn.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk)
        paths: list[Path] = []
        for iid in sorted(instance_ids):
            if conn.execute("SELECT 1 FROM items WHERE instance_id = ? LIMIT 1", (iid,)).fetchone():
                continue
            row = conn.execute("SELECT rel_path FROM instances WHERE id = ?", (iid,)).fetchone()
            if row is None:  # pragma: no cover - index corrupted by hand
                continue
            conn.execute("DELETE FROM instances WHERE id = ?", (iid,))
            if row[0].startswith(INLINE_PREFIX):
                conn.execute("DELETE FROM blobs WHERE instance_id = ?", (iid,))
                continue
            conn.execute("INSERT OR IGNORE INTO trash(rel_path) VALUES (?)", (row[0],))
            paths.append(self.root / row[0])
        return paths

    async def delivered(self, ids: Iterable[int]) -> None:
        """Delivered items are removed; a file goes when its last item does."""
        id_list = list(ids)
        if not id_list:
            return

        def job(conn: sqlite3.Connection) -> Any:
            return unlinking(None, self._remove_items(conn, id_list), delivered=True)

        await self._write(job)

    async def record_outcomes(
        self,
        delivered: Sequence[int] = (),
        failed: Sequence[tuple[int, str, float | None]] = (),
        rejected: Sequence[tuple[int, str]] = (),
        *,
        durable: bool = True,
    ) -> None:
        """A node's outcomes for part of a batch, in one store job: `delivered` ids are removed
        (as `delivered`), `failed` (id, error, next attempt) as `fail`, `rejected` (id, error)
        as `reject`. Ids no longer in the index are skipped, so one vanished item never undoes
        the record of the others.

        `durable=False` commits without a WAL fsync of its own (the next durable commit covers
        it): for outcomes whose loss in a power cut costs only a repeated delivery. A caller
        passes it only when no spool file goes away with the record (small instances kept in
        the index): a file unlinked after a record that a power cut then undoes would leave an
        item without its file."""
        delivered, failed, rejected = list(delivered), list(failed), list(rejected)
        if not (delivered or failed or rejected):
            return
        now = self._clock()

        def job(conn: sqlite3.Connection) -> Any:
            conn.executemany(_FAIL_SQL, [(error, at, now, item_id) for item_id, error, at in failed])
            conn.executemany(_REJECT_SQL, [(error, now, item_id) for item_id, error in rejected])
            paths = self._remove_items(conn, delivered) if delivered else []
            if paths and not durable:
                # never unlink after a commit a power cut may undo: the files stay in the trash
                # table, and recovery removes them at the next start
                log.warning("store: %d delivered file(s) left for recovery to remove", len(paths))
                paths = []
            return unlinking(None, paths, delivered=True)

        await self._write(job, durable=durable)

    def _update_one(
        self, conn: sqlite3.Connection, item_id: int, sql: str, params: Sequence[Any]
    ) -> None:
        if conn.execute(sql, (*params, item_id)).rowcount == 0:
            raise ItemNotFound(f"no item {item_id}")

    async def fail(self, item_id: int, error: str, next_attempt_at: float | None) -> None:
        """A delivery attempt failed: attempt+1, lastError, state failed, back in the queue."""
        now = self._clock()
        await self._write(
            lambda conn: self._update_one(
                conn,
                item_id,
                _FAIL_SQL,
                (error, next_attempt_at, now),
            )
        )

    async def reject(self, item_id: int, error: str) -> None:
        """The destination refused the item: attempt+1, state rejected (no automatic retry)."""
        now = self._clock()
        await self._write(
            lambda conn: self._update_one(
                conn,
                item_id,
                _REJECT_SQL,
                (error, now),
            )
        )

    async def release(self, ids: Iterable[int]) -> None:
        """Give checked-out items back unchanged (aborted send, pause)."""
        id_list = list(ids)
        if not id_list:
            return

        def job(conn: sqlite3.Connection) -> None:
            for chunk in _chunks(id_list):
                conn.execute(
                    f"UPDATE items SET checked_out = 0 WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )

        await self._write(job, durable=False)

    async def release_all_checked_out(self, destination: Destination | None = None) -> list[str]:
        """Release every checked-out item (of one destination): the supervisor after a crash.
        Returns their SOP Instance UIDs (what may reach the destination twice)."""

        where = "checked_out = 1"
        params: tuple[str, ...] = ()
        if destination is not None:
            where += " AND destination_ae = ? AND destination_role = ?"
            params = (destination.ae_title, destination.role)

        def job(conn: sqlite3.Connection) -> list[str]:
            # (not UPDATE ... RETURNING: that needs SQLite 3.35, and some systems' Python has 3.34)
            select = f"SELECT sop_instance_uid FROM items WHERE {where}"
            uids = [r[0] for r in conn.execute(select, params)]
            conn.execute(f"UPDATE items SET checked_out = 0 WHERE {where}", params)
            return uids

        return await self._write(job, durable=False)

    # -- operator transitions (API) ----------------------------------------------------------------

    def _get_for_change(self, conn: sqlite3.Connection, item_id: int) -> sqlite3.Row:
        rows = _item_rows(conn, f"{_SELECT_ITEMS} WHERE i.id = ?", (item_id,))
        if not rows:
            raise ItemNotFound(f"no item {item_id}")
        if rows[0]["checked_out"]:
            raise ItemCheckedOut(f"item {item_id} is being delivered")
        return rows[0]

    @staticmethod
    def _target_next_attempt(target: str, now: float) -> float | None:
        return now if target == FAILED else None

    async def move(self, item_id: int, target_state: str) -> Item:
        """Move an item to any state ('failed': retried on the next cycle)."""
        target_state = _state(target_state)
        now = self._clock()
        nxt = self._target_next_attempt(target_state, now)

        def job(conn: sqlite3.Connection) -> Item:
            row = self._get_for_change(conn, item_id)
            conn.execute(
                "UPDATE items SET state = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (target_state, nxt, now, item_id),
            )
            return self._item(row, state=target_state, next_attempt_at=nxt, updated_at=now)

        return await self._write(job)

    async def retry(self, item_id: int) -> Item:
        """failed|rejected -> new, a fresh start (attempt count 0); anything else is a TransitionError."""
        now = self._clock()

        def job(conn: sqlite3.Connection) -> Item:
            row = self._get_for_change(conn, item_id)
            if row["state"] not in RETRYABLE:
                raise TransitionError(
                    f"item {item_id} is {row['state']}; only failed or rejected items retry"
                )
            conn.execute(
                f"UPDATE items SET state = '{NEW}', next_attempt_at = NULL, attempt_count = 0, "
                "updated_at = ? WHERE id = ?",
                (now, item_id),
            )
            return self._item(row, state=NEW.value, next_attempt_at=None, attempt_count=0, updated_at=now)

        return await self._write(job)

    async def delete(self, item_id: int) -> None:
        def job(conn: sqlite3.Connection) -> Any:
            self._get_for_change(conn, item_id)
            return unlinking(None, self._remove_items(conn, [item_id]))

        await self._write(job)

    async def move_where(self, f: ItemFilter, target_state: str) -> int:
        """Move every matching item that is not checked out; returns how many were updated."""
        target_state = _state(target_state)
        now = self._clock()
        nxt = self._target_next_attempt(target_state, now)
        where, params = _where(f)

        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE items SET state = ?, next_attempt_at = ?, updated_at = ? WHERE id IN "
                f"(SELECT i.id FROM items i WHERE {where} AND i.checked_out = 0)",
                (target_state, nxt, now, *params),
            ).rowcount

        return await self._write(job)

    async def retry_where(self, f: ItemFilter, from_state: str) -> int:
        """Matching items in `from_state` (failed or rejected) go back to new."""
        from_state = str(from_state).strip().lower()
        if from_state not in RETRYABLE:
            raise TransitionError(f"only failed or rejected items retry, not {from_state!r}")
        if f.state is not None and _state(f.state) != from_state:
            return 0
        now = self._clock()
        where, params = _where(f)

        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"UPDATE items SET state = '{NEW}', next_attempt_at = NULL, attempt_count = 0, "
                "updated_at = ? WHERE id IN "
                f"(SELECT i.id FROM items i WHERE {where} AND i.state = ? AND i.checked_out = 0)",
                (now, *params, from_state),
            ).rowcount

        return await self._write(job)

    async def delete_where(self, f: ItemFilter) -> int:
        """Delete every matching item that is not checked out; returns how many."""
        where, params = _where(f)

        def job(conn: sqlite3.Connection) -> Any:
            ids = [
                r[0]
                for r in conn.execute(
                    f"SELECT i.id FROM items i WHERE {where} AND i.checked_out = 0", params
                )
            ]
            return unlinking(len(ids), self._remove_items(conn, ids))

        return await self._write(job)

    async def expire(self, now: float, threshold_seconds: float) -> int:
        """Queued items (new, prepared, failed) created before now - threshold become expired."""

        def job(conn: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(QUEUED_STATES))
            return conn.execute(
                f"UPDATE items SET state = '{EXPIRED}', next_attempt_at = NULL, updated_at = ? "
                f"WHERE created_at < ? AND checked_out = 0 AND state IN ({marks})",
                (now, now - threshold_seconds, *QUEUED_STATES),
            ).rowcount

        return await self._write(job)

    async def set_paused(self, destination: Destination, paused: bool) -> None:
        def job(conn: sqlite3.Connection) -> None:
            if paused:
                conn.execute(
                    "INSERT OR IGNORE INTO paused(ae_title, role) VALUES (?, ?)",
                    (destination.ae_title, destination.role),
                )
            else:
                conn.execute(
                    "DELETE FROM paused WHERE ae_title = ? AND role = ?",
                    (destination.ae_title, destination.role),
                )

        await self._write(job)

    # -- reads (reader connections in worker threads) --------------------------------------------

    async def list_items(
        self, f: ItemFilter, *, skip: int = 0, limit: int = 100
    ) -> tuple[list[Item], int]:
        """A page of matching items in id (arrival) order, and the total number matching."""
        where, params = _where(f)

        def q(conn: sqlite3.Connection) -> tuple[list[Item], int]:
            if f.search:
                # one scan of the covering search index gives the total and the page's ids
                ids = [
                    r[0]
                    for r in conn.execute(
                        f"SELECT i.id FROM items i INDEXED BY items_search WHERE {where}", params
                    )
                ]
                total = len(ids)
                ids.sort()
                page = ids[max(0, skip) : max(0, skip) + max(0, limit)]
                rows: list[sqlite3.Row] = []
                for chunk in _chunks(page):
                    rows += _item_rows(
                        conn, f"{_SELECT_ITEMS} WHERE i.id IN ({','.join('?' * len(chunk))})", chunk
                    )
                rows.sort(key=lambda r: r["id"])
            else:
                rows = _item_rows(
                    conn,
                    f"{_SELECT_ITEMS} WHERE {where} ORDER BY i.id LIMIT ? OFFSET ?",
                    (*params, max(0, limit), max(0, skip)),
                )
                total = conn.execute(
                    f"SELECT COUNT(*) FROM items i WHERE {where}", params
                ).fetchone()[0]
            return [self._item(r) for r in rows], int(total)

        return await self._read(q)

    async def get_item(self, item_id: int, *, with_data: bool = False) -> Item:
        """One item; `with_data` also reads the bytes of a small instance kept in the index
        (`Item.data`), in the same snapshot."""

        def q(conn: sqlite3.Connection) -> Item:
            rows = _item_rows(conn, f"{_SELECT_ITEMS} WHERE i.id = ?", (item_id,))
            if not rows:
                raise ItemNotFound(f"no item {item_id}")
            item = self._item(rows[0])
            if with_data and item.inline:
                item = attrs.evolve(item, data=_blob(conn, item.instance_id))
            return item

        return await self._read(q)

    async def read_inline(self, instance_id: int) -> bytes:
        """The Part 10 bytes of an instance kept in the index (`Item.inline`)."""

        def q(conn: sqlite3.Connection) -> bytes:
            data = _blob(conn, instance_id)
            if data is None:
                raise ItemNotFound(f"no stored bytes for instance {instance_id}")
            return data

        return await self._read(q)

    async def counts(self, destination: Destination | None = None) -> Counts:
        """Items per state and checked out, for one destination or for all. Index-only: the
        state index for the states, the partial index of checked-out items for the rest."""

        def q(conn: sqlite3.Connection) -> Counts:
            where = ""
            params: tuple[Any, ...] = ()
            if destination is not None:
                where = " WHERE destination_ae = ? AND destination_role = ?"
                params = (destination.ae_title, destination.role)
            per: dict[str, int] = dict.fromkeys(STATES, 0)
            for state, n in conn.execute(f"SELECT state, COUNT(*) FROM items{where} GROUP BY state", params):
                per[state] = int(n)
            checked_sql = "SELECT COUNT(*) FROM items WHERE checked_out = 1" + where.replace(" WHERE", " AND")
            (checked,) = conn.execute(checked_sql, params).fetchone()
            return Counts(**per, checked_out=int(checked), total=sum(per.values()))

        return await self._read(q)

    async def counts_by_destination(self) -> dict[Destination, Counts]:
        """Counts of every destination that has items, in one scan of the queue index."""

        def q(conn: sqlite3.Connection) -> dict[Destination, Counts]:
            per: dict[Destination, dict[str, int]] = {}
            checked: dict[Destination, int] = {}
            rows = conn.execute(
                "SELECT destination_ae, destination_role, state, checked_out, COUNT(*) FROM items "
                "GROUP BY destination_ae, destination_role, state, checked_out"
            )
            for ae, role, state, co, n in rows:
                dest = Destination(ae, role)
                states = per.setdefault(dest, dict.fromkeys(STATES, 0))
                states[state] += int(n)
                if co:
                    checked[dest] = checked.get(dest, 0) + int(n)
            return {
                d: Counts(**states, checked_out=checked.get(d, 0), total=sum(states.values()))
                for d, states in per.items()
            }

        return await self._read(q)

    async def destinations(self) -> list[Destination]:
        """Every destination that has items (including nodes since removed from the config)."""

        def q(conn: sqlite3.Connection) -> list[Destination]:
            rows = conn.execute("SELECT DISTINCT destination_ae, destination_role FROM items")
            return [Destination(a, r) for a, r in rows]

        return await self._read(q)

    async def next_eligible_at(self, destination: Destination, now: float) -> float | None:
        """When something of `destination` is next eligible for checkout (now if already)."""

        def q(conn: sqlite3.Connection) -> float | None:
            key = (destination.ae_title, destination.role)
            if conn.execute(
                "SELECT 1 FROM items WHERE destination_ae = ? AND destination_role = ? "
                f"AND state = '{PREPARED}' AND checked_out = 0 LIMIT 1",
                key,
            ).fetchone():
                return now
            row = conn.execute(
                "SELECT MIN(next_attempt_at) FROM items WHERE destination_ae = ? AND "
                f"destination_role = ? AND state = '{FAILED}' AND checked_out = 0 "
                "AND next_attempt_at IS NOT NULL",
                key,
            ).fetchone()
            if row is None or row[0] is None:
                return None
            return max(now, float(row[0]))

        return await self._read(q)

    async def first_quiet_arrival(self, destination: Destination, lookahead: int) -> float | None:
        """Of the studies of the `lookahead` oldest items waiting for `destination` (prepared,
        not checked out), the earliest last arrival: when the first of them fell quiet (the
        ProcessDelay's next look). None when nothing waits."""

        def q(conn: sqlite3.Connection) -> float | None:
            dest = (destination.ae_title, destination.role)
            row = conn.execute(
                "SELECT MIN(last) FROM (SELECT MAX(created_at) AS last FROM items "
                "WHERE destination_ae = ? AND destination_role = ? AND study_uid IN ("
                "SELECT study_uid FROM items WHERE destination_ae = ? AND destination_role = ? "
                f"AND state = '{PREPARED}' AND checked_out = 0 ORDER BY created_at, id LIMIT ?) "
                "GROUP BY study_uid)",
                (*dest, *dest, lookahead),
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._read(q)

    async def get_paused(self) -> set[tuple[str, str]]:
        def q(conn: sqlite3.Connection) -> set[tuple[str, str]]:
            return {(r[0], r[1]) for r in conn.execute("SELECT ae_title, role FROM paused")}

        return await self._read(q)


@asynccontextmanager
async def open_store(
    cache_path: Path,
    *,
    durable: bool = True,
    min_free_space_percent: float = 0,
    cycle_rejected_on_startup: bool = False,
    clock: Callable[[], float] = time.time,
    file_ops: FileOps | None = None,
    read_connections: int = 2,
    reserve_bytes: int = 8 * 1024 * 1024,
    inline_max_bytes: int = INLINE_MAX_BYTES,
) -> AsyncIterator[Store]:
    """Open (creating if needed) the store under `cache_path`, run recovery, and yield it.

    `reserve_bytes` are allocated in ``cache/reserve`` and given back to the index when the disk
    fills up, so deliveries and deletes (which free space) keep working; new instances are refused
    until the reserve can be taken back.
    """
    store = Store(
        Path(cache_path),
        durable=durable,
        min_free_space_percent=min_free_space_percent,
        cycle_rejected_on_startup=cycle_rejected_on_startup,
        clock=clock,
        file_ops=file_ops,
        read_connections=read_connections,
        reserve_bytes=reserve_bytes,
        inline_max_bytes=inline_max_bytes,
    )
    await store._open()
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
