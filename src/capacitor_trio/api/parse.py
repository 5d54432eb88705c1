"""Parsing a request for the API's handlers: the JSON body (only the fields allowed, each of its
type), query arguments (whole numbers within bounds, states, roles) and item IDs. Anything else
is an `ApiError` (400, or 415 for a body that is not JSON), never an exception of its own.
"""

from __future__ import annotations

import json
from typing import Any

from quart import request

from capacitor_trio.config.models import NODE_ROLES
from capacitor_trio.store import STATES

from .envelope import ApiError, bad_request, not_found


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
