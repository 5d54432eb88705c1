"""The acceptor's listener: the accept loop (`serve_acceptor`) and the bounds on connections
(`_Connections`), each connection served by `handle_association` (acceptor.py).

- `max_clients` counts associations only: from acceptance until our last PDU (A-RELEASE-RP,
  A-ASSOCIATE-RJ).
- At most `max_unassociated` connections read their A-ASSOCIATE-RQ at once; the others wait their
  turn unread, and a reader that has not had its request answered `STALE_AFTER` after it started
  gives its place to the first of them.
- At most `max_unassociated` connections wait for the peer to close after our last PDU; the
  oldest is closed for a new one.
"""

from __future__ import annotations

import functools
import logging
import math

import trio

from capacitor_trio.serving import serve_listeners

from .acceptor import handle_association
from .sink import AcceptorConfig, InstanceSink
from .transport import BufferBudget

log = logging.getLogger("capacitor_trio.dicom")

#: a connection reading its A-ASSOCIATE-RQ that has not had it answered after this many
#: seconds (a real peer sends it as soon as it has connected) gives its place to a connection
#: waiting for one
STALE_AFTER = 2.0
#: connections waiting for a place among those reading their request, per place; beyond that
#: a new connection is closed at once
QUEUE_FACTOR = 16


class _Connections:
    """The listener's connections, in four groups.

    - An association, from the acceptance of its request until its last PDU goes out, counts
      against `max_clients`.
    - At most `max_unassociated` connections read their A-ASSOCIATE-RQ at once (ARTIM bounds
      each); that bounds what requests not yet answered can hold (256 KiB each).
    - Further connections wait their turn, unread, first come first served (ARTIM bounds the
      wait; at most `QUEUE_FACTOR` per place, a new one beyond is closed at once). A reader
      whose request has not been answered `STALE_AFTER` after it started gives its place to
      the first of them (it is closed: an A-ABORT, then the close). A burst of modalities is
      served in turn, and idle sockets cannot keep one out, however many are opened.
    - A connection whose last PDU (A-ASSOCIATE-RJ, A-RELEASE-RP) has gone out, while the peer
      closes (ARTIM bounds it): at most `max_unassociated`, the oldest closed for a new one (it
      has its answer already)."""

    def __init__(self, max_clients: int, max_unassociated: int) -> None:
        self.max_clients = max_clients
        self.max_readers = max(1, max_unassociated)
        self.associations = 0
        #: connections reading their request, oldest first: cancel scope -> start
        self._readers: dict[trio.CancelScope, float] = {}
        #: connections whose last PDU went out, oldest first
        self._closing: dict[trio.CancelScope, None] = {}
        self._turns = trio.lowlevel.ParkingLot()  # the connections waiting for a place
        self._queued = 0
        self._handed = 0  # places handed to waiting connections that have not taken them yet
        self._crowded = False  # a close for crowding has been logged (once per burst)

    async def reading_turn(self, scope: trio.CancelScope) -> bool:
        """Wait for a place among the connections reading their request, and take it; False
        (at once) when too many wait already."""
        if self._queued >= QUEUE_FACTOR * self.max_readers:
            self._crowd("too many connections waiting for their turn; closing new ones")
            return False
        self._queued += 1
        try:
            if self._turns or len(self._readers) + self._handed >= self.max_readers:
                await self._wait_turn()
        finally:
            self._queued -= 1
        self._readers[scope] = trio.current_time()
        return True

    async def _wait_turn(self) -> None:
        while True:
            if len(self._readers) + self._handed < self.max_readers:
                return  # a place came free while this one was not parked (after a timeout)
            since = next(iter(self._readers.values()), None)
            deadline = math.inf if since is None else since + STALE_AFTER
            if trio.current_time() >= deadline:  # the oldest reader is stale: take its place
                oldest = next(iter(self._readers))
                del self._readers[oldest]
                oldest.cancel()
                self._crowd("closing connections that have not sent their request in time")
                return
            with trio.move_on_at(deadline) as waited:
                await self._turns.park()
            if not waited.cancelled_caught:  # a place was handed over
                self._handed -= 1
                return

    def _crowd(self, what: str) -> None:
        if not self._crowded:
            self._crowded = True
            log.warning(
                "DICOM: %d connections reading their A-ASSOCIATE-RQ, %d waiting: %s (logged "
                "once until it eases)",
                len(self._readers),
                self._queued,
                what,
            )

    def _stop_reading(self, scope: trio.CancelScope) -> None:
        if self._readers.pop(scope, None) is None:
            return
        if self._turns:
            self._turns.unpark()
            self._handed += 1
        elif len(self._readers) < self.max_readers // 2:
            self._crowded = False

    def admit(self, scope: trio.CancelScope) -> bool:
        """Move the connection to the associations, if one is free."""
        if self.max_clients and self.associations >= self.max_clients:
            return False
        self._stop_reading(scope)
        self.associations += 1
        return True

    def over(self, scope: trio.CancelScope, associated: bool) -> None:
        """Its last PDU went out: among the closing ones while the peer closes."""
        if associated:
            self.associations -= 1
        self._stop_reading(scope)
        if len(self._closing) >= self.max_readers:
            oldest = next(iter(self._closing))
            del self._closing[oldest]
            oldest.cancel()
        self._closing[scope] = None

    def leave(self, scope: trio.CancelScope, associated: bool) -> None:
        if associated:
            self.associations -= 1
        self._stop_reading(scope)
        self._closing.pop(scope, None)


async def serve_acceptor(
    config: AcceptorConfig,
    sink: InstanceSink,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    budget: BufferBudget | None = None,
) -> None:
    """Listen on config.host:config.port and serve associations until cancelled; `budget`
    (tests: to watch it) is made from `config.max_buffered_bytes` when not given."""
    host = None if config.host in ("", "0.0.0.0", "*") else config.host
    listeners = await trio.open_tcp_listeners(config.port, host=host, backlog=128)
    port = listeners[0].socket.getsockname()[1]
    log.info("DICOM listening on %s:%s as %s", config.host, port, config.ae_title)
    connections = _Connections(config.max_clients, config.max_unassociated)
    #: what all the connections hold in PDUs not received whole: with `max_clients` 0 nothing
    #: else bounds it (each association may hold up to twice our maxPduSize for clientTimeout)
    if budget is None:
        budget = BufferBudget(config.max_buffered_bytes)

    async def handler(stream: trio.SocketStream) -> None:
        associated = False

        def admit() -> bool:
            nonlocal associated
            associated = connections.admit(scope)
            return associated

        def over() -> None:
            # released or rejected: the slot is free while we wait for the peer to close (a
            # modality that opens its next association at once is not refused for it)
            nonlocal associated
            connections.over(scope, associated)
            associated = False

        with trio.CancelScope() as scope:
            try:
                turn = False
                with trio.move_on_after(config.artim_timeout):  # the wait for a turn
                    turn = await connections.reading_turn(scope)
                if turn:
                    await handle_association(
                        stream, config, sink, admit=admit, on_over=over, budget=budget
                    )
                else:
                    await trio.aclose_forcefully(stream)  # closed unread
            except Exception:
                log.exception("DICOM association handler failed")
            finally:
                connections.leave(scope, associated)
        if scope.cancelled_caught:
            log.debug("DICOM connection closed to make room for a new one")

    async with trio.open_nursery() as nursery:
        # our accept loop: an EMFILE is one log line per burst, not a traceback per attempt
        await nursery.start(functools.partial(serve_listeners, handler, listeners, name="DICOM", logger=log))
        task_status.started(port)
