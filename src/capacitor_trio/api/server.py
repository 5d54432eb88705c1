"""Serving the management API: hypercorn's Trio worker on 127.0.0.1 only.

`run_api` is started by the runtime with ``nursery.start`` in the router's own nursery, so the
app runs in the same process and Trio run as the actors. It binds the loopback address whatever
the configured host (the API is never reachable from another machine), tries `api.port` and the
next ports up to `PORT_TRIES` in all, and reports the bound port with ``task_status.started``
once the socket listens. Cancelling it stops the server.

Connections are accepted by our own loop (`serving.serve_listeners`) and each is served by
hypercorn's `TCPServer`: at most `MAX_CONNECTIONS` at once (more wait in the listen backlog,
holding no descriptor), so that a flood of slow local connections cannot take the descriptors the
DICOM listener and the store need; a connection that has not sent a whole request head within
`keep_alive_timeout` (30 s) of its start or of its last response is closed by hypercorn. An accept
failing for want of descriptors is one log line per burst.
"""

from __future__ import annotations

import errno
import logging
import socket
from functools import partial
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import wrap_app

from capacitor_trio.serving import serve_listeners

from .routes import create_app

if TYPE_CHECKING:
    from capacitor_trio.runtime import Router

from capacitor_trio.logs import ACCESS_LOGGER

log = logging.getLogger("capacitor_trio.api")

LOOPBACK = "127.0.0.1"
#: How many consecutive ports are tried, starting at api.port.
PORT_TRIES = 10
#: Most API connections served at once (the operator's browser opens a handful).
MAX_CONNECTIONS = 64


class _TCPServer(TCPServer):
    """hypercorn's connection, which ends when the client's side does: otherwise its keep-alive
    timer would hold the connection's slot (`MAX_CONNECTIONS`) for up to `keep_alive_timeout`
    after the client has gone."""

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


class ApiPortsBusy(OSError):
    """Every port tried for the API is taken."""


def bind_loopback(port: int, tries: int = PORT_TRIES, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on 127.0.0.1: `port`, else the next free one (port 0: any port)."""
    candidates = [0] if port == 0 else [p for p in range(port, port + tries) if p <= 65535]
    last: OSError | None = None
    for candidate in candidates:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((LOOPBACK, candidate))
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            last = exc
            continue
        sock.setblocking(False)
        return sock
    raise ApiPortsBusy(
        errno.EADDRINUSE,
        f"API cannot start: ports {candidates[0]}-{candidates[-1]} on {LOOPBACK} are all in use "
        f"(set api.port to a free port); last error: {last}",
    )


def hypercorn_config() -> HyperConfig:
    config = HyperConfig()
    config.bind = []
    config.accesslog = None
    http_log = logging.getLogger("capacitor_trio.api.http")
    if http_log.level == logging.NOTSET:
        http_log.setLevel(logging.WARNING)  # hypercorn's "Running on ..." repeats our own line
    config.errorlog = http_log
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 30.0
    return config


async def run_api(router: Router, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API for `router` until cancelled; `task_status.started(port)` once listening."""
    api = router.settings.config.api
    sock = bind_loopback(api.port)
    port = sock.getsockname()[1]
    config = hypercorn_config()
    if not router.settings.config.suppress_web_log:
        # the request lines go to their own file (logs.setup_file_logging), never to stderr
        access = logging.getLogger(ACCESS_LOGGER)
        access.propagate = False
        config.accesslog = access
    quart_app = create_app(router)
    app = wrap_app(quart_app, config.wsgi_max_body_size, "asgi")
    try:
        async with trio.open_nursery() as nursery:
            quart_app.extensions["capacitor_api"].set_background_nursery(nursery)
            await nursery.start(partial(_serve, app, config, sock))
            log.info("API listening on http://%s:%d", LOOPBACK, port)
            task_status.started(port)
    finally:
        sock.close()


async def _serve(
    app: AppWrapper, config: HyperConfig, sock: socket.socket, *, task_status: trio.TaskStatus[None]
) -> None:
    """hypercorn's Trio worker (`hypercorn.trio.run.worker_serve`) with our accept loop: the
    app's lifespan (startup, then shutdown when the listener ends), each connection a
    `TCPServer`. These are hypercorn's internals: pyproject pins its minor version, and
    tests/api/test_hypercorn_hooks.py checks the hooks used here."""
    state: LifespanState = {}
    lifespan = Lifespan(app, config, state)
    context = WorkerContext(None)
    handler = partial(_TCPServer, app, config, context, ConnectionState(state))
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        await serve_listeners(
            handler, [listener], name="API", logger=log, max_connections=MAX_CONNECTIONS,
            task_status=task_status,
        )
