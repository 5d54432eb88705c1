"""Authentication of write (🔒) endpoints: a bearer token or a browser session cookie.

Reads are open. Writes need ``Authorization: Bearer <api.token>`` or the ``capacitor_session``
cookie that ``POST /api/auth/login`` sets when given ``api.servicePassword``; the cookie holds a
random session id, never the password. When neither secret is configured, writes are open
(backward-compatible). Every secret comparison is constant-time (`hmac.compare_digest`), and
sessions are looked up by comparing against each live session id, not by a dict lookup on the
attacker's string.

A write with the session cookie (and no bearer token) must also carry the session's CSRF token in
the ``X-CSRF-Token`` header (`CSRF_HEADER`): login answers it, the dashboard's pages carry it.
The cookie is SameSite=Strict and the Origin is checked; the token is defence in depth for a
browser that sends neither an Origin nor honours SameSite. Bearer-token writes need none.

A write from a browser must come from the API's own origin: `same_origin` compares an Origin
header's scheme, host and port with the API's (``http``, a loopback name, the port it listens
on), so that a page served by another program on this machine cannot post to it.

Password and token guessing is slowed per client address (`LoginThrottle`): after
`FREE_FAILURES` wrong passwords or bearer tokens in a row (counted together), each further
attempt must wait, 1 s doubling up to `MAX_WAIT` (30 s), and one made earlier is answered 429
with Retry-After without looking at the password or token (the right one too: a throttle that
let it through would tell a guesser when it was right). Writes with a session cookie and no
bearer token are not held back (a session id is random, 256 bits: not worth guessing). Every
loopback address counts as one client (a local user can connect from any of 127.0.0.0/8, so
counting them apart would give a guesser 16 million fresh starts); the wait stays short because
the operator shares that client with everyone on the machine.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable

import attrs

from capacitor_trio.config.models import ApiConfig

log = logging.getLogger("capacitor_trio.api")

COOKIE = "capacitor_session"
#: The header a cookie-authenticated write carries its session's CSRF token in.
CSRF_HEADER = "X-CSRF-Token"
#: How long a browser session lasts from login (seconds), used or not: the cookie's Max-Age, and
#: the server ends it then too (a session id copied out of a browser is not kept alive by use).
SESSION_TTL = 12 * 3600.0
#: Most sessions kept at once; the oldest is dropped beyond that.
MAX_SESSIONS = 256


#: Wrong passwords a client may send in a row before it has to wait.
FREE_FAILURES = 5
#: The wait after the first failure beyond FREE_FAILURES; it doubles with each further one...
FIRST_WAIT = 1.0
#: ...up to this (seconds).
MAX_WAIT = 30.0
#: A client's failures are forgotten this long after its last one (seconds).
FORGET_AFTER = 600.0
#: Most client addresses remembered at once; the one idle longest is dropped beyond that.
MAX_CLIENTS = 4096


class LoginThrottle:
    """Wrong passwords and bearer tokens per client address, and how long each client must
    wait before its next attempt."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: client -> (failures in a row, earliest time of the next attempt, time of the last failure)
        self._clients: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    @staticmethod
    def _key(client: str) -> str:
        """The client's address; every loopback address is the same client."""
        try:
            return "loopback" if ipaddress.ip_address(client).is_loopback else client
        except ValueError:  # not an address (a Unix socket, a test's name)
            return client

    def wait(self, client: str) -> float:
        """Seconds `client` must still wait before its password is looked at (0: go ahead)."""
        client = self._key(client)
        now = self._clock()
        state = self._clients.get(client)
        if state is None:
            return 0.0
        if now - state[2] >= FORGET_AFTER:
            del self._clients[client]
            return 0.0
        return max(0.0, state[1] - now)

    def failed(self, client: str) -> None:
        client = self._key(client)
        now = self._clock()
        failures = self._clients.pop(client, (0, 0.0, now))[0] + 1
        extra = failures - FREE_FAILURES
        delay = 0.0 if extra <= 0 else min(FIRST_WAIT * 2.0 ** min(extra - 1, 32), MAX_WAIT)
        if extra == 1:
            log.warning(
                "API: %d wrong passwords or tokens in a row from %s; further attempts are "
                "slowed down (up to %d s apart)", failures, client, MAX_WAIT,
            )
        self._clients[client] = (failures, now + delay, now)
        while len(self._clients) > MAX_CLIENTS:
            self._clients.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._clients.pop(self._key(client), None)


#: The host names the API is reached by (it listens on 127.0.0.1 only).
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def same_origin(origin: str, port: int | None) -> bool:
    """True when the Origin header `origin` is the API's own: ``http://`` + a loopback name +
    `port` (the port the request came in on; None: unknown, nothing matches)."""
    try:
        url = urllib.parse.urlsplit(origin.strip())
        origin_port = url.port if url.port is not None else 80
    except ValueError:  # a port that is not a number, a malformed IPv6 literal
        return False
    plain = not (url.path or url.query or url.fragment or url.username or url.password)
    return plain and url.scheme == "http" and url.hostname in LOOPBACK_NAMES and origin_port == port


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, exactly as sent after
    "Bearer " (compared as it is with ``api.token``, which is kept exactly as configured); None
    when there is no such header."""
    if not authorization:
        return None
    scheme, sep, token = authorization.partition(" ")
    return token if sep and scheme.lower() == "bearer" else None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


@attrs.define
class Session:
    expires: float  # monotonic seconds
    csrf: str  # the token a write with this session's cookie must carry (CSRF_HEADER)


class Auth:
    def __init__(self, config: ApiConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        #: session id -> its expiry and CSRF token
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self.throttle = LoginThrottle(clock)

    @property
    def required(self) -> bool:
        return self.config.auth_required

    @property
    def login_enabled(self) -> bool:
        return bool(self.config.service_password)

    def _now(self) -> float:
        return self._clock()

    def check_password(self, password: str) -> bool:
        return self.login_enabled and _same(password, self.config.service_password)

    def new_session(self) -> str:
        self._expire()
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = Session(self._now() + SESSION_TTL, secrets.token_urlsafe(32))
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return sid

    def end_session(self, sid: str | None) -> None:
        match = self._find(sid)
        if match is not None:
            del self._sessions[match]

    def _expire(self) -> None:
        now = self._now()
        for sid in [s for s, session in self._sessions.items() if session.expires <= now]:
            del self._sessions[sid]

    def _find(self, sid: str | None) -> str | None:
        if not sid:
            return None
        self._expire()
        found = None
        for known in self._sessions:  # compare against every one: no early exit, no dict probe
            if _same(sid, known):
                found = known
        return found

    def session_cookie(self, values: list[str]) -> str | None:
        """Of the ``capacitor_session`` cookies a request carries, the first that names a live
        session (else the first, or None). Cookies do not keep to a port: a page of another
        program on this machine can set one of the same name with a longer Path, which the
        browser sends first; taken alone it would shadow the operator's session."""
        for value in values:
            if self._find(value) is not None:
                return value
        return values[0] if values else None

    def token_wait(self, authorization: str | None, client: str) -> float:
        """Seconds `client` must still wait before a bearer token it sends is looked at (0: go
        ahead, or it sends none: a session cookie alone is not held back)."""
        if not self.required or bearer_token(authorization) is None:
            return 0.0
        return self.throttle.wait(client)

    def audit_name(self, authorization: str | None, cookie: str | None) -> str:
        """Which credential an allowed write came with, for the audit trail: "token",
        "session:<first 8 hex digits of the session id's SHA-256>" or "open" (no credential
        configured); never the secret itself."""
        if not self.required:
            return "open"
        token = bearer_token(authorization)
        if token is not None and self.config.token and _same(token, self.config.token):
            return "token"
        match = self._find(cookie)
        if match is None:
            return "unknown"
        return "session:" + hashlib.sha256(match.encode()).hexdigest()[:8]

    def csrf_token(self, cookie: str | None) -> str | None:
        """The CSRF token of the live session `cookie` names; None without one."""
        match = self._find(cookie)
        return None if match is None else self._sessions[match].csrf

    def credential(self, authorization: str | None, cookie: str | None, client: str = "") -> str | None:
        """Which credential these are (`token_wait` first): "open" (none configured), "token"
        (the right bearer token), "session" (a live session's cookie), None (neither). A wrong
        bearer token counts against `client` in the throttle, a right one clears its count."""
        if not self.required:
            return "open"
        token = bearer_token(authorization)
        if token is not None and self.config.token:
            if _same(token, self.config.token):
                self.throttle.succeeded(client)
                return "token"
            self.throttle.failed(client)
        match = self._find(cookie)
        if match is not None:
            self._sessions.move_to_end(match)  # the most recently used is dropped last
            return "session"
        return None

    def csrf_ok(self, cookie: str | None, sent: str | None) -> bool:
        """True when `sent` is the CSRF token of the session `cookie` names."""
        expected = self.csrf_token(cookie)
        return expected is not None and sent is not None and _same(sent, expected)
