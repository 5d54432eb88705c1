"""Shared fixtures of the soak harness: destinations on our own acceptor and a router subprocess
whose memory is sampled while it runs."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from capacitor_trio.dicom.acceptor import AcceptorConfig
from capacitor_trio.dicom.listener import serve_acceptor
from tests.helpers.peers import RouterProcess
from tests.helpers.sinks import CountingSink
from tests.helpers.soak import RssSampler


async def start_sinks(
    nursery: trio.Nursery, root: Path, names: tuple[str, ...]
) -> tuple[dict[str, CountingSink], dict[str, int]]:
    sinks, ports = {}, {}
    for name in names:
        sinks[name] = CountingSink(root / name)
        ports[name] = await nursery.start(
            serve_acceptor, AcceptorConfig(ae_title=name, host="127.0.0.1", port=0), sinks[name]
        )
    return sinks, ports


@pytest.fixture(autouse=True)
def collect_sockets() -> Iterator[None]:
    """pynetdicom leaves sockets of broken associations to the garbage collector: collect them
    while the test's warning filters still apply."""
    yield
    gc.collect()


@pytest.fixture
def rss(nursery: trio.Nursery) -> RssSampler:
    return RssSampler()


@pytest.fixture
async def router_factory(
    nursery: trio.Nursery, rss: RssSampler
) -> AsyncIterator[list[RouterProcess]]:
    """A list to put RouterProcess objects in: the newest one's memory is sampled, and all are
    killed and reaped at the end."""
    routers: list[RouterProcess] = []

    def pid() -> int | None:
        if routers and routers[-1].proc is not None and routers[-1].proc.returncode is None:
            return routers[-1].proc.pid
        return None

    nursery.start_soon(rss.run, pid)
    try:
        yield routers
    finally:
        for r in routers:
            await r.aclose()
