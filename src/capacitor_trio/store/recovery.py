"""Restart recovery: bring the spool and the index back into agreement before anything runs.

Runs in a worker thread on the write connection, before the writer thread starts, in one
transaction. Every step is idempotent, so a crash during recovery is recovered by the next open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from pathlib import Path

from ..domain.states import FAILED, NEW, REJECTED
from .fsops import FileOps
from .model import RecoveryReport
from .schema import INLINE_PREFIX, PREPARED_SUFFIX
from .spares import is_unused_spare

log = logging.getLogger("capacitor_trio.store")


def spool_buckets(spool: Path) -> list[int]:
    out = []
    for entry in os.scandir(spool):
        if entry.is_dir() and entry.name.isdigit():
            out.append(int(entry.name))
    return out


def recover(
    conn: sqlite3.Connection,
    root: Path,
    ops: FileOps,
    *,
    now: float,
    cycle_rejected: bool,
) -> RecoveryReport:
    spool, orphans_dir = root / "spool", root / "orphans"
    conn.execute("BEGIN IMMEDIATE")
    try:
        # 1. items left checked out by a dead process go back to their queue
        released = conn.execute("UPDATE items SET checked_out = 0 WHERE checked_out = 1").rowcount
        # 2. files whose last item went away in a committed transaction
        trash = _empty_trash(conn, root, ops)
        # 3. temporary files of receptions that never committed
        incoming_removed = _remove_incoming(root / "incoming", ops)
        # 4. spool against index
        on_disk = _spool_on_disk(spool)
        known = {
            r[0]: r[1]
            for r in conn.execute(
                "SELECT rel_path, id FROM instances WHERE rel_path NOT LIKE ?",
                (f"{INLINE_PREFIX}%",),
            )
        }
        unknown = sorted(on_disk - set(known))
        _remove_unrecorded_copies(root, [r for r in unknown if r.endswith(PREPARED_SUFFIX)], ops)
        orphans = [r for r in unknown if not r.endswith(PREPARED_SUFFIX)]
        _move_orphans(root, orphans_dir, orphans, ops)
        missing = _mark_missing(conn, known, sorted(set(known) - on_disk), now)
        # 5. operator option: rejected items get another chance
        rejected_cycled = 0
        if cycle_rejected:
            rejected_cycled = conn.execute(
                f"UPDATE items SET state = '{NEW}', next_attempt_at = NULL, updated_at = ? "
                f"WHERE state = '{REJECTED}'",
                (now,),
            ).rowcount
        # 6. tidy: empty bucket directories
        _tidy(spool, orphans_dir if orphans else None, synced_spool=bool(unknown or trash), ops=ops)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    report = RecoveryReport(
        released=released,
        incoming_removed=incoming_removed,
        trash_removed=len(trash),
        orphans=tuple(orphans),
        missing=tuple(missing),
        rejected_cycled=rejected_cycled,
    )
    if released or incoming_removed or orphans or missing or rejected_cycled:
        log.info("store recovery: %s", report)
    return report


def _empty_trash(conn: sqlite3.Connection, root: Path, ops: FileOps) -> list[str]:
    """Unlink the files the trash table names and empty it; returns their paths."""
    trash = [r[0] for r in conn.execute("SELECT rel_path FROM trash")]
    for rel in trash:
        ops.unlink(root / rel)
    conn.execute("DELETE FROM trash")
    return trash


def _remove_incoming(incoming: Path, ops: FileOps) -> int:
    """Remove every temporary file; returns how many had been written to."""
    removed = 0
    for entry in os.scandir(incoming):
        if entry.is_file() or entry.is_symlink():
            path = Path(entry.path)
            unused = is_unused_spare(path)  # made ahead, never written: nothing to report
            ops.unlink(path)
            removed += not unused
    return removed


def _spool_on_disk(spool: Path) -> set[str]:
    """The spool's files, as paths relative to the cache directory."""
    on_disk: set[str] = set()
    for bucket in os.scandir(spool):
        if bucket.is_dir():
            for entry in os.scandir(bucket.path):
                on_disk.add(f"spool/{bucket.name}/{entry.name}")
        else:
            on_disk.add(f"spool/{bucket.name}")
    return on_disk


def _remove_unrecorded_copies(root: Path, copies: list[str], ops: FileOps) -> None:
    """Prepared copies written but never recorded (the process died before the transaction
    that names them): their items are still `new` and are prepared again, so they go."""
    for rel in copies:
        log.info("store recovery: prepared copy %s was never recorded; removed", rel)
        ops.unlink(root / rel)


def _move_orphans(root: Path, orphans_dir: Path, orphans: list[str], ops: FileOps) -> None:
    """Move spool files without an instance row aside, under a free name in `orphans_dir`."""
    if orphans:
        ops.mkdir(orphans_dir)
    for rel in orphans:
        src = root / rel
        dst = orphans_dir / src.name
        n = 1
        while dst.exists():
            dst = orphans_dir / f"{src.stem}.{n}{src.suffix}"
            n += 1
        log.warning("store recovery: spool file %s has no queue item; moved to %s", rel, dst)
        ops.rename(src, dst)


def _mark_missing(
    conn: sqlite3.Connection, known: dict[str, int], missing: list[str], now: float
) -> list[str]:
    """Mark the items of instances whose spool file (`missing`) or stored bytes are gone
    failed; returns every missing instance's path."""
    # small instances kept in the index whose bytes are not there (never expected: they
    # commit in one transaction; a damaged or hand-edited index)
    lost = conn.execute(
        "SELECT n.rel_path, n.id FROM instances n LEFT JOIN blobs b ON b.instance_id = n.id "
        "WHERE n.rel_path LIKE ? AND b.instance_id IS NULL",
        (f"{INLINE_PREFIX}%",),
    ).fetchall()
    known.update(lost)
    missing += sorted(rel for rel, _ in lost)
    for rel in missing:
        what = "stored bytes" if rel.startswith(INLINE_PREFIX) else "spool file"
        n = conn.execute(
            f"UPDATE items SET state = '{FAILED}', next_attempt_at = NULL, updated_at = ?, "
            "last_error = ? WHERE instance_id = ?",
            (now, f"{what} missing at startup: {rel}", known[rel]),
        ).rowcount
        log.error("store recovery: %s %s missing; %d item(s) marked failed", what, rel, n)
    return missing


def _tidy(spool: Path, orphans_dir: Path | None, *, synced_spool: bool, ops: FileOps) -> None:
    """Remove empty bucket directories; make the moves and unlinks above durable."""
    for bucket in os.scandir(spool):
        if bucket.is_dir():
            with contextlib.suppress(OSError):  # not empty
                os.rmdir(bucket.path)
    if orphans_dir is not None:
        ops.fsync_dir(orphans_dir)
    if synced_spool:
        ops.fsync_dir(spool)
