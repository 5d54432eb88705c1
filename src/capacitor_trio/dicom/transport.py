"""A PDU-level transport over a Trio stream: large receives, QUICKACK, activity accounting.

On a `trio.SocketStream` it talks to the socket directly: receives of up to 1 MiB (large PDU
bodies are received straight into their own buffer, no intermediate copy, which grows with the
bytes that arrive: never sized by the peer's length field alone), TCP_QUICKACK re-armed
after every receive on Linux (stock DCMTK leaves Nagle on and writes each response in two pieces;
without QUICKACK every message waits ~40 ms for our delayed ACK), and partial sends so the stall
detector sees progress. Any other `trio.abc.Stream` (memory streams in tests) works too.

On a socket, receives and sends call the system directly and wait (`wait_readable`,
`wait_writable`) only when the socket has nothing to give or no room: Trio's own socket methods
add a scheduling round to every call that succeeds at once, and on this path (a 0.5 MB image is
four to eight receives or sends) those rounds cost more than the system calls. Every call still
checks for cancellation, and a task yields at least once per `YIELD_BYTES` moved, so one fast
peer cannot starve the other tasks.
"""

from __future__ import annotations

import logging
import os
import socket as _stdsocket
from collections.abc import Callable

import trio

from .pdu import (
    ABORT_REASON_UNRECOGNIZED_PDU,
    KNOWN_PDU_TYPES,
    PDU_HEADER,
    PduError,
)

RECEIVE_SIZE = 1 << 20
#: a task moving bytes without ever waiting yields to the others after this many
YIELD_BYTES = 4 << 20
#: what a PDU taken from the receive buffer (no system call) counts towards YIELD_BYTES: a
#: task yields at least once per 1024 such PDUs (each costs microseconds to act on)
PDU_COST = 4096
#: a PDU body that has not arrived yet is received into a buffer of at least this size, which
#: doubles as it fills (up to the PDU's length)
GROW_BYTES = 64 << 10
_TCP_QUICKACK = getattr(_stdsocket, "TCP_QUICKACK", None)

log = logging.getLogger("capacitor_trio.dicom")


class PeerClosed(Exception):
    """The peer closed the connection (or it broke)."""


class OverBudget(PduError):
    """A PDU's buffer would take the listener's `BufferBudget` over its limit: the connection
    is aborted (the budget logs it, once per burst)."""


class BufferBudget:
    """The bytes held in buffers of PDUs not received whole yet, over all the connections of a
    listener, up to `limit` (0: no limit). A transport charges its buffer as it grows (a few
    times per large PDU, never per receive) and releases it when the PDU is whole or the read
    ends: a peer that sends all of a PDU but its last byte and waits holds the buffer, and many
    such peers are refused beyond the limit instead of taking the process's memory.

    The first `GROW_BYTES` of each buffer are not charged: PDUs of up to 64 KiB (storescu's
    are 16 KiB) are never refused, however full the budget, and what they hold is bounded by
    the number of connections the process can have open (64 KiB each)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.refused = 0
        self._warned = False  # a refusal has been logged (once until the buffers ease)

    def charge(self, n: int) -> None:
        """Take `n` more bytes, or raise OverBudget (nothing taken)."""
        if self.limit and self.held + n > self.limit:
            self.refused += 1
            if not self._warned:
                self._warned = True
                log.warning(
                    "DICOM: %d MiB held in PDUs not received whole yet (the limit is %d MiB): "
                    "aborting the associations that ask for more (logged once until it eases)",
                    self.held >> 20,
                    self.limit >> 20,
                )
            raise OverBudget(f"PDU buffers over the listener's limit of {self.limit} bytes")
        self.held += n

    def release(self, n: int) -> None:
        self.held -= n
        if self.held <= self.limit // 2:
            self._warned = False


async def overdue(started: Callable[[], float | None], limit: float) -> float:
    """Return once the wait that `started()` dates (None: no wait now) has lasted `limit`
    seconds, with its start. Sleeps until exactly that moment, and again whenever the wait
    changes; with no wait, it looks again `limit` later, which is never after the deadline of
    a wait that starts meanwhile. The watchdogs of an association (idle PDU loop, C-STORE
    response, stall) keep their timeouts this way, not with a cancel scope per message: entering
    and leaving a scope with a deadline costs ≈ 20 µs here."""
    period = limit if limit > 0 else 0.001  # never a busy loop
    while True:
        since = started()
        now = trio.current_time()
        if since is None:
            await trio.sleep_until(now + period)
        elif now >= since + limit:
            return since
        else:
            await trio.sleep_until(since + limit)


def read_limit(max_pdu: int) -> int:
    """The longest PDU body to read from a peer that we told our maximum PDU length `max_pdu`
    (0: none). Some peers overshoot it (they count the header in, or not), so twice that, at
    least 128 KiB; 64 MiB when we set none. A longer length field is a protocol error: reading
    it would allocate whatever the peer claims, up to 4 GiB."""
    return 2 * max(max_pdu, 65536) if max_pdu else 64 << 20


def tune_socket(sock: trio.socket.SocketType) -> None:
    """TCP_NODELAY on, QUICKACK on (Linux), generous buffers."""
    try:
        sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
        if _TCP_QUICKACK is not None:
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    except OSError:
        pass


class Transport:
    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        receive_size: int = RECEIVE_SIZE,
        budget: BufferBudget | None = None,
    ) -> None:
        self.stream = stream
        #: what the buffers of PDUs not received whole are charged to (None: nothing)
        self._budget = budget
        self._sock: trio.socket.SocketType | None = (
            stream.socket if isinstance(stream, trio.SocketStream) else None
        )
        if self._sock is not None:
            tune_socket(self._sock)
        self._quickack = self._sock is not None and _TCP_QUICKACK is not None
        self._receive_size = receive_size
        self._unyielded = 0
        self._buf = bytearray()
        self.last_activity = trio.current_time()
        self.bytes_sent = 0
        self.bytes_received = 0
        #: a send stopped part-way through a PDU (cancelled, or the peer went away): the stream
        #: cannot carry another PDU, an A-ABORT included (the peer would read it as the rest of
        #: the cut one), so later sends raise PeerClosed and the connection can only be closed
        self.cut = False

    def _rearm(self) -> None:
        if self._quickack:
            try:
                self._sock.setsockopt(_stdsocket.IPPROTO_TCP, _TCP_QUICKACK, 1)  # type: ignore[union-attr,arg-type]
            except OSError:
                self._quickack = False

    async def spend(self, cost: int) -> None:
        """Count work (`cost`, in bytes' worth) towards the next yield, and yield once it adds
        up to `YIELD_BYTES`: the bytes a system call moved without waiting, and the work done
        on received bytes (what a PDU holds many small pieces of costs more than its bytes)."""
        self._unyielded += cost
        if self._unyielded >= YIELD_BYTES:
            self._unyielded = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _receive(self, max_bytes: int) -> bytes | bytearray:
        data: bytes | bytearray
        try:
            if self._sock is not None:
                await trio.lowlevel.checkpoint_if_cancelled()
                while True:
                    try:
                        data = os.read(self._sock.fileno(), max_bytes)
                        break
                    except BlockingIOError:
                        self._unyielded = 0
                        await trio.lowlevel.wait_readable(self._sock)
                self._rearm()
                await self.spend(len(data))
            else:
                data = await self.stream.receive_some(max_bytes)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerClosed(str(exc)) from exc
        if not data:
            raise PeerClosed("connection closed by peer")
        self.last_activity = trio.current_time()
        self.bytes_received += len(data)
        return data

    async def _receive_into(self, view: memoryview) -> int:
        if self._sock is None:
            data = await self._receive(len(view))
            view[: len(data)] = data
            return len(data)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    n = os.readv(self._sock.fileno(), [view])
                    break
                except BlockingIOError:
                    self._unyielded = 0
                    await trio.lowlevel.wait_readable(self._sock)
            self._rearm()
        except (OSError, trio.ClosedResourceError) as exc:
            raise PeerClosed(str(exc)) from exc
        if n == 0:
            raise PeerClosed("connection closed by peer")
        self.last_activity = trio.current_time()
        self.bytes_received += n
        await self.spend(n)
        return n

    async def read_pdu(self, max_length: int = 0) -> tuple[int, bytes | bytearray]:
        """The next PDU as (type, body). Raises PduError for an unknown type or a PDU longer than
        `max_length` (0 = no limit), PeerClosed on EOF (also mid-PDU).

        Memory follows the bytes that arrived, not the length field: a PDU that is not in the
        buffer yet is received into a buffer that starts at what is there (at least
        `GROW_BYTES`) and doubles as it fills, so a peer that claims 2 MiB and sends 6 bytes
        holds 64 KiB, and one that sends half a PDU holds at most what it sent, twice over. That
        buffer is charged to the transport's `BufferBudget` as it grows beyond `GROW_BYTES`, and
        released when the PDU is whole or the read ends (OverBudget beyond its limit). A
        PDU taken whole from the buffer costs `PDU_COST` towards the next yield: a stream of
        tiny PDUs received in one go cannot keep the other tasks waiting either."""
        buf = self._buf
        received = False
        while len(buf) < 6:
            buf += await self._receive(self._receive_size)
            received = True
        pdu_type, _, length = PDU_HEADER.unpack_from(buf, 0)
        if pdu_type not in KNOWN_PDU_TYPES:
            raise PduError(f"unknown PDU type 0x{pdu_type:02X}", ABORT_REASON_UNRECOGNIZED_PDU)
        if max_length and length > max_length:
            raise PduError(f"PDU length {length} exceeds the maximum {max_length}")
        total = 6 + length
        if len(buf) >= total:
            with memoryview(buf) as mv:
                body = bytes(mv[6:total])
            del buf[:total]
            if not received:
                await self.spend(PDU_COST)
            return pdu_type, body
        # The rest of a PDU: received straight into the buffer that becomes its body.
        del buf[:6]  # O(1) at the start of a bytearray
        big, self._buf = buf, bytearray()
        return pdu_type, await self._receive_rest(big, length)

    async def _receive_rest(self, big: bytearray, length: int) -> bytearray:
        """`big` (the start of a PDU body of `length` bytes) with the rest received into it."""
        have = len(big)
        budget = self._budget
        charged = 0
        try:
            while have < length:
                if have == len(big):  # full: grow (no view of it may be alive)
                    grown = min(length, max(2 * have, GROW_BYTES))
                    if budget is not None and grown > GROW_BYTES:
                        budget.charge(grown - GROW_BYTES - charged)
                        charged = grown - GROW_BYTES
                    big += bytes(grown - have)
                with memoryview(big) as mv:
                    have += await self._receive_into(mv[have:])
        finally:
            if charged:
                budget.release(charged)  # type: ignore[union-attr]
        return big

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data`, whole PDUs (callers never split one over two calls)."""
        if self.cut:
            raise PeerClosed("an earlier PDU was cut off part-way: nothing more can be sent")
        try:
            if self._sock is None:
                await self.stream.send_all(data)
                self.bytes_sent += len(data)
                self.last_activity = trio.current_time()
                return
            await trio.lowlevel.checkpoint_if_cancelled()
            with memoryview(data) as mv:
                total = len(mv)
                off = 0
                try:
                    while off < total:
                        try:
                            n = os.write(self._sock.fileno(), mv[off:])
                        except BlockingIOError:
                            self._unyielded = 0
                            await trio.lowlevel.wait_writable(self._sock)
                            continue
                        off += n
                        self.bytes_sent += n
                        self.last_activity = trio.current_time()
                finally:
                    self.cut = 0 < off < total
            await self.spend(total)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerClosed(str(exc)) from exc

    async def wait_closed(self) -> None:
        """Read and discard until the peer closes (used after A-RELEASE-RP / A-ABORT)."""
        self._buf.clear()
        try:
            while True:
                await self._receive(65536)
        except PeerClosed:
            return

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
