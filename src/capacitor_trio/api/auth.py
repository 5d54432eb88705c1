"""Authentication of write (🔒) endpoints: a bearer token or a browser session cookie.

Reads are open. Writes need ``Authorization: Bearer <api.token>`` or the ``capacitor_session``
cookie that ``POST /api/auth/login`` sets when given ``api.servicePassword``; the cookie holds a
random session id, never the password. When neither secret is configured, writes are open
(backward-compatible). Every secret comparison is constant-time (`hmac.compare_digest`), and
sessions are looked up by comparing against each live session id, not by a dict lookup on the
attacker's string.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict

from capacitor_trio.config.models import ApiConfig

COOKIE = "capacitor_session"
#: How long a browser session lasts without being used (seconds).
SESSION_TTL = 12 * 3600.0
#: Most sessions kept at once; the oldest is dropped beyond that.
MAX_SESSIONS = 256


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


class Auth:
    def __init__(self, config: ApiConfig, clock: object = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        #: session id -> expiry (monotonic seconds)
        self._sessions: OrderedDict[str, float] = OrderedDict()

    @property
    def required(self) -> bool:
        return self.config.auth_required

    @property
    def login_enabled(self) -> bool:
        return bool(self.config.service_password)

    def _now(self) -> float:
        return self._clock()  # type: ignore[operator]

    def check_password(self, password: str) -> bool:
        return self.login_enabled and _same(password, self.config.service_password)

    def new_session(self) -> str:
        self._expire()
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = self._now() + SESSION_TTL
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return sid

    def end_session(self, sid: str | None) -> None:
        match = self._find(sid)
        if match is not None:
            del self._sessions[match]

    def _expire(self) -> None:
        now = self._now()
        for sid in [s for s, until in self._sessions.items() if until <= now]:
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

    def allowed(self, authorization: str | None, cookie: str | None) -> bool:
        """True when a write may proceed with these credentials."""
        if not self.required:
            return True
        if authorization and self.config.token:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and _same(value.strip(), self.config.token):
                return True
        match = self._find(cookie)
        if match is not None:
            self._sessions[match] = self._now() + SESSION_TTL
            self._sessions.move_to_end(match)
            return True
        return False
