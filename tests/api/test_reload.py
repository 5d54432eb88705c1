"""Configuration reload through `POST /api/config/reload`: node additions, removals and edits from
nodes.yml and the reloadable config.yml keys are applied; anything invalid changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
import yaml

from capacitor_trio.actors.control import Control
from capacitor_trio.actors.reload import reload_configuration
from capacitor_trio.domain.instance import Destination

from .conftest import AUTH, PASSWORD, TOKEN, Running, StartRouter, dead_node
from .test_endpoints import data, error
from .test_filters import ROUTINGS


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


async def test_a_reload_after_a_node_edit_finds_nothing_to_change(start_router: StartRouter) -> None:
    """The node edit replaced the node in force and in nodes.yml alike: one owner, no stale copy."""
    r = await start_router((dead_node("A"),))
    write_config(r)
    await r.client.post("/api/nodes/A/pause", headers=AUTH)
    data(await r.client.put("/api/nodes/A", json={"role": "Storage", "priority": 2}, headers=AUTH))
    assert r.router.settings.nodes[0].priority == 2
    report = await reload(r)
    assert (report["added"], report["removed"], report["changed"]) == ([], [], [])


async def test_a_reload_whose_caller_goes_away_is_applied_whole(start_router: StartRouter) -> None:
    """A caller cancelled once the new settings are published (an HTTP client disconnecting)
    does not leave the new node routed without an actor."""
    r = await start_router((dead_node("A"), dead_node("B")))
    write_config(r)
    path = r.data_dir / "nodes.yml"
    entries = [e for e in yaml.safe_load(path.read_text()) if e["AeTitle"] != "B"]
    entries.append({"AeTitle": "C", "HostName": "127.0.0.1", "Port": 9})
    path.write_text(yaml.safe_dump(entries))
    before = r.router.settings
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reload_configuration, r.router)
        await r.router.in_force.wait_value(lambda s: s is not before)
        nursery.cancel_scope.cancel()
    assert [n.ae_title for n in r.router.nodes] == ["A", "C"]
    handle = r.router.supervisor.handle("C")
    assert handle is not None and r.router.supervisor.handle("B") is None
    assert r.router.receiver.destinations_for("C") == [Destination("C", "Storage")]


async def test_removing_a_node_gives_back_what_it_had_checked_out(start_router: StartRouter) -> None:
    r = await start_router((dead_node("A"), dead_node("B")))
    write_config(r)
    await r.client.post("/api/nodes/B/pause", headers=AUTH)
    (item_id,) = await r.queue(1, dest="B", state="prepared")
    handle = r.router.supervisor.handle("B")
    (item,) = await r.store.checkout_batch(handle.destination, now=r.router.clock() + 10, limit=1)
    await r.router.supervisor.remove(("B", "Storage"))
    assert not (await r.store.get_item(item.id)).checked_out
    assert item.id == item_id


async def test_a_node_edit_whose_caller_goes_away_is_applied_whole(start_router: StartRouter) -> None:
    """Cancelled once the actor has the new settings, the edit still reaches nodes.yml, the node
    set in force and the routes: the actor and the file never disagree."""
    r = await start_router((dead_node("A"),))
    await r.client.post("/api/nodes/A/pause", headers=AUTH)
    handle = r.router.supervisor.handle("A")
    node = handle.node
    control = Control(r.router)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.edit_node, node, {"aliases": ["ALIASED"]})
        while handle.node is node:
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    assert handle.node.aliases == ("ALIASED",)
    assert r.router.nodes[0].aliases == ("ALIASED",)
    assert r.router.receiver.destinations_for("ALIASED") == [Destination("A", "Storage")]
    assert yaml.safe_load((r.data_dir / "nodes.yml").read_text())[0]["Aliases"] == ["ALIASED"]


async def test_expiry_asks_each_node_and_expires_items_of_nodes_gone_itself(start_router: StartRouter) -> None:
    r = await start_router((dead_node("A"),))
    await r.client.post("/api/nodes/A/pause", headers=AUTH)
    await r.queue(2, dest="A")
    await r.queue(1, dest="GONE")  # a node since removed from nodes.yml: no actor
    await trio.sleep(0.01)
    assert await Control(r.router).expire(0.005) == 3
    assert (await r.store.counts()).expired == 3


async def test_reload_reads_the_filter_chain_again_and_keeps_it_on_an_error(start_router: StartRouter) -> None:
    r = await start_router((dead_node("PACS"), dead_node("VNA")))
    (r.data_dir / "routings.yml").write_text(ROUTINGS)
    write_config(r, filters=["route"])
    assert (await reload(r))["configChanged"] == ["filters"]  # the chain named in config.yml
    assert r.router.supervisor.ctx.config.filter_chain.names == ("route",)
    assert r.router.receiver.config.filter_chain == r.router.settings.config.filter_chain
    (r.data_dir / "routings.yml").write_text(ROUTINGS.replace("CT also to the VNA", "renamed"))
    assert (await reload(r))["configChanged"] == ["filters"]  # only a filter file changed
    shown = data(await r.client.get("/api/filters"))
    assert shown["files"][0]["entries"][0]["description"] == "renamed"
    (r.data_dir / "routings.yml").write_text("- Actions:\n    - Type: teleport\n")
    message = error(await r.client.post("/api/config/reload", headers=AUTH), "BAD_REQUEST", 400)
    assert "routings.yml" in message
    (r.data_dir / "routings.yml").write_text(ROUTINGS.replace("Target: VNA", "Target: NOWHERE"))
    error(await r.client.post("/api/config/reload", headers=AUTH), "BAD_REQUEST", 400)
    shown = data(await r.client.get("/api/filters"))
    assert shown["files"][0]["entries"][0]["description"] == "renamed"  # the old chain stays
