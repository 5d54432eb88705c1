"""Ingest: admission (free space, the disk-full reserve), spool buckets, and the commit of a
received instance with one item per destination (see the package docstring, "Acknowledged
means durable")."""

from __future__ import annotations

import concurrent.futures
import os
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from ..domain.instance import Destination, InstanceHeader
from ..domain.states import NEW
from .connection import BUCKET_SIZE, StoreCore
from .errors import StoreError, StoreFull
from .fsops import open_private, relative_name
from .rows import stored_state
from .schema import INLINE_PREFIX

#: the values of one item row as `_insert_job` inserts them, after the instance id
ItemValues = tuple[Any, ...]


def _write_file(path: Path, data: bytes) -> None:
    # no O_TRUNC: the path is new, made ahead or reused (see the acceptor's _spill); cut what
    # a reused file held beyond the new bytes
    fd = open_private(path, os.O_WRONLY | os.O_CREAT)
    with open(fd, "wb") as f:
        f.write(data)
        f.truncate()



def _search_text(header: InstanceHeader, source_ae: str, dest: Destination) -> str:
    return "\x1f".join(
        s.lower()
        for s in (
            header.study_instance_uid,
            header.series_instance_uid,
            header.sop_instance_uid,
            source_ae,
            dest.ae_title,
            header.accession_number,
            header.patient_id,
        )
    )


def _item_values(
    state: str, header: InstanceHeader, source_ae: str, d: Destination, now: float
) -> ItemValues:
    return (
        state,
        source_ae,
        d.ae_title,
        d.role,
        header.study_instance_uid,
        header.series_instance_uid,
        header.sop_instance_uid,
        header.sop_class_uid,
        header.modality,
        header.patient_id,
        header.patient_name,
        header.accession_number,
        header.transfer_syntax_uid,
        now,
        now,
        _search_text(header, source_ae, d),
        header.transfer_syntax_uid,
    )


def _insert_job(
    rel: str, rows: list[ItemValues], now: float, *, reused: bool
) -> Callable[..., list[int]]:
    """The writer's job for a commit: the instance (and its bytes when `blob` is given), then
    one item per row; returns the item ids."""

    def insert(conn: sqlite3.Connection, size: int, blob: bytes | None = None) -> list[int]:
        cur = conn.execute(
            "INSERT INTO instances(rel_path, size_bytes, created_at) VALUES (?, ?, ?)",
            (rel, size, now),
        )
        instance_id = cur.lastrowid
        if reused:
            conn.execute("DELETE FROM trash WHERE rel_path = ?", (rel,))
        if blob is not None:
            conn.execute("INSERT INTO blobs(instance_id, data) VALUES (?, ?)", (instance_id, blob))
        ids = []
        for row in rows:
            cur = conn.execute(
                "INSERT INTO items(instance_id, state, source_ae, destination_ae, "
                "destination_role, study_uid, series_uid, sop_instance_uid, sop_class_uid, "
                "modality, patient_id, patient_name, accession_number, "
                "transfer_syntax_uid, created_at, updated_at, search_text, received_syntax, "
                "size_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (instance_id, *row, size),
            )
            ids.append(int(cur.lastrowid or 0))
        return ids

    return insert


@attrs.frozen
class _Placement:
    """Where a committed instance lives: in the index (`inline`), or in the spool file `final`
    (`reused`: a delivered instance's file written over in place; else new in `bucket`)."""

    rel: str
    inline: bool = False
    final: Path | None = None
    reused: bool = False
    bucket: Path | None = None


class Ingest(StoreCore):
    """The receiver's side of the store."""

    def new_incoming_path(self) -> Path:
        """A fresh temporary path in cache/incoming for the acceptor to write a Part 10 file to:
        a ready empty file when there is one (`spares.py`: creating a file is the slow part)."""
        return self._spares.take() or self._incoming / f"{uuid.uuid4().hex}.part"

    def start_sync(self, temp_path: Path, size: int) -> concurrent.futures.Future[None] | None:
        """Start the fsync of a complete temporary file that will take a spool file (larger than
        `inline_max_bytes`, durable writes), on the writer's pool: pass what this returns to
        `commit_instance` as `sync`. Started as the last byte is written, the flush overlaps the
        work before the commit (the header's parsing, the hand-over to the receiver); the commit
        still renames the file only once the fsync is done. None: nothing to start."""
        if size <= self.inline_max_bytes or self._writer is None:
            return None
        return self._writer.start_sync(temp_path)

    async def discard_incoming(self, temp_path: Path) -> None:
        """Remove a temporary file the acceptor will not commit (association aborted, etc.)."""
        await trio.to_thread.run_sync(self._ops.unlink, Path(temp_path))

    @property
    def index_free_bytes(self) -> int:
        """Free pages inside the index file (left by deleted small instances): SQLite reuses them
        for new ones, so they count as free space for admission."""
        return self._writer.index_free_bytes if self._writer is not None else 0

    def free_space_percent(self) -> float:
        # files kept for reuse (spares.py) count as free: the next receptions write over them
        extra = self.index_free_bytes + self._spares.recycled_bytes
        return self._ops.free_space_percent(self.root, extra_bytes=extra)

    @property
    def accepting(self) -> bool:
        """False while the reserve is given to the index after the disk filled up."""
        return self._writer is None or not self._writer.reserve_released

    def check_admission(self) -> None:
        """Raise StoreFull when free space is below `min_free_space_percent` (one statvfs), or
        while the disk is full (the reserve was given to the index and there is no room yet to
        take it back)."""
        if not self.accepting:
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize + self.index_free_bytes < 2 * self.reserve_bytes:
                raise StoreFull("disk full: the remaining space is kept for deliveries")
        if self.min_free_space_percent <= 0:
            return
        free = self.free_space_percent()
        if free < self.min_free_space_percent:
            raise StoreFull(
                f"free space {free:.1f}% below minimum {self.min_free_space_percent:g}%"
            )

    async def _bucket_dir(self) -> Path:
        async with self._bucket_lock:
            if self._bucket_used >= BUCKET_SIZE:
                nxt = self._bucket + 1
                path = self._spool / f"{nxt:06d}"

                def make() -> None:
                    self._ops.mkdir(path)
                    self._ops.fsync_dir(self._spool)

                await trio.to_thread.run_sync(make)
                self._bucket, self._bucket_used, self._bucket_path = nxt, 0, path
            self._bucket_used += 1
            return self._bucket_path

    async def commit_instance(
        self,
        temp_path: Path | None,
        header: InstanceHeader,
        source_ae: str,
        destinations: Sequence[Destination],
        *,
        state: str = NEW,
        data: bytes | None = None,
        sync: concurrent.futures.Future[None] | None = None,
    ) -> list[int]:
        """Store a received instance and queue one item per destination, durably.

        The instance is the temporary file `temp_path` (from `new_incoming_path`), or `data`
        (its Part 10 bytes, received in memory) with `temp_path` None. Returns the new item ids
        (one per distinct destination, in order) only once the instance and the items are
        durable; `sync` is the file's fsync from `start_sync`, if one was started. Raises
        StoreFull (and leaves nothing behind: the temporary file is removed) when space is short
        or a write fails. Once started it completes even if the caller is
        cancelled; the caller then sees Cancelled at its next checkpoint.
        """
        if (temp_path is None) == (data is None):
            raise ValueError("commit_instance takes a temporary file or the bytes, not both")
        dests = list(dict.fromkeys(destinations))
        if not dests:
            raise ValueError("commit_instance needs at least one destination")
        state = stored_state(state)
        final: Path | None = None
        committed = False
        try:
            self.check_admission()
            now = self._clock()
            if data is not None and len(data) > self.inline_max_bytes:
                # bytes too large for the index: they get a spool file like any large instance
                temp_path = self.new_incoming_path()
                await trio.to_thread.run_sync(_write_file, temp_path, data)
                data = None
            placement = await self._place(temp_path, inline=data is not None)
            final = placement.final
            rows = [_item_values(state, header, source_ae, d, now) for d in dests]
            insert = _insert_job(placement.rel, rows, now, reused=placement.reused)
            ids = await self._run_commit(placement, insert, temp_path, data, sync)
            committed = True
            return ids
        finally:
            if not committed:
                with trio.CancelScope(shield=True):
                    await self._discard_uncommitted(temp_path, final)

    async def _place(self, temp_path: Path | None, *, inline: bool) -> _Placement:
        """Decide where an instance lives: given bytes (`inline`) or a file of at most
        `inline_max_bytes` in the index, a larger file in the spool."""
        if not inline:
            assert temp_path is not None
            # a stat of the file just written (page cache): decides where it lives
            try:
                inline = os.stat(temp_path).st_size <= self.inline_max_bytes
            except OSError as exc:
                raise StoreError(f"received file vanished: {exc}") from exc
        if inline:
            return _Placement(f"{INLINE_PREFIX}{uuid.uuid4().hex}", inline=True)
        assert temp_path is not None
        if os.path.dirname(os.path.dirname(temp_path)) == str(self._spool):
            # a delivered instance's spool file, written over where it is (spares.py): its
            # name is durable already (no rename, no directory fsync); its trash row goes
            # in the same transaction as the new rows that name it
            return _Placement(relative_name(self.root, temp_path), final=temp_path, reused=True)
        bucket = await self._bucket_dir()
        name = f"{uuid.uuid4().hex}.dcm"
        return _Placement(f"{relative_name(self.root, bucket)}/{name}", final=bucket / name, bucket=bucket)

    async def _run_commit(
        self,
        placement: _Placement,
        insert: Callable[..., list[int]],
        temp_path: Path | None,
        data: bytes | None,
        sync: concurrent.futures.Future[None] | None,
    ) -> list[int]:
        assert self._writer is not None, "store is not open"
        ids: list[int]
        if placement.inline:
            # the bytes go into the group's transaction: its one WAL fsync covers them and
            # the items; the temporary file is removed after the COMMIT
            def insert_inline(conn: sqlite3.Connection) -> list[int]:
                payload = data if data is not None else temp_path.read_bytes()  # type: ignore[union-attr]
                return insert(conn, len(payload), payload)

            ids = await self._writer.run(insert_inline, admission=True, discard=temp_path)
            return ids
        # the pool fsyncs and renames the file (in parallel with the other commits), then
        # the group fsyncs the bucket once (none for a reused file), inserts, and commits
        assert placement.final is not None and temp_path is not None
        ids = await self._writer.run(
            insert,
            () if placement.bucket is None else (placement.bucket,),
            admission=True,
            place=(temp_path, placement.final),
            synced=sync,
        )
        return ids

    async def _discard_uncommitted(self, temp_path: Path | None, final: Path | None) -> None:
        """Remove the files of a commit that failed or was cancelled before its job ran."""
        if temp_path is not None:
            await trio.to_thread.run_sync(self._ops.unlink, Path(temp_path))
        if final is not None:
            # (a reused file keeps its trash row: its unlink is not made durable
            # here, and the row makes recovery remove it if a power cut brings it
            # back with this reception's bytes over the old ones)
            await trio.to_thread.run_sync(self._ops.unlink, final)
