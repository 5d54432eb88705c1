"""The management API's handlers (`Api`), bound to one running router; routes.py maps the routes
to them and builds the app (`create_app`), parse.py parses what they are sent.

Handlers are thin: they parse and validate the request, send every write through the control port
(`actors/control.py`: each command answered by the owner of what it changes) and every read
through the read port (`actors/queries.py`), and format the answers. Errors are raised
(`ApiError`, or the core's own exceptions) and become the envelope in routes.py's `_endpoint`;
nothing ever answers with a traceback.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import TYPE_CHECKING, Any

import attrs
import trio
from quart import Response, request

import capacitor_trio
from capacitor_trio.actors.control import Control
from capacitor_trio.actors.messages import (
    BulkCommand,
    NodeStatus,
    Pause,
    SetOverride,
)
from capacitor_trio.actors.queries import ReadPort, RouterReads, detail_limiter
from capacitor_trio.audit import OPERATOR
from capacitor_trio.config.models import Node
from capacitor_trio.domain.states import FAILED, REJECTED
from capacitor_trio.logs import LEVELS, parse_level
from capacitor_trio.metrics import CONTENT_TYPE
from capacitor_trio.store import STATES, Counts, ItemFilter

from .auth import COOKIE, CSRF_HEADER, SESSION_TTL, Auth
from .envelope import (
    ApiError,
    bad_request,
    error_response,
    iso,
    json_response,
    not_found,
    now_iso,
    ok,
)
from .parse import _int_arg, _item_id, _json_body, _role, _role_arg, _state, _str_arg
from .queries import Recent
from .views import item_json, node_json, read_tags, without_names

if TYPE_CHECKING:
    from capacitor_trio.runtime import Router

MAX_LIMIT = 1000
#: the largest DICOM file POST /api/filters/test takes (other writes: 1 MiB, routes.py)
FILTER_TEST_MAX_BYTES = 64 * 1024 * 1024
MAX_LOG_LINES = 1000


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


def _client() -> str:
    """The address the request came from (the throttle's client)."""
    return str((request.scope.get("client") or ("",))[0])


def _too_many(wait: float) -> ApiError:
    seconds = math.ceil(wait)
    return ApiError(
        "TOO_MANY_REQUESTS",
        f"too many wrong passwords or tokens; try again in {seconds} s",
        status=429,
        headers={"Retry-After": str(seconds)},
    )


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
        self.oldest_waiting = Recent(lambda: self.reads.oldest_waiting_by_node())

    def set_background_nursery(self, nursery: trio.Nursery) -> None:
        self.totals.nursery = self.per_destination.nursery = self.oldest_waiting.nursery = nursery

    def invalidate(self) -> None:
        self.totals.invalidate()
        self.per_destination.invalidate()
        self.oldest_waiting.invalidate()

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

    def _cookie(self) -> str | None:
        """The request's session cookie (`Auth.session_cookie`)."""
        return self.auth.session_cookie(request.cookies.getlist(COOKIE))

    def require_write(self) -> None:
        authorization = request.headers.get("Authorization")
        client = _client()
        wait = self.auth.token_wait(authorization, client)
        if wait > 0:  # too many wrong tokens or passwords from this address: not looked at
            raise _too_many(wait)
        cookie = self._cookie()
        kind = self.auth.credential(authorization, cookie, client)
        if kind is None:
            raise ApiError("FORBIDDEN", "missing or wrong credentials")
        writing = request.method not in ("GET", "HEAD")
        if kind == "session" and writing and not self.auth.csrf_ok(cookie, request.headers.get(CSRF_HEADER)):
            raise ApiError("FORBIDDEN", f"a write with the session cookie needs its {CSRF_HEADER} header")
        # who the control port's audit lines name for this request
        OPERATOR.set(f"{self.auth.audit_name(authorization, cookie)}@{client}")

    def may_see_names(self) -> bool:
        """True when this read may show patient names: a credential (the bearer token or a
        session), or none configured. A bearer token is checked (and throttled) as a write's."""
        authorization = request.headers.get("Authorization")
        client = _client()
        if self.auth.token_wait(authorization, client) > 0:
            return False  # too many wrong tokens from this address: not looked at
        return self.auth.credential(authorization, self._cookie(), client) is not None

    async def session(self) -> Response:
        """Whether this browser has a live session, and its CSRF token (a cross-site page cannot
        read this answer: no CORS headers are ever sent)."""
        csrf = self.auth.csrf_token(self._cookie())
        return ok({
            "authenticated": csrf is not None,
            "loginEnabled": self.auth.login_enabled,
            "authRequired": self.auth.required,
            "csrfToken": csrf,
        })

    async def login(self) -> Response:
        body = await _json_body({"password": str}, required=("password",))
        client = _client()
        wait = self.auth.throttle.wait(client)
        if wait > 0:  # too many wrong passwords from this address: the password is not looked at
            err = _too_many(wait)
            return error_response(err, err.headers)
        if not self.auth.check_password(body["password"]):
            self.auth.throttle.failed(client)
            raise ApiError("FORBIDDEN", "wrong password" if self.auth.login_enabled else "login is disabled: api.servicePassword is not set")
        self.auth.throttle.succeeded(client)
        # a fresh session id on every login, and the one this browser held (if any) ended: an id
        # planted in the browser before login (session fixation) never becomes a logged-in one
        self.auth.end_session(self._cookie())
        sid = self.auth.new_session()
        response = ok({"authenticated": True, "csrfToken": self.auth.csrf_token(sid)})
        response.set_cookie(
            COOKIE, sid, max_age=int(SESSION_TTL), httponly=True, samesite="Strict", path="/"
        )
        return response

    async def logout(self) -> Response:
        # Ending a live session is a write: it needs the session's CSRF token, so that another
        # page cannot log the operator out (logout CSRF). A cookie that names no live session
        # is only cleared.
        cookie = self._cookie()
        if self.auth.csrf_token(cookie) is not None and not self.auth.csrf_ok(cookie, request.headers.get(CSRF_HEADER)):
            raise ApiError("FORBIDDEN", f"logging out needs the session's {CSRF_HEADER} header")
        self.auth.end_session(cookie)
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

    async def settings(self) -> Response:
        view = await self.reads.settings()
        return ok({
            "config": view.config,
            "nodesYml": view.nodes_yml,
            "filterFiles": [{"name": name, "text": text} for name, text in view.filter_files],
        })

    async def openapi(self) -> Response:
        return Response(_openapi_text(), content_type="application/json")

    # ---- nodes -------------------------------------------------------------------------------

    async def _node_json(self, node: Node, status: NodeStatus | None) -> dict[str, Any]:
        """`node_json` with the age of the node's oldest waiting item."""
        oldest = (await self.oldest_waiting.get()).get(node.key)
        if status is not None:
            status = attrs.evolve(status, oldest_waiting_at=oldest)
        return node_json(node, status, now=self.reads.now())

    async def list_nodes(self) -> Response:
        by_dest = await self.per_destination.get()
        out = []
        for node in self.reads.nodes():
            out.append(await self._node_json(node, self.reads.node_status(node, by_dest.get(node.key, Counts()))))
        return ok(out)

    async def get_node(self, ae: str) -> Response:
        node = self.find_node(ae, _role_arg())
        return ok(await self._node_json(node, await self.reads.node_status_now(node)))

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
        return ok(await self._node_json(updated, status))

    async def _node_command(self, ae: str, command: Any) -> Response:
        node = self.find_node(ae, _role_arg())
        return ok(await self._node_json(node, await self.control.node_command(node, command)))

    async def pause_node(self, ae: str) -> Response:
        return await self._node_command(ae, Pause())

    async def resume_node(self, ae: str) -> Response:
        node = self.find_node(ae, _role_arg())
        return ok(await self._node_json(node, await self.control.resume(node)))

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
        order = _str_arg("order") or "oldest"
        if order not in ("oldest", "newest"):
            raise bad_request(f"order must be oldest or newest, not {order!r}")
        items, total = await self.reads.list_items(f, skip=skip, limit=limit, newest_first=order == "newest")
        names = self.may_see_names()
        return ok({"items": [item_json(i, names=names) for i in items], "total": total, "skip": skip, "limit": limit})

    async def get_item(self, item_id: str) -> Response:
        item = await self.reads.get_item(_item_id(item_id), with_data=True)
        names = self.may_see_names()
        out = item_json(item, names=names)
        # None: unreadable, or the item went away while it was read (read_stored)
        shown = await self.reads.read_stored(item, read_tags)
        tags = shown.json if shown is not None else None
        if tags is not None and tags.get("00080018", {}).get("Value") != [item.sop_instance_uid]:
            tags = None  # not this instance's file (gone and its name reused): never show it
        if tags is not None and not names:
            tags = without_names(tags)
        out["tags"] = tags
        # what the header shown leaves out beyond bulk data (views.read_tags's limits)
        # (also when the cut left out the SOP Instance UID, so that nothing could be shown)
        foreign = shown is not None and tags is None and "00080018" in shown.json
        out["tagsLimits"] = list(shown.cut_by) if shown is not None and not foreign else []
        out["tagsTruncated"] = bool(out["tagsLimits"])
        # up to a few MB of JSON: off the loop, sharing the detail reads' threads
        return await trio.to_thread.run_sync(ok, out, limiter=detail_limiter())

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
        return ok(await self.control.set_service(False))

    async def reload_config(self) -> Response:
        report = await self.control.reload()
        return ok({
            "added": list(report.added),
            "removed": list(report.removed),
            "changed": list(report.changed),
            "configChanged": list(report.config_changed),
            "needsRestart": list(report.needs_restart),
        })

    # ---- filters -----------------------------------------------------------------------------

    async def get_filters(self) -> Response:
        return ok(self.reads.filters())

    async def test_filters(self) -> Response:
        """The chain in force run on the DICOM file in the body for ?dest= (from ?source=)."""
        dest = _str_arg("dest")
        if dest is None:
            raise bad_request("dest is required: the destination node's AE title")
        request.max_content_length = FILTER_TEST_MAX_BYTES
        data = await request.get_data(as_text=False)
        if not isinstance(data, bytes) or not data:
            raise bad_request("the body must be a DICOM file (Part 10)")
        try:
            trials = await self.reads.try_filters(data, _str_arg("source") or "", dest)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc
        return ok({"destinations": [t.as_json() for t in trials]})

    async def reload_filters(self) -> Response:
        return ok(await self.control.reload_filters())

    async def service_resume(self) -> Response:
        return ok(await self.control.set_service(True))

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
                "transcoding": self.reads.conversions(),
            }
        )

    async def prometheus(self) -> Response:
        """The same counters in Prometheus's text exposition format (metrics.py)."""
        return Response(await self.reads.metrics_text(), status=200, content_type=CONTENT_TYPE)

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
