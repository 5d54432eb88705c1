"""The files side of the per-item prepare stage: a prepared copy's bytes in a spool file of its
own (or in the index), the received instance kept while an item refers to it, an unrecorded
copy removed by recovery, and the migration to schema version 3."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import attrs

from capacitor_trio.domain.instance import Destination
from capacitor_trio.store import Store, open_store
from capacitor_trio.store.model import Preparation, PreparedCopy, PrepOutcome
from capacitor_trio.store.schema import PREPARED_SUFFIX

from .util import PACS, FakeClock, commit, content, header, spool_files

AI = Destination("AI")


def copy(data: bytes = b"COPY" * 100) -> PreparedCopy:
    return PreparedCopy(attrs.evolve(header(), sop_instance_uid="9.9.9"), data)


async def test_a_large_copy_gets_a_spool_file_and_the_received_one_stays_while_needed(store: Store) -> None:
    a, b = await commit(store, [PACS, AI])
    received = (await store.get_item(a)).path
    await store.apply_preparations([Preparation(a, PrepOutcome.PREPARED, copy=copy())])
    mine = await store.get_item(a)
    assert mine.path.name.endswith(PREPARED_SUFFIX) and await content(store, mine) == b"COPY" * 100
    assert received.exists() and (await store.get_item(b)).path == received
    # the other destination's copy repoints its item too: the received file goes then
    await store.apply_preparations([Preparation(b, PrepOutcome.PREPARED, copy=copy(b"AI" * 300))])
    assert not received.exists()
    assert spool_files(store.root) == {mine.path, (await store.get_item(b)).path}


async def test_a_copy_for_an_item_gone_meanwhile_is_not_kept(store: Store) -> None:
    (a,) = await commit(store)
    await store.delete(a)
    before = spool_files(store.root)
    report = await store.apply_preparations([Preparation(a, PrepOutcome.PREPARED, copy=copy())])
    assert report.skipped == (a,) and spool_files(store.root) == before


async def test_a_dropped_item_takes_its_file_when_it_was_the_last(store: Store) -> None:
    (a,) = await commit(store)
    path = (await store.get_item(a)).path
    await store.apply_preparations([Preparation(a, PrepOutcome.REMOVED)])
    assert not path.exists() and spool_files(store.root) == set()


async def test_recovery_removes_a_copy_written_but_never_recorded(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "cache"
    async with open_store(root, durable=False, clock=clock, inline_max_bytes=0) as store:
        (a,) = await commit(store)
        bucket = (await store.get_item(a)).path.parent
    stray = bucket / f"0123abcd{PREPARED_SUFFIX}"
    stray.write_bytes(b"half")
    other = bucket / "fedc.dcm"
    other.write_bytes(b"orphan")
    async with open_store(root, durable=False, clock=clock) as store:
        assert not stray.exists()
        assert store.recovery_report.orphans == (other.relative_to(root).as_posix(),)
        assert (await store.get_item(a)).state == "new"


async def test_an_index_of_version_2_is_migrated(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "cache"
    async with open_store(root, durable=False, clock=clock) as store:
        (a,) = await commit(store)
    conn = sqlite3.connect(root / "index.db")
    with conn:  # what version 2 wrote: no received_syntax, sort_key, added_by
        for column in ("received_syntax", "sort_key", "added_by", "prepared_copy"):
            conn.execute(f"ALTER TABLE items DROP COLUMN {column}")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    async with open_store(root, durable=False, clock=clock) as store:
        item = await store.get_item(a)
        assert item.received_syntax == item.transfer_syntax_uid and item.sort_key is None
