from __future__ import annotations

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
