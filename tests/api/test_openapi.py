"""The OpenAPI document: served, equal to its source, and listing exactly the app's routes."""

from __future__ import annotations

import json
import re
from importlib import resources
from types import SimpleNamespace

from capacitor_trio.api.openapi_source import render
from capacitor_trio.api.routes import create_app
from capacitor_trio.config.models import ApiConfig

from .conftest import StartRouter


def _shape(path: str) -> str:
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


def _document() -> dict:
    return json.loads(resources.files("capacitor_trio.api").joinpath("openapi.json").read_text("utf-8"))


def test_document_is_up_to_date() -> None:
    text = resources.files("capacitor_trio.api").joinpath("openapi.json").read_text("utf-8")
    assert text == render(), "regenerate: python -m capacitor_trio.api.openapi_source > src/capacitor_trio/api/openapi.json"
    assert _document()["openapi"].startswith("3.1")


def test_document_lists_exactly_the_routes() -> None:
    router = SimpleNamespace(settings=SimpleNamespace(config=SimpleNamespace(api=ApiConfig())))
    app = create_app(router)
    routes = {
        (method, _shape(rule.rule))
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS") and not rule.endpoint.startswith("web.")  # the dashboard's pages
    }
    documented = {
        (method.upper(), _shape(path))
        for path, ops in _document()["paths"].items()
        for method in ops
    }
    assert routes == documented


def test_write_endpoints_are_marked() -> None:
    from capacitor_trio.api.routes import ROUTES

    writes = {(m, _shape(p)) for m, p, _name, write in ROUTES if write}
    doc = _document()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert (("security" in op) == ((method.upper(), _shape(path)) in writes)), (method, path)


async def test_served(start_router: StartRouter) -> None:
    r = await start_router()
    resp = await r.client.get("/api/openapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    assert resp.json() == _document()
