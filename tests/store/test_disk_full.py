"""Admission: a full disk makes commits refuse with StoreFull, loses nothing, and recovers.

The end-to-end test fills a real 16 MB tmpfs (we mount it; where mounting is impossible it falls
back to the fault-injecting file layer). The unit tests inject ENOSPC/EIO at each step.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from capacitor_trio.store import FileOps, ItemFilter, Store, StoreFull, open_store

from .util import (
    AI,
    PACS,
    commit,
    content,
    file_paths,
    header,
    incoming_leftovers,
    spool_files,
    write_temp,
)


class FaultyOps(FileOps):
    """Real file operations, except the ones told to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: dict[str, int] = {}  # operation -> errno
        self.once: set[str] = set()  # ...failing once only
        self.free_percent: float | None = None

    def _maybe(self, op: str) -> None:
        if op in self.fail:
            err = self.fail[op]
            if op in self.once:
                self.once.discard(op)
                del self.fail[op]
            raise OSError(err, os.strerror(err))

    def fsync_file(self, path: Path) -> None:
        self._maybe("fsync_file")
        super().fsync_file(path)

    def fsync_dir(self, path: Path) -> None:
        self._maybe("fsync_dir")
        super().fsync_dir(path)

    def rename(self, src: Path, dst: Path) -> None:
        self._maybe("rename")
        super().rename(src, dst)

    def unlink(self, path: Path) -> None:
        if path.name == "reserve":
            self.fail.pop("index", None)  # giving up the reserve makes room for the index
        super().unlink(path)

    def before_index_commit(self) -> None:
        if "index" in self.fail:
            raise sqlite3.OperationalError("database or disk is full")

    def free_space_percent(self, path: Path, extra_bytes: int = 0) -> float:
        if self.free_percent is None:
            return super().free_space_percent(path, extra_bytes)
        return self.free_percent


def assert_consistent(store: Store, items: list) -> None:  # type: ignore[type-arg]
    assert incoming_leftovers(store.root / "incoming") == []
    assert spool_files(store.root) == file_paths(items)


@pytest.mark.parametrize(
    "op, err",
    [
        ("fsync_file", errno.ENOSPC),
        ("rename", errno.EIO),
        ("fsync_dir", errno.EIO),
        ("index", errno.ENOSPC),
        ("index-inline", errno.ENOSPC),
        ("fsync_file-early", errno.EIO),
        ("index-early", errno.ENOSPC),
    ],
)
async def test_write_error_refuses_and_leaves_nothing(tmp_path: Path, op: str, err: int) -> None:
    """-early: the file's fsync was started as its last byte was written (`start_sync`); its
    fault strikes once, so that a commit that fsynced again (and so missed the lost write the
    first fsync reported) would succeed, and fail the test."""
    ops = FaultyOps()
    inline = op.endswith("-inline")  # a small instance kept in the index, not in a file
    early = op.endswith("-early")
    op = op.removesuffix("-inline").removesuffix("-early")
    async with open_store(
        tmp_path, file_ops=ops, reserve_bytes=0, inline_max_bytes=1 << 20 if inline else 0
    ) as store:
        [kept] = await commit(store)
        ops.fail[op] = err
        if early:
            ops.once.add(op)
        temp = write_temp(store)
        sync = store.start_sync(temp, temp.stat().st_size) if early else None
        assert (sync is not None) == early
        with pytest.raises(StoreFull):
            await store.commit_instance(temp, header(), "CT", [PACS, AI], sync=sync)
        assert not temp.exists()
        items, _ = await store.list_items(ItemFilter())
        assert [i.id for i in items] == [kept]
        assert_consistent(store, items)
        # space returns: commits work again
        ops.fail.pop(op, None)
        assert len(await commit(store, [PACS, AI])) == 2
    async with open_store(tmp_path, reserve_bytes=0) as store:
        r = store.recovery_report
        assert (r.orphans, r.missing, r.incoming_removed) == ((), (), 0)
        assert (await store.counts()).total == 3


async def test_min_free_space_refuses_before_writing(tmp_path: Path) -> None:
    ops = FaultyOps()
    async with open_store(tmp_path, file_ops=ops, min_free_space_percent=10) as store:
        store.check_admission()
        ops.free_percent = 9.5
        with pytest.raises(StoreFull, match="below minimum"):
            store.check_admission()
        temp = write_temp(store)
        with pytest.raises(StoreFull):
            await store.commit_instance(temp, header(), "CT", [PACS])
        assert not temp.exists() and spool_files(tmp_path) == set()
        ops.free_percent = 11
        await commit(store)


@pytest.fixture(params=["tmpfs", "fault-injection"])
def small_fs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, bool]]:
    """A 16 MB tmpfs if we may mount one, else a plain directory (fault-injection fallback)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if request.param == "fault-injection":
        yield mnt, False
        return
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        yield mnt, False
        return
    try:
        yield mnt, True
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)


async def test_disk_full_refuses_loses_nothing_and_recovers(small_fs: tuple[Path, bool]) -> None:
    mnt, mounted = small_fs
    root = mnt / "cache"
    ops = FaultyOps()
    acked: dict[int, bytes] = {}
    refusals: list[str] = []

    async def attempt(store: Store, size: int, *, ballast: Path | None = None) -> bool:
        data = os.urandom(size)
        temp = store.new_incoming_path()
        try:  # the acceptor's own write may hit ENOSPC: it answers 0xA700 itself
            temp.write_bytes(data)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            await store.discard_incoming(temp)
            refusals.append("acceptor")
            return False
        if ballast is not None:  # something else fills the disk meanwhile
            fill(ballast)
        try:
            ids = await store.commit_instance(temp, header(), "CT", [PACS, AI])
        except StoreFull as exc:
            refusals.append(str(exc))
            return False
        for i in ids:
            acked[i] = data
        return True

    async def check(store: Store) -> list:  # type: ignore[type-arg]
        items, _ = await store.list_items(ItemFilter(), limit=10_000)
        assert {i.id for i in items} == set(acked)
        assert all([await content(store, i) == acked[i.id] for i in items])
        assert_consistent(store, items)
        return items

    async with open_store(
        root, file_ops=ops, reserve_bytes=1 << 20, min_free_space_percent=25
    ) as store:
        # 1. the configured minimum refuses first
        if not mounted:
            ops.free_percent = 20
        for _ in range(200):
            if not await attempt(store, 100_000):
                break
        assert refusals and "below minimum" in refusals[-1], refusals
        await check(store)

        # 2. no minimum configured, and the disk fills up under us: the index write fails
        store.min_free_space_percent = 0
        ballast = mnt / "ballast"
        for n in range(400):
            if not mounted and n == 20:
                ops.fail.update(index=errno.ENOSPC)
            if not await attempt(store, 2_000, ballast=ballast if mounted else None):
                if refusals[-1] != "acceptor":
                    break
                ballast.unlink()  # let the acceptor write its file, then fill again
        assert "disk" in refusals[-1], refusals[-3:]
        print(
            "disk-full refusals:",
            len(refusals),
            refusals[0],
            "|",
            refusals[-1],
            "| mounted:",
            mounted,
        )
        assert not store.accepting or not mounted
        items = await check(store)

        # 3. deliveries keep working on the full disk (the reserve) and free space...
        await store.delivered([i.id for i in items if i.destination_ae == "PACS"])
        await store.delivered([i.id for i in items if i.destination_ae == "AI"][::2])
        for i in [i.id for i in items if i.destination_ae == "PACS"]:
            del acked[i]
        for i in [i.id for i in items if i.destination_ae == "AI"][::2]:
            del acked[i]
        await check(store)
        # ...and once space returns, instances are accepted again
        ballast.unlink(missing_ok=True)
        ops.fail.clear()
        assert await attempt(store, 50_000)
        assert store.accepting
        await check(store)
    async with open_store(root, reserve_bytes=1 << 20) as store:
        r = store.recovery_report
        assert (r.orphans, r.missing, r.incoming_removed) == ((), (), 0)
        await check(store)


def fill(path: Path) -> None:
    """Write to `path` until the file system says ENOSPC."""
    chunk = b"\0" * 65536
    with open(path, "ab", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
