"""Restart recovery and schema versioning."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from capacitor_trio.domain.instance import Destination
from capacitor_trio.domain.states import FAILED, REJECTED
from capacitor_trio.store import SCHEMA_VERSION, ItemFilter, StoreError, open_store

from .util import AI, PACS, FakeClock, commit, spool_files, write_temp


async def test_recovery_repairs_spool_and_index(tmp_path: Path) -> None:
    clock = FakeClock(5000.0)
    async with open_store(tmp_path, durable=False, clock=clock, inline_max_bytes=0) as store:
        [a, a_ai] = await commit(store, [PACS, AI])
        [b] = await commit(store)
        [c] = await commit(store)
        [d] = await commit(store)
        await store.prepare_ripe(clock.now, 0)
        checked = await store.checkout_batch(PACS, now=clock.now, limit=1)
        assert [i.id for i in checked] == [a]
        await store.reject(d, "refused")
        stray_temp = write_temp(store)  # a reception that never committed
        b_path = (await store.get_item(b)).path
        c_path = (await store.get_item(c)).path
    # damage done while the router was down
    b_path.unlink()
    orphan = c_path.parent / "stray.dcm"
    orphan.write_bytes(b"who am i")
    loose = tmp_path / "spool" / "loose-file"
    loose.write_bytes(b"not in a bucket")

    clock.advance(60)
    async with open_store(
        tmp_path, durable=False, clock=clock, cycle_rejected_on_startup=True
    ) as store:
        report = store.recovery_report
        assert report.released == 1
        assert report.incoming_removed == 1 and not stray_temp.exists()
        assert report.missing == (b_path.relative_to(tmp_path).as_posix(),)
        assert sorted(report.orphans) == sorted(
            p.relative_to(tmp_path).as_posix() for p in (orphan, loose)
        )
        assert report.rejected_cycled == 1
        assert (tmp_path / "orphans" / "stray.dcm").read_bytes() == b"who am i"
        assert (tmp_path / "orphans" / "loose-file").exists()
        assert not (await store.get_item(a)).checked_out
        item_b = await store.get_item(b)
        assert item_b.state == FAILED and "spool file missing" in item_b.last_error
        assert item_b.next_attempt_at is None  # parked: retrying cannot bring the file back
        assert (await store.get_item(d)).state == "new"
        assert (await store.get_item(a_ai)).state == "prepared"
        counts = await store.counts()
        assert counts.checked_out == 0 and counts.total == 5
    # recovery is idempotent: a second open finds nothing more to do
    async with open_store(tmp_path, durable=False, clock=clock) as store:
        r = store.recovery_report
        assert (r.released, r.incoming_removed, r.orphans, r.rejected_cycled) == (0, 0, (), 0)
        assert r.missing == (b_path.relative_to(tmp_path).as_posix(),)


async def test_rejected_stay_rejected_without_cycle_option(tmp_path: Path) -> None:
    async with open_store(tmp_path, durable=False) as store:
        [a] = await commit(store)
        await store.reject(a, "no")
    async with open_store(tmp_path, durable=False) as store:
        assert (await store.get_item(a)).state == REJECTED


async def test_trash_left_by_a_crash_is_removed(tmp_path: Path) -> None:
    async with open_store(tmp_path, durable=False, inline_max_bytes=0) as store:
        [a] = await commit(store)
        path = (await store.get_item(a)).path
    # simulate: the delete committed (trash row written) but the process died before the unlink
    conn = sqlite3.connect(tmp_path / "index.db")
    with conn:
        conn.execute("DELETE FROM items")
        conn.execute("DELETE FROM instances")
        conn.execute(
            "INSERT INTO trash(rel_path) VALUES (?)", (path.relative_to(tmp_path).as_posix(),)
        )
    conn.close()
    async with open_store(tmp_path, durable=False) as store:
        assert store.recovery_report.trash_removed == 1
        assert store.recovery_report.orphans == ()
        assert not path.exists() and spool_files(tmp_path) == set()
        assert (await store.list_items(ItemFilter()))[1] == 0


async def test_delete_where_trash_is_cleared(tmp_path: Path) -> None:
    async with open_store(tmp_path, durable=False) as store:
        for _ in range(3):
            await commit(store, [PACS, Destination("X")])
        assert await store.delete_where(ItemFilter()) == 6
        await store.set_paused(PACS, True)  # a later group forgets the trash rows
    conn = sqlite3.connect(tmp_path / "index.db")
    assert conn.execute("SELECT COUNT(*) FROM trash").fetchone()[0] == 0
    conn.close()
    assert spool_files(tmp_path) == set()


async def test_schema_version_recorded_and_newer_refused(tmp_path: Path) -> None:
    async with open_store(tmp_path, durable=False):
        pass
    conn = sqlite3.connect(tmp_path / "index.db")
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    with conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        async with open_store(tmp_path, durable=False):
            pass
