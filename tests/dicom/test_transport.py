"""The transport on real TCP sockets (127.0.0.1): receives and sends that call the system
directly and wait only when the socket cannot go on."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from capacitor_trio.dicom import pdu as P
from capacitor_trio.dicom import transport
from capacitor_trio.dicom.transport import PeerClosed, Transport


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Transport, trio.SocketStream]]:
    """(our transport, the raw peer stream), connected over loopback TCP."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listeners[0].accept())

        nursery.start_soon(accept)
        ours = await trio.open_tcp_stream("127.0.0.1", port)
    t = Transport(ours)
    try:
        yield t, accepted[0]
    finally:
        await t.aclose()
        await accepted[0].aclose()
        await listeners[0].aclose()


async def read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await stream.receive_some(min(65536, n - len(got)))
        assert chunk, "peer closed early"
        got += chunk
    return bytes(got)


def waits_for_room(monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """An event set when a send first has to wait for room in the socket buffers."""
    waited = trio.Event()
    real_wait = trio.lowlevel.wait_writable

    async def wait_writable(sock: object) -> None:
        waited.set()
        await real_wait(sock)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.lowlevel, "wait_writable", wait_writable)
    return waited


async def test_a_send_larger_than_the_socket_buffers_waits_for_room_and_arrives_whole(
    pair: tuple[Transport, trio.SocketStream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer reads only once the sender had to wait for room (EAGAIN, `wait_writable`)."""
    t, peer = pair
    data = os.urandom(32 << 20)
    waited = waits_for_room(monkeypatch)
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            await waited.wait()
            received.append(await read_exactly(peer, len(data)))

        nursery.start_soon(reader)
        before = t.bytes_sent
        await t.send_all(data)
    assert t.bytes_sent - before == len(data)
    assert received == [data]


async def test_nothing_follows_a_pdu_cut_off_part_way(
    pair: tuple[Transport, trio.SocketStream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send cancelled while it waits for room in the middle of a PDU leaves the stream inside
    that PDU: an A-ABORT sent now would be read as the rest of it. Every later send raises
    PeerClosed instead (the callers' A-ABORT gives up and the connection is closed); a send
    cancelled before its first byte leaves the stream usable."""
    t, peer = pair
    pdu = b"\x04\x00" + (32 << 20).to_bytes(4, "big") + os.urandom(32 << 20)  # P-DATA-TF
    with trio.CancelScope() as scope:
        scope.cancel()
        await t.send_all(pdu)
    assert not t.cut
    waited = waits_for_room(monkeypatch)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(t.send_all, pdu)
        await waited.wait()  # the socket buffers are full, part of the PDU is out
        nursery.cancel_scope.cancel()
    assert t.cut and 0 < t.bytes_sent < len(pdu)
    with pytest.raises(PeerClosed, match="cut off"):
        await t.send_all(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # an A-ABORT
    await t.aclose()
    received = bytearray()
    while chunk := await peer.receive_some(1 << 20):
        received += chunk
    assert bytes(received) == pdu[: len(received)]  # a prefix of the PDU, nothing after it


async def test_a_closed_peer_is_peer_closed(pair: tuple[Transport, trio.SocketStream]) -> None:
    t, peer = pair
    await peer.aclose()
    with pytest.raises(PeerClosed):
        await t.read_pdu()
    with pytest.raises(PeerClosed):
        for _ in range(64):  # the first sends may still land in our buffer
            await t.send_all(b"x" * (1 << 20))


def schedule_points() -> int:
    """How many times this task yielded to the scheduler so far (Trio's own count, which
    `trio.testing.assert_checkpoints` reads together with the cancellation checks)."""
    return trio.lowlevel.current_task()._schedule_points  # type: ignore[attr-defined,no-any-return]


async def test_ready_bytes_are_moved_without_a_scheduling_round_until_the_budget_is_spent(
    pair: tuple[Transport, trio.SocketStream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receive or send that the socket can serve at once does not yield (Trio's socket
    methods would, every time); after YIELD_BYTES moved without waiting it does, so one busy
    association cannot starve the others."""
    t, peer = pair
    monkeypatch.setattr(transport, "YIELD_BYTES", 1000)
    # one segment on loopback: readable means both PDUs are in our receive buffer
    await peer.send_all(b"\x07\x00\x00\x00\x01\xf4" + b"x" * 500 + b"\x07\x00\x00\x00\x01\xf4" + b"y" * 500)
    await trio.lowlevel.wait_readable(t.stream.socket)  # type: ignore[attr-defined]
    t._receive_size = 506  # one PDU per receive
    t._unyielded = 0
    before = schedule_points()
    assert await t.read_pdu() == (7, b"x" * 500)
    assert schedule_points() == before
    assert await t.read_pdu() == (7, b"y" * 500)  # 1012 bytes now: yields once
    assert schedule_points() == before + 1
    await t.send_all(b"z" * 600)
    assert schedule_points() == before + 1
    await t.send_all(b"z" * 600)
    assert schedule_points() == before + 2
    assert await read_exactly(peer, 1200) == b"z" * 1200


async def test_a_cancelled_task_does_not_move_bytes(
    pair: tuple[Transport, trio.SocketStream],
) -> None:
    """Every call checks for cancellation first, even where the socket is ready."""
    t, peer = pair
    await peer.send_all(b"\x07\x00\x00\x00\x00\x01z")
    await trio.lowlevel.wait_readable(t.stream.socket)  # type: ignore[attr-defined]
    with trio.CancelScope() as scope:
        scope.cancel()
        await t.read_pdu()
    assert scope.cancelled_caught
    assert await t.read_pdu() == (7, b"z")  # nothing was consumed


async def test_a_closed_transport_raises_peer_closed_and_touches_no_other_fd(
    pair: tuple[Transport, trio.SocketStream], tmp_path: Path
) -> None:
    """The socket's descriptor is looked up on every call: after close, the number may belong
    to another file by now."""
    t, _peer = pair
    await t.aclose()
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(PeerClosed):
            await t.read_pdu()
        with pytest.raises(PeerClosed):
            await t.send_all(b"abc")
        assert os.fstat(other).st_size == 0
    finally:
        os.close(other)


async def test_memory_follows_the_bytes_that_arrive_not_the_length_field() -> None:
    """issue 19 #2: a PDU header claiming 2 MiB followed by a few bytes holds no more than the
    first buffer (64 KiB), not 2 MiB for as long as the peer waits; as the rest trickles in,
    the buffer stays within twice what arrived; the PDU comes out whole."""
    client, server = trio.testing.memory_stream_pair()
    t = Transport(server)
    length = 2 << 20
    body = os.urandom(length)
    got: list[tuple[int, bytes | bytearray]] = []

    async def reader() -> None:
        got.append(await t.read_pdu(4 << 20))

    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            base = tracemalloc.get_traced_memory()[0]
            await client.send_all(P.PDU_HEADER.pack(P.P_DATA_TF, 0, length) + body[:1000])
            await trio.testing.wait_all_tasks_blocked()
            assert tracemalloc.get_traced_memory()[0] - base < 128 << 10  # was 2 MiB
            sent = 1000
            for size in (50_000, 200_000, 300_000):  # 551,000 bytes in all
                await client.send_all(body[sent : sent + size])
                sent += size
                await trio.testing.wait_all_tasks_blocked()
            assert tracemalloc.get_traced_memory()[0] - base < 2 * sent + (64 << 10)
            await client.send_all(body[sent:])
    finally:
        tracemalloc.stop()
    assert got == [(P.P_DATA_TF, body)]


async def test_tiny_pdus_taken_from_the_buffer_still_yield(
    pair: tuple[Transport, trio.SocketStream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 19 #3: PDUs that one receive brought in are acted on without a system call each;
    every one counts PDU_COST towards the yield budget, so a burst of tiny PDUs (a 1 MiB
    receive holds 100,000 A-ABORTs' worth) lets the other tasks run now and then."""
    t, peer = pair
    monkeypatch.setattr(transport, "YIELD_BYTES", 10 * 4096)  # ten PDUs of PDU_COST
    pdus = 100
    await peer.send_all(P.abort_bytes() * pdus)  # 1,000 bytes: one segment on loopback
    await trio.lowlevel.wait_readable(t.stream.socket)  # type: ignore[attr-defined]
    t._unyielded = 0
    before = schedule_points()
    for _ in range(pdus):
        assert (await t.read_pdu())[0] == P.A_ABORT
    assert schedule_points() - before >= 9  # 99 PDUs from the buffer: 9 budgets spent
