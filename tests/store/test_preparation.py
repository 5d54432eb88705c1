"""The files side of the per-item prepare stage: a prepared copy's bytes in a spool file of its
own (or in the index), the received instance kept while an item refers to it, an unrecorded
copy removed by recovery, and the migration to schema version 3."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import attrs
import pytest

from capacitor_trio.domain.instance import Destination
from capacitor_trio.store import Store, open_store
from capacitor_trio.store.errors import StoreFull
from capacitor_trio.store.model import Preparation, PreparedCopy, PrepOutcome
from capacitor_trio.store.schema import PREPARED_SUFFIX

from .util import PACS, FakeClock, commit, content, header, incoming_leftovers, spool_files

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


def handed(tmp_path: Path, data: bytes = b"FILE" * 100) -> PreparedCopy:
    """A prepared copy handed over as a finished file (a converted large instance)."""
    path = tmp_path / f"handed-{len(list(tmp_path.glob('handed-*')))}.part"
    path.write_bytes(data)
    return PreparedCopy(attrs.evolve(header(), sop_instance_uid="9.9.8"), file=path)


async def test_a_copy_handed_over_as_a_file_is_renamed_into_the_spool(store: Store, tmp_path: Path) -> None:
    """Its bytes never pass through the router: the same inode becomes the item's spool file."""
    a, b = await commit(store, [PACS, AI])
    received = (await store.get_item(a)).path
    prep = handed(tmp_path)
    assert prep.file is not None
    prep.file.chmod(0o644)  # as a worker process's umask may leave it
    inode = prep.file.stat().st_ino
    await store.apply_preparations([Preparation(a, PrepOutcome.PREPARED, copy=prep)])
    mine = await store.get_item(a)
    assert mine.path.name.endswith(PREPARED_SUFFIX) and mine.path.stat().st_ino == inode
    assert mine.path.stat().st_mode & 0o777 == 0o600
    assert await content(store, mine) == b"FILE" * 100 and mine.size_bytes == 400
    assert (mine.sop_instance_uid, mine.prepared_copy) == ("9.9.8", True)
    assert not prep.file.exists() and (await store.get_item(b)).path == received


async def test_a_small_handed_over_file_goes_into_the_index(inline_store: Store, tmp_path: Path) -> None:
    (a,) = await commit(inline_store)
    prep = handed(tmp_path)
    assert prep.file is not None
    await inline_store.apply_preparations([Preparation(a, PrepOutcome.PREPARED, copy=prep)])
    mine = await inline_store.get_item(a)
    assert mine.inline and await content(inline_store, mine) == b"FILE" * 100
    assert not prep.file.exists()


async def test_a_handed_over_file_from_another_file_system_is_copied(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename across file systems fails (EXDEV): the file is copied into the spool instead,
    fsync'd and renamed there, and the original removed."""
    (a,) = await commit(store)
    prep = handed(tmp_path)
    assert prep.file is not None
    rename = store._ops.rename

    def cross_device(src: Path, dst: Path) -> None:
        if src == prep.file:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst)

    monkeypatch.setattr(store._ops, "rename", cross_device)
    await store.apply_preparations([Preparation(a, PrepOutcome.PREPARED, copy=prep)])
    mine = await store.get_item(a)
    assert await content(store, mine) == b"FILE" * 100 and not prep.file.exists()
    assert incoming_leftovers(store.root / "incoming") == []


async def test_a_handed_over_file_not_recorded_is_removed(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store owns a handed-over file: for an item gone meanwhile it is removed, and when
    the transaction fails the file (adopted into the spool or not yet) is removed with it."""
    (a,) = await commit(store)
    await store.delete(a)
    before = spool_files(store.root)
    prep = handed(tmp_path)
    report = await store.apply_preparations([Preparation(a, PrepOutcome.PREPARED, copy=prep)])
    assert report.skipped == (a,) and spool_files(store.root) == before
    assert prep.file is not None and not prep.file.exists()

    b, c = (await commit(store))[0], (await commit(store))[0]
    before = spool_files(store.root)
    first, second = handed(tmp_path), handed(tmp_path)

    def refuse() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store._ops, "before_index_commit", refuse)
    with pytest.raises(StoreFull):
        await store.apply_preparations([
            Preparation(b, PrepOutcome.PREPARED, copy=first),
            Preparation(c, PrepOutcome.PREPARED, copy=second),
        ])
    assert spool_files(store.root) == before
    assert first.file is not None and second.file is not None
    assert not first.file.exists() and not second.file.exists()
    assert (await store.get_item(b)).state == "new"


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
