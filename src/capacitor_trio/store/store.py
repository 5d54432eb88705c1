"""The Store: spool files plus the SQLite queue index (see the package docstring).

`Store` is one class made of parts, each changing for its own reason:

* `connection.StoreCore` — its state, locking the cache directory, opening (migrate, recover,
  reserve, readers) and closing, and the two ways into the index (`_write`, `_read`);
* `ingest.Ingest` — admission, spool buckets and `commit_instance`;
* `queue.Queue` — each destination's queue: ripening, checkout (SOP-class priority, the
  ProcessDelay), outcomes, releases, when to look next;
* `operator.Operator` — the operator's transitions (move, retry, delete, bulk, expiry);
* `queries.Queries` — read-only listings and counts;
* `flags.Flags` — pause flags;
* `preparation.Preparing` — the per-item prepare stage: ripe items, prepared copies, drops,
  added destinations, retries.

Rows are mapped into `Item` by column name in `rows.py`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .connection import BUCKET_SIZE, INLINE_MAX_BYTES, LOCK_NAME
from .flags import Flags
from .fsops import FileOps
from .ingest import Ingest
from .operator import Operator
from .preparation import Preparing
from .queries import Queries
from .queue import CHECKOUT_INLINE_BYTES, Queue

__all__ = [
    "BUCKET_SIZE",
    "CHECKOUT_INLINE_BYTES",
    "INLINE_MAX_BYTES",
    "LOCK_NAME",
    "Store",
    "open_store",
]


class Store(Ingest, Queue, Operator, Queries, Flags, Preparing):
    """Handle on an open store; make one with `open_store`."""


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
