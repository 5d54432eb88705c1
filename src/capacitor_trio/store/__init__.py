"""The durable store: spool files under `cachePath` and the SQLite queue index.

Theory of operation
===================

Layout::

    cache/index.db (+ -wal, -shm)   queue index, SQLite in WAL mode
    cache/incoming/<uuid>.part      temporary files being received (owned by the acceptor)
    cache/spool/<bucket>/<uuid>.dcm one file per received instance, shared by all its items
    cache/orphans/                  spool files recovery found without any item

Who owns what
-------------
* The **writer thread** (`writer.py`) is the only user of the write connection. Every change —
  commit, checkout, delivered, fail, operator move — is a job it runs inside one SAVEPOINT of a
  *group transaction*: while one COMMIT (one WAL fsync with ``synchronous=FULL``) is in progress,
  new jobs queue up and the next COMMIT serves them all. A job that raises is rolled back alone.
* **Readers** (listing, counts, search) use a small pool of read-only connections in Trio worker
  threads; WAL lets them read a consistent snapshot while the writer writes.
* The **Trio loop** never does blocking I/O: a new file's fsync and rename run in the writer's
  group (several files of one group are fsync'd in parallel by a small pool), other file work
  in `trio.to_thread` workers, and callers wait for their job on a `trio.Event` set from the
  writer thread.
* The **acceptor** owns a temporary file from `new_incoming_path()` until it calls
  `commit_instance` (or `discard_incoming`); from then on the store owns it.
* **Node actors** own their items' states (design.md): the store only enforces that operator
  transitions never touch a checked-out item (`ItemCheckedOut`).

Acknowledged means durable
--------------------------
`commit_instance` does, in order: admission check (statvfs) -> [writer, for every commit of the
group, in parallel] fsync the temporary file and rename it into the current spool bucket ->
[writer] fsync the bucket directory once for the whole group -> insert the instance and one item
per destination -> COMMIT. It returns only after the COMMIT. (One thread hop per commit: the
caller hands the job to the writer and waits for it.) Buckets hold up to 4096 files and are shared by concurrent commits, so a group
usually costs one directory fsync and one WAL fsync however many instances it holds. With
``durable=False`` the same steps run without fsyncs (``synchronous=OFF``): the data is in the OS
page cache, which survives a killed process but not a power cut.

Removing a file: the transaction that deletes an instance's last item also records the file in
the ``trash`` table; the file is unlinked after the COMMIT, and recovery unlinks whatever trash
is left. So a crash never turns a delivered file into an "orphan".

Crash
-----
Every step above is either atomic (rename, COMMIT) or repaired on the next open (`recovery.py`):
checked-out items are released (delivery is at-least-once), temporary files in ``incoming`` are
removed, trash is emptied, a spool file without an instance row (renamed, never committed: its
sender got no success) moves to ``orphans/`` with a warning, and an instance whose file is missing
marks its items failed with a clear ``last_error``. Recovery is idempotent.

Cancel
------
A store call that has started completes: the wait for the writer is shielded and worker threads
are not abandoned, because a half-known outcome (a checkout nobody holds, a commit whose file was
removed) is worse than a few milliseconds' delay. The Cancelled arrives at the caller's next
checkpoint. If `commit_instance` is cancelled before its job was submitted, or fails, the
temporary (and any renamed) file is removed, so nothing half-written remains.

Full disk
---------
`check_admission` (and `commit_instance`) raise `StoreFull` when free space is below
``min_free_space_percent``; ENOSPC/EIO from a file operation or SQLITE_FULL/IOERR from the index
also become `StoreFull`, after the refused instance's files were removed. Deliveries and deletes
keep working (they free space), and commits succeed again once space returns.

Time
----
The store never reads the clock except through the injected ``clock`` (createdAt, updatedAt of
operator changes); the delivery path takes ``now`` explicitly.
"""

from __future__ import annotations

from .errors import ItemCheckedOut, ItemNotFound, StoreError, StoreFull, TransitionError
from .fsops import FileOps
from .model import QUEUED_STATES, STATES, Counts, Item, ItemFilter, RecoveryReport
from .schema import SCHEMA_VERSION
from .store import Store, open_store

__all__ = [
    "QUEUED_STATES",
    "SCHEMA_VERSION",
    "STATES",
    "Counts",
    "FileOps",
    "Item",
    "ItemCheckedOut",
    "ItemFilter",
    "ItemNotFound",
    "RecoveryReport",
    "Store",
    "StoreError",
    "StoreFull",
    "TransitionError",
    "open_store",
]
