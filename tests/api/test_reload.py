"""Configuration reload through `POST /api/config/reload`: node additions, removals and edits from
nodes.yml and the reloadable config.yml keys are applied; anything invalid changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from capacitor_trio.domain.instance import Destination

from .conftest import AUTH, PASSWORD, TOKEN, Running, StartRouter, dead_node
from .test_endpoints import data, error


def write_config(r: Running, **extra: object) -> None:
    """The config.yml equivalent of the test router's settings (tests/api/conftest.py), but
    for the API's port (0 there: a free one), which a file cannot say."""
    config = {
        "scpPort": 0,
        "durableWrites": False,
        "minimumAge": 0,
        "storageInterval": 0,
        "retryDelaySeconds": 30,
        "api": {"enabled": True, "port": r.router.api_port, "token": TOKEN, "servicePassword": PASSWORD},
        **extra,
    }
    (r.data_dir / "config.yml").write_text(yaml.safe_dump(config))


def append_node(data_dir: Path, text: str) -> None:
    path = data_dir / "nodes.yml"
    path.write_text(path.read_text() + text)


async def reload(r: Running) -> dict[str, Any]:
    return data(await r.client.post("/api/config/reload", headers=AUTH))


async def test_reload_adds_a_node(start_router: StartRouter) -> None:
    r = await start_router((dead_node("A"),))
    write_config(r)
    append_node(r.data_dir, "- AeTitle: NEWNODE\n  HostName: 127.0.0.1\n  Port: 9\n  Aliases: [NEWALIAS]\n")
    error(await r.client.post("/api/config/reload"), "FORBIDDEN", 403)
    report = await reload(r)
    assert report == {"added": ["NEWNODE"], "removed": [], "changed": [], "configChanged": [], "needsRestart": ["api.port"]}
    handle = r.router.supervisor.handle("NEWNODE")
    assert handle is not None and handle.status.value == "running"
    assert r.router.receiver.destinations_for("NEWALIAS") == [Destination("NEWNODE", "Storage")]
    node = data(await r.client.get("/api/nodes/NEWNODE"))
    assert node["port"] == 9
    assert any("configuration reloaded: added NEWNODE" in e.message for e in r.ring.recent())


async def test_reload_edits_and_removes_nodes(start_router: StartRouter) -> None:
    r = await start_router((dead_node("A"), dead_node("B")))
    write_config(r)
    path = r.data_dir / "nodes.yml"
    entries = yaml.safe_load(path.read_text())
    entries[0]["Port"] = 4444
    path.write_text(yaml.safe_dump(entries[:1]))
    report = await reload(r)
    assert (report["removed"], report["changed"]) == (["B"], ["A"])
    assert r.router.supervisor.handle("B") is None
    assert r.router.supervisor.handle("A").node.port == 4444
    assert not r.router.receiver.accepts_called_ae("B")
    error(await r.client.get("/api/nodes/B"), "NOT_FOUND", 404)


async def test_reload_applies_reloadable_keys_and_names_the_rest(start_router: StartRouter) -> None:
    r = await start_router((dead_node("A"),))
    write_config(r, retryDelaySeconds=45, myAeTitle="RENAMED")
    report = await reload(r)
    assert report["configChanged"] == ["retryDelaySeconds"]
    assert report["needsRestart"] == ["myAeTitle", "api.port"]
    assert r.router.supervisor.ctx.config.retry_delay_seconds == 45
    assert r.router.receiver.config.retry_delay_seconds == 45
    assert r.router.supervisor.ctx.config.my_ae_title == "CAPACITOR"  # in force until a restart


async def test_removing_a_node_with_queued_items_is_refused_and_nothing_changes(start_router: StartRouter) -> None:
    r = await start_router((dead_node("A"), dead_node("B")))
    write_config(r, retryDelaySeconds=45)
    await r.client.post("/api/nodes/B/pause", headers=AUTH)
    await r.queue(2, dest="B")
    path = r.data_dir / "nodes.yml"
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text())[:1]))
    message = error(await r.client.post("/api/config/reload", headers=AUTH), "CONFLICT", 409)
    assert "B was removed but still has 2 queued item(s)" in message
    assert r.router.supervisor.handle("B") is not None
    assert r.router.receiver.accepts_called_ae("B")
    assert r.router.supervisor.ctx.config.retry_delay_seconds == 30


async def test_an_invalid_file_is_refused_with_its_error_and_nothing_changes(start_router: StartRouter) -> None:
    r = await start_router((dead_node("A"),))
    write_config(r)
    append_node(r.data_dir, "- AeTitle: NEWNODE\n  HostName: 127.0.0.1\n  Port: 70000\n")
    message = error(await r.client.post("/api/config/reload", headers=AUTH), "BAD_REQUEST", 400)
    assert "Port = 70000" in message
    assert r.router.supervisor.handle("NEWNODE") is None
    (r.data_dir / "config.yml").write_text("retryDelaySeconds: [\n")
    message = error(await r.client.post("/api/config/reload", headers=AUTH), "BAD_REQUEST", 400)
    assert "config.yml" in message
    assert any("configuration reload refused" in e.message for e in r.ring.recent(level="ERROR"))


async def test_reload_adds_the_first_node_to_a_router_with_none(start_router: StartRouter) -> None:
    r = await start_router(())
    write_config(r)
    (r.data_dir / "nodes.yml").write_text("- AeTitle: FIRST\n  HostName: 127.0.0.1\n  Port: 9\n")
    assert (await reload(r))["added"] == ["FIRST"]
    assert r.router.supervisor.handle("FIRST").status.value == "running"
