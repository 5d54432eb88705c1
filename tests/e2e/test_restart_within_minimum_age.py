"""A restart soon after instances arrived: the ones still `new` (younger than `minimumAge` when
the router stopped) are prepared and delivered by the next run without any further arrival."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from capacitor_trio.config import load_settings
from capacitor_trio.dicom.acceptor import AcceptorConfig
from capacitor_trio.dicom.listener import serve_acceptor
from capacitor_trio.runtime import run_router
from tests.helpers.datasets import write_corpus
from tests.helpers.peers import free_port, needs_dcmtk, path_uid, storescu
from tests.helpers.sinks import CountingSink

pytestmark = [needs_dcmtk, pytest.mark.timeout(60)]


async def test_items_still_new_at_a_restart_are_delivered(tmp_path: Path, nursery: trio.Nursery) -> None:
    sink = CountingSink(tmp_path / "DEST")
    port = await nursery.start(
        serve_acceptor, AcceptorConfig(ae_title="DEST", host="127.0.0.1", port=0), sink
    )
    data = tmp_path / "data"
    data.mkdir()
    scp_port = free_port()

    def config(minimum_age: int) -> None:
        (data / "config.yml").write_text(
            f"scpPort: {scp_port}\nminimumAge: {minimum_age}\nstorageInterval: 0\n"
            "deliveryProcess: false\n"
        )

    config(30)  # the first run stops long before anything is ripe, however slow the machine
    (data / "nodes.yml").write_text(f"- AeTitle: DEST\n  Port: {port}\n")
    files = write_corpus(tmp_path / "in", 5)
    with trio.CancelScope() as first_run:
        async with trio.open_nursery() as run:
            router = await run.start(run_router, load_settings(data, environ={}))
            await storescu(scp_port, "DEST", files)
            assert (await router.store.counts()).new == 5
            first_run.cancel()  # stopped (as by SIGTERM) before the instances are ripe
    assert not sink.received
    config(2)  # the next run finds them new and (on any but a very slow machine) not yet ripe
    async with trio.open_nursery() as run:
        router = await run.start(run_router, load_settings(data, environ={}))
        with trio.fail_after(20):  # ripe at the latest minimumAge after the start
            await sink.count.wait_until(lambda: len(sink.received) == 5)
        assert set(sink.received) == {path_uid(p) for p in files}
        run.cancel_scope.cancel()
