"""The web dashboard: server-rendered pages (Jinja2 templates under templates/) and one plain
script (static/app.js), served by the API on its port (`blueprint`, registered by
api/routes.py's `create_app`).

The pages hold no state and write nothing themselves: their script reads the JSON API and writes
through it (same origin; the API's control port stays the one write path), carrying the
session's CSRF token (rendered into each page for a logged-in browser) in ``X-CSRF-Token``. A page
that only writes or shows the configuration (node edit, Settings) shows the login instead when a
credential is configured and the browser has no session. Every page is sent with a strict
Content-Security-Policy (scripts and styles from this origin only, no framing).
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, current_app, render_template, request

from capacitor_trio.api.auth import COOKIE

blueprint = Blueprint("web", __name__, template_folder="templates", static_folder="static", static_url_path="/static")

#: What every page may load: its own script and styles, nothing inline, nothing framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _session() -> dict[str, Any]:
    """What the page needs to know of the browser's credential."""
    auth = current_app.extensions["capacitor_api"].auth
    csrf = auth.csrf_token(auth.session_cookie(request.cookies.getlist(COOKIE)))
    return {
        "csrf": csrf or "",
        "logged_in": csrf is not None,
        "auth_required": auth.required,
        "login_enabled": auth.login_enabled,
        # may this browser write (and see patient names)? a session, or nothing configured
        "may_write": csrf is not None or not auth.required,
    }


def safe_next(target: str | None) -> str:
    r"""`target` when it is a path on this site, else "/" (no open redirect after login).

    A browser reads "\" as "/" and drops tabs and newlines from a URL before it follows it, so
    "/\evil", "/<tab>/evil" and "/<newline>/evil" all lead to "//evil" (another site): a target
    that starts with two slashes or backslashes, or holds any control character, is refused."""
    if not target or not target.startswith("/") or target[1:2] in ("/", "\\"):
        return "/"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return "/"
    return target


async def _page(template: str, page: str, *, needs_login: bool = False, **context: Any) -> str:
    session = _session()
    if needs_login and not session["may_write"]:
        here = safe_next(request.full_path.rstrip("?"))
        return await render_template("login.html", page="login", next=here, **session)
    return await render_template(template, page=page, **session, **context)


@blueprint.after_request
async def _headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@blueprint.get("/")
async def dashboard() -> str:
    return await _page("dashboard.html", "dashboard")


@blueprint.get("/queue")
async def queue() -> str:
    return await _page("queue.html", "queue")


@blueprint.get("/queue/<int:item_id>")
async def item(item_id: int) -> str:
    return await _page("item.html", "item", item_id=item_id)


@blueprint.get("/logs")
async def logs() -> str:
    return await _page("logs.html", "logs")


@blueprint.get("/settings")
async def settings() -> str:
    return await _page("settings.html", "settings", needs_login=True)


@blueprint.get("/nodes/<ae>/edit")
async def node_edit(ae: str) -> str:
    role = request.args.get("role", "Storage")
    return await _page("node_edit.html", "node-edit", needs_login=True, ae=ae, role=role)


@blueprint.get("/login")
async def login() -> str:
    next_page = safe_next(request.args.get("next"))
    return await render_template("login.html", page="login", next=next_page, **_session())
