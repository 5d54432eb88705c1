"""Chaos on node actors, with traffic and the management API under watch: the router subprocess
kills a random node actor every `chaos.killNodeActorsEverySeconds` while modalities stream to three
destinations and a client keeps asking the API. Zero loss, zero stuck items, and no API request
takes a second or more."""

from __future__ import annotations

import functools
import gc
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.helpers.peers import Counter, RouterProcess, free_port
from tests.helpers.soak import ApiProber, Gate, RssSampler, Sender, series_of, write_router_config

from .conftest import start_sinks
from .test_crash_cycles import BATCH, NODES, wait_queue_empty

pytestmark = [
    pytest.mark.soak,
    pytest.mark.timeout(3600),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


async def test_chaos_on_actors_with_api_answering(
    tmp_path: Path, nursery: trio.Nursery, soak: bool, figures: dict[str, Any],
    router_factory: list[RouterProcess], rss: RssSampler,
) -> None:
    every, per_node, min_kills = (0.05, 1500, 200) if soak else (0.1, 150, 5)
    started = time.monotonic()
    sinks, ports = await start_sinks(nursery, tmp_path / "dest", NODES)
    data = tmp_path / "data"
    scp_port, api_port = free_port(), free_port()
    write_router_config(
        data, scp_port, ports, api_port=api_port,
        extra=f"batchSize: {BATCH}\nchaos:\n  killNodeActorsEverySeconds: {every}\n",
    )
    base = f"http://127.0.0.1:{api_port}"
    router = RouterProcess(data)
    router_factory.append(router)
    await router.start(nursery, timeout=120)
    kills = Counter()
    router_lines = len(router.lines)

    async def count_kills() -> None:
        seen = router_lines
        while True:
            await router.wait_for_line(lambda _line, seen=seen: len(router.lines) > seen)
            fresh, seen = router.lines[seen:], len(router.lines)
            kills.add(sum("actor killed by chaos" in line for line in fresh))

    prober = ApiProber(base)
    async with trio.open_nursery() as watch:
        watch.start_soon(count_kills)
        watch.start_soon(prober.run)
        gate = Gate()
        gate.open()
        senders = [Sender(scp_port, ae, series_of(per_node, patient=ae), gate) for ae in NODES]
        try:
            async with trio.open_nursery() as n:
                for s in senders:
                    n.start_soon(functools.partial(trio.to_thread.run_sync, s.run,
                                                   abandon_on_cancel=True))
        finally:
            for s in senders:
                s.stop.set()
            gate.close()
            gc.collect()
        assert [s.error for s in senders] == [None] * len(senders)
        expected = {ae: set(s.acked) for ae, s in zip(NODES, senders, strict=True)}
        with trio.fail_after(600):
            for ae, sink in sinks.items():
                await sink.count.wait_until(lambda s=sink, a=ae: expected[a] <= set(s.received))
            await kills.wait_until(lambda: kills.value >= min_kills)
            stats = await wait_queue_empty(router, base)
        async with httpx.AsyncClient(timeout=30) as client:
            nodes = await prober.get(client, "/api/nodes")
        watch.cancel_scope.cancel()

    lost = sum(len(expected[ae] - set(sinks[ae].received)) for ae in NODES)
    duplicates = sum(sink.duplicates() for sink in sinks.values())
    assert lost == 0
    assert [u for sink in sinks.values() for u in sink.corrupt] == []  # bytes as sent
    assert all(len(expected[ae]) == per_node for ae in NODES)
    assert prober.failures == []
    assert prober.slowest < 1.0, prober.slowest
    node_list = nodes.get("data", nodes)
    node_list = node_list.get("nodes", node_list) if isinstance(node_list, dict) else node_list
    assert all(n["status"] != "failed" for n in node_list), node_list
    assert stats["total"] == 0 and stats["checkedOut"] == 0
    # a kill can only repeat the batch in flight on the killed node
    assert duplicates <= kills.value * BATCH, (duplicates, kills.value)
    figures["chaos: actor kills survived"] = kills.value
    figures["chaos: instances acknowledged"] = sum(len(v) for v in expected.values())
    figures["chaos: lost"] = lost
    figures["chaos: stuck (queued or checked out at the end)"] = stats["total"] + stats["checkedOut"]
    figures["chaos: duplicates (batches in flight at a kill)"] = duplicates
    figures["chaos: API requests"] = prober.requests
    figures["chaos: slowest API request (s)"] = round(prober.slowest, 3)
    figures["chaos: router peak RSS (MB)"] = round(rss.peak / 2**20, 1)
    figures["chaos: wall time (s)"] = round(time.monotonic() - started, 1)
