"""Empty temporary files made ahead of need, so that receiving a large instance starts without
creating a file.

Creating a file is the costly step of starting a large instance on ext4: the inode allocator
walks its bitmap past recently deleted inodes, and a router deletes a file for every delivered
instance. Measured on the development VM, taking a ready file instead made the acceptor 9-48 %
faster for 0.5 MB images (docs/performance.md). A thread keeps a few empty files ready in
`incoming/` (names starting with SPARE_PREFIX); the acceptor writes into one as into any
temporary file, and the commit renames it into the spool as before. Ready files are removed when
the store closes, and by recovery after a crash, like every other file in `incoming/`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import uuid
from pathlib import Path

log = logging.getLogger("capacitor_trio.store")

SPARE_PREFIX = "spare-"
#: refill when fewer than this many are ready
SPARE_LOW = 8
#: how many a refill makes
SPARE_BATCH = 32


def is_unused_spare(path: Path) -> bool:
    """A ready file nobody has written to (what recovery and tests need not report)."""
    try:
        return path.name.startswith(SPARE_PREFIX) and path.stat().st_size == 0
    except OSError:
        return False


class SpareFiles:
    """Ready empty files in `directory`, made by a thread of their own once the first is taken."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._ready: collections.deque[Path] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        #: set after every refill (tests wait on it)
        self.refilled = threading.Event()

    def __len__(self) -> int:
        return len(self._ready)

    def take(self) -> Path | None:
        """A ready file (now the caller's), or None when none is ready yet."""
        try:
            path = self._ready.popleft()
        except IndexError:
            path = None
        if len(self._ready) < SPARE_LOW:
            with self._cond:
                if self._thread is None and not self._stop:
                    self._thread = threading.Thread(
                        target=self._fill, name="capacitor-store-spares", daemon=True
                    )
                    self._thread.start()
                self._cond.notify()
        return path

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._stop and len(self._ready) >= SPARE_LOW:
                    self._cond.wait()
                if self._stop:
                    return
            for _ in range(SPARE_BATCH):
                path = self._dir / f"{SPARE_PREFIX}{uuid.uuid4().hex}.part"
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
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
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        while True:
            try:
                path = self._ready.popleft()
            except IndexError:  # empty (a late take() may have had the last one)
                break
            with contextlib.suppress(OSError):
                os.unlink(path)
