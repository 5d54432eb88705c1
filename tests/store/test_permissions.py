"""The cache directory and the data directory are their owner's only (issue 19 #10): 0700
directories and 0600 files whatever the umask, a cache directory others could tamper with is
refused, and no file in it is opened through a symbolic link."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from capacitor_trio import cli
from capacitor_trio.config import ensure_data_dir
from capacitor_trio.store import open_store
from capacitor_trio.store.fsops import UnsafePath
from capacitor_trio.store.spares import _emptied

from .util import PACS, FakeClock, header, spool_files

pytestmark = pytest.mark.usefixtures("open_umask")


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 000: whatever is not asked for 0700/0600 comes out open to everyone."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_everything_the_store_creates_is_the_owners_only(tmp_path: Path) -> None:
    root = tmp_path / "data" / "cache"
    async with open_store(root, durable=False, clock=FakeClock(1e6), inline_max_bytes=0) as store:
        for size in (100, 50):  # bytes received in memory, too large for the index: spool files
            await store.commit_instance(None, header(), "MODALITY", [PACS], data=b"DICM" * size)
        files = [p for p in root.rglob("*") if p.is_file()]
        dirs = [root, *(p for p in root.rglob("*") if p.is_dir())]
        assert {p.name for p in files} >= {"index.db", "index.db-wal", "index.db-shm", "lock", "reserve"}
        assert len(spool_files(root)) == 2
        assert {str(p): mode(p) for p in files} == {str(p): 0o600 for p in files}
        assert {str(p): mode(p) for p in dirs} == {str(p): 0o700 for p in dirs}


async def test_an_existing_cache_directory_open_to_others_is_closed(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir(mode=0o755)
    async with open_store(root, durable=False, clock=FakeClock(1e6)):
        assert mode(root) == 0o700


async def test_a_cache_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir(mode=0o777)
    with pytest.raises(UnsafePath, match="writable by other users"):
        async with open_store(root, durable=False, clock=FakeClock(1e6)):
            pass
    assert not (root / "index.db").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user's needs root")
async def test_a_cache_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    with pytest.raises(UnsafePath, match="belongs to uid 65534"):
        async with open_store(root, durable=False, clock=FakeClock(1e6)):
            pass


@pytest.mark.parametrize("name", ["lock", "index.db", "index.db-wal"])
async def test_a_symbolic_link_in_the_cache_is_not_followed(tmp_path: Path, name: str) -> None:
    """A symlinked cache/lock (or index) used to make the router write into its target."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    (root / name).symlink_to(victim)
    with pytest.raises(UnsafePath, match="symbolic link"):
        async with open_store(root, durable=False, clock=FakeClock(1e6)):
            pass
    assert victim.read_bytes() == b"precious\n"


def test_a_retired_file_replaced_by_a_link_is_not_truncated(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    link = tmp_path / "retired-x.dcm"
    link.symlink_to(victim)
    assert _emptied(link) is False
    assert victim.read_bytes() == b"precious\n"


def test_first_start_writes_a_private_configuration(tmp_path: Path) -> None:
    data = tmp_path / "new"
    assert ensure_data_dir(data)
    assert mode(data) == 0o700
    assert mode(data / "config.yml") == 0o600 and mode(data / "nodes.yml") == 0o600


def test_first_start_does_not_write_through_a_dangling_link(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "nodes.yml").write_text("[]\n")
    (data / "config.yml").symlink_to(tmp_path / "elsewhere.yml")
    ensure_data_dir(data)
    assert not (tmp_path / "elsewhere.yml").exists()


def test_run_refuses_an_unsafe_cache_directory_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d"
    ensure_data_dir(data)
    (data / "cache").mkdir(mode=0o777)
    assert cli.main(["run", "--path", str(data), "--config.scpPort=0"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "writable by other users" in err[0], err
