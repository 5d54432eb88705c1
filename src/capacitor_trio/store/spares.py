"""Empty temporary files made ahead of need, so that receiving a large instance starts without
creating a file.

Creating a file is the costly step of starting a large instance on ext4: the inode allocator
walks its bitmap past recently deleted inodes, and a router deletes a file for every delivered
instance (docs/performance.md has the figures for taking a ready file instead). A thread keeps a few empty files ready in
`incoming/` (names starting with SPARE_PREFIX); the acceptor writes into one as into any
temporary file, and the commit renames it into the spool as before. Ready files are removed when
the store closes, and by recovery after a crash, like every other file in `incoming/`.

A spool file whose last item was delivered is *retired* (one an operator deleted is unlinked
at once instead), once the commit that removed its rows is durable; its trash row stays.

- With durable writes, the writer hands it to this thread where it is (`retired_in_place`), and
  the thread keeps up to RECYCLE_MAX of them for the next receptions to write over, newest
  first. Overwriting blocks a file already owns costs neither block allocation nor freeing, its
  fsync has almost nothing to commit to the journal, and its name is durable already: the commit
  needs no rename and no directory fsync, and deletes the file's trash row in the transaction
  that inserts the rows naming it. After a crash, a kept file (or one a reception was writing
  into) is still in the trash, and recovery removes it. Whoever writes into a file from `take()`
  must truncate it to what it wrote (the acceptor does). A file is kept only if nothing else has
  it open (a write lease is granted only then): a reader would otherwise see the next patient's
  bytes.
- Otherwise the writer renames it into `incoming/` (names starting with RETIRED_PREFIX; a rename
  is cheap, an unlink of a 0.5 MB file took 0.3 ms of the writer's time, during which no commit
  can run). A kept file this thread gives up is moved there too, and `gone` told, so that its
  trash row goes. Without durable writes no bytes are reused: bytes never flushed could, after a
  power cut, leave one patient's header over another patient's pixel data. A retired file in
  `incoming/` is emptied (`_emptied`) and handed out like a made-ahead file, up to READY_MAX of
  them, so that the file system frees and allocates no inode per instance; the rest are
  unlinked. (One that reuse has room for when it arrives here is kept with its bytes, once an
  fsync of `incoming/` has made its new name durable, so that a power cut cannot bring its old
  spool name back with new bytes in it.)
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import signal
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from .fsops import open_private

log = logging.getLogger("capacitor_trio.store")

SPARE_PREFIX = "spare-"
RETIRED_PREFIX = "retired-"
#: with durable writes, at most this many retired files wait for a reception (the rest are
#: unlinked), holding at most RECYCLE_BYTES together; none larger than RECYCLE_FILE_BYTES
RECYCLE_MAX = 64
RECYCLE_BYTES = 64 << 20
RECYCLE_FILE_BYTES = 8 << 20
#: refill when fewer than this many are ready
SPARE_LOW = 8
#: retired files not kept for reuse are emptied (truncated to nothing) and made ready files
#: while fewer than this many are ready; the rest are unlinked
READY_MAX = 64
#: how many a refill makes
SPARE_BATCH = 32


def is_unused_spare(path: Path) -> bool:
    """A ready file nobody has written to (what recovery and tests need not report): an empty
    made-ahead file, or a retired one not written since its rename (a rename changes only the
    ctime, a write the mtime too)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if path.name.startswith(RETIRED_PREFIX):
        return st.st_mtime_ns < st.st_ctime_ns or st.st_size == 0
    return path.name.startswith(SPARE_PREFIX) and st.st_size == 0


#: the signal a lease break sends to its holder: by default SIGIO, whose default action ends the
#: process (another process opening the file in the instant of the check would kill the router);
#: SIGURG's default action is to ignore it
_LEASE_SIGNAL = signal.SIGURG
_F_SETSIG = getattr(fcntl, "F_SETSIG", 10)


def _take_lease(fd: int) -> None:
    """A write lease on `fd`, its break signalled with _LEASE_SIGNAL; OSError when refused."""
    fcntl.fcntl(fd, _F_SETSIG, _LEASE_SIGNAL)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)


def _unused_elsewhere(fd: int) -> bool:
    """True when no other open file description (any process) refers to the file: a write
    lease is granted only then. A reader still streaming a retired file (the sender process,
    the API showing an item) must not see the next patient's bytes in it. False when leases are
    not available (file system, settings): such a file is not reused."""
    try:
        _take_lease(fd)
    except OSError:
        return False
    with contextlib.suppress(OSError):  # closing the descriptor releases it anyway
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def _reusable(path: Path) -> int | None:
    """The size of a retired file if it may be reused: small enough, and open nowhere else."""
    try:
        fd = open_private(path, os.O_RDONLY)  # a symbolic link put in its place is not reused
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > RECYCLE_FILE_BYTES or not _unused_elsewhere(fd):
            return None
        return size
    finally:
        os.close(fd)


def _emptied(path: Path) -> bool:
    """Truncate a retired file to nothing, if it is open nowhere else: it is then as good as a
    new empty file (its blocks are freed; what is written next goes to newly allocated blocks,
    so even an unflushed write cannot show the old bytes under a new name), and it spares the
    file system an inode freed and another allocated (ext4 walks past every inode freed in the
    last minutes to find one: 9 % of the router's CPU time receiving 0.5 MB images without
    durable writes). False: unlink it."""
    try:
        fd = open_private(path, os.O_WRONLY)  # never truncate the target of a symbolic link
    except OSError:
        return False
    try:
        if not _unused_elsewhere(fd):
            return False
        os.ftruncate(fd, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class SpareFiles:
    """Ready empty files in `directory`, made by a thread of their own once the first is taken;
    the same thread keeps retired spool files for reuse (`fsync_dir` given), empties them, or
    unlinks them."""

    def __init__(
        self,
        directory: Path,
        fsync_dir: Callable[[Path], None] | None = None,
        gone: Callable[[Path], None] | None = None,
    ) -> None:
        self._dir = directory
        #: told (from the thread) that a spool file kept in place left the spool: its trash row
        #: can go
        self._gone = gone
        #: spool files retired in place (`retired_in_place`) the thread has not dealt with yet
        self._in_place: list[Path] = []
        self._ready: collections.deque[Path] = collections.deque()
        #: retired files ready to take again, with their sizes (the newest first: its pages are
        #: likeliest cached)
        self._recycled: list[tuple[Path, int]] = []
        #: bytes they hold: free space for admission (a reception reuses them)
        self.recycled_bytes = 0
        #: retired files the thread has not dealt with yet
        self._retired: list[Path] = []
        #: makes a retired file's new name durable; None: no reuse, retired files are unlinked
        self._fsync_dir = fsync_dir
        #: the thread is dealing with a batch of retired files
        self._dealing = False
        #: no reuse for now (the disk is full: every byte goes back to the file system)
        self._reuse_paused = False
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        #: set after every refill and every batch of retired files dealt with (tests wait on it)
        self.refilled = threading.Event()

    def __len__(self) -> int:
        return len(self._ready)

    @property
    def recycled(self) -> int:
        """Retired files ready to be taken again."""
        return len(self._recycled)

    def take(self) -> Path | None:
        """A ready file (now the caller's; it may hold old bytes past what the caller writes), or
        None when none is ready yet."""
        if self._recycled:
            with self._cond:
                if self._recycled:
                    reused, size = self._recycled.pop()
                    self.recycled_bytes -= size
                    return reused
        try:
            path: Path | None = self._ready.popleft()
        except IndexError:
            path = None
        if len(self._ready) < SPARE_LOW:
            with self._cond:
                self._start()
                self._cond.notify_all()
        return path

    @property
    def reuses_in_place(self) -> bool:
        """Whether a delivered instance's spool file may be handed to `retired_in_place`."""
        return self._fsync_dir is not None and not self._reuse_paused and not self._stop

    def retired_in_place(self, path: Path) -> None:
        """`path`, a spool file whose last item was delivered (the commit that removed it is
        durable; its trash row stays), may be written over where it is: the thread keeps it, or
        moves it out of the spool and tells `gone` (thread side)."""
        self._hand_over(self._in_place, path)

    def retire_path(self) -> Path | None:
        """Where to rename a file to be removed (then call `retired`), or None once closed:
        unlink it yourself."""
        if self._stop:
            return None
        return self._retired_name()

    def _retired_name(self) -> Path:
        return self._dir / f"{RETIRED_PREFIX}{uuid.uuid4().hex}.part"

    def retired(self, path: Path) -> None:
        """`path` (from `retire_path`) holds a file to reuse, empty or unlink (thread side)."""
        self._hand_over(self._retired, path)

    def _hand_over(self, pending: list[Path], path: Path) -> None:
        with self._cond:
            if self._stop:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                return
            pending.append(path)
            self._start()
            self._cond.notify_all()

    def _start(self) -> None:
        if self._thread is None and not self._stop:
            self._thread = threading.Thread(
                target=self._fill, name="capacitor-store-spares", daemon=True
            )
            self._thread.start()

    def _deal_with_retired(self) -> None:
        """Keep what reuse has room for (files retired in place as they are; renamed ones once
        one directory fsync has made their names durable); move the other in-place ones out of
        the spool; empty the rest for receptions, or unlink them."""
        with self._cond:
            retired, self._retired = self._retired, []
            in_place, self._in_place = self._in_place, []
            self._dealing = True
        keep: list[tuple[Path, int]] = []
        keep_in_place: list[tuple[Path, int]] = []
        drop: list[Path] = []
        count, held = len(self._recycled), self.recycled_bytes
        reuse = self._fsync_dir is not None and not self._reuse_paused

        def room_for(path: Path) -> int | None:
            """Its size if reuse keeps it (counted), else None."""
            nonlocal count, held
            size = _reusable(path) if reuse else None
            if size is None or count >= RECYCLE_MAX or held + size > RECYCLE_BYTES:
                return None
            count, held = count + 1, held + size
            return size

        left: list[Path] = []  # moved out of the spool
        for path in in_place:  # no fsync needed: their names are durable already
            if (size := room_for(path)) is not None:
                keep_in_place.append((path, size))
            else:
                left.append(path)
                if (out := self._out_of_spool(path)) is not None:
                    drop.append(out)
        self._forget(left)
        for path in retired:
            if (size := room_for(path)) is not None:
                keep.append((path, size))
            else:
                drop.append(path)
        keep = self._make_durable(keep, drop)
        self._empty_or_unlink(drop)
        self._recycle(keep, keep_in_place)

    def _make_durable(self, keep: list[tuple[Path, int]], drop: list[Path]) -> list[tuple[Path, int]]:
        """One directory fsync makes the renamed files' names durable; what may be kept then
        (none, all moved to `drop`, when the fsync fails)."""
        if keep:
            try:
                assert self._fsync_dir is not None
                self._fsync_dir(self._dir)
            except Exception as exc:
                log.warning("store: cannot fsync %s, retired files not reused: %s", self._dir, exc)
                drop += [p for p, _ in keep]
                return []
        return keep

    def _empty_or_unlink(self, drop: list[Path]) -> None:
        """Empty files for receptions while they are wanted, unlink the rest."""
        for path in drop:
            if len(self._ready) < READY_MAX and not self._stop and _emptied(path):
                self._ready.append(path)
                continue
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _recycle(self, keep: list[tuple[Path, int]], keep_in_place: list[tuple[Path, int]]) -> None:
        """The kept files join the recycled ones (unless stopped or paused meanwhile); the round
        is over."""
        with self._cond:
            if self._stop:
                self._retired.extend(p for p, _ in keep + keep_in_place)  # close() removes them
            elif self._reuse_paused:  # paused meanwhile: the next round empties or unlinks them
                self._retired.extend(p for p, _ in keep)
                self._in_place.extend(p for p, _ in keep_in_place)
            else:
                keep += keep_in_place
                self._recycled.extend(keep)
                self.recycled_bytes += sum(size for _, size in keep)
            self._dealing = False
            self._cond.notify_all()

    def _out_of_spool(self, path: Path) -> Path | None:
        """Move a spool file kept in place out of the spool (to empty or unlink like any
        retired file: its new path), or unlink it (None). `_forget` it afterwards."""
        to = self._retired_name()
        try:
            os.rename(path, to)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        return to

    def _forget(self, paths: list[Path]) -> None:
        """`paths` left the spool: once that is durable (an fsync of each directory they left),
        `gone` may forget their trash rows. Without it a power cut could bring a name back
        without its row, the file then holding a new reception's bytes (on a file system that
        does not journal a rename or unlink before a later fsync of another file); if the fsync
        fails, the rows stay, and recovery removes whatever comes back."""
        if not paths or self._gone is None:
            return
        try:
            for directory in sorted({p.parent for p in paths}):
                if self._fsync_dir is not None:
                    self._fsync_dir(directory)
        except Exception as exc:
            log.warning("store: cannot fsync the spool, trash rows kept until restart: %s", exc)
            return
        for path in paths:
            self._gone(path)

    def pause_reuse(self, paused: bool) -> None:
        """While the disk is full nothing is kept for reuse (the files kept are unlinked now),
        so that every delivered file gives its space back."""
        with self._cond:
            self._reuse_paused = paused
            if self._retired or self._in_place:
                self._cond.notify_all()
        if paused:
            self.drop_recycled()

    def drop_recycled(self) -> None:
        """Unlink the files kept for reuse (the disk is full: their space goes back)."""
        with self._cond:
            dropped, self._recycled, self.recycled_bytes = self._recycled, [], 0
        for path, _ in dropped:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._forget([path for path, _ in dropped if path.parent != self._dir])  # in the spool

    def wait_settled(self, timeout: float) -> bool:
        """Wait until every retired file has been kept, emptied or unlinked (tests)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._retired and not self._in_place and not self._dealing, timeout
            )

    def _fill(self) -> None:
        while True:
            with self._cond:
                while (
                    not self._stop
                    and len(self._ready) >= SPARE_LOW
                    and not self._retired
                    and not self._in_place
                ):
                    self._cond.wait()
                if self._stop:
                    return
            if self._retired or self._in_place:
                self._deal_with_retired()
                self.refilled.set()
            if len(self._ready) >= SPARE_LOW:
                continue
            for _ in range(SPARE_BATCH):
                path = self._dir / f"{SPARE_PREFIX}{uuid.uuid4().hex}.part"
                try:
                    os.close(
                        open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                    )
                except OSError as exc:  # no inodes, no directory: callers make their own
                    log.debug("store: cannot make a spare file: %s", exc)
                    with self._cond:  # try again at the next take, not in a loop
                        if not self._stop:
                            self._cond.wait()
                    break
                self._ready.append(path)
            self.refilled.set()

    def close(self) -> None:
        """Stop the thread and remove the files nobody took (thread side: it joins)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        _unlink_all(self._ready.popleft)  # (a late take() may have had the last one)
        self.drop_recycled()
        _unlink_all(self._retired.pop)
        _unlink_all(self._in_place.pop)


def _unlink_all(pop: Callable[[], Path]) -> None:
    """Unlink the paths `pop` gives until it raises IndexError (empty)."""
    while True:
        try:
            path = pop()
        except IndexError:
            return
        with contextlib.suppress(OSError):
            os.unlink(path)
