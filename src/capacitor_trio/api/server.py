"""Serving the management API: hypercorn's Trio worker on 127.0.0.1 only.

`run_api` is started by the runtime with ``nursery.start`` in the router's own nursery, so the
app runs in the same process and Trio run as the actors. It binds the loopback address whatever
the configured host (the API is never reachable from another machine), tries `api.port` and the
next ports up to `PORT_TRIES` in all, and reports the bound port with ``task_status.started``
once the socket listens. Cancelling it stops the server (connections get a short grace period).
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from .app import create_app

log = logging.getLogger("capacitor_trio.api")

LOOPBACK = "127.0.0.1"
#: How many consecutive ports are tried, starting at api.port.
PORT_TRIES = 10


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


async def run_api(router: Any, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API for `router` until cancelled; `task_status.started(port)` once listening."""
    api = router.settings.config.api
    sock = bind_loopback(api.port)
    port = sock.getsockname()[1]
    config = hypercorn_config()
    quart_app = create_app(router)
    app = wrap_app(quart_app, config.wsgi_max_body_size, "asgi")
    sockets = Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])
    try:
        async with trio.open_nursery() as nursery:
            quart_app.extensions["capacitor_api"].set_background_nursery(nursery)
            await nursery.start(lambda task_status: worker_serve(app, config, sockets=sockets, task_status=task_status))
            log.info("API listening on http://%s:%d", LOOPBACK, port)
            task_status.started(port)
    finally:
        sock.close()
