"""A flood of slow connections to the API (issue 19 #6), with real sockets.

The flooding clients run in a child process, so that their descriptors are not the router's; the
router's soft open-file limit is lowered for the test, so that an uncapped API would run out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
from collections.abc import Iterator

import pytest
import trio
from pydicom.uid import generate_uid
from pynetdicom import AE

from capacitor_trio import serving
from capacitor_trio.api import server

from .conftest import StartRouter, StorageScp, free_port, pacs
from .test_endpoints import data

#: connects `n` times to 127.0.0.1:`port`, says how many, and holds them until stdin closes
_FLOOD = """
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
port, n = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
    except OSError:
        break
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def fd_limit(extra: int) -> Iterator[None]:
    """The soft open-file limit of this process: what is open now plus `extra`, for the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def flood(nursery: trio.Nursery, port: int, n: int) -> tuple[trio.Process, int]:
    """A child holding up to `n` connections to `port`; (the process, how many connected)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _FLOOD, str(port), str(n)], stdin=-1, stdout=-1
    )
    assert proc.stdout is not None
    line = b""
    with trio.fail_after(30):
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(100)
            assert chunk, "the flooding child died"
            line += chunk
    return proc, int(line)


async def end(proc: trio.Process) -> None:
    assert proc.stdin is not None
    await proc.stdin.aclose()
    with trio.fail_after(10):
        await proc.wait()


def c_store(port: int) -> int:
    """One C-STORE of a small CT image to the router (a pynetdicom SCU); its status."""
    from tests.helpers.datasets import make_dataset

    ds = make_dataset(rows=8, columns=8)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
    assert assoc.is_established, "the router refused or did not answer the association"
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


async def test_a_flood_of_api_connections_leaves_dicom_intake_working(
    start_router: StartRouter, scp: StorageScp, nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(server, "MAX_CONNECTIONS", 4, raising=False)
    r = await start_router((pacs(scp),), scp_port=free_port())
    dicom_port = r.router.dicom_port
    before = open_fds()
    with fd_limit(40):
        proc, connected = await flood(nursery, r.router.api_port, 100)
        assert connected == 100  # the rest wait in the listen backlog
        for _ in range(3):  # DICOM intake goes on: a listener, a spool file, the index
            assert await trio.to_thread.run_sync(c_store, dicom_port) == 0x0000
        # what the API holds is the cap, not the flood
        assert open_fds() - before <= server.MAX_CONNECTIONS + 8  # (uncapped: 40 more)
        await end(proc)
    assert not [rec for rec in caplog.records if "EMFILE" in rec.getMessage()]
    assert data(await r.client.get("/api/nodes"))[0]["aeTitle"] == "PACS"  # the API serves again


class CountingListener(trio.abc.Listener[trio.SocketStream]):
    """A socket listener whose `expect(n)` event is set once accept has been called `n` more
    times."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.inner = trio.SocketListener(sock)
        self.calls = 0
        self.wanted = 0
        self.tried = trio.Event()

    def expect(self, n: int) -> trio.Event:
        self.wanted, self.tried = self.calls + n, trio.Event()
        return self.tried

    async def accept(self) -> trio.SocketStream:
        self.calls += 1
        if self.calls >= self.wanted:
            self.tried.set()
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


class Seen(logging.Handler):
    """Sets an event when a record containing `text` is logged (from the Trio thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.events: dict[str, trio.Event] = {}

    def wait_for(self, text: str) -> trio.Event:
        return self.events.setdefault(text, trio.Event())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        for text, event in self.events.items():
            if text in record.getMessage():
                event.set()


async def test_running_out_of_descriptors_is_one_log_line_per_burst(nursery: trio.Nursery) -> None:
    """Uncapped, the accept loop meets EMFILE: one ERROR line for the whole burst (no traceback),
    however many attempts fail, and one line when a connection is accepted again."""
    logger = logging.getLogger("capacitor_trio.test_flood")
    seen = Seen()
    logger.addHandler(seen)
    trio_seen = Seen()
    logging.getLogger("trio.serve_listeners").addHandler(trio_seen)
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    listener = CountingListener(sock)
    release = trio.Event()

    async def hold(stream: trio.SocketStream) -> None:
        await release.wait()

    try:
        with fd_limit(10):
            await nursery.start(
                lambda task_status: serving.serve_listeners(
                    hold, [listener], name="TEST", logger=logger, task_status=task_status
                )
            )
            failing = seen.wait_for("cannot accept connections")
            proc, _ = await flood(nursery, port, 40)
            with trio.fail_after(10):
                await failing.wait()
                await listener.expect(5).wait()  # five more attempts, all failing
        recovered = seen.wait_for("accepting connections again")
        release.set()  # the held connections end: descriptors come back
        with trio.fail_after(10):
            await recovered.wait()
        await end(proc)
    finally:
        logger.removeHandler(seen)
        logging.getLogger("trio.serve_listeners").removeHandler(trio_seen)
    errors = [rec for rec in seen.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "EMFILE" in errors[0].getMessage()
    (again,) = [rec for rec in seen.records if "again" in rec.getMessage()]
    assert int(again.getMessage().split("after ")[1].split()[0]) >= 5
    assert not trio_seen.records


def test_the_daemon_raises_its_open_file_limit() -> None:
    from capacitor_trio.runtime import FD_LIMIT_WANTED, raise_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        wanted = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else hard
        assert raise_fd_limit() == wanted == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
