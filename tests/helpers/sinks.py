"""Destinations built on our own acceptor, for end-to-end and soak tests.

`CountingSink` stores nothing and counts every SOP Instance UID it receives: a fast, honest
destination, which also checks each instance's pixels against the digest the soak traffic
carries. `FakePeer` is a misbehaving destination: a listener whose every connection is served by
`handle_association` through a `Script` that may refuse the association, answer chosen failure
statuses, abort or go silent mid-dataset, read slowly, or close the socket after some images.
"""

from __future__ import annotations

import collections
import contextlib
import io
import socket
from collections.abc import Callable
from pathlib import Path

import attrs
import pydicom
import trio

from capacitor_trio.dicom import pdu as P
from capacitor_trio.dicom.acceptor import (
    AcceptorConfig,
    CannotProcess,
    OutOfResources,
    ReceivedInstance,
    handle_association,
)
from tests.helpers.peers import Counter


class CountingSink:
    """An acceptor sink that records every SOP Instance UID it stores (and deletes the bytes)."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        root.mkdir(parents=True, exist_ok=True)
        self.received: collections.Counter[str] = collections.Counter()
        self.count = Counter()
        self._n = 0
        #: instances whose pixels do not match the digest they carry (see `intact`)
        self.corrupt: list[str] = []

    def accepts_called_ae(self, called_ae: str) -> bool:
        return True

    def called_ae_hint(self, called_ae: str) -> str | None:
        return None

    def new_temp_path(self) -> Path:
        self._n += 1
        return self.dir / f"{self._n}.part"

    def check_admission(self) -> None:
        pass

    def start_sync(self, path: Path, size: int) -> None:
        return None

    async def instance_received(self, rx: ReceivedInstance) -> None:
        if rx.path is not None:
            raw = rx.path.read_bytes()
            rx.path.unlink()
        else:
            assert rx.data is not None
            raw = rx.data
        if not intact(raw):
            self.corrupt.append(rx.header.sop_instance_uid)
        self.received[rx.header.sop_instance_uid] += 1
        self.count.add()

    def duplicates(self) -> int:
        return sum(n - 1 for n in self.received.values())


def intact(part10: bytes) -> bool:
    """False when the data set carries a pixel digest (tests.helpers.soak.pixel_digest) that its
    pixels do not match, or cannot be read at all."""
    from tests.helpers.soak import pixel_digest

    try:
        ds = pydicom.dcmread(io.BytesIO(part10))
        comment = str(ds.get("ImageComments", ""))
        return not comment.startswith("sha1:") or comment == pixel_digest(ds.PixelData)
    except Exception:
        return False


@attrs.define
class Script:
    """What a FakePeer does. Connections are numbered from 1; `None` = behave."""

    # association: "transient" (A-ASSOCIATE-RJ busy) or "permanent" (called AE not recognised)
    refuse: Callable[[int], str | None] = lambda _conn: None
    # C-STORE status for the n-th instance received overall (1-based) and its SOP class
    status: Callable[[int, str], int] = lambda _n, _cls: 0x0000
    # after this many bytes received on a connection: "abort" (A-ABORT) or "silent"
    after_bytes: Callable[[int], tuple[int, str] | None] = lambda _conn: None
    # read at most this many bytes per second on this connection
    trickle: Callable[[int], int | None] = lambda _conn: None
    # close the socket (no release, no abort) after this many C-STORE responses
    close_after: Callable[[int], int | None] = lambda _conn: None


class _ScriptedSink(CountingSink):
    def __init__(self, root: Path, peer: FakePeer, refuse_ae: bool) -> None:
        super().__init__(root)
        self.peer = peer
        self.refuse_ae = refuse_ae

    def accepts_called_ae(self, called_ae: str) -> bool:
        return not self.refuse_ae

    def called_ae_hint(self, called_ae: str) -> str | None:
        return None

    async def instance_received(self, rx: ReceivedInstance) -> None:
        self.peer.instances += 1
        status = self.peer.script.status(self.peer.instances, rx.header.sop_class_uid)
        self.peer.statuses[status] += 1
        if status == 0xA700:
            raise OutOfResources("scripted out of resources")  # the acceptor removes the file
        if status != 0x0000:
            raise CannotProcess(f"scripted failure 0x{status:04X}")
        sink = self.peer.sink
        await sink.instance_received(rx)


class _ScriptedStream(trio.abc.HalfCloseableStream):
    """A socket stream that misbehaves as the script says for this connection."""

    def __init__(self, inner: trio.SocketStream, peer: FakePeer, conn: int) -> None:
        self.inner = inner
        self.peer = peer
        self.conn = conn
        self.received = 0
        self.responses = 0
        self.closed = False
        self.fault = peer.script.after_bytes(conn)
        self.rate = peer.script.trickle(conn)
        self.close_after = peer.script.close_after(conn)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.closed:
            return b""
        if self.fault is not None and self.received >= self.fault[0]:
            kind = self.fault[1]
            self.peer.faults[kind] += 1
            if kind == "silent":
                await trio.sleep_forever()
            self.closed = True
            if kind == "abort":
                await self.inner.send_all(P.abort_bytes(P.ABORT_SOURCE_USER, 0))
            await self.inner.aclose()
            return b""
        if self.rate is not None:
            # a slow reader: a little at a time, so the sender's buffers fill up
            chunk = max(1, self.rate // 10)
            max_bytes = chunk if max_bytes is None else min(max_bytes, chunk)
            await trio.sleep(chunk / self.rate)
        elif self.fault is not None:
            left = self.fault[0] - self.received
            max_bytes = left if max_bytes is None else min(max_bytes, left)
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise trio.BrokenResourceError("closed by script")
        await self.inner.send_all(data)
        if bytes(data[:1]) == bytes([P.P_DATA_TF]):
            self.responses += 1
            if self.close_after is not None and self.responses >= self.close_after:
                self.closed = True
                self.peer.faults["close"] += 1
                await self.inner.aclose()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if not self.closed:
            await self.inner.send_eof()

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


class FakePeer:
    """A scripted destination on 127.0.0.1. Counts connections (with their times), statuses and
    faults; instances it accepts land in `sink` (a CountingSink)."""

    def __init__(self, root: Path, ae_title: str, script: Script, *, rcvbuf: int = 0) -> None:
        self.ae_title = ae_title
        self.script = script
        self.rcvbuf = rcvbuf
        self.sink = CountingSink(root / "ok")
        self._ok = _ScriptedSink(root / "in", self, refuse_ae=False)
        self._refusing = _ScriptedSink(root / "in-refused", self, refuse_ae=True)
        self.connections: list[float] = []
        self.instances = 0
        self.statuses: collections.Counter[int] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.config = AcceptorConfig(
            ae_title=ae_title, host="127.0.0.1", port=0, artim_timeout=10, client_timeout=60
        )
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        await sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        listener = trio.SocketListener(sock)
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections.append(trio.current_time())
        conn = len(self.connections)
        refuse = self.script.refuse(conn)
        wrapped = _ScriptedStream(stream, self, conn)
        sink = self._refusing if refuse == "permanent" else self._ok
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handle_association(wrapped, self.config, sink, busy=refuse == "transient")
