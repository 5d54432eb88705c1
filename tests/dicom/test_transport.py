"""The transport on real TCP sockets (127.0.0.1): receives and sends that call the system
directly and wait only when the socket cannot go on, and `send_file` (sendfile(2))."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

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


async def test_send_file_sends_the_head_then_the_file_range_through_a_slow_reader(
    pair: tuple[Transport, trio.SocketStream], tmp_path: Path
) -> None:
    """More than the socket buffers hold, so sendfile returns short and waits for room."""
    t, peer = pair
    assert t.sends_files
    data = os.urandom(6 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    received: list[bytes] = []
    try:
        async with trio.open_nursery() as nursery:

            async def slow_reader() -> None:
                await trio.sleep(0.05)  # let the sender fill the buffers and wait
                received.append(await read_exactly(peer, 5 + (6 << 20) - 1000))

            nursery.start_soon(slow_reader)
            before = t.bytes_sent
            sent = await t.send_file(b"HEAD:", fd, 1000, len(data) - 1000)
    finally:
        os.close(fd)
    assert sent == len(data) - 1000
    assert t.bytes_sent - before == 5 + sent
    assert received == [b"HEAD:" + data[1000:]]


async def test_send_file_returns_short_when_the_file_ends(
    pair: tuple[Transport, trio.SocketStream], tmp_path: Path
) -> None:
    t, peer = pair
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert await t.send_file(b"H", fd, 4, 100) == 6
    finally:
        os.close(fd)
    assert await read_exactly(peer, 7) == b"H456789"


async def test_a_file_error_in_send_file_is_the_files_not_the_peers(
    pair: tuple[Transport, trio.SocketStream], tmp_path: Path
) -> None:
    """sendfile from something that cannot be read (a directory: EINVAL) raises OSError, which
    the requestor reports against the spool file; a closed peer raises PeerClosed."""
    t, peer = pair
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            await t.send_file(b"", fd, 0, 10)
        assert not isinstance(caught.value, PeerClosed)
        await peer.aclose()
        path = tmp_path / "f"
        path.write_bytes(b"x" * (4 << 20))
        fd2 = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(PeerClosed):
                for _ in range(8):  # the first sends may still land in our buffer
                    await t.send_file(b"", fd2, 0, 4 << 20)
        finally:
            os.close(fd2)
    finally:
        os.close(fd)


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
    await peer.send_all(b"\x07\x00\x00\x00\x01\xf4" + b"x" * 500 + b"\x07\x00\x00\x00\x01\xf4" + b"y" * 500)
    await trio.sleep(0.05)  # both PDUs are in our receive buffer
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
    await trio.sleep(0.05)
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
