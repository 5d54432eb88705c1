"""The writer thread: sole owner of the write connection, committing jobs in groups.

A job is a function `fn(conn) -> result` that runs inside a SAVEPOINT of the current group
transaction. The thread takes every job queued while it was busy, runs them one after another,
fsyncs the spool directories they name, and COMMITs once: one WAL fsync serves the whole group.
A job that raises is rolled back alone (its savepoint) and its caller gets the exception; a failed
COMMIT fails every job of the group. Callers wait in Trio on an Event set from the thread with
`TrioToken.run_sync_soon`, so the loop never waits for a flush.

One exception: without durable writes nothing here ever flushes (`synchronous=OFF`, no
directory fsyncs), and the commit of a new instance runs on the loop itself when the thread is
idle (`Writer._run_inline`), as one group of its own; the receiving association would wait for
it anyway, and the two thread hand-overs cost more than the commit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import trio

from .errors import StoreFull, translate
from .fsops import FileOps, open_private, relative_name
from .spares import SpareFiles

log = logging.getLogger("capacitor_trio.store")

#: Upper bound on jobs per group transaction (keeps one commit's latency bounded).
MAX_GROUP = 512
#: Threads fsyncing a group's new files concurrently (one file is fsync'd by the writer itself).
PLACE_THREADS = 8


@attrs.define(eq=False)
class Job:
    #: `fn(conn)`, or `fn(conn, size)` for a job that places a file
    fn: Callable[..., Any]
    dirs: frozenset[Path] = frozenset()
    done: trio.Event = attrs.field(factory=trio.Event)
    result: Any = None
    #: a commit of a new instance: refused while the disk is full
    admission: bool = False
    error: BaseException | None = None
    #: files to unlink once the group has committed (last item of an instance went away)
    unlink_after: list[Path] = attrs.field(factory=list)
    #: ...delivered ones, which may be retired for reuse; False: deleted by an operator, so
    #: their bytes go at once (`_retire`)
    retire: bool = False
    #: a temporary file to unlink once the group has committed (its bytes are in the index now)
    discard: Path | None = None
    #: (temporary file, spool path): fsync'd and renamed by the group before its directory
    #: fsyncs; `fn` runs only if that worked, with the file's size in `placed_size`
    place: tuple[Path, Path] | None = None
    placed_size: int = 0
    #: the fsync and rename of `place`, started on the pool when the job was submitted
    #: (overlapping the group in progress, in parallel with the other jobs' files); its result
    #: is the file's size. The group waits for it before its directory fsyncs.
    placed: concurrent.futures.Future[int] | None = None
    #: False: losing this job in a power cut is harmless (a checkout, a release: recovery
    #: undoes them anyway), so a group of such jobs commits without its own WAL fsync
    durable: bool = True


@attrs.define(eq=False)
class Stats:
    groups: int = 0
    jobs: int = 0
    #: jobs run on the loop (`Writer._run_inline`), whether or not they succeeded; the ones
    #: that did count in `groups` and `jobs` too
    inline: int = 0


class Writer:
    def __init__(
        self,
        conn: sqlite3.Connection,
        ops: FileOps,
        root: Path,
        *,
        reserve_path: Path | None = None,
        reserve_bytes: int = 0,
        reserve_released: bool = False,
        spares: SpareFiles | None = None,
    ) -> None:
        #: the thread that takes delivered instances' files (`_retire`)
        self._spares = spares
        if spares is not None and reserve_released:  # opened on a full disk
            spares.pause_reuse(True)
        self._reserve_path = reserve_path if reserve_bytes > 0 else None
        self._reserve_bytes = reserve_bytes
        #: the reserve was given to the index: new instances are refused until it is back
        self.reserve_released = reserve_released
        self._conn = conn
        self._ops = ops
        self._root = root
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(
            target=self._main, name="capacitor-store-writer", daemon=True
        )
        self._trash_done: list[str] = []
        #: spool paths of files that left the spool outside the writer (spares kept in place,
        #: then dropped): their trash rows go in the next group (`forget_trash`, any thread)
        self._forgotten: collections.deque[str] = collections.deque()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if ops.durable:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                PLACE_THREADS, thread_name_prefix="capacitor-store-fsync"
            )
        self.stats = Stats()
        #: free pages inside the index file (deleted small instances), reused by SQLite before
        #: the file grows: refreshed after every group
        self.index_free_bytes = 0
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        self._closed = False
        self._sync_mode = "FULL" if ops.durable else "OFF"  # what the store's connection set
        #: held while a group runs, by the thread or by the loop (`_run_inline`)
        self._running = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    async def run(
        self,
        fn: Callable[..., Any],
        dirs: Iterable[Path] = (),
        *,
        admission: bool = False,
        place: tuple[Path, Path] | None = None,
        durable: bool = True,
        discard: Path | None = None,
        synced: concurrent.futures.Future[None] | None = None,
    ) -> Any:
        """Run `fn` in the next group transaction and return its result once committed.

        With `place=(temp, final)` the group first fsyncs `temp` and renames it to `final` (a
        failure fails this job alone), and `fn` gets the file's size as a second argument;
        `synced` is that fsync if `start_sync` started it already.

        Once submitted, the job completes even if the caller is cancelled meanwhile (the wait is
        shielded; a store operation is short and must not be left half-known, e.g. a checkout
        whose items nobody holds). The cancellation is delivered at the caller's next checkpoint.
        """
        if self._closed:
            raise RuntimeError("store is closed")
        job = Job(
            fn, frozenset(dirs), admission=admission, place=place, durable=durable, discard=discard
        )
        if self._run_inline(job):
            await trio.lowlevel.cancel_shielded_checkpoint()
            if job.error is not None:
                raise job.error
            return job.result
        if place is not None and self._pool is not None:
            # fsync and rename the file now, so that it overlaps the group being committed
            job.placed = self._pool.submit(_place_file, self._ops, *place, synced)
        self._queue.put(job)
        with trio.CancelScope(shield=True):
            await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    @trio.lowlevel.enable_ki_protection  # a Ctrl-C must not land between COMMIT and result
    def _run_inline(self, job: Job) -> bool:
        """Without durable writes, the commit of a new instance runs here on the loop when the
        thread is idle: no fsync can happen (`synchronous=OFF`, renames without directory
        fsyncs), only page-cache writes like the reception's own, and the receiving
        association waits for this commit anyway; the two thread hand-overs it saves were a
        tenth of a large image's turnaround. Everything else, and any commit while the thread
        is busy, the disk full or the store durable, goes through the queue. True if done.
        (A write lock held on the index by another process, which nothing of ours takes, would
        hold the loop up to SQLite's busy timeout here, as it holds the thread otherwise.)"""
        if (
            self._ops.durable
            or not job.admission
            or self.reserve_released
            or not self._queue.empty()
            or not self._running.acquire(blocking=False)
        ):
            return False
        try:
            self.stats.inline += 1
            self._execute([job])
        finally:
            self._running.release()
        return True

    def forget_trash(self, path: Path) -> None:
        """`path`, a spool file kept in place for reuse, is gone: its trash row can go (any
        thread; done in the next group)."""
        self._forgotten.append(relative_name(self._root, path))

    def start_sync(self, path: Path) -> concurrent.futures.Future[None] | None:
        """fsync `path` on the pool now (see `Store.start_sync`); None without durable writes."""
        if self._pool is None or self._closed:
            return None
        return self._pool.submit(self._ops.fsync_file, path)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await trio.to_thread.run_sync(self._thread.join)

    # -- thread side ---------------------------------------------------------------------------

    def _main(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            group = [first]
            while len(group) < MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            with self._running:
                self._execute(group)
            for job in group:
                self._wake(job)
        self._conn.close()
        if self._pool is not None:
            self._pool.shutdown()

    def _execute(self, group: list[Job]) -> None:
        """Run a group and tidy after it; every job ends with a result or an error (holding
        `_running`)."""
        try:
            ok = self._run_group(group)
        except BaseException as exc:  # never leave a caller waiting forever
            log.exception("store writer: unexpected failure of a group")
            if self._conn.in_transaction:  # or every later BEGIN would fail
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            for job in group:
                if job.placed is not None:  # let its rename finish before the caller cleans up
                    concurrent.futures.wait([job.placed])
                if job.error is None:
                    job.error = exc
        else:
            try:  # committed: what follows must not turn the jobs into failures
                self._unlink_after(ok)
            except Exception:
                log.exception("store writer: removing files after a commit failed")

    def _wake(self, job: Job) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the run ended under us
            self._token.run_sync_soon(job.done.set)

    def _refuse_admission(self, jobs: list[Job]) -> list[Job]:
        for job in jobs:
            if job.admission:
                job.error = StoreFull("disk full: the remaining space is kept for deliveries")
        return [j for j in jobs if not j.admission]

    def _restore_reserve(self) -> bool:
        """Re-create the reserve file if there is room for it twice over (thread side)."""
        if self._reserve_path is None:
            return True
        st = os.statvfs(self._root)
        if st.f_bavail * st.f_frsize < 2 * self._reserve_bytes:
            return False
        try:
            write_reserve(self._reserve_path, self._reserve_bytes, self._ops)
        except OSError:
            self._ops.unlink(self._reserve_path)
            return False
        self.reserve_released = False
        if self._spares is not None:
            self._spares.pause_reuse(False)
        return True

    def _attempt(self, live: list[Job]) -> list[Job] | None:
        """One group transaction; the jobs that succeeded, or None when the disk is full."""
        conn = self._conn
        self._choose_sync_mode(live)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            err = translate(exc)
            for job in live:
                job.error = err
            return None if isinstance(err, StoreFull) else []
        while self._forgotten:
            self._trash_done.append(self._forgotten.popleft())
        if self._trash_done:
            conn.executemany(
                "DELETE FROM trash WHERE rel_path = ?", [(p,) for p in self._trash_done]
            )
        ok: list[Job] = []
        for job in live:
            if self._run_job(job):
                ok.append(job)
            elif not conn.in_transaction:
                # SQLite rolled the whole transaction back itself (SQLITE_FULL inside a
                # statement, an I/O error): the group fails as one, like a failed COMMIT
                for other in live:
                    if other.error is None:
                        other.error = job.error
                    other.unlink_after.clear()
                return None if isinstance(job.error, StoreFull) else []
        return self._commit(ok)

    def _choose_sync_mode(self, live: list[Job]) -> None:
        if self._ops.durable:
            # WAL with synchronous=NORMAL commits without an fsync; the next FULL commit (or a
            # checkpoint) makes it durable too. Only groups of jobs that may be lost use it.
            mode = "FULL" if any(j.durable for j in live) else "NORMAL"
            if mode != self._sync_mode:
                self._conn.execute(f"PRAGMA synchronous = {mode}")
                self._sync_mode = mode

    def _run_job(self, job: Job) -> bool:
        """Run one job in its savepoint; False when it failed (its error set, its savepoint
        rolled back)."""
        conn = self._conn
        conn.execute("SAVEPOINT job")
        try:
            job.result = job.fn(conn) if job.place is None else job.fn(conn, job.placed_size)
        except Exception as exc:
            job.error = translate(exc)
            job.unlink_after.clear()
            try:
                conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
            except sqlite3.Error:
                pass
            return False
        conn.execute("RELEASE job")
        if isinstance(job.result, _Unlinking):
            job.unlink_after.extend(job.result.paths)
            job.retire = job.result.retire
            job.result = job.result.value
        return True

    def _commit(self, ok: list[Job]) -> list[Job] | None:
        """Commit the group (with synchronous=FULL this is the one WAL fsync of the group); the
        jobs that succeeded, or none (None when the disk is full) if the commit fails."""
        conn = self._conn
        try:
            self._ops.before_index_commit()
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            err = translate(exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for job in ok:
                job.error = err
                job.unlink_after.clear()
            return None if isinstance(err, StoreFull) else []
        return ok

    def _place_one(self, job: Job) -> None:
        assert job.place is not None
        try:
            if job.placed is not None:
                job.placed_size = job.placed.result()  # raises the pool's OSError
            else:
                job.placed_size = _place_file(self._ops, *job.place)
        except OSError as exc:
            job.error = translate(exc)

    def _place(self, group: list[Job]) -> list[Job]:
        """Wait for the group's new files to be fsync'd and renamed into the spool."""
        placing = [j for j in group if j.place is not None]
        for job in placing:  # started at submission, in parallel on the pool
            self._place_one(job)
        return [j for j in group if j.error is None]

    def _run_group(self, group: list[Job]) -> list[Job]:
        # 0. new files: fsync each (in parallel), rename it into its spool bucket
        group = self._place(group)
        # 1. make the renames of this group durable: one fsync per distinct spool directory
        dirs = sorted({d for job in group for d in job.dirs})
        failed_dirs: dict[Path, BaseException] = {}
        for d in dirs:
            try:
                self._ops.fsync_dir(d)
            except OSError as exc:
                failed_dirs[d] = translate(exc)
        live: list[Job] = []
        for job in group:
            bad = next((failed_dirs[d] for d in job.dirs if d in failed_dirs), None)
            if bad is not None:
                job.error = bad
            else:
                live.append(job)
        if not live:
            return []
        # a full disk: refuse new instances until the reserve is back, keep everything else going
        if self.reserve_released and any(j.admission for j in live):
            if self._restore_reserve():
                log.warning("store: free space is back; reserve restored, accepting instances")
            elif self.index_free_bytes < 2 * self._reserve_bytes:
                live = self._refuse_admission(live)
            # else: the index has room of its own (pages of deleted small instances)
        ok = self._attempt(live)
        if ok is None and self._reserve_path is not None and not self.reserve_released:
            # SQLITE_FULL: give the index the reserve so deliveries and deletes can free space
            log.error(
                "store: disk full; releasing the %d-byte reserve, refusing new instances",
                self._reserve_bytes,
            )
            self._ops.unlink(self._reserve_path)
            if self._spares is not None:  # and the files kept for reuse, until space is back
                self._spares.pause_reuse(True)
            self.reserve_released = True
            live = self._refuse_admission(live)
            for job in live:
                job.error, job.result = None, None
                job.unlink_after.clear()
            ok = self._attempt(live)
        if ok is None:
            return []
        try:  # after the COMMIT: a failure here must not fail the committed jobs
            self.index_free_bytes = (
                int(self._conn.execute("PRAGMA freelist_count").fetchone()[0]) * self._page_size
            )
        except sqlite3.Error:
            log.exception("store writer: cannot read the index's free pages")
        self._trash_done = []
        self.stats.groups += 1
        self.stats.jobs += len(live)
        return ok

    def _unlink_after(self, ok: list[Job]) -> None:
        """Files whose last item went away: unlink now (before the callers are woken), forget
        their trash rows in the next group."""
        for job in ok:
            if job.discard is not None:
                with contextlib.suppress(OSError):  # recovery removes what is left in incoming/
                    self._ops.unlink(job.discard)
            for path in job.unlink_after:
                try:
                    if job.retire:
                        if not self._retire(path):
                            continue  # still in the spool: its trash row stays
                    else:
                        self._ops.unlink(path)
                    self._trash_done.append(relative_name(self._root, path))
                except OSError:
                    log.warning("store: could not remove %s; recovery will retry", path)

    def _retire(self, path: Path) -> bool:
        """A delivered instance's file, after a durable commit (the index no longer names it
        in a power cut). With reuse in place it stays in the spool for the spares thread to keep
        for a reception, whose commit deletes its trash row (False). Otherwise it leaves the
        spool (True): renamed for the spares thread to empty or unlink (`spares.py`), else
        unlinked here."""
        spares = self._spares
        if spares is not None and spares.reuses_in_place:
            spares.retired_in_place(path)
            return False
        to = spares.retire_path() if spares is not None else None
        if to is not None:
            try:
                self._ops.rename(path, to)
            except OSError:
                pass  # unlink it then
            else:
                assert spares is not None
                spares.retired(to)
                return True
        self._ops.unlink(path)
        return True


def _place_file(
    ops: FileOps, src: Path, dst: Path, synced: concurrent.futures.Future[None] | None = None
) -> int:
    """fsync `src` (or wait for `synced`, its fsync started earlier on the same pool, so never
    queued behind this), then rename it to `dst` (the data is on disk before the name is); its
    size."""
    size = os.stat(src).st_size
    if synced is not None:
        synced.result()  # raises its OSError
    else:
        ops.fsync_file(src)
    if src != dst:  # (a spool file reused in place has its name already)
        ops.rename(src, dst)
    return size


@attrs.frozen
class _Unlinking:
    """A job result that also asks for files to be unlinked after the commit."""

    value: Any
    paths: tuple[Path, ...]
    retire: bool = False


def unlinking(value: Any, paths: Iterable[Path], *, delivered: bool = False) -> Any:
    """`value`, and `paths` to remove after the commit. Files of `delivered` instances are
    retired (`Writer._retire`: perhaps reused); others (an operator's delete) are unlinked at
    once, so that their bytes are gone when the caller hears back."""
    paths = tuple(paths)
    return _Unlinking(value, paths, delivered) if paths else value


def write_reserve(path: Path, size: int, ops: FileOps) -> None:
    """Allocate `size` bytes at `path` (really allocated blocks, not a sparse file)."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            chunk = b"\0" * 65536
            for offset in range(0, size, len(chunk)):
                os.pwrite(fd, chunk[: size - offset], offset)
    finally:
        os.close(fd)
    ops.fsync_file(path)
