"""The response envelope, API errors and their HTTP status codes.

Every endpoint but the two backward-compatible ones answers
``{"ok", "data", "error": {"code", "message"} | null, "timestamp"}``. Errors are raised as
`ApiError` anywhere in a route (or translated from the core's exceptions by `translate`) and
turned into the envelope in one place; a body never carries a traceback.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from quart import Response

from capacitor_trio.actors.control import PartlyDone, WriteFailed
from capacitor_trio.actors.messages import CommandRefused, NodeUnavailable
from capacitor_trio.actors.reload import ReloadRefused
from capacitor_trio.config.load import ConfigError
from capacitor_trio.config.nodes_file import NodesFileConflict
from capacitor_trio.store import ItemNotFound, StoreFull, TransitionError

log = logging.getLogger("capacitor_trio.api")

STATUS = {
    "BAD_REQUEST": 400,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "CONFLICT": 409,
    "TOO_MANY_REQUESTS": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
}


class ApiError(Exception):
    """An error answer: `code` is one of STATUS; `status` overrides the code's usual status."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS[code]
        #: headers of the answer (Retry-After of a 429)
        self.headers = headers


def bad_request(message: str) -> ApiError:
    return ApiError("BAD_REQUEST", message)


def not_found(message: str) -> ApiError:
    return ApiError("NOT_FOUND", message)


def conflict(message: str) -> ApiError:
    return ApiError("CONFLICT", message)


def iso(epoch: float | None, *, ms: bool = True) -> str | None:
    """Epoch seconds -> ISO 8601 UTC with a Z (None stays None)."""
    if epoch is None:
        return None
    stamp = datetime.fromtimestamp(float(epoch), UTC).isoformat(
        timespec="milliseconds" if ms else "seconds"
    )
    return stamp.replace("+00:00", "Z")


def now_iso() -> str:
    return iso(datetime.now(UTC).timestamp(), ms=False) or ""


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return Response(text, status=status, headers=headers, content_type="application/json")


def ok(data: Any, status: int = 200) -> Response:
    return json_response({"ok": True, "data": data, "error": None, "timestamp": now_iso()}, status)


def error_response(err: ApiError, headers: dict[str, str] | None = None) -> Response:
    body = {
        "ok": False,
        "data": None,
        "error": {"code": err.code, "message": err.message},
        "timestamp": now_iso(),
    }
    return json_response(body, err.status, headers)


def translate(exc: BaseException) -> ApiError:
    """The core's exceptions -> API errors. Anything unexpected is logged and becomes INTERNAL."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ItemNotFound):
        return ApiError("NOT_FOUND", str(exc))
    if isinstance(exc, TransitionError | CommandRefused | ReloadRefused | NodesFileConflict):  # ItemCheckedOut is a TransitionError
        return ApiError("CONFLICT", str(exc))
    if isinstance(exc, WriteFailed):
        return ApiError("INTERNAL", str(exc))
    if isinstance(exc, NodeUnavailable | PartlyDone):
        return ApiError("UNAVAILABLE", str(exc))
    if isinstance(exc, ConfigError):
        return ApiError("BAD_REQUEST", str(exc))
    if isinstance(exc, StoreFull):
        return ApiError("UNAVAILABLE", str(exc))
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return translate(exc.exceptions[0])
    log.error("API: unexpected error: %r", exc, exc_info=exc)
    return ApiError("INTERNAL", "internal error; see the router's log")
