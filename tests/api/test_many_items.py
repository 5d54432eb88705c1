"""Listing, filtering and paging through 10,000 queued items."""

from __future__ import annotations

import time

from .conftest import AUTH, StartRouter, bulk_insert, dead_node
from .test_endpoints import data, error

N = 10_000


async def test_list_filter_and_page_through_10000_items(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"),))
    data(await r.client.post("/api/nodes/DEAD/pause", headers=AUTH))
    await bulk_insert(r.store, N, dest="DEAD")
    assert (await r.store.counts()).total == N

    first = data(await r.client.get("/api/queue/items", params={"limit": 1000}))
    assert first["total"] == N and len(first["items"]) == 1000

    # page through everything, 1000 at a time: every id once, in order
    seen: list[int] = []
    started = time.monotonic()
    for skip in range(0, N, 1000):
        page = data(await r.client.get("/api/queue/items", params={"skip": skip, "limit": 1000}))
        assert page["skip"] == skip and page["limit"] == 1000 and page["total"] == N
        seen += [i["id"] for i in page["items"]]
    assert seen == sorted(set(seen)) and len(seen) == N
    assert time.monotonic() - started < 30
    past = data(await r.client.get("/api/queue/items", params={"skip": N, "limit": 10}))
    assert past["items"] == [] and past["total"] == N

    # filters combine with AND; totals are exact
    failed = data(await r.client.get("/api/queue/items", params={"state": "failed", "limit": 100}))
    assert failed["total"] in (N // 4, N // 4 + 1)  # one extra: the real committed item
    assert {i["state"] for i in failed["items"]} == {"failed"}
    ct_a = data(await r.client.get("/api/queue/items", params={"modality": "CT", "source": "MOD_A"}))
    assert all(i["modality"] == "CT" and i["sourceAeTitle"] == "MOD_A" for i in ct_a["items"])
    both = data(await r.client.get("/api/queue/items", params={"modality": "CT", "state": "failed", "dest": "DEAD"}))
    assert both["total"] > 0 and all(i["state"] == "failed" and i["modality"] == "CT" for i in both["items"])
    none = data(await r.client.get("/api/queue/items", params={"modality": "CT", "state": "rejected"}))
    assert none["total"] == 0  # k % 4 ties modality and state: CT items are never rejected
    one = data(await r.client.get("/api/queue/items", params={"search": "ACC4321"}))
    assert one["total"] == 1 and one["items"][0]["accessionNumber"] == "ACC4321"
    study = data(await r.client.get("/api/queue/items", params={"search": "1.2.3.42.", "limit": 1000}))
    assert study["total"] == 100
    error(await r.client.get("/api/queue/items", params={"limit": 1001}), "BAD_REQUEST", 400)

    # counts everywhere agree
    m = data(await r.client.get("/api/metrics"))
    assert m["totalItems"] == N
    node = data(await r.client.get("/api/nodes/DEAD"))
    assert sum(v for k, v in node["queue"].items() if k != "checkedOut") == N
