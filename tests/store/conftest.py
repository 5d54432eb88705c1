from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from capacitor_trio.store import Store, open_store

from .util import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000_000.0)


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    """A store that keeps every instance in a spool file (the unit tests of files)."""
    async with open_store(tmp_path / "cache", durable=False, clock=clock, inline_max_bytes=0) as s:
        yield s


@pytest.fixture
async def inline_store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    """A store with the default size limit below which instances are kept in the index."""
    async with open_store(tmp_path / "cache", durable=False, clock=clock) as s:
        yield s


@pytest.fixture
def leases(tmp_path: Path) -> None:
    """Reuse needs file leases (spares._take_lease); where the file system or the settings
    refuse them, nothing is reused (test_without_leases_nothing_is_reused) and these tests
    have nothing to check."""
    from capacitor_trio.store.spares import _take_lease

    probe = tmp_path / "lease-probe"
    probe.write_bytes(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        _take_lease(fd)
    except OSError as exc:
        pytest.skip(f"file leases not available here: {exc}")
    finally:
        os.close(fd)
        probe.unlink()
