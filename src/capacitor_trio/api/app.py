"""The management API: `create_app(router)` builds a Quart-Trio app with every route.

Routes are thin: they parse and validate the request, send every write through the control port
(`actors/control.py`: each command answered by the owner of what it changes) and every read
through the read port (`actors/queries.py`), and format the answers. Errors are raised (`ApiError`, or the core's own exceptions) and
become the envelope in `_endpoint`; nothing ever answers with a traceback.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

import capacitor_trio
from capacitor_trio.actors.control import Control
from capacitor_trio.actors.messages import (
    BulkCommand,
    Pause,
    SetOverride,
)
from capacitor_trio.actors.queries import ReadPort, RouterReads
from capacitor_trio.config.models import NODE_ROLES, Node
from capacitor_trio.domain.states import FAILED, REJECTED
from capacitor_trio.logs import LEVELS, parse_level
from capacitor_trio.store import STATES, Counts, ItemFilter

from .auth import COOKIE, SESSION_TTL, Auth, same_origin
from .envelope import (
    ApiError,
    bad_request,
    error_response,
    iso,
    json_response,
    not_found,
    now_iso,
    ok,
    translate,
)
from .queries import Recent
from .views import item_json, node_json, read_tags

if TYPE_CHECKING:
    from capacitor_trio.runtime import Router

MAX_LIMIT = 1000
MAX_LOG_LINES = 1000

Handler = Callable[..., Awaitable[Any]]

#: PUT body field (the contract's camelCase) -> Node attribute; config/ knows the nodes.yml keys.
PUT_FIELDS = {
    "role": "role",
    "hostName": "host_name",
    "port": "port",
    "priority": "priority",
    "processDelay": "process_delay",
    "impersonate": "impersonate",
    "transferSyntax": "transfer_syntax",
    "batchSize": "batch_size",
    "minimumLineSpeed": "minimum_line_speed",
    "stallThreshold": "stall_threshold",
    "processSchedule": "process_schedule",
    "sopClassPriorities": "sop_class_priorities",
    "aliases": "aliases",
}


def _openapi_text() -> str:
    return resources.files("capacitor_trio.api").joinpath("openapi.json").read_text("utf-8")


# ---- request parsing -------------------------------------------------------------------------


async def _json_body(allowed: dict[str, Any], *, required: tuple[str, ...] = (), optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object with only `allowed` keys (name -> type or tuple of types;
    None in a tuple allows null)."""
    raw = await request.get_data(as_text=False)
    if not raw.strip():
        if optional and not required:
            return {}
        raise bad_request("a JSON object body is required")
    if request.mimetype != "application/json":  # a form or a text/plain post is not JSON
        raise ApiError("BAD_REQUEST", f"Content-Type must be application/json, not {request.mimetype or 'none'!r}", status=415)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: deep nesting
        raise bad_request(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)}")
    for name in required:
        if name not in body:
            raise bad_request(f"{name} is required")
    for name, value in body.items():
        expected = allowed[name]
        if expected is Any:
            continue
        types = expected if isinstance(expected, tuple) else (expected,)
        if value is None and None in types:
            continue
        real = tuple(t for t in types if t is not None)
        if isinstance(value, bool) and bool not in real:
            raise bad_request(f"{name}: wrong type")
        if not isinstance(value, real):
            raise bad_request(f"{name}: wrong type")
    return body


def _int_arg(name: str, default: int, lo: int, hi: int | None = None, *, clamp_high: bool = False) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise bad_request(f"{name} must be a whole number, not {raw!r}") from None
    if value < lo:
        raise bad_request(f"{name} must be at least {lo}")
    if hi is not None and value > hi:
        if clamp_high:
            return hi
        raise bad_request(f"{name} must be {lo}..{hi}")
    return value


def _state(value: Any, name: str = "state") -> str:
    state = str(value).strip().lower()
    if state not in STATES:
        raise bad_request(f"{name}: unknown state {value!r}; expected one of {', '.join(STATES)}")
    return state


def _str_arg(name: str) -> str | None:
    value = request.args.get(name)
    return value if value not in (None, "") else None


def _role_arg() -> str | None:
    raw = request.args.get("role")
    if raw in (None, ""):
        return None
    return _role(raw)


def _role(raw: Any) -> str:
    for role in NODE_ROLES:
        if str(raw).strip().lower() == role.lower():
            return role
    raise bad_request(f"role: unknown role {raw!r}; expected one of {', '.join(NODE_ROLES)}")


def _item_id(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"item id must be a whole number, not {raw!r}") from None
    if value < 0:
        raise bad_request(f"item id must not be negative, not {raw!r}")
    if value > 2**63 - 1:
        raise not_found(f"no item {raw}")
    return value


# ---- the app ---------------------------------------------------------------------------------


#: Host names a request to the API may carry (it listens on 127.0.0.1 only).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})


def _host_name(host: str) -> str:
    """`127.0.0.1:1080` -> `127.0.0.1`, `[::1]:1080` -> `[::1]`, `localhost` -> `localhost`."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0].lower()


class Api:
    """The routes, bound to one running router."""

    def __init__(self, router: Router) -> None:
        self.auth = Auth(router.settings.config.api)
        #: every write goes through `control`, every read through `reads`
        self.control = Control(router)
        self.reads: ReadPort = RouterReads(router)
        #: aggregate counts, recomputed in the background (see queries.Recent)
        self.totals = Recent(lambda: self.reads.counts())
        self.per_destination = Recent(lambda: self.reads.counts_by_node())

    def set_background_nursery(self, nursery: trio.Nursery) -> None:
        self.totals.nursery = self.per_destination.nursery = nursery

    def invalidate(self) -> None:
        self.totals.invalidate()
        self.per_destination.invalidate()

    # ---- lookups -----------------------------------------------------------------------------

    def find_node(self, ae: str, role: str | None) -> Node:
        matches = [n for n in self.reads.nodes() if n.ae_title == ae]
        if role is not None:
            matches = [n for n in matches if n.role == role]
        if not matches:
            suffix = f" with role {role}" if role else ""
            raise not_found(f"no node {ae!r}{suffix}")
        storage = [n for n in matches if n.role == "Storage"]
        return (storage or matches)[0]

    # ---- auth --------------------------------------------------------------------------------

    def require_write(self) -> None:
        if not self.auth.allowed(request.headers.get("Authorization"), request.cookies.get(COOKIE)):
            raise ApiError("FORBIDDEN", "missing or wrong credentials")

    async def login(self) -> Response:
        body = await _json_body({"password": str}, required=("password",))
        client = str((request.scope.get("client") or ("",))[0])
        wait = self.auth.throttle.wait(client)
        if wait > 0:  # too many wrong passwords from this address: the password is not looked at
            seconds = math.ceil(wait)
            err = ApiError("TOO_MANY_REQUESTS", f"too many failed logins; try again in {seconds} s", status=429)
            return error_response(err, {"Retry-After": str(seconds)})
        if not self.auth.check_password(body["password"]):
            self.auth.throttle.failed(client)
            raise ApiError("FORBIDDEN", "wrong password" if self.auth.login_enabled else "login is disabled: api.servicePassword is not set")
        self.auth.throttle.succeeded(client)
        sid = self.auth.new_session()
        response = ok({"authenticated": True})
        response.set_cookie(
            COOKIE, sid, max_age=int(SESSION_TTL), httponly=True, samesite="Strict", path="/"
        )
        return response

    async def logout(self) -> Response:
        self.auth.end_session(request.cookies.get(COOKIE))
        response = ok({"authenticated": False})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
        return response

    # ---- system ------------------------------------------------------------------------------

    async def system_info(self) -> Response:
        info = self.reads.system()
        return ok(
            {
                "product": "capacitor-trio",
                "version": capacitor_trio.__version__,
                "startedAt": iso(info.started_at, ms=False),
                "uptimeSeconds": info.uptime_seconds,
                "aeTitle": info.ae_title,
                "activationState": "Active",
            }
        )

    async def openapi(self) -> Response:
        return Response(_openapi_text(), content_type="application/json")

    # ---- nodes -------------------------------------------------------------------------------

    async def list_nodes(self) -> Response:
        by_dest = await self.per_destination.get()
        out = []
        for node in self.reads.nodes():
            out.append(node_json(node, self.reads.node_status(node, by_dest.get(node.key, Counts()))))
        return ok(out)

    async def get_node(self, ae: str) -> Response:
        node = self.find_node(ae, _role_arg())
        return ok(node_json(node, await self.reads.node_status_now(node)))

    async def put_node(self, ae: str) -> Response:
        allowed: dict[str, Any] = {
            "aeTitle": str,
            "role": str,
            "hostName": str,
            "port": int,
            "priority": int,
            "processDelay": (int, None),
            "impersonate": bool,
            "transferSyntax": (str, None),
            "batchSize": (int, None),
            "minimumLineSpeed": (int, None),
            "stallThreshold": (int, None),
            "processSchedule": (list, None),
            "sopClassPriorities": (list, None),
            "aliases": (list, None),
        }
        body = await _json_body(allowed, required=("role",))
        role = _role(body.pop("role"))
        query_role = _role_arg()
        if query_role is not None and query_role != role:
            raise bad_request(f"role in the body ({role}) and ?role= ({query_role}) differ")
        if "aeTitle" in body and body.pop("aeTitle") != ae:
            raise bad_request("aeTitle cannot be changed (it names the node)")
        current = self.find_node(ae, role)
        if current.role != role:
            raise not_found(f"no node {ae!r} with role {role}")
        changes = {PUT_FIELDS[name]: value for name, value in body.items()}
        changes["role"] = role
        updated, status = await self.control.edit_node(current, changes)
        return ok(node_json(updated, status))

    async def _node_command(self, ae: str, command: Any) -> Response:
        node = self.find_node(ae, _role_arg())
        return ok(node_json(node, await self.control.node_command(node, command)))

    async def pause_node(self, ae: str) -> Response:
        return await self._node_command(ae, Pause())

    async def resume_node(self, ae: str) -> Response:
        node = self.find_node(ae, _role_arg())
        return ok(node_json(node, await self.control.resume(node)))

    async def override_on(self, ae: str) -> Response:
        return await self._node_command(ae, SetOverride(True))

    async def override_off(self, ae: str) -> Response:
        return await self._node_command(ae, SetOverride(False))

    async def echo_node(self, ae: str) -> Response:
        result = await self.control.echo(self.find_node(ae, _role_arg()))
        return ok({"success": result.success, "latencyMs": result.latency_ms, "error": result.error})

    # ---- queue -------------------------------------------------------------------------------

    def _list_filter(self) -> ItemFilter:
        state = _str_arg("state")
        return ItemFilter(
            state=_state(state) if state is not None else None,
            source=_str_arg("source"),
            destination=_str_arg("dest"),
            modality=_str_arg("modality"),
            search=_str_arg("search"),
        )

    async def list_items(self) -> Response:
        f = self._list_filter()
        skip = _int_arg("skip", 0, 0, 2**62)
        limit = _int_arg("limit", 100, 1, MAX_LIMIT)
        items, total = await self.reads.list_items(f, skip=skip, limit=limit)
        return ok({"items": [item_json(i) for i in items], "total": total, "skip": skip, "limit": limit})

    async def get_item(self, item_id: str) -> Response:
        item = await self.reads.get_item(_item_id(item_id), with_data=True)
        out = item_json(item)
        # None: unreadable, or the item went away while it was read (read_stored)
        shown = await self.reads.read_stored(item, read_tags)
        tags = shown.json if shown is not None else None
        if tags is not None and tags.get("00080018", {}).get("Value") != [item.sop_instance_uid]:
            tags = None  # not this instance's file (gone and its name reused): never show it
        out["tags"] = tags
        # what the header shown leaves out beyond bulk data (views.read_tags's limits)
        # (also when the cut left out the SOP Instance UID, so that nothing could be shown)
        foreign = shown is not None and tags is None and "00080018" in shown.json
        out["tagsLimits"] = list(shown.cut_by) if shown is not None and not foreign else []
        out["tagsTruncated"] = bool(out["tagsLimits"])
        return await trio.to_thread.run_sync(ok, out)  # up to a few MB of JSON: off the loop

    async def _item_action(self, item_id: str, action: str, target: str | None = None) -> Any:
        return await self.control.item_action(_item_id(item_id), action, target)

    async def fail_item(self, item_id: str) -> Response:
        return ok(item_json(await self._item_action(item_id, "fail")))

    async def reject_item(self, item_id: str) -> Response:
        return ok(item_json(await self._item_action(item_id, "reject")))

    async def retry_item(self, item_id: str) -> Response:
        return ok(item_json(await self._item_action(item_id, "retry")))

    async def move_item(self, item_id: str) -> Response:
        body = await _json_body({"targetState": str}, required=("targetState",))
        target = _state(body["targetState"], "targetState")
        return ok(item_json(await self._item_action(item_id, "move", target)))

    async def delete_item(self, item_id: str) -> Response:
        ident = _item_id(item_id)
        await self._item_action(item_id, "delete")
        return ok({"id": ident, "deleted": True})

    async def _bulk(self, command: BulkCommand) -> int:
        return await self.control.bulk(command)

    async def _bulk_filter_body(self) -> ItemFilter:
        body = await _json_body(
            {"source": (str, None), "destination": (str, None), "modality": (str, None)}, optional=True
        )
        return ItemFilter(
            source=body.get("source") or None,
            destination=body.get("destination") or None,
            modality=body.get("modality") or None,
        )

    async def retry_failed(self) -> Response:
        f = await self._bulk_filter_body()
        return ok({"count": await self._bulk(BulkCommand("retry", f, from_state=FAILED))})

    async def retry_rejected(self) -> Response:
        f = await self._bulk_filter_body()
        return ok({"count": await self._bulk(BulkCommand("retry", f, from_state=REJECTED))})

    async def _target_body(self) -> str:
        body = await _json_body({"targetState": str}, required=("targetState",))
        return _state(body["targetState"], "targetState")

    async def move_study(self, uid: str) -> Response:
        target = await self._target_body()
        return ok({"count": await self._bulk(BulkCommand("move", ItemFilter(study_uid=uid), target))})

    async def delete_study(self, uid: str) -> Response:
        return ok({"count": await self._bulk(BulkCommand("delete", ItemFilter(study_uid=uid)))})

    async def move_series(self, uid: str) -> Response:
        target = await self._target_body()
        return ok({"count": await self._bulk(BulkCommand("move", ItemFilter(series_uid=uid), target))})

    # ---- service, metrics, logs --------------------------------------------------------------

    async def service_status(self) -> Response:
        return ok(self.reads.service_flags())

    async def service_pause(self) -> Response:
        return ok(self.control.set_service(False))

    async def reload_config(self) -> Response:
        report = await self.control.reload()
        return ok({
            "added": list(report.added),
            "removed": list(report.removed),
            "changed": list(report.changed),
            "configChanged": list(report.config_changed),
            "needsRestart": list(report.needs_restart),
        })

    async def service_resume(self) -> Response:
        return ok(self.control.set_service(True))

    async def processing_status(self) -> Response:
        st = await self.reads.processing_status()
        return ok(
            {
                "allPaused": st.all_paused,
                "checkedOutItems": st.checked_out_items,
                "activeJobs": st.active_jobs,
                "idle": st.idle,
                "nodes": [
                    {"aeTitle": n.ae_title, "role": n.role, "paused": n.paused, "status": n.status}
                    for n in st.nodes
                ],
            }
        )

    async def metrics(self) -> Response:
        counts = await self.totals.get()
        return ok(
            {
                "totalItems": counts.total,
                "byState": {s: getattr(counts, s) for s in STATES},
                "checkedOut": counts.checked_out,
                "received": self.reads.received(),
                "service": self.reads.service_flags(),
                "loop": self.reads.loop_figures(),
            }
        )

    async def logs_recent(self) -> Response:
        lines = _int_arg("lines", 100, 1, MAX_LOG_LINES, clamp_high=True)
        raw = _str_arg("level")
        level = None
        if raw is not None:
            try:
                level = parse_level(raw)
            except ValueError:
                raise bad_request(f"level: unknown level {raw!r}; expected one of {', '.join(LEVELS)}") from None
        return ok([e.to_json() for e in self.reads.recent_logs(lines, level)])

    # ---- backward compatible (no envelope) ---------------------------------------------------

    async def queue_stats(self) -> Response:
        counts = await self.totals.get()
        return json_response(
            {"total": counts.total, "byState": {s: getattr(counts, s) for s in STATES}, "checkedOut": counts.checked_out}
        )

    async def queue_health(self) -> Response:
        return json_response({"status": "ok", "timestamp": now_iso()})


#: (method, path, handler name, needs a credential)
ROUTES: tuple[tuple[str, str, str, bool], ...] = (
    ("GET", "/api/openapi.json", "openapi", False),
    ("POST", "/api/auth/login", "login", False),
    ("POST", "/api/auth/logout", "logout", False),
    ("GET", "/api/system/info", "system_info", False),
    ("GET", "/api/nodes", "list_nodes", False),
    ("GET", "/api/nodes/<ae>", "get_node", False),
    ("PUT", "/api/nodes/<ae>", "put_node", True),
    ("POST", "/api/nodes/<ae>/pause", "pause_node", True),
    ("POST", "/api/nodes/<ae>/resume", "resume_node", True),
    ("POST", "/api/nodes/<ae>/echo", "echo_node", True),
    ("POST", "/api/nodes/<ae>/override-schedule", "override_on", True),
    ("DELETE", "/api/nodes/<ae>/override-schedule", "override_off", True),
    ("GET", "/api/queue/items", "list_items", False),
    ("GET", "/api/queue/items/<item_id>", "get_item", False),
    ("POST", "/api/queue/items/<item_id>/fail", "fail_item", True),
    ("POST", "/api/queue/items/<item_id>/reject", "reject_item", True),
    ("POST", "/api/queue/items/<item_id>/retry", "retry_item", True),
    ("POST", "/api/queue/items/<item_id>/move", "move_item", True),
    ("DELETE", "/api/queue/items/<item_id>", "delete_item", True),
    ("POST", "/api/queue/actions/retry-failed", "retry_failed", True),
    ("POST", "/api/queue/actions/retry-rejected", "retry_rejected", True),
    ("POST", "/api/queue/studies/<uid>/move", "move_study", True),
    ("DELETE", "/api/queue/studies/<uid>", "delete_study", True),
    ("POST", "/api/queue/series/<uid>/move", "move_series", True),
    ("GET", "/api/service/status", "service_status", False),
    ("POST", "/api/service/pause", "service_pause", True),
    ("POST", "/api/service/resume", "service_resume", True),
    ("GET", "/api/service/processing-status", "processing_status", False),
    ("POST", "/api/config/reload", "reload_config", True),
    ("GET", "/api/metrics", "metrics", False),
    ("GET", "/api/logs/recent", "logs_recent", False),
    ("GET", "/api/queue/stats", "queue_stats", False),
    ("GET", "/api/queue/health", "queue_health", False),
)


def _endpoint(api: Api, handler: Handler, write: bool) -> Handler:
    @functools.wraps(handler)
    async def view(**kwargs: Any) -> Response:
        try:
            if write:
                api.require_write()
                try:
                    return await handler(**kwargs)
                finally:
                    api.invalidate()  # the API shows its own changes at once
            return await handler(**kwargs)
        except (trio.Cancelled, HTTPException):
            raise  # HTTPException (e.g. 413 from a body over MAX_CONTENT_LENGTH): http_error below
        except Exception as exc:
            return error_response(translate(exc))

    return view


def create_app(router: Router) -> QuartTrio:
    """A fresh app serving `router` (no module-level app)."""
    app = QuartTrio("capacitor_trio.api", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.url_map.strict_slashes = False
    api = Api(router)
    app.extensions["capacitor_api"] = api
    for method, path, name, write in ROUTES:
        view = _endpoint(api, getattr(api, name), write)
        app.add_url_rule(
            path, endpoint=f"{method} {path}", view_func=view, methods=[method],
            provide_automatic_options=False,
        )

    @app.after_request
    async def drain_unread_body(response: Response) -> Response:
        # A refused write (403, 400…) is answered before its body is read; an unread body left on
        # a keep-alive connection would stall the client's next request behind it.
        if request.method in ("POST", "PUT", "DELETE", "PATCH"):
            try:
                await request.get_data()
            except HTTPException:  # over MAX_CONTENT_LENGTH: cannot be drained, end the connection
                response.headers["Connection"] = "close"
        return response

    @app.before_request
    async def same_machine_only() -> Response | None:
        # The API is for this machine. A browser page from elsewhere must not reach it: refuse a
        # Host that is not loopback (DNS rebinding) and a cross-site Origin on writes (a form
        # posted from another site, or from another program's page on this machine: scheme, host
        # and port must be the API's own), whatever the credentials configuration.
        if _host_name(request.host or "") not in LOOPBACK_HOSTS:
            return error_response(ApiError("FORBIDDEN", f"Host {request.host!r} is not this machine's loopback address"))
        origin = request.headers.get("Origin")
        writing = request.method not in ("GET", "HEAD", "OPTIONS")
        if writing and origin and not same_origin(origin, (request.scope.get("server") or (None, None))[1]):
            return error_response(ApiError("FORBIDDEN", f"cross-site request from {origin!r} refused"))
        return None

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers: dict[str, str] = {}
        if status == 405:
            allowed = getattr(exc, "valid_methods", None) or []
            headers["Allow"] = ", ".join(allowed)
            err = ApiError("NOT_FOUND", f"{request.method} is not allowed on {request.path}", status=405)
        elif status == 404:
            err = ApiError("NOT_FOUND", f"no endpoint {request.method} {request.path}")
        elif status >= 500:
            err = ApiError("INTERNAL", "internal error", status=status)
        elif status == 413:
            # the rest of the body is never read: end the connection, or the client's next
            # request on it would wait behind the unread bytes
            headers["Connection"] = "close"
            err = ApiError("BAD_REQUEST", exc.description or exc.name, status=status)
        else:
            err = ApiError("BAD_REQUEST", exc.description or exc.name, status=status)
        return error_response(err, headers)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        return error_response(translate(exc))

    return app
