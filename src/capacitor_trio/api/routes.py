"""The API's route table and the app: `create_app(router)` builds a Quart-Trio app serving every
route of `ROUTES` with a handler of `Api` (app.py), wrapped by `_endpoint` (a credential for
writes, the envelope for errors), and the dashboard's pages (capacitor_trio/web), behind the same-machine guard (a loopback Host, a same-origin
write) and the error handlers (nothing ever answers with a traceback).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from capacitor_trio import web

from .app import Api
from .auth import same_origin
from .envelope import ApiError, error_response, translate

if TYPE_CHECKING:
    from capacitor_trio.runtime import Router

Handler = Callable[..., Awaitable[Any]]

#: Host names a request to the API may carry (it listens on 127.0.0.1 only).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})


def _host_name(host: str) -> str:
    """`127.0.0.1:1080` -> `127.0.0.1`, `[::1]:1080` -> `[::1]`, `localhost` -> `localhost`."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0].lower()


#: (method, path, handler name, needs a credential)
ROUTES: tuple[tuple[str, str, str, bool], ...] = (
    ("GET", "/api/openapi.json", "openapi", False),
    ("POST", "/api/auth/login", "login", False),
    ("POST", "/api/auth/logout", "logout", False),
    ("GET", "/api/auth/session", "session", False),
    ("GET", "/api/config", "settings", True),
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
    ("GET", "/api/filters", "get_filters", False),
    ("POST", "/api/filters/test", "test_filters", True),
    ("POST", "/api/filters/reload", "reload_filters", True),
    ("GET", "/api/metrics", "metrics", False),
    ("GET", "/metrics", "prometheus", False),
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
            err = translate(exc)
            return error_response(err, err.headers)

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
    app.register_blueprint(web.blueprint)  # the dashboard's pages (capacitor_trio/web)
    _add_guards(app)
    _add_error_handlers(app)
    return app


def _add_guards(app: QuartTrio) -> None:
    """Every request: from this machine only; every answer: not stored by a browser; every
    write: its unread body drained."""

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

    @app.after_request
    async def not_stored(response: Response) -> Response:
        # Answers carry patient data (names with a credential): no browser keeps them on disk,
        # and none reads one as anything but its declared type (JSON never runs as a script).
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
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


def _add_error_handlers(app: QuartTrio) -> None:
    """An HTTP error (404, 405, 413…) or an unexpected exception answered in the envelope."""

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
