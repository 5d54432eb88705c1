"""api/server.py serves connections with hypercorn's internals, not its public `serve`: it
subclasses `TCPServer` (overriding the private `_read_data`, stopping `idle_task`), and builds
`WorkerContext` and `Lifespan` itself. pyproject pins hypercorn to the minor version this was
written against; these tests say which hooks that relies on, so that moving the pin fails here,
by name, rather than as a hung or leaking API connection."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import hypercorn.utils
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext

from capacitor_trio.api import server


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_the_pinned_hypercorn_is_installed() -> None:
    assert version("hypercorn").split(".")[:2] == ["0", "18"]


def test_tcp_server_hooks() -> None:
    # built as partial(_TCPServer, app, config, context, state)(stream), then awaited
    assert _params(TCPServer.__init__) == ["self", "app", "config", "context", "state", "stream"]
    assert hasattr(TCPServer, "__await__")
    # _read_data is the connection's read loop: it returns when the client's side ends, and run()
    # calls it once the protocol is set up (our override stops the keep-alive timer after it)
    assert inspect.iscoroutinefunction(TCPServer._read_data) and _params(TCPServer._read_data) == ["self"]
    assert "await self._read_data()" in inspect.getsource(TCPServer.run)
    assert server._TCPServer._read_data is not TCPServer._read_data
    # idle_task is made in __init__ and has an async stop()
    conn = TCPServer(None, Config(), WorkerContext(None), {}, None)  # type: ignore[arg-type]
    assert inspect.iscoroutinefunction(conn.idle_task.stop) and _params(conn.idle_task.stop) == []


def test_worker_hooks() -> None:
    assert _params(WorkerContext.__init__) == ["self", "max_requests"]
    assert _params(Lifespan.__init__) == ["self", "app", "config", "state"]
    assert inspect.iscoroutinefunction(Lifespan.handle_lifespan)
    assert "task_status" in _params(Lifespan.handle_lifespan)
    assert inspect.iscoroutinefunction(Lifespan.wait_for_startup)
    assert _params(hypercorn.utils.wrap_app) == ["app", "wsgi_max_body_size", "mode"]
    assert hasattr(Config(), "wsgi_max_body_size")
