"""Attacks on the dashboard's session, redirects and patient data (issue 23), over HTTP: the
login page's `next` never leads to another site, logging out and logging in cannot be forced by
another page, each login gets a fresh session id, no secret reaches a page or an answer, and a
read without a credential shows no name under any VR."""

from __future__ import annotations

from pathlib import Path

import httpx
from pydicom.dataset import Dataset

from capacitor_trio.api.auth import SESSION_TTL, Auth
from capacitor_trio.api.views import read_tags, without_names
from capacitor_trio.config.models import ApiConfig
from tests.helpers.datasets import make_dataset, write_dataset

from .conftest import AUTH, PASSWORD, TOKEN, StartRouter, StorageScp, dead_node, pacs
from .test_endpoints import data, error

COOKIE = "capacitor_session"


async def _login(client: httpx.AsyncClient) -> dict[str, str]:
    return {"X-CSRF-Token": data(await client.post("/api/auth/login", json={"password": PASSWORD}))["csrfToken"]}


async def _logged_in(client: httpx.AsyncClient) -> bool:
    return bool(data(await client.get("/api/auth/session"))["authenticated"])


async def test_login_next_never_leads_to_another_site(start_router: StartRouter) -> None:
    """A browser drops tabs and newlines from a URL and reads a backslash as a slash, so each of
    these would be "//evil.example" once followed: the login page returns to "/" instead."""
    r = await start_router()
    hostile = (
        "/\t/evil.example/", "/\n/evil.example/", "/\r\n/evil.example", "/\x00/evil.example",
        "/\\evil.example", "\\\\evil.example", " //evil.example", "https:evil.example", "//evil.example",
        "/%2F/evil.example",  # stays here: a browser does not decode %2F in a path
    )
    for bad in hostile:
        page = (await r.client.get("/login", params={"next": bad})).text
        expected = bad if bad == "/%2F/evil.example" else "/"
        assert f'data-next="{expected}"' in page, repr(bad)
    # the login shown in place of a page that needs one returns to that page, and only to it
    page = (await r.client.get("/settings")).text
    assert 'data-next="/settings"' in page


async def test_logout_needs_the_sessions_csrf_token(start_router: StartRouter, scp: StorageScp) -> None:
    """Another page cannot log the operator out: without the token, with a wrong one or with
    another session's, the session stays live; with its own it ends server-side."""
    r = await start_router((pacs(scp),))
    csrf = await _login(r.client)
    sid = r.client.cookies[COOKIE]
    async with httpx.AsyncClient(base_url=str(r.client.base_url)) as other:
        other_csrf = await _login(other)
    for headers in ({}, {"X-CSRF-Token": ""}, {"X-CSRF-Token": csrf["X-CSRF-Token"] + "x"}, other_csrf):
        error(await r.client.post("/api/auth/logout", headers=headers), "FORBIDDEN", 403)
        assert await _logged_in(r.client), headers
    # a form posted from another site (its Origin) with the right token cannot either
    resp = await r.client.post("/api/auth/logout", headers={**csrf, "Origin": "http://evil.example"})
    error(resp, "FORBIDDEN", 403)
    assert await _logged_in(r.client)
    assert data(await r.client.post("/api/auth/logout", headers=csrf)) == {"authenticated": False}
    # ended on the server: the old cookie, sent again, is nobody's
    async with httpx.AsyncClient(base_url=str(r.client.base_url), cookies={COOKIE: sid}) as stale:
        assert not await _logged_in(stale)
        error(await stale.post("/api/nodes/PACS/pause", headers=csrf), "FORBIDDEN", 403)
    # a cookie that names no live session is just cleared
    async with httpx.AsyncClient(base_url=str(r.client.base_url), cookies={COOKIE: "nobody"}) as nobody:
        assert data(await nobody.post("/api/auth/logout")) == {"authenticated": False}


async def test_each_login_gets_a_fresh_session_and_ends_the_old_one(start_router: StartRouter, scp: StorageScp) -> None:
    """Session fixation: an id planted in the browser before login is never the logged-in one,
    and logging in again ends the session the browser held."""
    r = await start_router((pacs(scp),))
    async with httpx.AsyncClient(base_url=str(r.client.base_url), cookies={COOKIE: "planted-by-attacker"}) as victim:
        resp = await victim.post("/api/auth/login", json={"password": PASSWORD})
        assert resp.headers["set-cookie"].startswith(f"{COOKIE}=") and "planted-by-attacker" not in resp.headers["set-cookie"]
    await _login(r.client)
    first = r.client.cookies[COOKIE]
    csrf = await _login(r.client)
    second = r.client.cookies[COOKIE]
    assert second != first
    async with httpx.AsyncClient(base_url=str(r.client.base_url), cookies={COOKIE: first}) as old:
        assert not await _logged_in(old)
        error(await old.post("/api/nodes/PACS/pause", headers=csrf), "FORBIDDEN", 403)
    assert await _logged_in(r.client)


async def test_login_cannot_be_forced_by_another_page(start_router: StartRouter, scp: StorageScp) -> None:
    """Login CSRF: what a page of another site can send (a form: urlencoded or text/plain,
    with its Origin) is refused, so it cannot log the victim's browser in."""
    r = await start_router((pacs(scp),))
    for kind, body in (("application/x-www-form-urlencoded", f"password={PASSWORD}"),
                       ("text/plain", f'{{"password": "{PASSWORD}"}}'), ("multipart/form-data; boundary=x", "")):
        resp = await r.client.post("/api/auth/login", content=body.encode(), headers={"Content-Type": kind})
        assert resp.status_code in (400, 415), (kind, resp.text)
        assert COOKIE not in r.client.cookies
    resp = await r.client.post("/api/auth/login", json={"password": PASSWORD}, headers={"Origin": "http://evil.example"})
    error(resp, "FORBIDDEN", 403)
    resp = await r.client.post("/api/auth/login", json={"password": PASSWORD}, headers={"Origin": "null"})
    error(resp, "FORBIDDEN", 403)
    assert COOKIE not in r.client.cookies


async def test_no_secret_in_pages_answers_or_logs(start_router: StartRouter, scp: StorageScp) -> None:
    """Neither the password, the token nor the session id appears in a page, in /api/config or in
    the recent logs; the session cookie is HttpOnly, SameSite=Strict, Path=/ and expires."""
    r = await start_router((pacs(scp),))
    resp = await r.client.post("/api/auth/login", json={"password": PASSWORD})
    cookie = resp.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie and "Max-Age=" in cookie
    sid = r.client.cookies[COOKIE]
    await r.client.post("/api/auth/login", json={"password": "wrong " + PASSWORD})
    await r.client.get("/api/nodes", headers={"Authorization": "Bearer wrong-" + TOKEN})
    await _login(r.client)
    sid2 = r.client.cookies[COOKIE]
    texts = [(await r.client.get(p)).text for p in ("/", "/queue", "/queue/1", "/logs", "/settings", "/login",
                                                      "/nodes/PACS/edit", "/api/config", "/api/auth/session")]
    texts.append((await r.client.get("/api/logs/recent", params={"lines": 1000, "level": "DEBUG"}, headers=AUTH)).text)
    for text in texts:
        for secret in (PASSWORD, TOKEN, sid, sid2):
            assert secret not in text


def test_a_name_under_another_vr_or_in_a_private_tag_is_not_shown(tmp_path: Path) -> None:
    """A hostile peer sends PatientName as LO (explicit VR: pydicom keeps the VR sent) and a name
    in a private element: a read without a credential shows neither, nor any PN, nor the
    patient's demographics; the patient ID (the item's identity) stays."""
    ds = make_dataset(seed=1, patient_name="", patient_id="PID001")
    del ds.PatientName
    ds.add_new(0x00100010, "LO", "DOE^JANE")
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091001, "LO", "DOE^JANE")
    ds.PatientBirthDate = "19700101"
    ds.PatientAddress = "1 Hostile Street"
    ds.OtherPatientIDs = "OTHER-ID"
    seq_item = Dataset()
    seq_item.add_new(0x00081050, "LO", "DOE^JOHN")  # PerformingPhysicianName, as LO
    ds.add_new(0x00081111, "SQ", [seq_item])
    tags = read_tags(write_dataset(tmp_path / "hostile.dcm", ds)).json
    assert tags["00100010"]["vr"] == "LO"  # what the attack relies on
    shown = without_names(tags)
    assert "DOE^J" not in repr(shown)
    assert not {"00100030", "00101040", "00101000", "00091001"} & set(shown)  # demographics, private
    assert shown["00100020"]["Value"] == ["PID001"] and "00081111" in shown


def test_a_session_ends_when_its_cookie_does_however_much_it_is_used() -> None:
    """The cookie lives SESSION_TTL from login; the server ends the session then too, so that a
    session id copied out of a browser cannot be kept alive by using it."""
    now = [0.0]
    auth = Auth(ApiConfig(enabled=True, service_password=PASSWORD), clock=lambda: now[0])
    sid = auth.new_session()
    while now[0] < SESSION_TTL - 3600:
        now[0] += 3600
        assert auth.credential(None, sid) == "session"
    now[0] = SESSION_TTL
    assert auth.credential(None, sid) is None and auth.csrf_token(sid) is None


async def test_api_answers_are_not_stored_nor_sniffed(start_router: StartRouter, scp: StorageScp) -> None:
    """The JSON answers carry patient names (with a credential): a browser keeps none of them on
    disk and never reads one as HTML or script; errors too."""
    r = await start_router((pacs(scp),))
    for path in ("/api/queue/items", "/api/queue/items/1", "/api/nodes", "/api/logs/recent", "/api/no-such"):
        resp = await r.client.get(path, headers=AUTH)
        assert resp.headers["cache-control"] == "no-store", path
        assert resp.headers["x-content-type-options"] == "nosniff", path


async def test_values_in_a_pages_url_are_escaped(start_router: StartRouter, scp: StorageScp) -> None:
    """What a page renders from its URL (the node edit page's AE title and role, the login's
    next, the login link's return path) is escaped: no markup of it reaches the page."""
    r = await start_router((pacs(scp),))
    await _login(r.client)
    hostile = '"><img src=x onerror=alert(1)><b x="'
    pages = [
        await r.client.get("/nodes/" + hostile + "/edit", params={"role": hostile}),
        await r.client.get("/login", params={"next": "/" + hostile}),
        await r.client.get("/queue", params={"state": hostile}),
    ]
    for resp in pages:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
        assert "<img" not in resp.text and '<b x="' not in resp.text
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in pages[0].text  # shown, as text


async def test_no_endpoint_the_pages_read_shows_a_name_without_a_session(start_router: StartRouter) -> None:
    """Every read the pages make, without a credential while one is configured: no patient name
    anywhere (the item list and detail, the nodes, the service, the logs, the metrics)."""
    r = await start_router((dead_node("DEAD"),))
    await r.client.post("/api/nodes/DEAD/pause", headers=AUTH)
    (item,) = await r.queue(1, dest="DEAD", state="failed")
    assert "DOE" in (await r.client.get(f"/api/queue/items/{item}", headers=AUTH)).text  # there to find
    reads = (
        "/api/queue/items", f"/api/queue/items/{item}", "/api/queue/items?search=pid001", "/api/nodes",
        "/api/nodes/DEAD", "/api/service/status", "/api/service/processing-status", "/api/metrics",
        "/api/queue/stats", "/api/logs/recent?lines=1000&level=DEBUG", "/api/system/info", "/api/auth/session",
    )
    for path in reads:
        text = (await r.client.get(path)).text
        assert "DOE" not in text and "JANE" not in text, path
    error(await r.client.get("/api/config"), "FORBIDDEN", 403)


async def test_a_cookie_set_by_another_local_page_does_not_shadow_the_session(start_router: StartRouter, scp: StorageScp) -> None:
    """Cookies do not keep to a port: another program's page on this machine can set its own
    capacitor_session (Path=/api: the browser sends it first). The operator's session still
    counts, and the bogus one is nobody's."""
    r = await start_router((pacs(scp),))
    csrf = await _login(r.client)
    sid = r.client.cookies[COOKIE]
    both = {"Cookie": f"{COOKIE}=tossed-by-another-page; {COOKIE}={sid}"}
    async with httpx.AsyncClient(base_url=str(r.client.base_url)) as browser:
        assert data(await browser.get("/api/auth/session", headers=both))["csrfToken"] == csrf["X-CSRF-Token"]
        data(await browser.post("/api/nodes/PACS/pause", headers={**both, **csrf}))
        assert f'content="{csrf["X-CSRF-Token"]}"' in (await browser.get("/", headers=both)).text
        bogus = {"Cookie": f"{COOKIE}=tossed-by-another-page"}
        error(await browser.post("/api/nodes/PACS/resume", headers={**bogus, **csrf}), "FORBIDDEN", 403)
