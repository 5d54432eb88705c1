"""`GET /metrics` (Prometheus) and `GET /api/metrics` read the same counters: after a known
sequence of sends through the router between real peers (DCMTK's storescu in, pynetdicom SCPs
out: one that stores, one that refuses with 0xC000, one out of resources with 0xA700, one nobody
listens for), every series has the value the sequence implies, parsed with prometheus-client's
own parser. Actor restarts are counted from the supervisor (chaos kills)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE, AllStoragePresentationContexts, evt

from capacitor_trio.config.models import ChaosConfig, Node
from tests.helpers.datasets import write_corpus
from tests.helpers.peers import needs_dcmtk, storescu

from .conftest import AUTH, StartRouter, StorageScp, dead_node, free_port, pacs

pytestmark = needs_dcmtk


class StatusScp:
    """A pynetdicom storage SCP answering every C-STORE with `status`."""

    def __init__(self, ae_title: str, status: int) -> None:
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda _e: status)]
        )
        self.port = int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample: (name, its labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(client: Any) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return parse(resp.text)


async def test_metrics_after_sends_failures_and_refusals(
    start_router: StartRouter, scp: StorageScp, tmp_path: Path
) -> None:
    refusing, busy = StatusScp("REJ", 0xC000), StatusScp("BUSY", 0xA700)
    try:
        # BatchSize 10: the three instances (three series) in one association per node
        nodes = (
            pacs(scp, batch_size=10), Node("REJ", host_name="127.0.0.1", port=refusing.port, batch_size=10),
            Node("BUSY", host_name="127.0.0.1", port=busy.port, batch_size=10), dead_node(batch_size=10),
        )
        r = await start_router(nodes, scp_port=free_port(), delivery_process=False)
        files = write_corpus(tmp_path / "corpus", 3)
        # everything received first, so that each node sends its three in one association
        assert (await r.client.post("/api/service/pause", headers=AUTH)).status_code == 200
        for called in ("PACS", "REJ", "BUSY", "DEAD"):
            await storescu(r.router.dicom_port, called, files)
        assert (await r.client.post("/api/service/resume", headers=AUTH)).status_code == 200
        with trio.fail_after(30):
            while True:
                counts = await r.client.get("/api/queue/stats")
                by = counts.json()["byState"]
                if by["rejected"] == 3 and by["failed"] == 6 and counts.json()["total"] == 9:
                    break
                await trio.sleep(0.05)
        m = await scrape(r.client)
    finally:
        refusing.close()
        busy.close()

    storage = {"role": "Storage"}
    # intake
    assert value(m, "capacitor_intake_associations_total") == 4
    assert value(m, "capacitor_intake_instances_total") == 12
    received_bytes = value(m, "capacitor_intake_bytes_total") or 0
    assert received_bytes > 0 and received_bytes % 4 == 0  # the same three files to each AE
    size = received_bytes / 4
    assert value(m, "capacitor_intake_commit_duration_seconds_count") == 12
    assert value(m, "capacitor_intake_admission_refusals_total", reason="free_space") is None  # none refused
    assert 0 < (value(m, "capacitor_intake_free_space_percent") or 0) <= 100
    assert value(m, "capacitor_intake_min_free_space_percent") == r.router.settings.config.min_free_space
    # per node: deliveries
    assert value(m, "capacitor_node_delivered_instances_total", node="PACS", **storage) == 3
    assert value(m, "capacitor_node_delivered_bytes_total", node="PACS", **storage) == size
    assert (value(m, "capacitor_node_send_duration_seconds_count", node="PACS", **storage) or 0) >= 1
    # failures by outcome and DIMSE status class; association errors by kind
    fail = "capacitor_node_failures_total"
    assert value(m, fail, node="REJ", outcome="rejected", status_class="cannot_understand", **storage) == 3
    assert value(m, fail, node="BUSY", outcome="retry_later", status_class="out_of_resources", **storage) == 3
    assert value(m, fail, node="DEAD", outcome="retry_later", status_class="none", **storage) == 3
    assert value(m, "capacitor_node_association_errors_total", node="DEAD", kind="connect", **storage) == 1
    assert value(m, "capacitor_node_association_errors_total", node="BUSY", kind="connect", **storage) is None
    # gauges from the store and the supervisor
    items = "capacitor_node_items"
    assert value(m, items, node="REJ", state="rejected", **storage) == 3
    assert value(m, items, node="BUSY", state="failed", **storage) == 3
    assert value(m, items, node="PACS", state="new", **storage) == 0
    assert value(m, "capacitor_node_checked_out", node="PACS", **storage) == 0
    assert (value(m, "capacitor_node_oldest_waiting_age_seconds", node="DEAD", **storage) or -1) >= 0
    assert value(m, "capacitor_node_oldest_waiting_age_seconds", node="PACS", **storage) == 0
    assert value(m, "capacitor_node_paused", node="PACS", **storage) == 0
    assert value(m, "capacitor_node_in_window", node="PACS", **storage) == 1
    assert value(m, "capacitor_node_actor_restarts_total", node="PACS", **storage) == 0
    # the library's process collectors
    assert value(m, "process_cpu_seconds_total") is not None
    assert value(m, "python_info", **_python_info(m)) == 1
    # /api/metrics reads the same counter, its shape unchanged
    data = (await r.client.get("/api/metrics")).json()["data"]
    assert data["received"] == 12
    assert set(data) == {"totalItems", "byState", "checkedOut", "received", "service", "loop", "transcoding"}


def _python_info(m: Samples) -> dict[str, str]:
    return next(dict(labels) for name, labels in m if name == "python_info")


async def test_pausing_shows_in_the_gauge(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),))
    resp = await r.client.post("/api/nodes/PACS/pause", headers=AUTH)
    assert resp.status_code == 200
    m = await scrape(r.client)
    assert value(m, "capacitor_node_paused", node="PACS", role="Storage") == 1


async def test_actor_restarts_are_counted(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),), chaos=ChaosConfig(kill_node_actors_every_seconds=0.05))
    with trio.fail_after(20):
        while True:
            sup = r.router.supervisor
            if sup.snapshot(sup.handles[0]).restarts >= 3:
                break
            await trio.sleep(0.02)
    m = await scrape(r.client)
    restarts = value(m, "capacitor_node_actor_restarts_total", node="PACS", role="Storage") or 0
    node = (await r.client.get("/api/nodes/PACS")).json()["data"]
    assert restarts >= 3 and node["restarts"] >= restarts  # the supervisor's one count, read twice


async def test_two_routers_in_one_process_keep_their_own_counters(
    start_router: StartRouter, scp: StorageScp, tmp_path: Path
) -> None:
    a = await start_router((pacs(scp),), scp_port=free_port(), delivery_process=False)
    b = await start_router((pacs(scp),), scp_port=free_port(), delivery_process=False)
    await storescu(a.router.dicom_port, "PACS", write_corpus(tmp_path / "one", 2))
    assert value(await scrape(a.client), "capacitor_intake_instances_total") == 2
    assert value(await scrape(b.client), "capacitor_intake_instances_total") == 0
