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
from .schema import INLINE_PREFIX
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
    incoming, spool, orphans_dir = root / "incoming", root / "spool", root / "orphans"
    conn.execute("BEGIN IMMEDIATE")
    try:
        # 1. items left checked out by a dead process go back to their queue
        released = conn.execute("UPDATE items SET checked_out = 0 WHERE checked_out = 1").rowcount

        # 2. files whose last item went away in a committed transaction
        trash = [r[0] for r in conn.execute("SELECT rel_path FROM trash")]
        for rel in trash:
            ops.unlink(root / rel)
        conn.execute("DELETE FROM trash")

        # 3. temporary files of receptions that never committed
        incoming_removed = 0
        for entry in os.scandir(incoming):
            if entry.is_file() or entry.is_symlink():
                path = Path(entry.path)
                unused = is_unused_spare(path)  # made ahead, never written: nothing to report
                ops.unlink(path)
                incoming_removed += not unused

        # 4. spool against index
        on_disk: set[str] = set()
        for bucket in os.scandir(spool):
            if bucket.is_dir():
                for entry in os.scandir(bucket.path):
                    on_disk.add(f"spool/{bucket.name}/{entry.name}")
            else:
                on_disk.add(f"spool/{bucket.name}")
        known = {
            r[0]: r[1]
            for r in conn.execute(
                "SELECT rel_path, id FROM instances WHERE rel_path NOT LIKE ?",
                (f"{INLINE_PREFIX}%",),
            )
        }

        orphans = sorted(on_disk - set(known))
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

        missing = sorted(set(known) - on_disk)
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

        # 5. operator option: rejected items get another chance
        rejected_cycled = 0
        if cycle_rejected:
            rejected_cycled = conn.execute(
                f"UPDATE items SET state = '{NEW}', next_attempt_at = NULL, updated_at = ? "
                f"WHERE state = '{REJECTED}'",
                (now,),
            ).rowcount

        # 6. tidy: empty bucket directories
        for bucket in os.scandir(spool):
            if bucket.is_dir():
                with contextlib.suppress(OSError):  # not empty
                    os.rmdir(bucket.path)
        if orphans:
            ops.fsync_dir(orphans_dir)
        if orphans or trash:
            ops.fsync_dir(spool)
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
