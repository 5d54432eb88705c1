"""The management API: `create_app(router)` builds a Quart-Trio app with every route.

Routes are thin: they parse and validate the request, read the store directly for listings and
counts, and send every write as a command to the owning node actor through its handle (the reply
is awaited under a deadline). Errors are raised (`ApiError`, or the core's own exceptions) and
become the envelope in `_endpoint`; nothing ever answers with a traceback.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import attrs
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

import capacitor_trio
from capacitor_trio.actors.messages import (
    BulkCommand,
    Echo,
    ItemCommand,
    NodeStatus,
    NodeUnavailable,
    Pause,
    Resume,
    SetOverride,
    UpdateNode,
)
from capacitor_trio.actors.reload import reload_configuration
from capacitor_trio.config.load import check_node_set
from capacitor_trio.config.models import NODE_ROLES, Node
from capacitor_trio.config.nodes_file import NodesFileConflict, plan_edit
from capacitor_trio.dicom.requestor import Peer
from capacitor_trio.logs import LEVELS, parse_level
from capacitor_trio.store import STATES, Counts, ItemFilter, ItemNotFound

from .auth import COOKIE, SESSION_TTL, Auth
from .envelope import (
    ApiError,
    bad_request,
    conflict,
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

#: How long an echo may take (the page: "Times out after 10 seconds").
ECHO_TIMEOUT = 10.0
#: Reply deadline for commands that may touch many items.
BULK_TIMEOUT = 60.0
MAX_LIMIT = 1000
MAX_LOG_LINES = 1000

Handler = Callable[..., Awaitable[Any]]

#: PUT body (camelCase) -> nodes.yml key (PascalCase), for parse_node.
PUT_FIELDS = {
    "role": "NodeRole",
    "hostName": "HostName",
    "port": "Port",
    "priority": "Priority",
    "processDelay": "ProcessDelay",
    "impersonate": "Impersonate",
    "transferSyntax": "TransferSyntax",
    "batchSize": "BatchSize",
    "minimumLineSpeed": "MinimumLineSpeed",
    "stallThreshold": "StallThreshold",
    "processSchedule": "ProcessSchedule",
    "sopClassPriorities": "SopClassPriorities",
    "aliases": "Aliases",
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

    def __init__(self, router: Any) -> None:
        self.router = router
        self.auth = Auth(router.settings.config.api)
        #: aggregate counts, recomputed in the background (see queries.Recent)
        self.totals = Recent(lambda: self.store.counts())
        self.per_destination = Recent(self._per_destination)

    async def _per_destination(self) -> dict[tuple[str, str], Counts]:
        by_dest = await self.store.counts_by_destination()
        return {(d.ae_title, d.role): c for d, c in by_dest.items()}

    def set_background_nursery(self, nursery: trio.Nursery) -> None:
        self.totals.nursery = self.per_destination.nursery = nursery

    def invalidate(self) -> None:
        self.totals.invalidate()
        self.per_destination.invalidate()

    # ---- lookups -----------------------------------------------------------------------------

    @property
    def store(self) -> Any:
        return self.router.store

    @property
    def supervisor(self) -> Any:
        return self.router.supervisor

    def find_node(self, ae: str, role: str | None) -> Node:
        matches = [n for n in self.router.nodes if n.ae_title == ae]
        if role is not None:
            matches = [n for n in matches if n.role == role]
        if not matches:
            suffix = f" with role {role}" if role else ""
            raise not_found(f"no node {ae!r}{suffix}")
        storage = [n for n in matches if n.role == "Storage"]
        return (storage or matches)[0]

    def handle_for(self, node: Node) -> Any:
        return self.supervisor.handle(node.ae_title, node.role)

    def need_handle(self, node: Node) -> Any:
        handle = self.handle_for(node)
        if handle is None:
            raise conflict(f"node {node.ae_title} ({node.role}) has no queue to act on")
        return handle

    async def node_status(self, node: Node) -> NodeStatus | None:
        handle = self.handle_for(node)
        if handle is None:
            return None
        counts = await self.store.counts(handle.destination)
        return self.supervisor.snapshot(handle, counts)

    def node_response(self, node: Node, status: NodeStatus | None) -> Any:
        return node_json(node, status)

    # ---- auth --------------------------------------------------------------------------------

    def require_write(self) -> None:
        if not self.auth.allowed(request.headers.get("Authorization"), request.cookies.get(COOKIE)):
            raise ApiError("FORBIDDEN", "missing or wrong credentials")

    async def login(self) -> Response:
        body = await _json_body({"password": str}, required=("password",))
        if not self.auth.check_password(body["password"]):
            raise ApiError("FORBIDDEN", "wrong password" if self.auth.login_enabled else "login is disabled: api.servicePassword is not set")
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
        r = self.router
        return ok(
            {
                "product": "capacitor-trio",
                "version": capacitor_trio.__version__,
                "startedAt": iso(r.started_at, ms=False),
                "uptimeSeconds": max(0, int(r.clock() - r.started_at)),
                "aeTitle": r.settings.config.my_ae_title,
                "activationState": "Active",
            }
        )

    async def openapi(self) -> Response:
        return Response(_openapi_text(), content_type="application/json")

    # ---- nodes -------------------------------------------------------------------------------

    async def list_nodes(self) -> Response:
        by_dest = await self.per_destination.get()
        out = []
        for node in list(self.router.nodes):
            handle = self.handle_for(node)
            status = None if handle is None else self.supervisor.snapshot(handle, by_dest.get(node.key, Counts()))
            out.append(node_json(node, status))
        return ok(out)

    async def get_node(self, ae: str) -> Response:
        node = self.find_node(ae, _role_arg())
        return ok(node_json(node, await self.node_status(node)))

    async def put_node(self, ae: str) -> Response:
        async with self.router.config_lock:
            return await self._put_node(ae)

    async def _put_node(self, ae: str) -> Response:
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
        changes["NodeRole"] = role
        config = self.router.settings.config
        path = config.data_dir / "nodes.yml"
        edit = functools.partial(plan_edit, path, current, changes, prefix=config.ae_title_prefix)
        try:
            planned = await trio.to_thread.run_sync(edit)
        except NodesFileConflict as exc:
            raise conflict(str(exc)) from None
        updated = planned.node
        nodes = list(self.router.nodes)
        index = next(i for i, n in enumerate(nodes) if n.key == current.key)
        nodes[index] = updated
        check_node_set(nodes, "request body", prefix=config.ae_title_prefix, edited=updated)
        handle = self.handle_for(current)
        status = None
        if handle is not None:
            status = await handle.call(UpdateNode(updated))
        try:
            await trio.to_thread.run_sync(planned.write)
        except OSError as exc:
            if handle is not None:  # put the running node back as it was
                await handle.call(UpdateNode(current))
            raise ApiError("INTERNAL", f"cannot write {path.name}: {exc.strerror}") from None
        self.router.nodes[index] = updated  # in place: the receiver reads this list
        self.router.receiver.refresh_routes()
        if status is not None:
            status = await self.node_status(updated)
        return ok(node_json(updated, status))

    async def _node_command(self, ae: str, command: Any) -> Response:
        node = self.find_node(ae, _role_arg())
        handle = self.need_handle(node)
        status = await handle.call(command)
        return ok(node_json(node, status))

    async def pause_node(self, ae: str) -> Response:
        return await self._node_command(ae, Pause())

    async def resume_node(self, ae: str) -> Response:
        node = self.find_node(ae, _role_arg())
        handle = self.need_handle(node)
        if handle.status.value == "failed":
            self.supervisor.restart(handle)  # resume of a failed node is an explicit restart
            with trio.move_on_after(5):
                await handle.status.wait_value("running")
            if handle.status.value != "running":
                raise NodeUnavailable(f"node {node.ae_title} is {handle.status.value} after restart")
        status = await handle.call(Resume())
        return ok(node_json(node, status))

    async def override_on(self, ae: str) -> Response:
        return await self._node_command(ae, SetOverride(True))

    async def override_off(self, ae: str) -> Response:
        return await self._node_command(ae, SetOverride(False))

    async def echo_node(self, ae: str) -> Response:
        node = self.find_node(ae, _role_arg())
        handle = self.handle_for(node)
        if handle is not None:
            result = await handle.call(Echo(timeout=ECHO_TIMEOUT), timeout=ECHO_TIMEOUT + 2)
        else:
            sender = self.supervisor.ctx.sender
            peer = Peer(node.ae_title, node.host_name, node.port)
            with trio.move_on_after(ECHO_TIMEOUT + 1):
                result = await sender.echo(peer, self.router.settings.config.my_ae_title, timeout=ECHO_TIMEOUT)
                return ok(_echo_json(result))
            raise ApiError("UNAVAILABLE", f"echo to {node.ae_title} did not finish in time")
        return ok(_echo_json(result))

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
        items, total = await self.store.list_items(f, skip=skip, limit=limit)
        return ok({"items": [item_json(i) for i in items], "total": total, "skip": skip, "limit": limit})

    async def get_item(self, item_id: str) -> Response:
        item = await self.store.get_item(_item_id(item_id), with_data=True)
        out = item_json(item)
        try:
            source = io.BytesIO(item.data) if item.data is not None else item.path
            tags = await trio.to_thread.run_sync(read_tags, source)
        except Exception:  # a missing or unreadable file: the item is still shown
            tags = None
        if tags is not None and tags.get("00080018", {}).get("Value") != [item.sop_instance_uid]:
            tags = None  # not this instance's file (gone and its name reused): never show it
        if tags is not None and item.data is None:
            # the file may have been delivered and reused while it was read (its UID read before
            # a new reception overwrote what followed): its tags count only if the item is still
            # there, since a file is reused only after the commit that removed its items
            try:
                await self.store.get_item(item.id)
            except ItemNotFound:
                tags = None
        out["tags"] = tags
        return ok(out)

    async def _item_action(self, item_id: str, action: str, target: str | None = None) -> Any:
        ident = _item_id(item_id)
        item = await self.store.get_item(ident)
        handle = self.supervisor.handle(item.destination_ae, item.destination_role)
        if handle is not None:
            return await handle.call(ItemCommand(action, ident, target))
        store = self.store
        if action == "delete":
            return await store.delete(ident)
        if action == "retry":
            return await store.retry(ident)
        return await store.move(ident, {"fail": "failed", "reject": "rejected"}.get(action, target))

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
        """Send `command` to every node actor concerned (and act directly on the store for
        destinations without an actor); the number of items changed."""
        f = command.filter
        store = self.store
        handles = [h for h in self.supervisor.handles if f.destination in (None, h.ae_title)]
        actor_keys = {(h.ae_title, h.destination.role) for h in handles}
        orphans = [
            d
            for d in await self.store.destinations()
            if (d.ae_title, d.role) not in actor_keys
            and self.supervisor.handle(d.ae_title, d.role) is None
            and f.destination in (None, d.ae_title)
        ]
        total = 0
        unavailable: list[str] = []
        for handle in handles:
            try:
                total += int(await handle.call(command, timeout=BULK_TIMEOUT))
            except NodeUnavailable:
                unavailable.append(handle.ae_title)
        for dest in orphans:
            g = attrs.evolve(f, destination=dest.ae_title, role=dest.role)
            if command.action == "move":
                total += await store.move_where(g, command.target_state)
            elif command.action == "retry":
                total += await store.retry_where(g, command.from_state)
            else:
                total += await store.delete_where(g)
        if unavailable:
            raise ApiError(
                "UNAVAILABLE",
                f"changed {total} item(s), but node(s) {', '.join(unavailable)} did not answer; try again",
            )
        return total

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
        return ok({"count": await self._bulk(BulkCommand("retry", f, from_state="failed"))})

    async def retry_rejected(self) -> Response:
        f = await self._bulk_filter_body()
        return ok({"count": await self._bulk(BulkCommand("retry", f, from_state="rejected"))})

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
        return ok(self.router.service.as_dict())

    async def service_pause(self) -> Response:
        self.router.service.set_all(False)
        return ok(self.router.service.as_dict())

    async def reload_config(self) -> Response:
        report = await reload_configuration(self.router)
        return ok({
            "added": list(report.added),
            "removed": list(report.removed),
            "changed": list(report.changed),
            "configChanged": list(report.config_changed),
            "needsRestart": list(report.needs_restart),
        })

    async def service_resume(self) -> Response:
        self.router.service.set_all(True)
        return ok(self.router.service.as_dict())

    async def processing_status(self) -> Response:
        r = self.router
        service = r.service
        checked_out = (await self.store.counts()).checked_out  # live: `idle` must be exact
        now = r.clock()
        nodes = []
        sends = 0
        ripe = service.prepare and r.receiver.ripe_pending(now)
        for handle in self.supervisor.handles:
            snap = self.supervisor.snapshot(handle)
            sends += snap.sends_in_progress
            nodes.append({"aeTitle": snap.ae_title, "role": snap.role, "paused": snap.paused, "status": snap.status})
            can_send = (
                service.storage_scu
                and not snap.paused
                and snap.status == "running"
                and (snap.in_window or snap.schedule_override)
            )
            if can_send and not ripe:
                at = await self.store.next_eligible_at(handle.destination, now)
                ripe = at is not None and at <= now
        active = sends + r.receiver.preparing
        all_paused = service.all_paused or (bool(nodes) and all(n["paused"] for n in nodes))
        return ok(
            {
                "allPaused": all_paused,
                "checkedOutItems": checked_out,
                "activeJobs": active,
                "idle": active == 0 and checked_out == 0 and not ripe,
                "nodes": nodes,
            }
        )

    async def metrics(self) -> Response:
        counts = await self.totals.get()
        return ok(
            {
                "totalItems": counts.total,
                "byState": {s: getattr(counts, s) for s in STATES},
                "checkedOut": counts.checked_out,
                "received": self.router.receiver.received,
                "service": self.router.service.as_dict(),
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
        ring = self.router.ring
        entries = ring.recent(lines, level) if ring is not None else []
        return ok([e.to_json() for e in entries])

    # ---- backward compatible (no envelope) ---------------------------------------------------

    async def queue_stats(self) -> Response:
        counts = await self.totals.get()
        return json_response(
            {"total": counts.total, "byState": {s: getattr(counts, s) for s in STATES}, "checkedOut": counts.checked_out}
        )

    async def queue_health(self) -> Response:
        return json_response({"status": "ok", "timestamp": now_iso()})


def _echo_json(result: Any) -> dict[str, Any]:
    latency = result.latency_ms
    if latency is not None and not math.isfinite(latency):
        latency = None
    return {"success": bool(result.success), "latencyMs": latency, "error": result.error or None}


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


def create_app(router: Any) -> QuartTrio:
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
        # posted from another site), whatever the credentials configuration.
        if _host_name(request.host or "") not in LOOPBACK_HOSTS:
            return error_response(ApiError("FORBIDDEN", f"Host {request.host!r} is not this machine's loopback address"))
        origin = request.headers.get("Origin")
        writing = request.method not in ("GET", "HEAD", "OPTIONS")
        if writing and origin and _host_name(origin.split("://", 1)[-1]) not in LOOPBACK_HOSTS:
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
