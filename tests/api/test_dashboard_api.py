"""What the dashboard reads and is served (issue 23): patient names only with a credential, the
node card's facts (oldest waiting item, send rate), the read-only settings, the order of the
item list, and the pages themselves (security headers, login instead of a page that needs it)."""

from __future__ import annotations

import httpx
import trio

from capacitor_trio.actors.node import RATE_WINDOW, NodeState

from .conftest import AUTH, PASSWORD, StartRouter, StorageScp, dead_node, free_port, pacs
from .test_endpoints import data, error


async def _login(client: httpx.AsyncClient) -> dict[str, str]:
    return {"X-CSRF-Token": data(await client.post("/api/auth/login", json={"password": PASSWORD}))["csrfToken"]}


async def test_patient_names_only_with_a_credential(start_router: StartRouter) -> None:
    """A read without the token or a session (while one is configured) shows the item's identity
    but no person name, in the list, the detail and its tags; a wrong token shows none either."""
    r = await start_router((dead_node("DEAD"),))
    await r.client.post("/api/nodes/DEAD/pause", headers=AUTH)
    (item,) = await r.queue(1, dest="DEAD", state="failed")

    async def shown(client: httpx.AsyncClient, headers: dict[str, str]) -> tuple[object, object, dict]:
        listed = data(await client.get("/api/queue/items", headers=headers))["items"][0]
        detail = data(await client.get(f"/api/queue/items/{item}", headers=headers))
        return listed["patientName"], detail["patientName"], detail["tags"]

    name, detail_name, tags = await shown(r.client, {})
    assert name is None and detail_name is None
    assert "00100010" not in tags and tags["00100020"]["Value"] == ["PID001"]  # identity without names
    assert not any(v.get("vr") == "PN" for v in tags.values())
    name, detail_name, tags = await shown(r.client, {"Authorization": "Bearer wrong"})
    assert name is None and "00100010" not in tags
    name, detail_name, tags = await shown(r.client, AUTH)
    assert name == detail_name == "DOE^JANE"
    assert tags["00100010"]["Value"] == [{"Alphabetic": "DOE^JANE"}]
    async with httpx.AsyncClient(base_url=str(r.client.base_url)) as browser:
        csrf = await _login(browser)
        assert (await shown(browser, {}))[0] == "DOE^JANE"
        data(await browser.post("/api/auth/logout", headers=csrf))
        assert (await shown(browser, {}))[0] is None


async def test_patient_names_open_when_nothing_is_configured(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"),), token="", password="")
    await r.client.post("/api/nodes/DEAD/pause")
    await r.queue(1, dest="DEAD", state="failed")
    assert data(await r.client.get("/api/queue/items"))["items"][0]["patientName"] == "DOE^JANE"


async def test_node_shows_its_oldest_waiting_item(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"), dead_node("EMPTY")))
    for ae in ("DEAD", "EMPTY"):
        await r.client.post(f"/api/nodes/{ae}/pause", headers=AUTH)
    ids = await r.queue(2, dest="DEAD", state="failed")
    await r.queue(1, dest="DEAD", state="rejected")  # not waiting
    first = await r.store.get_item(ids[0])
    nodes = {n["aeTitle"]: n for n in data(await r.client.get("/api/nodes"))}
    dead, empty = nodes["DEAD"], nodes["EMPTY"]
    assert dead["oldestWaitingAt"] is not None
    assert abs(trio_iso_seconds(dead["oldestWaitingAt"]) - first.created_at) < 0.002
    assert 0 <= dead["oldestWaitingSeconds"] < 60
    assert empty["oldestWaitingAt"] is None and empty["oldestWaitingSeconds"] is None
    assert dead["sendRate"] == 0.0
    assert data(await r.client.get("/api/nodes/DEAD"))["oldestWaitingAt"] == dead["oldestWaitingAt"]


def trio_iso_seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def test_node_shows_its_send_rate(start_router: StartRouter, scp: StorageScp) -> None:
    from pynetdicom import AE

    from tests.helpers.datasets import make_dataset

    r = await start_router((pacs(scp),), scp_port=free_port())
    datasets = [make_dataset(rows=8, columns=8, seed=k) for k in range(6)]

    def send() -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", r.router.dicom_port, ae_title="PACS")
        try:
            assert [assoc.send_c_store(ds).Status for ds in datasets] == [0] * 6
        finally:
            assoc.release()

    await trio.to_thread.run_sync(send)
    with trio.fail_after(15):
        await r.router.supervisor.ctx.delivered_count.wait_value(lambda n: n >= 6)
    node = data(await r.client.get("/api/nodes/PACS"))
    assert node["sendRate"] == round(6 / RATE_WINDOW, 3)
    assert node["oldestWaitingAt"] is None


def test_send_rate_counts_the_last_minute_only() -> None:
    state = NodeState()
    state.record_delivered(1000.0, 30)
    state.record_delivered(1030.0, 30)
    assert state.last_delivered_at == 1030.0
    assert state.send_rate(1030.0) == 60 / RATE_WINDOW
    assert state.send_rate(1000.0 + RATE_WINDOW) == 30 / RATE_WINDOW  # the first send left the window
    assert state.send_rate(1030.0 + RATE_WINDOW) == 0.0
    assert not state.deliveries  # forgotten, not kept


def test_send_rate_memory_is_bounded() -> None:
    from capacitor_trio.actors.node import MAX_RATE_RECORDS

    state = NodeState()
    for k in range(MAX_RATE_RECORDS * 2):
        state.record_delivered(1000.0 + k * 1e-6, 1)
    assert len(state.deliveries) <= MAX_RATE_RECORDS


async def test_settings_shows_the_config_without_secrets(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),))
    error(await r.client.get("/api/config"), "FORBIDDEN", 403)
    s = data(await r.client.get("/api/config", headers=AUTH))
    assert s["config"]["api.token"] == "<redacted>" and s["config"]["api.servicePassword"] == "<redacted>"
    assert "test-token" not in str(s) and PASSWORD not in str(s)
    assert s["config"]["myAeTitle"] == "CAPACITOR" and s["config"]["api.enabled"] is True
    assert s["config"]["cachePath"] == str(r.data_dir / "cache")
    assert s["nodesYml"] == (r.data_dir / "nodes.yml").read_text() and "PACS" in s["nodesYml"]
    assert s["filterFiles"] == []
    (r.data_dir / "routings.yml").write_text("# a routing filter\n")
    s = data(await r.client.get("/api/config", headers=AUTH))
    assert s["filterFiles"] == [{"name": "routings.yml", "text": "# a routing filter\n"}]


async def test_items_newest_first(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"),))
    await r.client.post("/api/nodes/DEAD/pause", headers=AUTH)
    ids = await r.queue(4, dest="DEAD", state="failed")

    async def listed(**params: object) -> list[int]:
        return [i["id"] for i in data(await r.client.get("/api/queue/items", params=params))["items"]]

    assert await listed() == ids
    assert await listed(order="oldest") == ids
    assert await listed(order="newest") == ids[::-1]
    assert await listed(order="newest", skip=1, limit=2) == ids[::-1][1:3]
    assert await listed(order="newest", search="ACC001") == ids[::-1]
    error(await r.client.get("/api/queue/items", params={"order": "sideways"}), "BAD_REQUEST", 400)


async def test_pages_are_served_with_strict_headers(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),))
    for path in ("/", "/queue", "/queue/1", "/logs", "/login"):
        resp = await r.client.get(path)
        assert resp.status_code == 200, path
        assert resp.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in resp.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
        assert resp.headers["x-frame-options"] == "DENY"
        assert "<script>" not in resp.text  # no inline script: the policy would refuse it
    script = await r.client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert (await r.client.get("/static/style.css")).status_code == 200
    # a page from a non-loopback Host is refused like the API (DNS rebinding)
    error(await r.client.get("/", headers={"Host": "evil.example"}), "FORBIDDEN", 403)


async def test_pages_that_need_a_session_show_the_login(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),))
    for path in ("/settings", "/nodes/PACS/edit?role=Storage"):
        page = (await r.client.get(path)).text
        assert 'id="login-form"' in page and 'id="node-form"' not in page, path
        assert 'content=""' in page  # no CSRF token without a session
    csrf = (await _login(r.client))["X-CSRF-Token"]
    page = (await r.client.get("/nodes/PACS/edit?role=Storage")).text
    assert 'id="node-form"' in page and f'content="{csrf}"' in page
    assert 'id="config"' in (await r.client.get("/settings")).text


async def test_login_page_goes_back_only_to_this_site(start_router: StartRouter) -> None:
    r = await start_router()
    for bad in ("//evil.example/", "/\\evil.example", "http://evil.example/", "javascript:alert(1)"):
        page = (await r.client.get("/login", params={"next": bad})).text
        assert 'data-next="/"' in page, bad
    assert 'data-next="/queue?state=failed"' in (await r.client.get("/login", params={"next": "/queue?state=failed"})).text
