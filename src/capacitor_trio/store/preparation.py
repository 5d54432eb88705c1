"""The per-item prepare stage's side of the store: a node's ripe `new` items with what is needed
to read their bytes, when the next one ripens, and the application of a batch of preparations
(`Preparation`) in one transaction.

A prepared copy (a filter changed the data set, or transcoding) is written durably before the
transaction that records it: a small one (at most `inline_max_bytes`) goes into the index with
it, like a small reception; a larger one is written to a temporary file, fsync'd, renamed into a
spool bucket as ``<uuid>.prep.dcm`` (PREPARED_SUFFIX) and the bucket fsync'd by the writer's
group before its COMMIT. The item is then repointed to a new instance row; the received instance
stays for the other destinations' items and goes (trash) only when no item refers to it. A crash
before the COMMIT leaves the item `new` (it is prepared again from the received bytes) and the
copy's file without a row, which recovery removes (`recovery.py`); so a half-written or
unrecorded copy is never delivered, and nothing acknowledged is lost.

A copy handed over as a finished file (`PreparedCopy.file`: a converted large instance, never in
memory) goes the same way without its bytes passing through the router: the file is fsync'd
and renamed into the bucket as ``<uuid>.prep.dcm`` (copied there first when it lies on another
file system), or, when small enough for the index, read into it and removed. The store owns a
handed-over file from the call on: whatever happens (an item skipped, an error, a cancel), a
file that was not recorded is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from ..domain.instance import Destination
from ..domain.states import FAILED, NEW, PREPARED
from .connection import StoreCore
from .fsops import make_private, open_private, relative_name
from .ingest import _search_text
from .model import Item, Preparation, PreparedCopy, PrepareReport, PrepOutcome
from .queue import _within_inline_budget, items_with_bytes
from .rows import SELECT_QUEUE, forget_unreferenced, item_rows
from .schema import INLINE_PREFIX, PREPARED_SUFFIX
from .writer import unlinking

#: At most this many bytes of small instances are handed out by one `ripe_new`.
RIPE_INLINE_BYTES = 16 * 1024 * 1024

_ITEM_FIELDS = (
    "source_ae, destination_ae, destination_role, study_uid, series_uid, sop_instance_uid, "
    "sop_class_uid, modality, patient_id, patient_name, accession_number, transfer_syntax_uid, "
    "size_bytes, search_text, received_syntax"
)


@attrs.frozen
class _Placed:
    """Where a copy's bytes went before the transaction: the index (`data`) or a spool file."""

    rel: str
    size: int
    data: bytes | None = None
    path: Path | None = None


def _write_durably(ops: Any, temp: Path, final: Path, data: bytes) -> None:
    """Write `data` to `temp`, fsync it, rename it to `final` (its directory is fsync'd by the
    writer's group, before the COMMIT that names it)."""
    fd = open_private(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with open(fd, "wb") as f:
        f.write(data)
    ops.fsync_file(temp)
    ops.rename(temp, final)


def _adopt_durably(ops: Any, file: Path, temp: Path, final: Path) -> None:
    """Make the finished `file` the spool file `final`: the owner's only like every spool file,
    fsync'd, renamed (its directory is fsync'd by the writer's group, before the COMMIT that
    names it); from another file system copied to `temp` first, a block at a time, and the
    original removed."""
    try:
        make_private(file)
        ops.fsync_file(file)
        ops.rename(file, final)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    fd = open_private(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with open(fd, "wb") as out, open(file, "rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
    ops.fsync_file(temp)
    ops.rename(temp, final)
    ops.unlink(file)


def _take_small(ops: Any, file: Path) -> bytes:
    """A small handed-over file's bytes, for the index; the file is removed."""
    data = file.read_bytes()
    ops.unlink(file)
    return data


class Preparing(StoreCore):
    """A node's per-item prepare stage as the store serves it."""

    async def _bucket_dir(self) -> Path:  # Ingest's, in the composed Store
        raise NotImplementedError

    async def ripe_new(
        self, destination: Destination, now: float, minimum_age: float, limit: int
    ) -> list[Item]:
        """Up to `limit` of `destination`'s `new` items that are ripe (received at least
        `minimum_age` seconds before `now`, and not held back by a retry until later), oldest
        first, the bytes of small instances with them (`Item.data`, at most RIPE_INLINE_BYTES
        in all; the rest waits for the next call)."""

        def q(conn: sqlite3.Connection) -> list[Item]:
            rows = item_rows(
                conn,
                f"{SELECT_QUEUE} WHERE i.destination_ae = ? AND i.destination_role = ? AND "
                f"i.state = '{NEW}' AND i.checked_out = 0 AND i.created_at <= ? AND "
                "(i.next_attempt_at IS NULL OR i.next_attempt_at <= ?) "
                "ORDER BY i.created_at, i.id LIMIT ?",
                (destination.ae_title, destination.role, now - minimum_age, now, limit),
            )
            kept = _within_inline_budget(rows, RIPE_INLINE_BYTES)
            return items_with_bytes(conn, kept, self._item)

        return await self._read(q)

    async def next_ripe_at(self, destination: Destination, minimum_age: float) -> float | None:
        """When `destination`'s next `new` item ripens (received + `minimum_age`, or later if a
        retry holds it back); None when it has none."""

        def q(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(MAX(created_at + ?, COALESCE(next_attempt_at, 0))) FROM items "
                f"WHERE destination_ae = ? AND destination_role = ? AND state = '{NEW}' "
                "AND checked_out = 0",
                (minimum_age, destination.ae_title, destination.role),
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._read(q)

    async def apply_preparations(self, preparations: Sequence[Preparation]) -> PrepareReport:
        """Apply the prepare stage's decisions in one transaction (see the module docstring);
        an item no longer `new`, or checked out, or gone, is skipped (its copy discarded)."""
        if not preparations:
            return PrepareReport()
        placed: dict[int, _Placed] = {}
        dirs: set[Path] = set()
        try:
            for prep in preparations:
                if prep.copy is not None:
                    placed[prep.item_id] = await self._place_copy(prep.copy, dirs)
            now = self._clock()
            # without a copy or a removal nothing is unlinked after the commit: losing it in a
            # power cut only prepares the items again (as for prepare_ripe), so no fsync of its own
            durable = bool(placed) or any(p.outcome is PrepOutcome.REMOVED for p in preparations)
            report: PrepareReport = await self._write(
                lambda conn: self._apply_job(conn, preparations, placed, now), dirs, durable=durable
            )
        except BaseException:
            handed = [p.copy.file for p in preparations if p.copy is not None and p.copy.file is not None]
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._drop_files, list(placed.values()), handed)
            raise
        return report

    async def _place_copy(self, copy: PreparedCopy, dirs: set[Path]) -> _Placed:
        size = copy.size if copy.file is None else await trio.to_thread.run_sync(lambda: copy.size)
        if size <= self.inline_max_bytes:
            data = copy.data
            if copy.file is not None:
                data = await trio.to_thread.run_sync(_take_small, self._ops, copy.file)
            return _Placed(f"{INLINE_PREFIX}{uuid.uuid4().hex}", len(data), data=data)
        bucket = await self._bucket_dir()
        final = bucket / f"{uuid.uuid4().hex}{PREPARED_SUFFIX}"
        temp = self._incoming / f"{uuid.uuid4().hex}.part"
        try:
            if copy.file is not None:
                await trio.to_thread.run_sync(_adopt_durably, self._ops, copy.file, temp, final)
            else:
                await trio.to_thread.run_sync(_write_durably, self._ops, temp, final, copy.data)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._drop_files, [], [temp, final])
            raise
        dirs.add(bucket)
        return _Placed(relative_name(self.root, final), size, path=final)

    def _drop_files(self, placed: list[_Placed], others: Sequence[Path] = ()) -> None:
        for p in placed:
            if p.path is not None:
                self._ops.unlink(p.path)
        for path in others:
            self._ops.unlink(path)

    def _apply_job(
        self,
        conn: sqlite3.Connection,
        preparations: Sequence[Preparation],
        placed: dict[int, _Placed],
        now: float,
    ) -> Any:
        out: dict[PrepOutcome, list[int]] = {o: [] for o in PrepOutcome}
        added: list[tuple[int, Destination]] = []
        skipped: list[int] = []
        unlink: list[Path] = []
        cur = conn.cursor()
        cur.row_factory = sqlite3.Row
        for prep in preparations:
            row = cur.execute(
                f"SELECT id, instance_id, {_ITEM_FIELDS} FROM items WHERE id = ? AND "
                f"state = '{NEW}' AND checked_out = 0",
                (prep.item_id,),
            ).fetchone()
            copy = placed.get(prep.item_id)
            if row is None:
                skipped.append(prep.item_id)
                if copy is not None and copy.path is not None:
                    unlink.append(copy.path)
                continue
            if prep.outcome in (PrepOutcome.PREPARED, PrepOutcome.REMOVED):
                added += self._add_items(conn, prep, row, now)
            unlink += self._apply_one(conn, prep, row, copy, now)
            out[prep.outcome].append(prep.item_id)
        report = PrepareReport(
            prepared=tuple(out[PrepOutcome.PREPARED]),
            removed=tuple(out[PrepOutcome.REMOVED]),
            retried=tuple(out[PrepOutcome.RETRY]),
            failed=tuple(out[PrepOutcome.FAILED]),
            added=tuple(added),
            skipped=tuple(skipped),
        )
        return unlinking(report, unlink)

    def _apply_one(
        self,
        conn: sqlite3.Connection,
        prep: Preparation,
        row: sqlite3.Row,
        copy: _Placed | None,
        now: float,
    ) -> list[Path]:
        """One item's outcome; returns files to unlink after the commit."""
        item_id, received = prep.item_id, row["instance_id"]
        if prep.outcome is PrepOutcome.REMOVED:
            conn.execute("DELETE FROM items WHERE id = ?", (item_id,))
            gone = forget_unreferenced(conn, self.root, received)
            return [] if gone is None else [gone]
        if prep.outcome is PrepOutcome.RETRY:
            conn.execute(
                "UPDATE items SET last_error = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (prep.last_error, prep.not_before, now, item_id),
            )
            return []
        if prep.outcome is PrepOutcome.FAILED:
            conn.execute(
                f"UPDATE items SET state = '{FAILED}', last_error = ?, next_attempt_at = NULL, "
                "updated_at = ? WHERE id = ?",
                (prep.last_error, now, item_id),
            )
            return []
        conn.execute(
            f"UPDATE items SET state = '{PREPARED}', sort_key = ?, last_error = '', "
            "next_attempt_at = NULL, updated_at = ? WHERE id = ?",
            (prep.sort_key, now, item_id),
        )
        if copy is None or prep.copy is None:
            return []
        self._repoint(conn, item_id, row, prep.copy, copy, now)
        gone = forget_unreferenced(conn, self.root, received)
        return [] if gone is None else [gone]

    def _repoint(
        self,
        conn: sqlite3.Connection,
        item_id: int,
        row: sqlite3.Row,
        copy: PreparedCopy,
        placed: _Placed,
        now: float,
    ) -> None:
        """The item is sent as its copy from now on: a new instance row, and the identity the
        copy's header gives (UIDs, transfer syntax, patient fields as the destination gets
        them); its received syntax stays."""
        cur = conn.execute(
            "INSERT INTO instances(rel_path, size_bytes, created_at) VALUES (?, ?, ?)",
            (placed.rel, placed.size, now),
        )
        instance_id = cur.lastrowid
        if placed.data is not None:
            conn.execute("INSERT INTO blobs(instance_id, data) VALUES (?, ?)", (instance_id, placed.data))
        h = copy.header
        dest = Destination(row["destination_ae"], row["destination_role"])
        conn.execute(
            "UPDATE items SET instance_id = ?, size_bytes = ?, study_uid = ?, series_uid = ?, "
            "sop_instance_uid = ?, sop_class_uid = ?, modality = ?, patient_id = ?, "
            "patient_name = ?, accession_number = ?, transfer_syntax_uid = ?, search_text = ?, "
            "prepared_copy = 1 WHERE id = ?",
            (
                instance_id, placed.size, h.study_instance_uid, h.series_instance_uid,
                h.sop_instance_uid, h.sop_class_uid, h.modality, h.patient_id, h.patient_name,
                h.accession_number, h.transfer_syntax_uid,
                _search_text(h, row["source_ae"], dest), item_id,
            ),
        )

    def _add_items(
        self, conn: sqlite3.Connection, prep: Preparation, row: sqlite3.Row, now: float
    ) -> list[tuple[int, Destination]]:
        """`new` items for the added destinations, sharing the received instance, with the
        received item's identity and arrival time; none where that instance has an item for
        the destination already (an item prepared twice adds once)."""
        added = []
        for dest in prep.add_destinations:
            if conn.execute(
                "SELECT 1 FROM items WHERE instance_id = ? AND destination_ae = ? AND "
                "destination_role = ? LIMIT 1",
                (row["instance_id"], dest.ae_title, dest.role),
            ).fetchone():
                continue
            search = row["search_text"].split("\x1f")
            if len(search) > 4:
                search[4] = dest.ae_title.lower()
            cur = conn.execute(
                f"INSERT INTO items(instance_id, state, {_ITEM_FIELDS}, created_at, updated_at, "
                "added_by) SELECT instance_id, ?, source_ae, ?, ?, study_uid, series_uid, "
                "sop_instance_uid, sop_class_uid, modality, patient_id, patient_name, "
                "accession_number, transfer_syntax_uid, size_bytes, ?, received_syntax, "
                "created_at, ?, id FROM items WHERE id = ?",
                (NEW, dest.ae_title, dest.role, "\x1f".join(search), now, prep.item_id),
            )
            added.append((int(cur.lastrowid or 0), dest))
        return added

