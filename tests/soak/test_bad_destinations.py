"""Misbehaving destinations: one router (in-process), one node per kind of misbehaviour, each a
scripted fake peer on our own acceptor, plus a healthy node.

| node     | the destination ...                              | expected                          |
|----------|--------------------------------------------------|-----------------------------------|
| REFUSE   | rejects every association (transient, busy)      | items stay queued (failed), the   |
|          |                                                  | node backs off: few connections   |
| REJECTAE | rejects every association (permanent)            | every item rejected, one batch    |
|          |                                                  | per backoff                       |
| BUSY     | answers 0xA700 to the first images, then accepts | everything delivered (retried)    |
| C000     | answers 0xC001 (cannot understand) to MR images  | MR rejected, CT delivered         |
| ABORT    | aborts twice in the middle of a data set         | everything delivered (retried)    |
| STALL    | goes silent in the middle of a data set          | stall detected, then delivered    |
| TRICKLE  | reads very slowly on its first association       | line speed aborts, then delivered |
| CLOSE    | closes the socket after 3 images, every time     | everything delivered, in pieces   |
| OK       | behaves                                          | delivered, never failed           |
"""

from __future__ import annotations

import functools
import gc
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from capacitor_trio.config import load_settings
from capacitor_trio.domain.instance import Destination
from capacitor_trio.runtime import run_router
from tests.helpers.peers import free_port
from tests.helpers.sinks import CountingSink, FakePeer, Script
from tests.helpers.soak import Gate, LogWatch, Sender, pixel_digest, series_of, write_router_config

from .conftest import start_sinks

pytestmark = [
    pytest.mark.soak,
    pytest.mark.timeout(3600),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

RETRY_BASE, RETRY_CAP = 1, 4


def big_images(n: int, side: int = 1024) -> Iterator[Dataset]:
    """2 MB images: enough to fill the socket buffers of a slow reader."""
    for ds in series_of(n, per_series=n, rows=8, patient="TRICKLE"):
        ds.Rows = ds.Columns = side
        ds.PixelData = bytes(side * side * 2)
        ds.ImageComments = pixel_digest(ds.PixelData)
        yield ds


def max_attempts(seconds: float) -> int:
    """The most connection attempts a backing-off node can make in `seconds`: delays of at least
    90 % of 1, 2, 4, 4, ... seconds (retryDelaySeconds 1, retryMaxDelaySeconds 4, ±10 % jitter)."""
    attempts, t, k = 1, 0.0, 0
    while True:
        t += 0.9 * min(RETRY_BASE * 2**k, RETRY_CAP)
        k += 1
        if t > seconds:
            return attempts
        attempts += 1


async def test_misbehaving_destinations(
    tmp_path: Path, nursery: trio.Nursery, soak: bool, figures: dict[str, Any],
) -> None:
    n = 200 if soak else 20
    n_big = 16 if soak else 12
    scripts = {
        "REFUSE": Script(refuse=lambda _c: "transient"),
        "REJECTAE": Script(refuse=lambda _c: "permanent"),
        "BUSY": Script(status=lambda i, _cls: 0xA700 if i <= 5 else 0x0000),
        "C000": Script(status=lambda _i, cls: 0xC001 if cls == MRImageStorage else 0x0000),
        "ABORT": Script(after_bytes=lambda c: (800, "abort") if c <= 2 else None),
        "STALL": Script(after_bytes=lambda c: (800, "silent") if c == 1 else None),
        "TRICKLE": Script(trickle=lambda c: 40_000 if c == 1 else None),
        "CLOSE": Script(close_after=lambda _c: 3),
    }
    peers = {ae: FakePeer(tmp_path / ae, ae, s, rcvbuf=16384 if ae == "TRICKLE" else 0)
             for ae, s in scripts.items()}
    ports = {ae: await nursery.start(p.serve) for ae, p in peers.items()}
    ok_sinks, ok_ports = await start_sinks(nursery, tmp_path / "dest", ("OK",))
    ports.update(ok_ports)
    sinks: dict[str, CountingSink] = {ae: p.sink for ae, p in peers.items()} | ok_sinks
    data = tmp_path / "data"
    scp_port = free_port()
    write_router_config(
        data, scp_port, ports, retry_max=RETRY_CAP, extra="batchSize: 5\n",
        node_extra={"STALL": "  StallThreshold: 2\n", "TRICKLE": "  MinimumLineSpeed: 4000\n"},
    )
    with LogWatch() as logs:
        router = await nursery.start(run_router, load_settings(data, environ={}))
        started = trio.current_time()
        wall = time.monotonic()
        gate = Gate()
        gate.open()
        traffic = {ae: series_of(n, per_series=5, patient=ae) for ae in scripts}
        traffic["C000"] = itertools.chain(series_of(n // 2, per_series=5, patient="CT"),
                                          series_of(n - n // 2, per_series=5, patient="MR",
                                                    sop_class=MRImageStorage))
        traffic["TRICKLE"] = big_images(n_big)
        traffic["OK"] = series_of(2 * n, per_series=5, patient="OK")
        senders = {ae: Sender(scp_port, ae, it, gate) for ae, it in traffic.items()}
        try:
            async with trio.open_nursery() as sending:
                for s in senders.values():
                    sending.start_soon(functools.partial(trio.to_thread.run_sync, s.run,
                                                         abandon_on_cancel=True))
        finally:
            for s in senders.values():
                s.stop.set()
            gate.close()
            gc.collect()
        assert {ae: s.error for ae, s in senders.items()} == dict.fromkeys(senders)
        acked = {ae: set(s.acked) for ae, s in senders.items()}
        assert {ae: len(v) for ae, v in acked.items()} == {
            ae: n_big if ae == "TRICKLE" else 2 * n if ae == "OK" else n for ae in senders}
        ok_done_at = None
        with trio.fail_after(600):
            await sinks["OK"].count.wait_until(lambda: acked["OK"] <= set(sinks["OK"].received))
            ok_done_at = trio.current_time() - started
            for ae in ("BUSY", "ABORT", "STALL", "TRICKLE", "CLOSE"):
                await sinks[ae].count.wait_until(lambda a=ae: acked[a] <= set(sinks[a].received))
            await sinks["C000"].count.wait_until(lambda: len(sinks["C000"].received) == n // 2)
            # every delivery recorded (the sink has an instance a moment before the router knows)
            expected_deliveries = n // 2 + sum(
                len(acked[ae]) for ae in ("BUSY", "ABORT", "STALL", "TRICKLE", "CLOSE", "OK"))
            await router.supervisor.ctx.delivered_count.wait_value(
                lambda v: v >= expected_deliveries)
            await logs.changed.wait_until(
                lambda: logs.count("node C000 rejected") >= n - n // 2
                and logs.count("node REJECTAE rejected") >= n
            )
        elapsed = trio.current_time() - started
        store = router.store
        counts = {ae: await store.counts(Destination(ae)) for ae in senders}
        refuse_connections = len(peers["REFUSE"].connections)
        line_speed_aborts = logs.count("TRICKLE", "line speed")
        stalls = logs.count("STALL", "stalled")
        ok_failures = logs.count("node OK", "fail")

    # delivered, nothing left, for the ones that recover
    for ae in ("BUSY", "ABORT", "STALL", "TRICKLE", "CLOSE", "OK"):
        assert counts[ae].total == 0, (ae, counts[ae])
        assert acked[ae] <= set(sinks[ae].received), ae
    assert peers["BUSY"].statuses[0xA700] == 5
    assert peers["ABORT"].faults["abort"] == 2
    assert peers["STALL"].faults["silent"] == 1 and stalls >= 1
    assert line_speed_aborts >= 1 and len(peers["TRICKLE"].connections) >= 2
    assert peers["CLOSE"].faults["close"] >= 1
    # MR rejected, CT delivered
    assert counts["C000"].rejected == n - n // 2 and counts["C000"].total == n - n // 2
    assert peers["C000"].statuses[0xC001] == n - n // 2
    # permanent association rejection: rejected, no retries
    assert counts["REJECTAE"].rejected == n and counts["REJECTAE"].total == n
    # transient rejection: nothing lost, nothing delivered, and the node backs off
    assert counts["REFUSE"].total == n and counts["REFUSE"].rejected == 0
    assert counts["REFUSE"].failed >= 1
    assert len(sinks["REFUSE"].received) == 0
    assert refuse_connections <= max_attempts(elapsed) + 1, (refuse_connections, elapsed)
    # the healthy node never failed and was done long before the slowest scenario
    assert ok_failures == 0
    assert sinks["OK"].duplicates() == 0
    assert [u for sink in sinks.values() for u in sink.corrupt] == []  # bytes as sent
    figures["faults: scenarios passed"] = f"{len(scripts)} of {len(scripts)} (+ healthy node)"
    figures["faults: REFUSE connection attempts per minute"] = round(
        refuse_connections * 60 / elapsed, 1)
    figures["faults: healthy node done after (s)"] = round(ok_done_at, 1)
    figures["faults: wall time (s)"] = round(time.monotonic() - wall, 1)
