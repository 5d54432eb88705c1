"""Auth (token, cookie after login, wrong credential, open when nothing is configured), the
loopback-only listener and its port selection."""

from __future__ import annotations

import errno
import logging
import shutil
import socket
import subprocess

import httpx
import pytest
import trio

from capacitor_trio.api.auth import FORGET_AFTER, FREE_FAILURES, MAX_WAIT, LoginThrottle
from capacitor_trio.api.server import ApiPortsBusy, bind_loopback
from capacitor_trio.config.models import ApiConfig

from .conftest import AUTH, PASSWORD, StartRouter, StorageScp, dead_node, free_port, pacs
from .test_endpoints import data, error


async def test_token_and_wrong_token(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),))
    data(await r.client.post("/api/nodes/PACS/pause", headers=AUTH))
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dGVzdC10b2tlbg=="},
        {"Authorization": AUTH["Authorization"] + "x"},
        {"Authorization": PASSWORD},  # the password is not a token
    ):
        error(await r.client.post("/api/nodes/PACS/resume", headers=headers), "FORBIDDEN", 403)
    # reads are open
    data(await r.client.get("/api/nodes"))


async def test_cookie_after_login_and_logout(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),))
    error(await r.client.post("/api/auth/login", json={"password": "nope"}), "FORBIDDEN", 403)
    error(await r.client.post("/api/auth/login", json={"password": 5}), "BAD_REQUEST", 400)
    error(await r.client.post("/api/auth/login", json={}), "BAD_REQUEST", 400)
    error(await r.client.post("/api/auth/login", json={"password": PASSWORD, "user": "x"}), "BAD_REQUEST", 400)
    assert "capacitor_session" not in r.client.cookies

    resp = await r.client.post("/api/auth/login", json={"password": PASSWORD})
    session = data(resp)
    assert session["authenticated"] is True
    csrf = {"X-CSRF-Token": session["csrfToken"]}
    cookie = resp.headers["set-cookie"]
    sid = r.client.cookies["capacitor_session"]
    assert PASSWORD not in cookie and len(sid) >= 32 and len(csrf["X-CSRF-Token"]) >= 32
    assert sid != csrf["X-CSRF-Token"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    data(await r.client.post("/api/nodes/PACS/pause", headers=csrf))  # the cookie and its token

    # another login gets another random session id
    other = httpx.AsyncClient(base_url=str(r.client.base_url))
    async with other:
        other_csrf = data(await other.post("/api/auth/login", json={"password": PASSWORD}))["csrfToken"]
        assert other.cookies["capacitor_session"] != sid and other_csrf != csrf["X-CSRF-Token"]
        # another session's token is not this one's
        error(await other.post("/api/nodes/PACS/resume", headers=csrf), "FORBIDDEN", 403)
        data(await other.post("/api/auth/logout", headers={"X-CSRF-Token": other_csrf}))
        error(await other.post("/api/nodes/PACS/resume", headers={"X-CSRF-Token": other_csrf}), "FORBIDDEN", 403)

    # a forged cookie is refused
    forged = httpx.AsyncClient(base_url=str(r.client.base_url), cookies={"capacitor_session": sid[:-1] + ("B" if sid.endswith("A") else "A")})
    async with forged:
        error(await forged.post("/api/nodes/PACS/resume"), "FORBIDDEN", 403)

    data(await r.client.post("/api/nodes/PACS/resume", headers=csrf))
    resp = await r.client.post("/api/auth/logout", headers=csrf)
    assert data(resp) == {"authenticated": False}
    stale = httpx.AsyncClient(base_url=str(r.client.base_url), cookies={"capacitor_session": sid})
    async with stale:
        error(await stale.post("/api/nodes/PACS/pause", headers=csrf), "FORBIDDEN", 403)


async def test_cookie_write_needs_its_csrf_token(start_router: StartRouter, scp: StorageScp) -> None:
    """issue 23: a write with the session cookie alone (a browser that sent neither an Origin nor
    honoured SameSite) is refused; the session's token in X-CSRF-Token lets it through; reads and
    bearer-token writes need none. GET /api/auth/session tells the page its token."""
    r = await start_router((pacs(scp),))
    assert data(await r.client.get("/api/auth/session")) == {
        "authenticated": False, "loginEnabled": True, "authRequired": True, "csrfToken": None,
    }
    token = data(await r.client.post("/api/auth/login", json={"password": PASSWORD}))["csrfToken"]
    assert data(await r.client.get("/api/auth/session"))["csrfToken"] == token
    for headers in ({}, {"X-CSRF-Token": ""}, {"X-CSRF-Token": token + "x"}, {"X-CSRF-Token": token[:-1]}):
        message = error(await r.client.post("/api/nodes/PACS/pause", headers=headers), "FORBIDDEN", 403)
        assert "X-CSRF-Token" in message
    assert not data(await r.client.get("/api/nodes/PACS"))["paused"]
    data(await r.client.post("/api/nodes/PACS/pause", headers={"X-CSRF-Token": token}))
    data(await r.client.get("/api/config"))  # a credentialed read: the cookie alone
    data(await r.client.post("/api/nodes/PACS/resume", headers=AUTH))  # the token needs none
    # a cross-site form post with the cookie: refused by the Origin check (and the missing token)
    resp = await r.client.post(
        "/api/nodes/PACS/pause", content=b"x=1",
        headers={"Origin": "http://127.0.0.1:1", "Content-Type": "application/x-www-form-urlencoded"},
    )
    error(resp, "FORBIDDEN", 403)
    assert not data(await r.client.get("/api/nodes/PACS"))["paused"]


async def test_token_only_disables_login(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),), password="")
    error(await r.client.post("/api/auth/login", json={"password": ""}), "FORBIDDEN", 403)
    error(await r.client.post("/api/nodes/PACS/pause"), "FORBIDDEN", 403)
    data(await r.client.post("/api/nodes/PACS/pause", headers=AUTH))


async def test_password_only(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),), token="")
    error(await r.client.post("/api/nodes/PACS/pause", headers={"Authorization": "Bearer"}), "FORBIDDEN", 403)
    token = data(await r.client.post("/api/auth/login", json={"password": PASSWORD}))["csrfToken"]
    data(await r.client.post("/api/nodes/PACS/pause", headers={"X-CSRF-Token": token}))


async def test_open_when_nothing_is_configured(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),), token="", password="")
    data(await r.client.post("/api/nodes/PACS/pause"))
    data(await r.client.post("/api/nodes/PACS/resume", headers={"Authorization": "Bearer anything"}))
    data(await r.client.post("/api/service/pause"))
    data(await r.client.post("/api/service/resume"))


async def test_refused_write_with_a_body_leaves_the_connection_usable(start_router: StartRouter, scp: StorageScp) -> None:
    r = await start_router((pacs(scp),))
    with trio.fail_after(10):
        for _ in range(3):  # the same keep-alive connection every time
            body = {"targetState": "New", "pad": "x" * 300_000}
            error(await r.client.post("/api/queue/studies/1.2.3/move", json=body), "FORBIDDEN", 403)
            data(await r.client.get("/api/nodes"))


async def test_other_sites_cannot_reach_the_api(start_router: StartRouter, scp: StorageScp) -> None:
    """Even with writes open, a web page elsewhere cannot use the API: a non-loopback Host (DNS
    rebinding) and a cross-site Origin on a write are refused."""
    r = await start_router((pacs(scp),), token="", password="")
    error(await r.client.get("/api/nodes", headers={"Host": "evil.example"}), "FORBIDDEN", 403)
    error(await r.client.get("/api/nodes", headers={"Host": "evil.example:1080"}), "FORBIDDEN", 403)
    error(
        await r.client.post("/api/service/pause", headers={"Origin": "https://evil.example"}), "FORBIDDEN", 403
    )
    assert r.router.service.storage_scu  # nothing was paused
    data(await r.client.get("/api/nodes", headers={"Origin": "https://evil.example"}))  # reads carry no harm
    data(await r.client.post("/api/service/pause", headers={"Origin": f"http://localhost:{r.router.api_port}"}))
    data(await r.client.get("/api/nodes", headers={"Host": "localhost"}))


async def test_only_the_apis_own_origin_may_write(start_router: StartRouter, scp: StorageScp) -> None:
    """Another program's page on this machine (another port, https, an opaque origin) cannot
    post to the API: scheme, host and port of the Origin must be the API's own."""
    r = await start_router((pacs(scp),), token="", password="")
    port = r.router.api_port
    for origin in (
        f"http://127.0.0.1:{port + 1}",
        "http://127.0.0.1:8000",
        "http://127.0.0.1",
        f"https://127.0.0.1:{port}",
        f"http://evil.example:{port}",
        f"http://127.0.0.1.evil.example:{port}",
        f"http://user@127.0.0.1:{port}",
        "http://127.0.0.1:notaport",
        "null",
    ):
        error(await r.client.post("/api/service/pause", headers={"Origin": origin}), "FORBIDDEN", 403)
    assert r.router.service.storage_scu  # nothing was paused
    for origin in (f"http://127.0.0.1:{port}", f"http://LOCALHOST:{port}", f"http://[::1]:{port}"):
        data(await r.client.post("/api/service/resume", headers={"Origin": origin}))


async def test_a_json_body_needs_the_json_content_type(start_router: StartRouter, scp: StorageScp) -> None:
    """A no-cors text/plain (or form) post is not parsed as JSON: 415 in the envelope."""
    r = await start_router((dead_node(),), token="", password="")
    (item,) = await r.queue(dest="DEAD")
    body = b'{"targetState": "Rejected"}'
    url = f"/api/queue/items/{item}/move"
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "text/plain; charset=utf-8", None):
        headers = {"Content-Type": content_type} if content_type else {}
        resp = await r.client.post(url, content=body, headers=headers)
        assert "application/json" in error(resp, "BAD_REQUEST", 415)
        assert data(await r.client.get(f"/api/queue/items/{item}"))["state"] != "rejected"
    resp = await r.client.post("/api/auth/login", content=b'{"password": "x"}', headers={"Content-Type": "text/plain"})
    error(resp, "BAD_REQUEST", 415)
    json_type = {"Content-Type": "application/json; charset=utf-8"}
    assert data(await r.client.post(url, content=body, headers=json_type))["state"] == "rejected"


async def test_repeated_wrong_passwords_are_slowed_down(start_router: StartRouter, scp: StorageScp) -> None:
    """After FREE_FAILURES wrong passwords the client must wait: 429 with Retry-After, and the
    password is not even looked at (the right one too) until the wait is over."""
    r = await start_router((pacs(scp),))
    for _ in range(FREE_FAILURES + 1):
        error(await r.client.post("/api/auth/login", json={"password": "guess"}), "FORBIDDEN", 403)
    for password in ("guess", PASSWORD):
        resp = await r.client.post("/api/auth/login", json={"password": password})
        assert "try again" in error(resp, "TOO_MANY_REQUESTS", 429)
        assert resp.headers["Retry-After"] == "1"
    assert "capacitor_session" not in r.client.cookies
    # wrong passwords and tokens count together: the token waits too (not looked at)
    resp = await r.client.post("/api/nodes/PACS/pause", headers=AUTH)
    assert "try again" in error(resp, "TOO_MANY_REQUESTS", 429)
    assert any("further attempts are slowed down" in e.message for e in r.ring.recent())


async def test_repeated_wrong_tokens_are_slowed_down(start_router: StartRouter, scp: StorageScp) -> None:
    """issue 19 #12: a write endpoint took wrong bearer tokens at ~1,000/s. After FREE_FAILURES
    wrong tokens a client must wait: every write with a bearer token (the right one too) is
    answered 429 with Retry-After, and a login too (one count); a browser session already
    open keeps working (a session id is not worth guessing)."""
    r = await start_router((pacs(scp),))
    browser = httpx.AsyncClient(base_url=str(r.client.base_url))
    async with browser:
        csrf = {"X-CSRF-Token": data(await browser.post("/api/auth/login", json={"password": PASSWORD}))["csrfToken"]}
        for _ in range(FREE_FAILURES + 1):
            resp = await r.client.post("/api/nodes/PACS/pause", headers={"Authorization": "Bearer guess"})
            error(resp, "FORBIDDEN", 403)
        for headers in ({"Authorization": "Bearer guess"}, AUTH):
            resp = await r.client.post("/api/nodes/PACS/pause", headers=headers)
            assert "try again" in error(resp, "TOO_MANY_REQUESTS", 429)
            assert resp.headers["Retry-After"] == "1"
        resp = await r.client.post("/api/auth/login", json={"password": PASSWORD})
        error(resp, "TOO_MANY_REQUESTS", 429)
        data(await browser.post("/api/nodes/PACS/pause", headers=csrf))  # the session cookie alone
    assert any("wrong passwords or tokens" in e.message for e in r.ring.recent())


async def test_the_token_is_compared_exactly_as_sent(start_router: StartRouter, scp: StorageScp) -> None:
    """issue 19 #12: the token after "Bearer " is compared with api.token as configured, with
    nothing stripped on either side: a token beginning with a space works as sent."""
    r = await start_router((pacs(scp),), token=" padded")
    data(await r.client.post("/api/nodes/PACS/pause", headers={"Authorization": "Bearer  padded"}))
    resp = await r.client.post("/api/nodes/PACS/resume", headers={"Authorization": "Bearer padded"})
    error(resp, "FORBIDDEN", 403)


def test_login_throttle_on_a_clock() -> None:
    now = [0.0]
    throttle = LoginThrottle(lambda: now[0])
    waits = []
    for _ in range(FREE_FAILURES + 8):
        assert throttle.wait("a") == 0.0
        throttle.failed("a")
        waits.append(throttle.wait("a"))
        now[0] += waits[-1]
    assert waits == [0.0] * FREE_FAILURES + [1.0, 2.0, 4.0, 8.0, 16.0, MAX_WAIT, MAX_WAIT, MAX_WAIT]
    assert throttle.wait("b") == 0.0  # per client
    throttle.failed("a")
    now[0] += 10.0
    assert throttle.wait("a") == MAX_WAIT - 10.0
    now[0] += FORGET_AFTER
    assert throttle.wait("a") == 0.0
    throttle.failed("a")
    assert throttle.wait("a") == 0.0  # forgotten: a fresh start
    for _ in range(FREE_FAILURES):
        throttle.failed("c")
    throttle.succeeded("c")
    throttle.failed("c")
    assert throttle.wait("c") == 0.0  # a right password clears the count


def test_every_loopback_address_is_one_client() -> None:
    """A local guesser cannot start afresh from 127.0.0.2, 127.0.0.3, ... or ::1."""
    throttle = LoginThrottle(lambda: 0.0)
    for i in range(FREE_FAILURES + 1):
        throttle.failed(f"127.0.{i}.{i + 2}")
    assert throttle.wait("127.0.0.1") == throttle.wait("::1") == 1.0
    assert throttle.wait("10.1.2.3") == 0.0


# ---- the listener ----------------------------------------------------------------------------


def non_loopback_ipv4() -> str | None:
    if shutil.which("ip"):
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            parts = line.split()
            if "inet" in parts:
                addr = parts[parts.index("inet") + 1].split("/")[0]
                if not addr.startswith("127."):
                    return addr
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


async def test_listener_is_loopback_only(start_router: StartRouter, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="capacitor_trio")
    r = await start_router()
    port = r.router.api_port
    assert port
    assert f"API listening on http://127.0.0.1:{port}" in caplog.messages
    data(await r.client.get("/api/system/info"))
    addr = non_loopback_ipv4()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(OSError), trio.fail_after(5):  # refused: nothing listens there
        await trio.open_tcp_stream(addr, port)


async def test_busy_port_moves_to_the_next(start_router: StartRouter) -> None:
    held = bind_loopback(0)
    base = held.getsockname()[1]
    try:
        second = bind_loopback(base)
        try:
            assert second.getsockname() == ("127.0.0.1", base + 1) or second.getsockname()[1] > base
        finally:
            second.close()
    finally:
        held.close()


def test_all_ports_busy_fails_with_a_clear_error() -> None:
    held = []
    base = None
    # find ten consecutive free ports and hold them
    for _attempt in range(50):
        first = bind_loopback(0)
        base = first.getsockname()[1]
        held = [first]
        try:
            for p in range(base + 1, base + 10):
                held.append(bind_loopback(p, tries=1))
        except ApiPortsBusy:
            for s in held:
                s.close()
            held = []
            continue
        break
    assert held and base is not None
    try:
        with pytest.raises(ApiPortsBusy) as info:
            bind_loopback(base)
        assert info.value.errno == errno.EADDRINUSE
        assert f"{base}-{base + 9}" in str(info.value) and "api.port" in str(info.value)
    finally:
        for s in held:
            s.close()


async def test_router_api_on_configured_port(start_router: StartRouter) -> None:
    port = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        r = await start_router(api=ApiConfig(enabled=True, port=port))
        assert r.router.api_port is not None and port < r.router.api_port < port + 10
    finally:
        blocker.close()
