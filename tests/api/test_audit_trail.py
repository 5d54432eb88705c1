"""Operator actions through the API and deliveries reach the audit trail: who (the credential,
never the secret), what, which items; a refused action too; the chain verifies."""

from __future__ import annotations

import json

import trio

from capacitor_trio.audit import AUDIT_LOG, verify

from .conftest import AUTH, PASSWORD, StartRouter, StorageScp, dead_node, pacs


def audit_lines(data_dir: object) -> list[dict[str, object]]:
    path = data_dir / "log" / AUDIT_LOG  # type: ignore[operator]
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_operator_actions_and_deliveries_are_audited(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp), dead_node()))
    assert (await r.client.post("/api/nodes/DEAD/pause", headers=AUTH)).status_code == 200
    [item] = await r.queue(1, dest="DEAD")
    login = await r.client.post("/api/auth/login", json={"password": PASSWORD})
    sid = login.cookies["capacitor_session"]  # kept by the client for the next request
    csrf = {"X-CSRF-Token": login.json()["data"]["csrfToken"]}  # a session's write carries it
    resp = await r.client.post(f"/api/queue/items/{item}/fail", headers=csrf)
    assert resp.status_code == 200
    r.client.cookies.clear()
    refused = await r.client.post("/api/nodes/PACS/resume", headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 403  # not allowed: nothing done, nothing audited
    conflict = await r.client.put("/api/nodes/PACS", headers=AUTH, json={"role": "Storage", "priority": 2})
    assert conflict.status_code == 409  # a running node is not edited: refused, and audited so
    await r.queue(2, dest="PACS", state="prepared")
    r.router.supervisor.wake_all()
    with trio.fail_after(20):
        while True:
            if any(e["event"] == "delivery" for e in audit_lines(r.data_dir)):
                break
            await trio.sleep(0.05)

    events = audit_lines(r.data_dir)
    operator = [e for e in events if e["event"] == "operator"]
    assert operator[0]["who"] == "token@127.0.0.1" and operator[0]["action"] == "pause"
    assert operator[0]["target"] == "DEAD (Storage)" and operator[0]["outcome"] == "ok"
    session = operator[1]
    assert str(session["who"]).startswith("session:") and sid not in str(session["who"])
    assert session["action"] == "item-fail" and session["items"] == [item]
    assert all("wrong" not in json.dumps(e) and PASSWORD not in json.dumps(e) for e in events)
    edit = operator[2]
    assert edit["action"] == "edit-node priority,role" and str(edit["outcome"]).startswith("refused")
    delivery = next(e for e in events if e["event"] == "delivery")
    assert delivery["node"] == "PACS" and len(delivery["delivered"]) >= 1  # type: ignore[arg-type]
    assert verify(r.data_dir, r.data_dir / "log") == (len(events), None)
