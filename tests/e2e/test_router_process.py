"""End to end with real processes: `capacitor-trio run` as a subprocess between DCMTK and
pynetdicom peers. Everything arrives byte-identical; a destination that is down for a while gets
everything once it is back; SIGTERM mid-stream and a restart lose nothing acknowledged."""

from __future__ import annotations

import gc
import signal
from pathlib import Path

import pytest
import trio

from tests.helpers.datasets import write_corpus
from tests.helpers.peers import (
    CountingStorescp,
    PynetdicomDestination,
    RouterProcess,
    dataset_bytes,
    free_port,
    needs_dcmtk,
    path_uid,
    pynetdicom_send,
    storescu,
)
from tests.helpers.router_files import write_router_files

# pynetdicom leaves a socket behind when the router goes away under its association
pytestmark = [
    needs_dcmtk,
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


async def test_router_end_to_end(tmp_path: Path, nursery: trio.Nursery) -> None:
    storescp = CountingStorescp(tmp_path / "storescp")
    dcmtk_port = await nursery.start(storescp.serve)
    pydest = PynetdicomDestination("PYDEST")
    py_port = pydest.start()
    router = RouterProcess(tmp_path / "data")
    try:
        scp_port = free_port()
        write_router_files(
            tmp_path / "data", scp_port,
            f"- AeTitle: STORESCP\n  Port: {dcmtk_port}\n  Aliases: [ARCHIVE]\n"
            f"- AeTitle: PYDEST\n  Port: {py_port}\n  BatchSize: 20\n",
        )
        await router.start(nursery)

        # 1. DCMTK storescu under two called AEs: an alias and the DCP_ prefix form; 50 KB
        #    images (spool files) to one, 8 KB images (kept in the index) to the other
        a = write_corpus(tmp_path / "a", 150, rows=160)
        b = write_corpus(tmp_path / "b", 150)
        async with trio.open_nursery() as senders:
            senders.start_soon(storescu, scp_port, "ARCHIVE", a)
            senders.start_soon(storescu, scp_port, "DCP_PYDEST", b)
        with trio.fail_after(60):
            await storescp.count.wait_for(150)
            await pydest.count.wait_for(150)
        stored = storescp.stored()
        for path in a:
            uid = path_uid(path)
            assert dataset_bytes(stored[uid]) == dataset_bytes(path)
        for path in b:
            assert pydest.received[path_uid(path)] == dataset_bytes(path)

        # 2. PYDEST goes down for a while; what is sent meanwhile arrives once it is back
        pydest.stop()
        c = write_corpus(tmp_path / "c", 30)
        await storescu(scp_port, "PYDEST", c)
        with trio.fail_after(30):
            await router.wait_for_line(lambda line: "PYDEST: delivery failed" in line)
        pydest = restart_destination(pydest, py_port)
        with trio.fail_after(60):
            await pydest.count.wait_for(150 + 30)
        assert {path_uid(p) for p in c} <= set(pydest.received)

        # 3. SIGTERM mid-stream, restart: every acknowledged instance is delivered
        d = write_corpus(tmp_path / "d", 200)
        acked: list[str] = []
        async with trio.open_nursery() as inner:
            inner.start_soon(trio.to_thread.run_sync, pynetdicom_send, scp_port, "PYDEST", d, acked, 3.0)
            with trio.fail_after(60):
                await pydest.count.wait_for(180 + 20)
            router.signal(signal.SIGTERM)
            assert await router.wait() == 0
        first_log = router.log()
        assert 0 < len(acked) < 200, len(acked)
        await router.start(nursery)
        with trio.move_on_after(60):
            await pydest.count.wait_until(lambda: set(acked) <= set(pydest.received))
        missing = set(acked) - set(pydest.received)
        assert not missing, (missing, router.log(), first_log)
        assert set(acked) <= set(pydest.received)
        for path in d:
            uid = path_uid(path)
            if uid in acked:
                assert pydest.received[uid] == dataset_bytes(path)
        router.signal(signal.SIGTERM)
        assert await router.wait() == 0
    finally:
        pydest.stop()
        await router.aclose()
        gc.collect()  # surface pynetdicom's leaked socket here, where the filter above applies


def restart_destination(old: PynetdicomDestination, port: int) -> PynetdicomDestination:
    new = PynetdicomDestination(old.ae_title, port)
    new.received = old.received
    new.count = old.count
    new.duplicates = old.duplicates
    new.start()
    return new

