"""The durable store: the SQLite queue index under `cachePath`, with small instances inside it
and larger ones in spool files.

Theory of operation
===================

Layout::

    cache/index.db (+ -wal, -shm)   queue index, SQLite in WAL mode; the bytes of instances of
                                    at most INLINE_MAX_BYTES (32 KiB) in its `blobs` table
    cache/incoming/<uuid>.part      temporary files being received (owned by the acceptor)
    cache/incoming/spare-<uuid>.part  empty files made ahead for them (`spares.py`)
    cache/spool/<bucket>/<uuid>.dcm one file per larger instance, shared by all its items
    cache/spool/<bucket>/<uuid>.prep.dcm  a larger prepared copy (a filter or transcoding
                                    changed it for one item; `preparation.py`)
    cache/orphans/                  spool files recovery found without any item

Who owns what
-------------
* The **writer thread** (`writer.py`) is the only user of the write connection. Every change —
  commit, checkout, delivered, fail, operator move — is a job it runs inside one SAVEPOINT of a
  *group transaction*: while one COMMIT (one WAL fsync with ``synchronous=FULL``) is in progress,
  new jobs queue up and the next COMMIT serves them all. A job that raises is rolled back alone.
  The one exception: with ``durable=False`` (nothing ever flushes) the commit of a new instance
  runs on the loop, as a group of its own, while the thread is idle (`Writer._run_inline`); a
  lock keeps the two from ever using the connection at once.
* **Readers** (listing, counts, search) use a small pool of read-only connections in Trio worker
  threads; WAL lets them read a consistent snapshot while the writer writes.
* The **Trio loop** never does blocking I/O beyond a stat of the file just received (and, with
  ``durable=False``, that inline commit's page-cache writes and rename): a new
  file's fsync and rename run on the writer's small pool (in parallel with the other commits),
  a small instance's bytes are read by the writer thread, other file work runs in
  `trio.to_thread` workers, and callers wait for their job on a `trio.Event` set from the
  writer thread.
* The **acceptor** owns a temporary file from `new_incoming_path()` until it calls
  `commit_instance` (or `discard_incoming`); from then on the store owns it.
* **Node actors** own their items' states (design.md): the store only enforces that operator
  transitions never touch a checked-out item (`ItemCheckedOut`).

Acknowledged means durable
--------------------------
A **small instance** (at most `INLINE_MAX_BYTES`, 32 KiB: most SR, KO, PR and small images)
costs one flush: `commit_instance` checks admission (statvfs), then the writer inserts its
bytes (received in memory by the acceptor, or read from a temporary file), the instance and one
item per destination in the group transaction, and COMMITs (the WAL fsync covers the bytes and
the items together); a temporary file is unlinked after the COMMIT (if the process dies first,
recovery removes it: the bytes are in the index). A **larger instance**: admission check -> [pool, started at submission, in
parallel with the other commits] fsync the temporary file, then rename it into the current
spool bucket -> [writer] fsync the bucket directory once for the whole group -> insert the
instance and its items -> COMMIT. Either way `commit_instance` returns only after the COMMIT.
Buckets hold up to 4096 files and are shared by concurrent commits, so a group usually costs
one directory fsync and one WAL fsync however many instances it holds. With ``durable=False``
the same steps run without fsyncs (``synchronous=OFF``): the data is in the OS page cache,
which survives a killed process but not a power cut.

A checkout hands the bytes of small instances to the node with the items (at most
`CHECKOUT_INLINE_BYTES`, 16 MiB, per checkout; the rest waits for the next one); the node and
the requestor let them go once sent. Deleting a small instance frees pages inside the index
file, which SQLite reuses before the file grows; admission counts them as free space.

Removing a file: the transaction that deletes an instance's last item also deletes a small
instance's bytes, or records a larger one's file in
the ``trash`` table; the file is unlinked after the COMMIT, and recovery unlinks whatever trash
is left. So a crash never turns a delivered file into an "orphan".

Crash
-----
Every step above is either atomic (rename, COMMIT) or repaired on the next open (`recovery.py`):
checked-out items are released (delivery is at-least-once), temporary files in ``incoming`` are
removed, trash is emptied, a spool file without an instance row (renamed, never committed: its
sender got no success) moves to ``orphans/`` with a warning (a prepared copy's file,
``*.prep.dcm``, is removed instead: its item is still `new` and is prepared again), and an instance whose file is missing
marks its items failed with a clear ``last_error`` (so does a small instance whose bytes are
not in the index, which only a damaged index can show). Recovery is idempotent.

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

from .errors import ItemCheckedOut, ItemNotFound, StoreError, StoreFull, StoreInUse, TransitionError
from .fsops import FileOps
from .model import QUEUED_STATES, STATES, Counts, Item, ItemFilter, RecoveryReport
from .port import QueuePort, StorePort
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
    "QueuePort",
    "RecoveryReport",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreInUse",
    "StorePort",
    "TransitionError",
    "open_store",
]
