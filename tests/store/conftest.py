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
    async with open_store(tmp_path / "cache", durable=False, clock=clock) as s:
        yield s
