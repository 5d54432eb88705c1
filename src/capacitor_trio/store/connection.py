"""Connections and locking: the store's state, its open (lock, migrate, recover, reserve,
readers) and close, and the two ways to reach the index, `_write` (a job in the writer's next
group) and `_read` (a snapshot on a pooled read-only connection in a worker thread)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import trio

from .errors import StoreInUse
from .fsops import FileOps, check_private_dir, make_private, open_private
from .model import Item, RecoveryReport
from .recovery import recover, spool_buckets
from .rows import ItemRow, to_item
from .schema import migrate
from .spares import SpareFiles
from .writer import Writer, write_reserve

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


class StoreCore:
    """The state every part of the `Store` shares, with its open and close."""

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
        self._bucket_path = self._spool  # the bucket's directory, set with it
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
        fd = open_private(path, os.O_RDWR | os.O_CREAT)
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
        check_private_dir(self.root)  # not another user's, not writable by others; 0700
        self._lock()
        try:
            # the index and its journals 0600 (SQLite gives the WAL and SHM the index's mode),
            # and never a symbolic link to another file
            for suffix in ("", "-wal", "-shm"):
                make_private(self._db_path.with_name(self._db_path.name + suffix), create=not suffix)
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

    def _spool_file_gone(self, path: Path) -> None:
        """A spool file kept in place for reuse left the spool (spares thread)."""
        if self._writer is not None:
            self._writer.forget_trash(path)

    def _item(self, r: ItemRow, **override: Any) -> Item:
        return to_item(self.root, r, **override)
