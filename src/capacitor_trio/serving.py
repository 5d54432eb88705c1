"""The accept loop of the router's listeners (DICOM and API), in place of `trio.serve_listeners`.

Two differences. A cap on the connections served at once (`max_connections`): beyond it the loop
stops accepting until one ends, so further connections wait in the kernel's listen backlog and
hold no descriptor of ours. And when accept fails for want of resources (EMFILE, ENFILE, ENOMEM,
ENOBUFS) the loop retries every `RETRY_DELAY` seconds, as Trio's does, but says so in one log
line per burst (no traceback), and in one more when a connection is accepted again, instead of a
traceback per attempt (ten a second, for as long as the descriptors are gone).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

import trio

#: accept failures that mean "not now": retried, not raised
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: seconds between two attempts while accept fails for want of resources
RETRY_DELAY = 0.1

Handler = Callable[[trio.SocketStream], Awaitable[object]]


class AcceptTrouble:
    """Counts the accept failures of one burst; logs its start and its end, once each."""

    def __init__(self, name: str, logger: logging.Logger) -> None:
        self.name = name
        self.log = logger
        #: failed attempts since the last accepted connection
        self.failures = 0

    def failed(self, exc: OSError) -> None:
        self.failures += 1
        if self.failures == 1:
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self.log.error(
                "%s: cannot accept connections: %s (%s); retrying every %d ms until it can",
                self.name, code, os.strerror(exc.errno or 0), round(RETRY_DELAY * 1000),
            )

    def accepted(self) -> None:
        if self.failures:
            self.log.warning(
                "%s: accepting connections again after %d failed attempt(s)", self.name, self.failures
            )
            self.failures = 0


async def serve_listeners(
    handler: Handler,
    listeners: Sequence[trio.abc.Listener[trio.SocketStream]],
    *,
    name: str,
    logger: logging.Logger,
    max_connections: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `handler(stream)` for each connection accepted on `listeners` until cancelled; at most
    `max_connections` at once (None: no cap). The stream is closed when the handler returns."""
    slots = trio.Semaphore(max_connections) if max_connections else None
    trouble = AcceptTrouble(name, logger)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_serve_one, listener, handler, nursery, slots, trouble)
        task_status.started()


async def _serve_one(
    listener: trio.abc.Listener[trio.SocketStream],
    handler: Handler,
    nursery: trio.Nursery,
    slots: trio.Semaphore | None,
    trouble: AcceptTrouble,
) -> None:
    async with listener:
        while True:
            if slots is not None:
                await slots.acquire()  # at the cap: wait here, the kernel queues the rest
            try:
                stream = await listener.accept()
            except OSError as exc:
                if slots is not None:
                    slots.release()
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                trouble.failed(exc)
                await trio.sleep(RETRY_DELAY)
                continue
            trouble.accepted()
            nursery.start_soon(_run_handler, handler, stream, slots)


async def _run_handler(handler: Handler, stream: trio.SocketStream, slots: trio.Semaphore | None) -> None:
    try:
        await handler(stream)
    finally:
        try:
            await trio.aclose_forcefully(stream)
        finally:
            if slots is not None:
                slots.release()
