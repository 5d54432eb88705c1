"""Files made ahead and files retired from the spool (`store/spares.py`), alone and in the store."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from capacitor_trio.store import ItemFilter, StoreFull, open_store
from capacitor_trio.store.spares import RECYCLE_MAX, RETIRED_PREFIX, SPARE_PREFIX, SpareFiles

from .util import PACS, commit, content, file_paths, header, incoming_leftovers, spool_files


def fsyncs(log: list[Path]):  # type: ignore[no-untyped-def]
    def fsync_dir(path: Path) -> None:
        log.append(path)

    return fsync_dir


def retire(spares: SpareFiles, data: bytes) -> Path:
    """What the store's writer does with a spool file whose last item went away."""
    to = spares.retire_path()
    assert to is not None and to.name.startswith(RETIRED_PREFIX)
    to.write_bytes(data)  # stands for the rename
    spares.retired(to)
    return to


def settle(spares: SpareFiles) -> None:
    assert spares.wait_settled(10)


@pytest.mark.usefixtures("leases")
def test_retired_files_are_reused_newest_first_once_their_names_are_durable(tmp_path: Path) -> None:
    synced: list[Path] = []
    spares = SpareFiles(tmp_path, fsyncs(synced))
    try:
        first, second = retire(spares, b"first"), retire(spares, b"second")
        settle(spares)
        assert synced and set(synced) == {tmp_path}  # the directory fsync'd before any reuse
        assert spares.take() == second and spares.take() == first
        assert spares.take() is None or spares.take().name.startswith(SPARE_PREFIX)  # type: ignore[union-attr]
    finally:
        spares.close()


@pytest.mark.usefixtures("leases")
def test_a_retired_file_is_not_handed_out_before_its_name_is_durable(tmp_path: Path) -> None:
    import threading

    entered, release = threading.Event(), threading.Event()

    def slow_fsync(path: Path) -> None:
        entered.set()
        assert release.wait(10)

    spares = SpareFiles(tmp_path, slow_fsync)
    try:
        path = retire(spares, b"old")
        assert entered.wait(10)  # the directory fsync is under way
        taken = spares.take()
        assert taken != path and (taken is None or taken.name.startswith(SPARE_PREFIX))
        release.set()
        settle(spares)
        assert spares.take() == path
    finally:
        release.set()
        spares.close()


def emptied(paths: list[Path]) -> list[Path]:
    """The retired files that are now empty ready files (what they held is gone)."""
    return [p for p in paths if p.exists() and p.stat().st_size == 0]


@pytest.mark.usefixtures("leases")
def test_retired_files_beyond_the_limit_are_emptied_or_unlinked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond what reuse keeps, a retired file becomes an empty ready file (no inode freed and
    another allocated: spares._emptied) while fewer than READY_MAX are ready; the rest go."""
    from capacitor_trio.store import spares as module

    monkeypatch.setattr(module, "READY_MAX", 3)
    monkeypatch.setattr(module, "SPARE_LOW", 0)  # no made-ahead files: only retired ones
    spares = SpareFiles(tmp_path, fsyncs([]))
    try:
        retired = [retire(spares, b"x") for _ in range(RECYCLE_MAX + 5)]
        settle(spares)
        assert spares.recycled == RECYCLE_MAX
        kept = [p for p in retired if p.exists() and p.stat().st_size == 1]
        assert len(kept) == RECYCLE_MAX
        made_empty = emptied(retired)
        assert len(made_empty) == 3 and len(spares) == 3
        assert sum(p.exists() for p in retired) == RECYCLE_MAX + 3
        # reused files first (they save the most), then the empty ones like any made-ahead file
        taken = [spares.take() for _ in range(RECYCLE_MAX + 3)]
        assert set(taken) == set(kept) | set(made_empty)
        assert [p.stat().st_size for p in taken[RECYCLE_MAX:] if p is not None] == [0, 0, 0]
    finally:
        spares.close()
    # closing removes the ones nobody took
    assert not any(p.exists() for p in retired if p not in taken)


@pytest.mark.parametrize("why", ["no durable writes", "directory fsync fails", "no leases"])
def test_a_retired_file_is_only_unlinked_when_reuse_is_not_safe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    """No durable writes: after a power cut a reused file could mix two patients' bytes. A
    failed fsync of its new name, or no way to tell whether someone still reads it (leases
    refused by the file system or the settings): not reused either."""
    from capacitor_trio.store import spares as module

    def broken(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if why == "no leases":
        monkeypatch.setattr(module, "_take_lease", broken)
    fsync_dir = {"no durable writes": None, "directory fsync fails": broken}.get(why, fsyncs([]))
    spares = SpareFiles(tmp_path, fsync_dir)  # type: ignore[arg-type]
    try:
        path = retire(spares, b"old patient")
        settle(spares)
        assert spares.recycled == 0
        if why == "no leases":  # someone may still read it: unlinked, the reader keeps the bytes
            assert not path.exists()
        else:  # emptied: only the inode is reused, as a new empty file
            assert path.exists() and path.stat().st_size == 0
        for _ in range(3):
            taken = spares.take()
            assert taken is None or taken.stat().st_size == 0
    finally:
        spares.close()


def test_retired_after_close_is_unlinked_at_once(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path, fsyncs([]))
    spares.close()
    assert spares.retire_path() is None
    late = tmp_path / f"{RETIRED_PREFIX}late.part"
    late.write_bytes(b"x")
    spares.retired(late)
    assert not late.exists()


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "no-fsync"])
@pytest.mark.usefixtures("leases")
async def test_a_delivered_instance_file_is_retired_and_with_durable_writes_reused(
    tmp_path: Path, durable: bool
) -> None:
    """With durable writes a delivered instance's spool file stays where it is and the next
    reception writes over it there (its name is durable already: no rename, no directory
    fsync), and the new instance holds exactly its own bytes (shorter or longer than the old).
    Without, the writer renames it out of the spool (and it comes back empty)."""
    old = b"OLD PATIENT " * 20_000  # 240 kB: a spool file
    async with open_store(tmp_path, durable=durable) as store:
        temp = store.new_incoming_path()
        temp.write_bytes(old)
        [a] = await store.commit_instance(temp, header(), "CT", [PACS])
        [spooled] = spool_files(tmp_path)
        await store.delivered([a])
        await trio.to_thread.run_sync(settle, store._spares)
        assert spooled.exists() == durable and store._spares.recycled == (1 if durable else 0)
        for new in (b"NEW" * 30_000, b"NEWER" * 60_000):
            reused = store.new_incoming_path()
            assert (reused == spooled) == durable
            # what the acceptor does: write without truncating, then cut to what it wrote
            fd = os.open(reused, os.O_WRONLY | os.O_CREAT)
            try:
                os.write(fd, new)
                os.ftruncate(fd, len(new))
            finally:
                os.close(fd)
            sync = store.start_sync(reused, len(new))
            [b] = await store.commit_instance(reused, header(), "CT", [PACS], sync=sync)
            assert await content(store, await store.get_item(b)) == new
            assert ((await store.get_item(b)).path == spooled) == durable
            await store.delivered([b])
            await trio.to_thread.run_sync(settle, store._spares)
        # bytes received in memory but too large for the index take a file the same way
        big = b"BYTES" * 20_000
        [c] = await store.commit_instance(None, header(), "CT", [PACS], data=big)
        assert await content(store, await store.get_item(c)) == big
    assert incoming_leftovers(tmp_path / "incoming") == []
    assert not any((tmp_path / "incoming").iterdir())  # closing removed the files kept for reuse
    assert len(spool_files(tmp_path)) == 1  # ...and in the spool: only the last instance's


@pytest.mark.usefixtures("leases")
async def test_a_spool_file_reused_in_place_survives_a_crash_and_a_kept_one_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file kept in place keeps its trash row until a reception's commit deletes it in the
    same transaction as the rows that name it: after a crash, recovery removes a kept file and
    one a reception was writing into without calling them orphans, and never one committed."""
    async with open_store(tmp_path, durable=True) as store:
        ids = []
        for n in range(3):
            temp = store.new_incoming_path()
            temp.write_bytes(b"OLD %d " % n * 20_000)
            ids += await store.commit_instance(temp, header(), "CT", [PACS])
        first, second, third = [(await store.get_item(i)).path for i in ids]
        await store.delivered(ids)
        await trio.to_thread.run_sync(settle, store._spares)
        assert store._spares.recycled == 3
        slot = store.new_incoming_path()  # the newest first
        assert slot == third
        slot.write_bytes(b"NEW PATIENT " * 10_000)
        [b] = await store.commit_instance(slot, header(), "CT", [PACS])
        # a reception writing into the next one when the router is killed
        half = store.new_incoming_path()
        assert half == second
        half.write_bytes(b"HALF")
        # ...and `first` still kept: a kill leaves it where it is (closing would remove it)
        monkeypatch.setattr(store._spares, "drop_recycled", lambda: None)
    assert first.exists() and second.exists()
    async with open_store(tmp_path, durable=True) as store:
        r = store.recovery_report
        assert r.orphans == () and r.missing == ()
        assert not first.exists() and not second.exists()
        item = await store.get_item(b)
        assert item.path == third and await content(store, item) == b"NEW PATIENT " * 10_000


@pytest.mark.usefixtures("leases")
async def test_a_kept_file_given_up_leaves_the_spool_before_its_trash_row_goes(
    tmp_path: Path,
) -> None:
    """A kept file that reuse gives up (the disk fills up, say) is removed from the spool and
    its directory fsync'd before its trash row is deleted; a file still kept keeps its row."""
    from capacitor_trio.store import FileOps

    synced: list[Path] = []

    class Ops(FileOps):
        def fsync_dir(self, path: Path) -> None:
            super().fsync_dir(path)
            synced.append(path)

    async with open_store(tmp_path, durable=True, file_ops=Ops()) as store:
        ids = []
        for n in range(2):
            temp = store.new_incoming_path()
            temp.write_bytes(b"OLD %d " % n * 20_000)
            ids += await store.commit_instance(temp, header(), "CT", [PACS])
        paths = {(await store.get_item(i)).path.relative_to(tmp_path).as_posix() for i in ids}

        async def trash() -> set[str]:
            return {r[0] for r in await store._read(lambda c: c.execute("SELECT rel_path FROM trash").fetchall())}

        await store.delivered(ids)
        await trio.to_thread.run_sync(settle, store._spares)
        assert store._spares.recycled == 2 and await trash() == paths  # kept: rows stay
        synced.clear()
        store._spares.drop_recycled()
        assert not any((tmp_path / p).exists() for p in paths)
        assert {(tmp_path / p).parent for p in paths} <= set(synced)
        await commit(store)  # the next group deletes the rows
        assert await trash() == set()


@pytest.mark.usefixtures("leases")
async def test_without_durable_writes_a_delivered_file_comes_back_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without durable writes no bytes are reused, but the file is: emptied, it is handed out
    like a new one, so that the file system frees and allocates no inode per instance."""
    from capacitor_trio.store import spares as module

    monkeypatch.setattr(module, "SPARE_LOW", 0)  # no made-ahead files: only retired ones
    async with open_store(tmp_path, durable=False) as store:
        temp = store.new_incoming_path()
        temp.write_bytes(b"OLD PATIENT " * 20_000)
        [a] = await store.commit_instance(temp, header(), "CT", [PACS])
        [spooled] = spool_files(tmp_path)
        inode = spooled.stat().st_ino
        await store.delivered([a])
        await trio.to_thread.run_sync(settle, store._spares)
        assert store._spares.recycled == 0
        again = store.new_incoming_path()
        assert again.name.startswith(RETIRED_PREFIX) and again.stat().st_ino == inode
        assert again.stat().st_size == 0
        new = b"NEW" * 30_000
        again.write_bytes(new)
        [b] = await store.commit_instance(again, header(), "CT", [PACS])
        assert await content(store, await store.get_item(b)) == new


async def test_an_operators_delete_removes_the_bytes_at_once(tmp_path: Path) -> None:
    """Only delivered instances' files are retired (and perhaps reused); a delete through the
    API (a study sent to the wrong place, say) unlinks its file before it returns."""

    async with open_store(tmp_path, durable=True) as store:
        ids = []
        for _ in range(3):
            temp = store.new_incoming_path()
            temp.write_bytes(b"WRONG PATIENT " * 10_000)
            ids += await store.commit_instance(temp, header(), "CT", [PACS])
        await store.delete(ids[0])
        assert await store.delete_where(ItemFilter()) == 2
        assert spool_files(tmp_path) == set()
        assert not [
            p for p in (tmp_path / "incoming").iterdir() if p.name.startswith(RETIRED_PREFIX)
        ]
        assert not any(
            b"WRONG PATIENT" in p.read_bytes() for p in (tmp_path / "incoming").iterdir()
        )


async def test_recovery_removes_retired_files_reporting_only_those_written_to(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path, durable=True):
        pass
    incoming = tmp_path / "incoming"
    unused = incoming / f"{RETIRED_PREFIX}left-by-a-kill.part"
    unused.write_bytes(b"old")
    st = unused.stat()  # a retired file was written before its rename: mtime < ctime
    os.utime(unused, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    (incoming / f"{RETIRED_PREFIX}emptied.part").touch()  # emptied for a new reception
    (incoming / f"{RETIRED_PREFIX}reused-then-cut-short.part").write_bytes(b"partial")
    (incoming / "reception-cut-short.part").write_bytes(b"partial")
    async with open_store(tmp_path, durable=True) as store:
        assert store.recovery_report.incoming_removed == 2
        assert incoming_leftovers(store.root / "incoming") == []
        assert not unused.exists()


@pytest.mark.usefixtures("leases")
def test_a_retired_file_still_open_elsewhere_is_not_reused(tmp_path: Path) -> None:
    """A reader still streaming it (the sender process, the API) would otherwise read the next
    reception's bytes: such a file is unlinked (the reader keeps the old bytes), not reused."""
    spares = SpareFiles(tmp_path, fsyncs([]))
    try:
        path = tmp_path / f"{RETIRED_PREFIX}busy.part"
        path.write_bytes(b"patient A")
        with open(path, "rb") as reader:
            spares.retired(path)
            settle(spares)
            assert spares.recycled == 0 and not path.exists()
            assert reader.read() == b"patient A"
        idle = retire(spares, b"patient B")
        settle(spares)
        assert spares.take() == idle
    finally:
        spares.close()


@pytest.mark.usefixtures("leases")
def test_an_open_during_the_lease_check_does_not_kill_the_router(tmp_path: Path) -> None:
    """While the check holds its lease, another process opening the file (a backup, a virus
    scanner) makes the kernel signal the holder; by default that is SIGIO, which ends a process.
    A child takes the lease the way the check does and must live through such an open."""
    import subprocess
    import sys

    path = tmp_path / f"{RETIRED_PREFIX}scanned.part"
    path.write_bytes(b"x")
    script = (
        "import fcntl, os, sys\n"
        "from capacitor_trio.store.spares import _take_lease\n"
        f"fd = os.open({str(path)!r}, os.O_RDONLY)\n"
        "_take_lease(fd)\n"
        "print('leased', flush=True)\n"
        "sys.stdin.readline()\n"
        "fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)\n"
        "print('alive', flush=True)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        try:
            assert holder.stdout.readline() == "leased\n"
            with pytest.raises(BlockingIOError):  # the open breaks the lease: holder signalled
                os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline() == "alive\n"
            assert holder.wait(10) == 0
        finally:
            holder.kill()


@pytest.mark.usefixtures("leases")
def test_reuse_is_bounded_in_bytes_and_file_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capacitor_trio.store import spares as module

    monkeypatch.setattr(module, "RECYCLE_BYTES", 250)
    monkeypatch.setattr(module, "RECYCLE_FILE_BYTES", 120)
    spares = SpareFiles(tmp_path, fsyncs([]))
    try:
        too_big = retire(spares, b"x" * 121)
        kept = [retire(spares, b"x" * 100) for _ in range(3)]
        settle(spares)

        def holding() -> list[Path]:  # retired files whose bytes are kept
            return [p for p in kept if p.exists() and p.stat().st_size]

        assert emptied([too_big]) == [too_big]  # not kept for reuse: its bytes are gone
        assert spares.recycled == 2 and spares.recycled_bytes == 200  # the third passes 250
        assert len(holding()) == 2
        taken = spares.take()
        assert spares.recycled_bytes == 100
        spares.drop_recycled()
        assert (spares.recycled, spares.recycled_bytes) == (0, 0)
        assert holding() == [taken]  # the taken one is its taker's
    finally:
        spares.close()


@pytest.mark.usefixtures("leases")
async def test_a_full_disk_gives_back_the_files_kept_for_reuse(tmp_path: Path) -> None:
    """They count as free space while kept; when the index hits a full disk they are unlinked
    with the reserve, and nothing is kept again until the reserve is back, so that deliveries
    and deletes give their space to the file system."""
    from .test_disk_full import FaultyOps

    ops = FaultyOps()

    async def held() -> list[Path]:  # files holding bytes no item needs (emptied ones do not)
        items, _ = await store.list_items(ItemFilter())
        return [
            p
            for p in (tmp_path / "incoming").iterdir()
            if p.name.startswith(RETIRED_PREFIX) and p.stat().st_size
        ] + sorted(spool_files(tmp_path) - file_paths(items))

    async with open_store(tmp_path, durable=True, file_ops=ops, reserve_bytes=1 << 16) as store:
        ids: list[int] = []
        for _ in range(6):
            temp = store.new_incoming_path()
            temp.write_bytes(b"x" * 100_000)
            ids += await store.commit_instance(temp, header(), "CT", [PACS])
        free = store.free_space_percent()
        await store.delivered(ids[:3])
        await trio.to_thread.run_sync(settle, store._spares)
        assert (store._spares.recycled, store._spares.recycled_bytes) == (3, 300_000)
        assert store.free_space_percent() >= free  # their bytes count as free
        ops.fail["index"] = errno.ENOSPC
        temp = store.new_incoming_path()
        assert temp.parent.parent == tmp_path / "spool"  # (one of them, taken by this reception)
        temp.write_bytes(b"y" * 100_000)
        with pytest.raises(StoreFull):
            await store.commit_instance(temp, header(), "CT", [PACS])
        assert not store.accepting
        assert (store._spares.recycled, store._spares.recycled_bytes) == (0, 0)
        assert await held() == []
        # deliveries on the full disk give their files back
        await store.delivered(ids[3:])
        await trio.to_thread.run_sync(settle, store._spares)
        assert store._spares.recycled == 0 and await held() == []
        # space returns: the reserve is taken back, and reuse resumes
        ops.fail.pop("index", None)  # (giving up the reserve made room already)
        temp = store.new_incoming_path()
        temp.write_bytes(b"z" * 100_000)
        [last] = await store.commit_instance(temp, header(), "CT", [PACS])
        assert store.accepting
        await store.delivered([last])
        await trio.to_thread.run_sync(settle, store._spares)
        assert store._spares.recycled == 1
