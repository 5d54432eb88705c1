"""Crash cycles: modalities stream to `capacitor-trio run` for three destinations while the harness
kills the router with SIGKILL at random moments and restarts it, again and again.

Every instance that got a success status must reach its destination; at the end the queue is
empty. Duplicates are counted and must be explained: a destination can see an instance twice only
when (a) the router was killed after committing it but before its answer reached the modality,
which then sent it again (each resend counts once), or (b) a batch was in flight on a node when the
router died (at most `batchSize` per node per kill).
"""

from __future__ import annotations

import functools
import gc
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from capacitor_trio.store import open_store
from tests.helpers.peers import Counter, RouterProcess, free_port
from tests.helpers.soak import Gate, RssSampler, Sender, queue_stats, series_of, write_router_config

from .conftest import start_sinks

pytestmark = [
    pytest.mark.soak,
    pytest.mark.timeout(3600),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

NODES = ("DEST1", "DEST2", "DEST3")
BATCH = 10


async def wait_queue_empty(router: RouterProcess, base: str) -> dict[str, Any]:
    """Ask the API until nothing is queued or checked out; between asks, wait for the router to
    report a delivery (or a second: the API's counts may be a quarter second stale)."""
    while True:
        stats = await queue_stats(base)
        if stats["total"] == 0 and stats["checkedOut"] == 0:
            return stats
        seen = len(router.lines)
        with trio.move_on_after(1):
            await router.wait_for_line(
                lambda line, seen=seen: len(router.lines) > seen and "delivered" in line
            )


async def test_sigkill_cycles_lose_nothing(
    tmp_path: Path, nursery: trio.Nursery, soak: bool, figures: dict[str, Any],
    router_factory: list[RouterProcess], rss: RssSampler,
) -> None:
    cycles, per_node = (60, 7000) if soak else (4, 100)
    rng = random.Random(7)
    started = time.monotonic()
    sinks, ports = await start_sinks(nursery, tmp_path / "dest", NODES)
    data = tmp_path / "data"
    scp_port, api_port = free_port(), free_port()
    write_router_config(data, scp_port, ports, api_port=api_port, extra=f"batchSize: {BATCH}\n")
    base = f"http://127.0.0.1:{api_port}"

    gate = Gate()
    acked = Counter()
    router = RouterProcess(data)
    router_factory.append(router)
    await router.start(nursery, timeout=120)
    gate.open()
    # 16x16 images are kept in the index, 140x140 (39 KB) ones get spool files
    senders = [
        Sender(scp_port, ae, series_of(per_node, patient=ae, rows=(16, 16, 140)), gate, acked)
        for ae in NODES
    ]
    finished = trio.Event()

    async def run_senders() -> None:
        try:
            async with trio.open_nursery() as n:
                for s in senders:
                    n.start_soon(functools.partial(trio.to_thread.run_sync, s.run,
                                                   abandon_on_cancel=True))
        finally:
            finished.set()

    nursery.start_soon(run_senders)
    total = per_node * len(NODES)
    kills = 0
    try:
        for cycle in range(cycles):
            target = total * (cycle + 1) // (cycles + 1)
            with trio.fail_after(600):
                await acked.wait_until(lambda t=target: acked.value >= t or finished.is_set())
            assert not finished.is_set(), [s.error for s in senders]
            await trio.sleep(rng.uniform(0, 0.3))  # the fault script: kill at a random moment
            gate.shut()
            router.signal(signal.SIGKILL)
            assert await router.wait(timeout=60) == -signal.SIGKILL
            kills += 1
            await router.start(nursery, timeout=120)
            gate.open()
        with trio.fail_after(900):
            await finished.wait()
    finally:
        for s in senders:
            s.stop.set()
        gate.close()
        gc.collect()  # pynetdicom's sockets of broken associations: closed here, under the filter
    assert [s.error for s in senders] == [None] * len(senders)
    expected = {ae: set(s.acked) for ae, s in zip(NODES, senders, strict=True)}
    assert all(len(expected[ae]) == per_node for ae in NODES)

    with trio.fail_after(600):
        for ae, sink in sinks.items():
            await sink.count.wait_until(lambda s=sink, a=ae: expected[a] <= set(s.received))
        stats = await wait_queue_empty(router, base)
    router.signal(signal.SIGTERM)
    assert await router.wait(timeout=60) == 0
    async with open_store(data / "cache") as store:
        counts = await store.counts()
    assert (counts.total, counts.checked_out) == (0, 0), counts

    lost = sum(len(expected[ae] - set(sinks[ae].received)) for ae in NODES)
    duplicates = {ae: sinks[ae].duplicates() for ae in NODES}
    resent = {ae: s.resent() for ae, s in zip(NODES, senders, strict=True)}
    for ae, s in zip(NODES, senders, strict=True):
        assert set(sinks[ae].received) <= set(s.attempts)  # nothing foreign
        # (a) an acknowledgement lost in a kill, then a resend; (b) a batch in flight at a kill
        assert duplicates[ae] <= resent[ae] + kills * BATCH, (ae, duplicates[ae], resent[ae])
    assert lost == 0
    assert {ae: sinks[ae].corrupt for ae in NODES} == {ae: [] for ae in NODES}  # bytes as sent
    figures["crash cycles (SIGKILL + restart)"] = kills
    figures["crash: instances acknowledged"] = sum(len(v) for v in expected.values())
    figures["crash: delivered (distinct instance x destination)"] = sum(
        len(s.received) for s in sinks.values())
    figures["crash: lost"] = lost
    figures["crash: duplicates at destinations"] = sum(duplicates.values())
    figures["crash: resends by the modality (answer lost in a kill)"] = sum(resent.values())
    figures["crash: queue at the end"] = stats
    figures["crash: router peak RSS (MB)"] = round(rss.peak / 2**20, 1)
    figures["crash: wall time (s)"] = round(time.monotonic() - started, 1)
