"""Property-based run of schemathesis against /api/openapi.json of a live router.

The router runs in its own thread (its own Trio run) because schemathesis calls the API with a
blocking HTTP client. Every operation gets a bounded number of examples, positive and negative,
with the bearer token; the checks: no 5xx, status codes, content types, headers and bodies as
documented, and no request may hang (each has a timeout).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import trio
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from capacitor_trio.api.openapi_source import build
from capacitor_trio.config.models import Node
from capacitor_trio.runtime import Router, run_router

from .conftest import AUTH, Running, StorageScp, make_settings

MAX_EXAMPLES = 12

# POST /api/filters/test takes a DICOM file: its generated bodies (binary strings) go as bytes
schemathesis.serializer.alias("application/dicom", "application/octet-stream")
REQUEST_TIMEOUT = 15


class LiveRouter:
    """A router in a background thread with its own Trio run."""

    def __init__(self, data_dir: Path, nodes: tuple[Node, ...]) -> None:
        self.settings = make_settings(data_dir, nodes)
        self.router: Router | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="live-router", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                self.router = await nursery.start(functools.partial(run_router, self.settings))
                running = Running(self.router, None, self.settings.config.data_dir, None)  # type: ignore[arg-type]
                await running.queue(3, dest="PACS", state="failed")
                await running.queue(2, dest="GONE", state="rejected")
                self._ready.set()

    def start(self) -> str:
        self._thread.start()
        assert self._ready.wait(30), "router did not start"
        if self._error is not None:
            raise self._error
        assert self.router is not None
        return f"http://127.0.0.1:{self.router.api_port}"

    def stop(self) -> None:
        if self._token is not None and self._scope is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(30)


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory, scp: StorageScp) -> Iterator[str]:
    nodes = (
        Node(ae_title="PACS", host_name="127.0.0.1", port=scp.port),
        Node(ae_title="PACS", host_name="127.0.0.1", port=scp.port, role="QueryRetrieve"),
    )
    live = LiveRouter(tmp_path_factory.mktemp("live"), nodes)
    base = live.start()
    yield base
    live.stop()


@pytest.fixture(scope="module")
def api_schema(live_api: str) -> Any:
    return schemathesis.openapi.from_url(f"{live_api}/api/openapi.json")


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

#: (method, path, generation mode): negative cases only where there is an input to get wrong
OPERATIONS = [
    (method.upper(), path, mode)
    for path, ops in build()["paths"].items()
    for method, op in ops.items()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or "parameters" in op or "requestBody" in op
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "path", "mode"), OPERATIONS, ids=[f"{m} {p} {g.value}" for m, p, g in OPERATIONS]
)
def test_api_conforms_to_its_openapi_document(api_schema: Any, method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Any) -> None:
        case.call_and_validate(headers=dict(AUTH), checks=CHECKS, timeout=REQUEST_TIMEOUT)

    run()
