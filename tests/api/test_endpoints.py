"""Every endpoint over real HTTP against a running router (run_router), with a pynetdicom storage
SCP as the real destination: success shapes and each error code an endpoint can return."""

from __future__ import annotations

import functools
import re
import threading
from typing import Any

import pytest
import trio
import trio.testing
import yaml

from capacitor_trio.config import nodes_file
from capacitor_trio.config.models import Node
from capacitor_trio.store import Item, ItemFilter, ItemNotFound, Store
from tests.store.util import content

from .conftest import AUTH, StartRouter, StorageScp, dead_node, pacs

AUTH_JSON = {**AUTH, "Content-Type": "application/json"}  # a JSON body sent as raw bytes
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
NODE_FIELDS = {
    "aeTitle", "hostName", "port", "role", "queue", "aliases", "priority", "processDelay",
    "impersonate", "transferSyntax", "batchSize", "minimumLineSpeed", "processSchedule", "paused",
    "scheduleOverride", "inWindow", "status", "lastError", "lastDeliveredAt", "restarts",
}
ITEM_FIELDS = {
    "id", "state", "checkedOut", "sourceAeTitle", "destinationAeTitle", "studyInstanceUid",
    "seriesInstanceUid", "sopInstanceUid", "sopClassUid", "modality", "patientId", "patientName",
    "accessionNumber", "transferSyntaxUid", "receivedTransferSyntaxUid", "sizeBytes", "attemptCount", "lastError",
    "nextAttemptAt", "createdAt", "updatedAt",
}


def data(resp: Any, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"ok", "data", "error", "timestamp"}
    assert body["ok"] is True and body["error"] is None
    assert ISO_Z.match(body["timestamp"])
    return body["data"]


def error(resp: Any, code: str, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"ok", "data", "error", "timestamp"}
    assert body["ok"] is False and body["data"] is None
    assert body["error"]["code"] == code, body
    assert "Traceback" not in resp.text
    return str(body["error"]["message"])


# ---- system, service, metrics, logs, backward compatible -------------------------------------


async def test_system_info(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),), my_ae_title="ROUTER1")
    info = data(await r.client.get("/api/system/info"))
    assert info["product"] == "capacitor-trio"
    assert info["aeTitle"] == "ROUTER1"
    assert info["activationState"] == "Active"
    assert isinstance(info["version"], str) and info["version"]
    assert ISO_Z.match(info["startedAt"])
    assert isinstance(info["uptimeSeconds"], int) and info["uptimeSeconds"] >= 0


async def test_unknown_paths_and_methods_answer_in_the_envelope(start_router: StartRouter) -> None:
    r = await start_router()
    error(await r.client.get("/api/nope"), "NOT_FOUND", 404)
    error(await r.client.get("/elsewhere"), "NOT_FOUND", 404)
    resp = await r.client.delete("/api/metrics")
    error(resp, "NOT_FOUND", 405)
    assert "GET" in resp.headers["allow"]
    error(await r.client.request("PATCH", "/api/nodes/X", headers=AUTH), "NOT_FOUND", 405)


async def test_service_pause_resume_and_status(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),))
    flags = {"storageScu": True, "worklistScu": True, "storageCommitScu": True, "prepare": True}
    assert data(await r.client.get("/api/service/status")) == flags
    error(await r.client.post("/api/service/pause"), "FORBIDDEN", 403)
    paused = data(await r.client.post("/api/service/pause", headers=AUTH))
    assert paused == dict.fromkeys(flags, False)
    assert data(await r.client.get("/api/service/status")) == paused
    status = data(await r.client.get("/api/service/processing-status"))
    assert status["allPaused"] is True
    assert data(await r.client.post("/api/service/resume", headers=AUTH)) == flags
    status = data(await r.client.get("/api/service/processing-status"))
    assert {"allPaused", "checkedOutItems", "activeJobs", "idle"} <= set(status)
    assert status["allPaused"] is False
    assert status["nodes"] == [{"aeTitle": "PACS", "role": "Storage", "paused": False, "status": "running"}]


async def test_processing_status_idle_only_when_nothing_is_ripe(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"),))
    assert data(await r.client.get("/api/service/processing-status"))["idle"] is True
    await r.client.post("/api/nodes/DEAD/pause", headers=AUTH)
    await r.queue(2, dest="DEAD", state="prepared")
    # paused: nothing will be sent, so idle
    assert data(await r.client.get("/api/service/processing-status"))["idle"] is True
    await r.client.post("/api/service/pause", headers=AUTH)
    await r.client.post("/api/nodes/DEAD/resume", headers=AUTH)
    assert data(await r.client.get("/api/service/processing-status"))["idle"] is True
    # with delivery enabled the prepared items are ripe (or being sent): not idle
    r.router.service.storage_scu = True
    st = data(await r.client.get("/api/service/processing-status"))
    assert st["idle"] is False


async def test_metrics_stats_and_health(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"),))
    await r.client.post("/api/nodes/DEAD/pause", headers=AUTH)
    await r.queue(3, dest="DEAD", state="failed")
    await r.queue(2, dest="DEAD", state="rejected")
    m = data(await r.client.get("/api/metrics"))
    assert m["totalItems"] == 5
    assert m["byState"] == {"new": 0, "prepared": 0, "failed": 3, "rejected": 2, "expired": 0}
    assert m["checkedOut"] == 0
    assert m["service"] == {"storageScu": True, "worklistScu": True, "storageCommitScu": True, "prepare": True}
    assert m["loop"] == {"maxStallMs": 0.0, "stallsOver100ms": 0}  # only the daemon watches the loop
    assert m["transcoding"] == {
        "DEAD": {"conversions": 0, "failed": 0, "seconds": 0.0, "onSend": 0, "onSendFailed": 0}
    }

    resp = await r.client.get("/api/queue/stats")
    assert resp.status_code == 200
    stats = resp.json()
    assert set(stats) == {"total", "byState", "checkedOut"}  # no envelope
    assert stats["total"] == 5 and stats["checkedOut"] == 0
    assert stats["byState"]["failed"] == 3 and stats["byState"]["rejected"] == 2

    resp = await r.client.get("/api/queue/health")
    assert resp.status_code == 200
    health = resp.json()
    assert set(health) == {"status", "timestamp"} and health["status"] == "ok"
    assert ISO_Z.match(health["timestamp"])


async def test_internal_errors_never_show_a_traceback(start_router: StartRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    r = await start_router()

    async def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("secret detail of the failure")

    monkeypatch.setattr(r.router.store, "counts", broken)
    monkeypatch.setattr(r.router.store, "_read", broken)
    msg = error(await r.client.get("/api/metrics"), "INTERNAL", 500)
    assert "secret detail" not in msg
    resp = await r.client.get("/api/queue/stats")
    assert resp.status_code == 500 and "Traceback" not in resp.text


async def test_logs_recent(start_router: StartRouter) -> None:
    r = await start_router()
    import logging

    log = logging.getLogger("capacitor_trio.test")
    for k in range(5):
        log.info("info %d", k)
    log.warning("a warning")
    log.error("an error")
    entries = data(await r.client.get("/api/logs/recent"))
    assert entries and set(entries[0]) == {"timestamp", "level", "message", "logger"}
    assert any(e["message"] == f"API listening on http://127.0.0.1:{r.router.api_port}" for e in entries)
    assert entries[-1]["message"] == "an error" and entries[-1]["level"] == "ERROR"
    assert ISO_Z.match(entries[-1]["timestamp"])
    two = data(await r.client.get("/api/logs/recent", params={"lines": 2}))
    assert [e["message"] for e in two] == ["a warning", "an error"]
    warn = data(await r.client.get("/api/logs/recent", params={"level": "warn"}))
    assert {e["level"] for e in warn} <= {"WARN", "ERROR"} and len(warn) >= 2
    assert [e["level"] for e in data(await r.client.get("/api/logs/recent", params={"level": "ERROR"}))][-1] == "ERROR"
    many = data(await r.client.get("/api/logs/recent", params={"lines": 5000}))  # at most 1000
    assert len(many) <= 1000
    error(await r.client.get("/api/logs/recent", params={"level": "LOUD"}), "BAD_REQUEST", 400)
    error(await r.client.get("/api/logs/recent", params={"lines": 0}), "BAD_REQUEST", 400)
    error(await r.client.get("/api/logs/recent", params={"lines": "many"}), "BAD_REQUEST", 400)


# ---- nodes -----------------------------------------------------------------------------------


async def test_nodes_list_get_and_roles(start_router: StartRouter, scp: StorageScp) -> None:
    qr = Node(ae_title="PACS", host_name="127.0.0.1", port=scp.port, role="QueryRetrieve")
    r = await start_router((qr, pacs(scp, aliases=("ARCHIVE",), priority=1)))
    await r.client.post("/api/nodes/PACS/pause", headers=AUTH)
    await r.queue(2, state="failed")
    nodes = data(await r.client.get("/api/nodes"))
    assert [(n["aeTitle"], n["role"]) for n in nodes] == [("PACS", "QueryRetrieve"), ("PACS", "Storage")]
    for n in nodes:
        assert set(n) >= NODE_FIELDS
    storage = nodes[1]
    assert storage["queue"] == {"new": 0, "prepared": 0, "failed": 2, "rejected": 0, "expired": 0, "checkedOut": 0}
    assert storage["aliases"] == ["ARCHIVE"] and storage["priority"] == 1 and storage["paused"] is True
    assert storage["status"] == "running" and storage["port"] == scp.port
    assert nodes[0]["queue"]["new"] == 0 and nodes[0]["status"] == "none"

    one = data(await r.client.get("/api/nodes/PACS"))  # default: the Storage node
    assert one["role"] == "Storage" and one["queue"]["failed"] == 2
    qr_json = data(await r.client.get("/api/nodes/PACS", params={"role": "QueryRetrieve"}))
    assert qr_json["role"] == "QueryRetrieve"
    error(await r.client.get("/api/nodes/NOPE"), "NOT_FOUND", 404)
    error(await r.client.get("/api/nodes/PACS", params={"role": "Worklist"}), "NOT_FOUND", 404)
    error(await r.client.get("/api/nodes/PACS", params={"role": "Janitor"}), "BAD_REQUEST", 400)
    # a node without a queue cannot be paused
    error(await r.client.post("/api/nodes/PACS/pause", params={"role": "QueryRetrieve"}, headers=AUTH), "CONFLICT", 409)


async def test_pause_resume_override(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),))
    error(await r.client.post("/api/nodes/PACS/pause"), "FORBIDDEN", 403)
    n = data(await r.client.post("/api/nodes/PACS/pause", headers=AUTH))
    assert n["paused"] is True and n["aeTitle"] == "PACS"
    assert data(await r.client.get("/api/nodes/PACS"))["paused"] is True
    n = data(await r.client.post("/api/nodes/PACS/resume", headers=AUTH))
    assert n["paused"] is False
    n = data(await r.client.post("/api/nodes/PACS/override-schedule", headers=AUTH))
    assert n["scheduleOverride"] is True
    n = data(await r.client.delete("/api/nodes/PACS/override-schedule", headers=AUTH))
    assert n["scheduleOverride"] is False
    for method, path in (
        ("POST", "/api/nodes/NOPE/pause"), ("POST", "/api/nodes/NOPE/resume"),
        ("POST", "/api/nodes/NOPE/echo"), ("POST", "/api/nodes/NOPE/override-schedule"),
        ("DELETE", "/api/nodes/NOPE/override-schedule"),
    ):
        error(await r.client.request(method, path, headers=AUTH), "NOT_FOUND", 404)
        error(await r.client.request(method, path), "FORBIDDEN", 403)


async def test_unavailable_node_answers_503(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),))
    handle = r.router.supervisor.handle("PACS")
    handle.status.value = "restarting"  # what the supervisor sets while an actor restarts
    try:
        error(await r.client.post("/api/nodes/PACS/pause", headers=AUTH), "UNAVAILABLE", 503)
        (item,) = await r.queue(1, state="failed")
        error(await r.client.post(f"/api/queue/items/{item}/retry", headers=AUTH), "UNAVAILABLE", 503)
        error(await r.client.post("/api/queue/actions/retry-failed", headers=AUTH), "UNAVAILABLE", 503)
        # reads still work without the actor
        assert data(await r.client.get("/api/nodes/PACS"))["status"] == "restarting"
    finally:
        handle.status.value = "running"


async def test_resume_of_a_failed_node_restarts_it(
    start_router: StartRouter, scp: StorageScp, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = await start_router((pacs(scp),))
    handle = r.router.supervisor.handle("PACS")
    restarted = []

    def restart(h: Any) -> bool:
        restarted.append(h)
        h.status.value = "running"
        return True

    monkeypatch.setattr(r.router.supervisor, "restart", restart)
    data(await r.client.post("/api/nodes/PACS/pause", headers=AUTH))
    handle.status.value = "failed"
    n = data(await r.client.post("/api/nodes/PACS/resume", headers=AUTH))
    assert restarted == [handle] and n["paused"] is False and n["status"] == "running"


async def test_resume_of_a_failed_node_waits_until_it_runs_again(
    start_router: StartRouter, scp: StorageScp, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = await start_router((pacs(scp),))
    handle = r.router.supervisor.handle("PACS")

    async def comes_up(h: Any) -> None:
        await trio.sleep(0.2)
        h.status.value = "running"

    def restart(h: Any) -> bool:
        h.status.value = "restarting"
        trio.lowlevel.spawn_system_task(comes_up, h)
        return True

    monkeypatch.setattr(r.router.supervisor, "restart", restart)
    data(await r.client.post("/api/nodes/PACS/pause", headers=AUTH))
    handle.status.value = "failed"
    n = data(await r.client.post("/api/nodes/PACS/resume", headers=AUTH))
    assert n["paused"] is False and n["status"] == "running"


async def test_echo(start_router: StartRouter, scp: StorageScp) -> None:
    qr = Node(ae_title="QR", host_name="127.0.0.1", port=scp.port, role="QueryRetrieve")
    r = await start_router((pacs(scp), dead_node("DEAD"), qr))
    good = data(await r.client.post("/api/nodes/PACS/echo", headers=AUTH))
    assert good["success"] is True and good["error"] is None
    assert isinstance(good["latencyMs"], float | int) and good["latencyMs"] >= 0
    with trio.fail_after(12):
        bad = data(await r.client.post("/api/nodes/DEAD/echo", headers=AUTH))
    assert bad["success"] is False and bad["error"]
    # a node without an actor is echoed directly
    assert data(await r.client.post("/api/nodes/QR/echo", headers=AUTH))["success"] is True


async def test_put_node(start_router: StartRouter, scp: StorageScp) -> None:
    qr = Node(ae_title="PACS", host_name="10.0.0.9", port=4242, role="QueryRetrieve")
    r = await start_router((pacs(scp), qr, dead_node("OTHER")))
    body = {
        "role": "Storage", "hostName": "127.0.0.1", "port": scp.port, "priority": 2, "processDelay": 0,
        "impersonate": True, "transferSyntax": "", "batchSize": 5, "minimumLineSpeed": 100,
        "aliases": ["PACS2", "ARCHIVE"],
    }
    error(await r.client.put("/api/nodes/PACS", json=body), "FORBIDDEN", 403)
    error(await r.client.put("/api/nodes/PACS", json=body, headers=AUTH), "CONFLICT", 409)  # not paused
    error(await r.client.put("/api/nodes/NOPE", json=body, headers=AUTH), "NOT_FOUND", 404)
    await r.client.post("/api/nodes/PACS/pause", headers=AUTH)
    for bad in (
        {k: v for k, v in body.items() if k != "role"},  # role is required
        {**body, "colour": "red"},  # unknown field
        {**body, "port": "104"},  # wrong type
        {**body, "impersonate": 1},  # wrong type
        {**body, "priority": 7},  # validated like the config loader
        {**body, "role": "Janitor"},
        {**body, "aliases": ["OTHER"]},  # names another Storage node
        {**body, "aeTitle": "RENAMED"},
    ):
        error(await r.client.put("/api/nodes/PACS", json=bad, headers=AUTH), "BAD_REQUEST", 400)
    error(await r.client.put("/api/nodes/PACS", content=b"{not json", headers=AUTH_JSON), "BAD_REQUEST", 400)
    error(await r.client.put("/api/nodes/PACS", content=b"[1]", headers=AUTH_JSON), "BAD_REQUEST", 400)
    error(await r.client.put("/api/nodes/PACS", headers=AUTH), "BAD_REQUEST", 400)

    n = data(await r.client.put("/api/nodes/PACS", json=body, headers=AUTH))
    assert (n["priority"], n["impersonate"], n["batchSize"], n["minimumLineSpeed"]) == (2, True, 5, 100)
    assert n["aliases"] == ["PACS2", "ARCHIVE"] and n["paused"] is True
    handle = r.router.supervisor.handle("PACS")
    assert handle.node.batch_size == 5 and handle.node.aliases == ("PACS2", "ARCHIVE")
    assert r.router.receiver.destinations_for("ARCHIVE")[0].ae_title == "PACS"
    saved = yaml.safe_load((r.data_dir / "nodes.yml").read_text())
    assert [(e["AeTitle"], e["NodeRole"]) for e in saved] == [("PACS", "Storage"), ("PACS", "QueryRetrieve"), ("OTHER", "Storage")]
    assert saved[0]["Aliases"] == ["PACS2", "ARCHIVE"] and saved[0]["BatchSize"] == 5
    assert saved[1]["HostName"] == "10.0.0.9"
    # the QueryRetrieve node of the same title, chosen by role; no pause needed (no queue)
    n = data(await r.client.put("/api/nodes/PACS", json={"role": "QueryRetrieve", "port": 4343}, headers=AUTH))
    assert n["role"] == "QueryRetrieve" and n["port"] == 4343
    assert yaml.safe_load((r.data_dir / "nodes.yml").read_text())[1]["Port"] == 4343
    # blank override: null inherits the global value
    n = data(await r.client.put("/api/nodes/PACS", json={"role": "Storage", "batchSize": None}, headers=AUTH))
    assert n["batchSize"] is None


async def test_put_edits_the_file_as_it_is_on_disk(start_router: StartRouter) -> None:
    # a new user's edits: a comment above a node and a node added by hand since start-up
    r = await start_router((dead_node("A"), dead_node("B")))
    path = r.data_dir / "nodes.yml"
    path.write_text("# site nodes: keep this comment\n" + path.read_text() + "- AeTitle: HANDADDED\n  HostName: h\n  Port: 7\n")
    await r.client.post("/api/nodes/B/pause", headers=AUTH)
    n = data(await r.client.put("/api/nodes/B", json={"role": "Storage", "priority": 2}, headers=AUTH))
    assert n["priority"] == 2
    text = path.read_text()
    assert text.startswith("# site nodes: keep this comment\n")
    assert [e["AeTitle"] for e in yaml.safe_load(text)] == ["A", "B", "HANDADDED"]


async def test_put_refused_when_the_node_was_changed_in_the_file(start_router: StartRouter) -> None:
    r = await start_router((dead_node("A"),))
    path = r.data_dir / "nodes.yml"
    await r.client.post("/api/nodes/A/pause", headers=AUTH)
    edited = path.read_text().replace("HostName: 127.0.0.1", "HostName: elsewhere")
    path.write_text(edited)
    message = error(await r.client.put("/api/nodes/A", json={"role": "Storage", "priority": 1}, headers=AUTH), "CONFLICT", 409)
    assert "changed in the file" in message
    assert path.read_text() == edited
    path.write_text("- [broken\n")
    message = error(await r.client.put("/api/nodes/A", json={"role": "Storage", "priority": 1}, headers=AUTH), "CONFLICT", 409)
    assert "no longer loads" in message
    assert r.router.supervisor.handle("A").node.priority == 0  # the running node is untouched


async def test_put_node_refuses_what_the_config_refuses(start_router: StartRouter) -> None:
    """issue 19 #18/#19: PUT runs the config's own checks: every called AE (titles, aliases and
    aeTitlePrefix + either) names one Storage node, with both nodes named in the error; and an
    empty HostName, a port outside 1-65535 or an AE title no peer can send are refused."""
    r = await start_router((dead_node("STORESCP"), dead_node("ORTHANC"), dead_node("X")))
    await r.client.post("/api/nodes/STORESCP/pause", headers=AUTH)
    before = (r.data_dir / "nodes.yml").read_text()
    msg = error(
        await r.client.put("/api/nodes/STORESCP", json={"role": "Storage", "aliases": ["DCP_ORTHANC"]}, headers=AUTH),
        "BAD_REQUEST", 400,
    )
    assert msg == (
        "request body: node STORESCP: Aliases = 'DCP_ORTHANC': called AE DCP_ORTHANC (its alias DCP_ORTHANC) "
        "already names Storage node ORTHANC (aeTitlePrefix + its AeTitle); a called AE must name one Storage node"
    )
    msg = error(
        await r.client.put("/api/nodes/STORESCP", json={"role": "Storage", "aliases": ["X"]}, headers=AUTH),
        "BAD_REQUEST", 400,
    )
    assert "node STORESCP: Aliases = 'X': called AE X (its alias X) already names Storage node X (its AeTitle)" in msg
    for bad, why in (
        ({"hostName": ""}, "HostName = '': a host name cannot be empty"),
        ({"hostName": "  "}, "a host name cannot be empty"),
        ({"hostName": "pacs\nevil"}, "control characters"),
        ({"port": 0}, "Port = 0: must be 1..65535"),
        ({"port": 65536}, "Port = 65536: must be 1..65535"),
        ({"aliases": ["SEVENTEEN_CHARS_X"]}, "at most 16"),
        ({"aliases": ["A\\B"]}, "backslashes or control characters"),
        ({"aliases": ["ARCH\t"]}, "backslashes or control characters"),
    ):
        msg = error(await r.client.put("/api/nodes/STORESCP", json={"role": "Storage", **bad}, headers=AUTH), "BAD_REQUEST", 400)
        assert why in msg, (bad, msg)
    assert (r.data_dir / "nodes.yml").read_text() == before  # nothing written
    assert r.router.receiver.destinations_for("DCP_ORTHANC")[0].ae_title == "ORTHANC"


async def test_put_that_cannot_write_the_file_changes_nothing(
    start_router: StartRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = await start_router((dead_node("A"),))
    await r.client.post("/api/nodes/A/pause", headers=AUTH)
    before = (r.data_dir / "nodes.yml").read_text()

    def disk_full(path: object, text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("capacitor_trio.config.nodes_file.replace_file", disk_full)
    message = error(await r.client.put("/api/nodes/A", json={"role": "Storage", "priority": 2}, headers=AUTH), "INTERNAL", 500)
    assert message == "cannot write nodes.yml: No space left on device"
    assert r.router.supervisor.handle("A").node.priority == 0  # never put in force
    assert (r.data_dir / "nodes.yml").read_text() == before


async def test_a_resume_waits_for_an_edit_to_be_in_force(
    start_router: StartRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node never resumes between its actor's approval of an edit and the edit being in force
    (so it never sends with settings the file no longer has): the resume waits for the edit."""
    r = await start_router((dead_node("A"),))
    await r.client.post("/api/nodes/A/pause", headers=AUTH)
    writing, release = threading.Event(), threading.Event()
    write = nodes_file.replace_file

    def slow_write(path: Any, text: str) -> None:
        writing.set()
        release.wait(10)
        write(path, text)

    monkeypatch.setattr("capacitor_trio.config.nodes_file.replace_file", slow_write)
    seen: dict[str, Any] = {}
    resumed = trio.Event()

    async def edit() -> None:
        seen["edit"] = await r.client.put("/api/nodes/A", json={"role": "Storage", "priority": 2}, headers=AUTH)

    async def resume() -> None:
        seen["resume"] = await r.client.post("/api/nodes/A/resume", headers=AUTH)
        seen["priority at resume"] = r.router.supervisor.handle("A").node.priority
        resumed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(edit)
        await trio.to_thread.run_sync(writing.wait, 10)  # approved, the file being written
        nursery.start_soon(resume)
        with trio.move_on_after(0.5):  # a resume that did not wait would be answered by now
            await resumed.wait()
        release.set()
    assert seen["edit"].status_code == 200 and data(seen["resume"])["paused"] is False
    assert seen["priority at resume"] == 2


async def test_concurrent_node_edits_are_all_kept(start_router: StartRouter) -> None:
    names = [f"N{i}" for i in range(6)]
    r = await start_router(tuple(dead_node(n) for n in names))
    for n in names:
        await r.client.post(f"/api/nodes/{n}/pause", headers=AUTH)
    async with trio.open_nursery() as nursery:
        for i, n in enumerate(names):
            nursery.start_soon(
                functools.partial(
                    r.client.put, f"/api/nodes/{n}", json={"role": "Storage", "priority": i % 3}, headers=AUTH
                )
            )
    on_disk = yaml.safe_load((r.data_dir / "nodes.yml").read_text())
    assert [(e["AeTitle"], e["Priority"]) for e in on_disk] == [(n, i % 3) for i, n in enumerate(names)]
    assert not list(r.data_dir.glob(".nodes.yml*"))  # no temporary file left behind


async def test_put_refused_with_items_checked_out(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"),))
    await r.client.post("/api/nodes/DEAD/pause", headers=AUTH)
    await r.queue(1, dest="DEAD", state="prepared")
    handle = r.router.supervisor.handle("DEAD")
    (item,) = await r.store.checkout_batch(handle.destination, now=r.router.clock() + 10, limit=1)
    msg = error(await r.client.put("/api/nodes/DEAD", json={"role": "Storage", "priority": 1}, headers=AUTH), "CONFLICT", 409)
    assert "checked out" in msg
    # acting on an item being delivered is a conflict too
    error(await r.client.post(f"/api/queue/items/{item.id}/fail", headers=AUTH), "CONFLICT", 409)
    error(await r.client.delete(f"/api/queue/items/{item.id}", headers=AUTH), "CONFLICT", 409)
    assert data(await r.client.get(f"/api/queue/items/{item.id}"))["checkedOut"] is True


# ---- queue -----------------------------------------------------------------------------------


async def test_items_list_filters_and_detail(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"), dead_node("OTHER")))
    for ae in ("DEAD", "OTHER"):
        await r.client.post(f"/api/nodes/{ae}/pause", headers=AUTH)
    a = await r.queue(3, dest="DEAD", state="failed", modality="MR", accession="ACCX", source="SRC1")
    b = await r.queue(2, dest="OTHER", state="prepared", patient_id="PATIENT9")
    page = data(await r.client.get("/api/queue/items"))
    assert page["total"] == 5 and page["skip"] == 0 and page["limit"] == 100
    assert [i["id"] for i in page["items"]] == a + b
    item = page["items"][0]
    assert set(item) >= ITEM_FIELDS
    assert item["state"] == "failed" and item["modality"] == "MR" and item["sourceAeTitle"] == "SRC1"
    assert item["destinationAeTitle"] == "DEAD" and item["checkedOut"] is False
    assert ISO_Z.match(item["createdAt"]) and ISO_Z.match(item["updatedAt"])

    async def ids(**params: Any) -> list[int]:
        return [i["id"] for i in data(await r.client.get("/api/queue/items", params=params))["items"]]

    assert await ids(state="failed") == a
    assert await ids(state="PREPARED") == b
    assert await ids(dest="OTHER") == b
    assert await ids(source="SRC1", modality="MR") == a
    assert await ids(modality="MR", dest="OTHER") == []
    assert await ids(search="accx") == a
    assert await ids(search="PATIENT9") == b
    assert await ids(skip=1, limit=2) == a[1:3]
    for bad in ({"state": "lost"}, {"skip": -1}, {"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"skip": "1.5"}):
        error(await r.client.get("/api/queue/items", params=bad), "BAD_REQUEST", 400)

    detail = data(await r.client.get(f"/api/queue/items/{a[0]}"))
    assert set(detail) >= ITEM_FIELDS | {"tags"}
    tags = detail["tags"]
    assert tags["00100020"] == {"vr": "LO", "Value": ["PID001"]}
    assert tags["00080060"]["Value"] == ["MR"]
    assert "7FE00010" not in tags  # no pixel data
    assert all(v.get("vr") not in ("OB", "OW", "UN") for v in tags.values())
    error(await r.client.get("/api/queue/items/999999"), "NOT_FOUND", 404)
    error(await r.client.get("/api/queue/items/abc"), "BAD_REQUEST", 400)


async def test_item_tags_come_only_from_the_items_own_instance(start_router: StartRouter) -> None:
    """A file that holds another instance (its name reused after the item went away) is never
    shown as this item's header."""
    r = await start_router((dead_node("DEAD"),))
    [mine] = await r.queue(1, dest="DEAD")
    item = await r.store.get_item(mine)
    [other] = await r.queue(1, dest="DEAD", patient_id="SOMEONE-ELSE")
    other_bytes = await content(r.store, await r.store.get_item(other))
    if item.inline:
        await r.store._write(
            lambda conn: conn.execute(
                "UPDATE blobs SET data = ? WHERE instance_id = ?", (other_bytes, item.instance_id)
            )
        )
    else:
        item.path.write_bytes(other_bytes)
    detail = data(await r.client.get(f"/api/queue/items/{mine}"))
    assert detail["sopInstanceUid"] == item.sop_instance_uid and detail["tags"] is None


async def test_no_tags_from_a_file_delivered_while_it_was_read(
    start_router: StartRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivered instance's file may be written over by the next reception while the API
    reads it (its SOP Instance UID still the old one, the patient after it already new): tags
    read from a file whose item went away meanwhile are not shown."""
    from capacitor_trio.api import app as app_module

    r = await start_router((dead_node("DEAD"),))
    [mine] = await r.queue(1, dest="DEAD", rows=256)  # a spool file, not in the index
    item = await r.store.get_item(mine)
    assert not item.inline
    real = app_module.read_tags

    def read_then_deliver(source: Any) -> Any:
        tags = real(source)
        trio.from_thread.run(r.store.delivered, [mine])  # delivered while the file was read
        return tags

    monkeypatch.setattr(app_module, "read_tags", read_then_deliver)
    detail = data(await r.client.get(f"/api/queue/items/{mine}"))
    assert detail["sopInstanceUid"] == item.sop_instance_uid and detail["tags"] is None


async def test_item_actions(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"),))
    await r.client.post("/api/nodes/DEAD/pause", headers=AUTH)
    i1, i2, i3 = await r.queue(3, dest="DEAD", state="prepared")
    for action in ("fail", "reject", "retry"):
        error(await r.client.post(f"/api/queue/items/{i1}/{action}"), "FORBIDDEN", 403)
    assert data(await r.client.post(f"/api/queue/items/{i1}/fail", headers=AUTH))["state"] == "failed"
    assert data(await r.client.post(f"/api/queue/items/{i1}/retry", headers=AUTH))["state"] == "new"
    error(await r.client.post(f"/api/queue/items/{i1}/retry", headers=AUTH), "CONFLICT", 409)  # new: no retry
    assert data(await r.client.post(f"/api/queue/items/{i2}/reject", headers=AUTH))["state"] == "rejected"
    assert data(await r.client.post(f"/api/queue/items/{i2}/retry", headers=AUTH))["state"] == "new"
    moved = data(await r.client.post(f"/api/queue/items/{i3}/move", json={"targetState": "Rejected"}, headers=AUTH))
    assert moved["state"] == "rejected" and moved["id"] == i3
    moved = data(await r.client.post(f"/api/queue/items/{i3}/move", json={"targetState": "NEW"}, headers=AUTH))
    assert moved["state"] == "new"
    for bad in ({"targetState": "gone"}, {}, {"targetState": 3}, {"targetState": "new", "x": 1}):
        error(await r.client.post(f"/api/queue/items/{i3}/move", json=bad, headers=AUTH), "BAD_REQUEST", 400)
    error(await r.client.post(f"/api/queue/items/{i3}/move", content=b"nope", headers=AUTH_JSON), "BAD_REQUEST", 400)
    error(await r.client.post(f"/api/queue/items/{i3}/move", json={"targetState": "new"}), "FORBIDDEN", 403)
    for action in ("fail", "reject", "retry"):
        error(await r.client.post(f"/api/queue/items/424242/{action}", headers=AUTH), "NOT_FOUND", 404)
    error(await r.client.post("/api/queue/items/424242/move", json={"targetState": "new"}, headers=AUTH), "NOT_FOUND", 404)

    item = await r.store.get_item(i3)
    assert await is_stored(r.store, item)
    error(await r.client.delete(f"/api/queue/items/{i3}"), "FORBIDDEN", 403)
    assert data(await r.client.delete(f"/api/queue/items/{i3}", headers=AUTH)) == {"id": i3, "deleted": True}
    assert not await is_stored(r.store, item)
    error(await r.client.get(f"/api/queue/items/{i3}"), "NOT_FOUND", 404)
    error(await r.client.delete(f"/api/queue/items/{i3}", headers=AUTH), "NOT_FOUND", 404)


async def test_items_of_a_destination_without_node_use_the_store(start_router: StartRouter) -> None:
    r = await start_router()
    (i,) = await r.queue(1, dest="GONE", state="failed")
    assert data(await r.client.post(f"/api/queue/items/{i}/reject", headers=AUTH))["state"] == "rejected"
    assert data(await r.client.post("/api/queue/actions/retry-rejected", headers=AUTH)) == {"count": 1}
    assert data(await r.client.delete(f"/api/queue/items/{i}", headers=AUTH))["deleted"] is True


async def test_bulk_actions(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"), dead_node("OTHER")))
    for ae in ("DEAD", "OTHER"):
        await r.client.post(f"/api/nodes/{ae}/pause", headers=AUTH)
    await r.queue(3, dest="DEAD", state="failed", modality="MR")
    await r.queue(2, dest="OTHER", state="failed", source="SRC2")
    await r.queue(2, dest="OTHER", state="rejected")
    error(await r.client.post("/api/queue/actions/retry-failed"), "FORBIDDEN", 403)
    error(await r.client.post("/api/queue/actions/retry-failed", json={"dest": "X"}, headers=AUTH), "BAD_REQUEST", 400)
    error(await r.client.post("/api/queue/actions/retry-failed", json={"source": 5}, headers=AUTH), "BAD_REQUEST", 400)
    body = {"modality": "MR", "destination": "DEAD"}
    assert data(await r.client.post("/api/queue/actions/retry-failed", json=body, headers=AUTH)) == {"count": 3}
    assert data(await r.client.post("/api/queue/actions/retry-failed", json={"source": "SRC2"}, headers=AUTH)) == {"count": 2}
    assert data(await r.client.post("/api/queue/actions/retry-failed", headers=AUTH)) == {"count": 0}
    error(await r.client.post("/api/queue/actions/retry-rejected"), "FORBIDDEN", 403)
    assert data(await r.client.post("/api/queue/actions/retry-rejected", headers=AUTH)) == {"count": 2}
    counts = await r.store.counts()
    # back to new, and prepared again at once (they are old enough): the nodes are paused
    assert (counts.new + counts.prepared, counts.failed, counts.rejected) == (7, 0, 0)


async def test_study_and_series_actions(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"), dead_node("OTHER")))
    for ae in ("DEAD", "OTHER"):
        await r.client.post(f"/api/nodes/{ae}/pause", headers=AUTH)
    study, s1, s2 = "1.2.3.4", "1.2.3.4.1", "1.2.3.4.2"
    await r.queue(2, dest="DEAD", study_uid=study, series_uid=s1)
    await r.queue(3, dest="OTHER", study_uid=study, series_uid=s2)
    await r.queue(1, dest="OTHER")
    error(await r.client.post(f"/api/queue/series/{s1}/move", json={"targetState": "failed"}), "FORBIDDEN", 403)
    error(await r.client.post(f"/api/queue/series/{s1}/move", json={"targetState": "bad"}, headers=AUTH), "BAD_REQUEST", 400)
    assert data(await r.client.post(f"/api/queue/series/{s1}/move", json={"targetState": "Failed"}, headers=AUTH)) == {"count": 2}
    error(await r.client.post(f"/api/queue/studies/{study}/move", json={}, headers=AUTH), "BAD_REQUEST", 400)
    error(await r.client.post(f"/api/queue/studies/{study}/move", json={"targetState": "new"}), "FORBIDDEN", 403)
    moved = data(await r.client.post(f"/api/queue/studies/{study}/move", json={"targetState": "rejected"}, headers=AUTH))
    assert moved == {"count": 5}
    items, total = await r.store.list_items(ItemFilter(study_uid=study))
    assert total == 5 and {i.state for i in items} == {"rejected"}
    assert all([await is_stored(r.store, i) for i in items])
    error(await r.client.delete(f"/api/queue/studies/{study}"), "FORBIDDEN", 403)
    assert data(await r.client.delete(f"/api/queue/studies/{study}", headers=AUTH)) == {"count": 5}
    assert data(await r.client.delete(f"/api/queue/studies/{study}", headers=AUTH)) == {"count": 0}
    assert not any([await is_stored(r.store, i) for i in items])
    assert (await r.store.counts()).total == 1


async def is_stored(store: Store, item: Item) -> bool:
    """Whether the instance's bytes are still kept (in its spool file or in the index)."""
    if not item.inline:
        return item.path.exists()
    try:
        await store.read_inline(item.instance_id)
    except ItemNotFound:
        return False
    return True


# ---- delivery with the real listener and a real destination -----------------------------------


async def test_delivery_through_the_router_shows_in_the_api(start_router: StartRouter, scp: StorageScp) -> None:
    from pynetdicom import AE

    from tests.helpers.datasets import make_dataset

    from .conftest import free_port

    r = await start_router((pacs(scp),), scp_port=free_port())
    port = r.router.dicom_port
    datasets = [make_dataset(rows=16, columns=16, seed=k) for k in range(4)]

    def send() -> list[int]:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
        assert assoc.is_established
        try:
            return [assoc.send_c_store(ds).Status for ds in datasets]
        finally:
            assoc.release()

    statuses = await trio.to_thread.run_sync(send)
    assert statuses == [0, 0, 0, 0]
    wanted = {ds.SOPInstanceUID for ds in datasets}
    with trio.fail_after(15):
        await r.router.supervisor.ctx.delivered_count.wait_value(lambda n: n >= len(datasets))
        await r.router.supervisor.ctx.sending.wait_value(lambda n: n == 0)  # association released
    assert wanted <= set(scp.received)
    assert data(await r.client.get("/api/service/processing-status"))["idle"]
    node = data(await r.client.get("/api/nodes/PACS"))
    assert ISO_Z.match(node["lastDeliveredAt"])
    assert node["queue"] == {"new": 0, "prepared": 0, "failed": 0, "rejected": 0, "expired": 0, "checkedOut": 0}
    m = data(await r.client.get("/api/metrics"))
    assert m["totalItems"] == 0 and m["received"] == 4
