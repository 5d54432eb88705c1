"""Real DICOM peers and the router as a subprocess, for end-to-end tests.

Every wait here is on an event (a line the router printed, a count a destination reached), never a
sleep-and-look loop.
"""

from __future__ import annotations

import collections
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import trio
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from capacitor_trio.dicom.part10 import read_meta

ALL_SYNTAXES = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.90",
]


HAVE_DCMTK = all(shutil.which(t) for t in ("storescu", "storescp", "echoscu"))
needs_dcmtk = pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK tools not on PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a Part 10 file (what travels on the wire)."""
    with open(path, "rb") as f:
        end, _meta = read_meta(f)
        f.seek(end)
        return f.read()


class Counter:
    """A count that Trio tasks can wait on, fed from any thread. Waiters may also wait for any
    condition, re-checked every time the count changes."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._value = 0
        self._lock = threading.Lock()
        self._waiters: list[tuple[Callable[[], bool], trio.Event]] = []

    @property
    def value(self) -> int:
        return self._value

    def add_from_thread(self, n: int = 1) -> None:
        with self._lock:
            self._value += n
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._notify)

    def add(self, n: int = 1) -> None:
        with self._lock:
            self._value += n
        self._notify()

    def _notify(self) -> None:
        for predicate, event in list(self._waiters):
            if predicate():
                event.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        if predicate():
            return
        entry = (predicate, trio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        finally:
            self._waiters.remove(entry)

    async def wait_for(self, target: int) -> None:
        await self.wait_until(lambda: self._value >= target)


class PynetdicomDestination:
    """A pynetdicom Storage SCP in its own threads, keeping each dataset's raw bytes."""

    def __init__(self, ae_title: str = "PYDEST", port: int = 0, syntaxes: Sequence[str] = ALL_SYNTAXES) -> None:
        self.ae_title = ae_title
        self.port = port
        #: the transfer syntaxes it accepts (each storage class in any of them)
        self.syntaxes = list(syntaxes)
        #: SOP Instance UID -> the transfer syntax it arrived in
        self.syntax_of: dict[str, str] = {}
        self.received: dict[str, bytes] = {}
        self.count = Counter()
        self._server: Any = None
        self.refuse_status: int | None = None
        self.duplicates = 0
        #: how many times each SOP Instance UID was stored
        self.times: collections.Counter[str] = collections.Counter()

    def start(self) -> int:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 50
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, self.syntaxes)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = int(self._server.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event: Any) -> int:
        if self.refuse_status is not None:
            return self.refuse_status
        raw = event.request.DataSet.getvalue()
        uid = str(event.request.AffectedSOPInstanceUID)
        self.times[uid] += 1
        new = uid not in self.received
        if not new:
            self.duplicates += 1
        # stored before the count changes: a waiter re-checks `received` as soon as it does
        self.syntax_of[uid] = str(event.context.transfer_syntax)
        self.received[uid] = raw
        if new:
            self.count.add_from_thread()  # counts distinct instances
        return 0x0000


class RouterProcess:
    """`capacitor-trio run` as a subprocess; `start` returns once it logged that it is ready."""

    def __init__(self, data_dir: Path, *args: str, nofile: int | None = None) -> None:
        self.data_dir = data_dir
        self.args = args
        #: the router's limit of open files (RLIMIT_NOFILE), as a shell or a service manager
        #: would set it (commonly 1024); None: this process's own
        self.nofile = nofile
        self.lines: list[str] = []
        self.proc: trio.Process | None = None
        self._ready = trio.Event()
        self._exited = trio.Event()
        self._line_waiters: list[tuple[Callable[[str], bool], trio.Event]] = []

    async def wait_for_line(self, predicate: Callable[[str], bool]) -> str:
        """Wait until the router prints a line matching `predicate` (or find one printed already)."""
        for line in self.lines:
            if predicate(line):
                return line
        event = trio.Event()
        entry = (predicate, event)
        self._line_waiters.append(entry)
        try:
            await event.wait()
        finally:
            self._line_waiters.remove(entry)
        return next(line for line in reversed(self.lines) if predicate(line))

    async def start(self, nursery: trio.Nursery, timeout: float = 30) -> None:  # noqa: ASYNC109
        self._ready = trio.Event()
        self._exited = trio.Event()
        self.proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "capacitor_trio", "run", "--path", str(self.data_dir), *self.args],
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=self._limit if self.nofile is not None else None,
        )
        nursery.start_soon(self._read, self.proc)
        with trio.fail_after(timeout):
            async with trio.open_nursery() as waiter:
                waiter.start_soon(self._fail_on_exit, waiter)
                await self._ready.wait()
                waiter.cancel_scope.cancel()

    def _limit(self) -> None:
        """In the child, before exec: lower RLIMIT_NOFILE."""
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = self.nofile or 1024
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))

    async def _fail_on_exit(self, _nursery: trio.Nursery) -> None:
        await self._exited.wait()
        raise RuntimeError("router exited during start-up:\n" + "\n".join(self.lines[-20:]))

    async def _read(self, proc: trio.Process) -> None:
        assert proc.stderr is not None
        buf = b""
        with contextlib.suppress(trio.ClosedResourceError):  # closed by `aclose`
            async for chunk in proc.stderr:
                buf += chunk
                *complete, buf = buf.split(b"\n")
                for raw in complete:
                    self._line(raw.decode(errors="replace"))
        await proc.wait()
        self._exited.set()

    def _line(self, line: str) -> None:
        self.lines.append(line)
        if "router ready" in line:
            self._ready.set()
        for predicate, event in self._line_waiters:
            if predicate(line):
                event.set()

    async def aclose(self) -> None:
        """SIGKILL if still running and reap it (test clean-up)."""
        if self.proc is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
            with trio.move_on_after(5):  # the reader gets the last lines, then EOF
                await self._exited.wait()
            if self.proc.stderr is not None:
                await self.proc.stderr.aclose()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 30) -> int:  # noqa: ASYNC109
        assert self.proc is not None
        with trio.fail_after(timeout):
            await self._exited.wait()
            return await self.proc.wait()

    def log(self) -> str:
        return "\n".join(self.lines)


def dcmtk_env(nodelay: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


async def storescu(port: int, called_ae: str, files: Sequence[Path], *, calling_ae: str = "MODALITY") -> None:
    """Send files with DCMTK storescu (one association); raise if it fails."""
    result = await trio.run_process(
        ["storescu", "-aet", calling_ae, "-aec", called_ae, "-pdu", "131072", "127.0.0.1", str(port),
         *map(str, files)],
        capture_stdout=True, capture_stderr=True, check=False, env=dcmtk_env(),
    )
    if result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}): {result.stderr.decode()[-2000:]}")


def pynetdicom_send(
    port: int, called_ae: str, files: Sequence[Path], acked: list[str], timeout: float = 10.0
) -> None:
    """Send files with pynetdicom in this thread, appending each SOP Instance UID that got a success
    status to `acked`; stops quietly when the association breaks."""
    import pydicom

    ae = AE(ae_title="PYSENDER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    datasets = [pydicom.dcmread(f) for f in files]
    for ts in {str(ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        for cls in {str(ds.SOPClassUID) for ds in datasets}:
            ae.add_requested_context(cls, UID(ts))
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        return
    try:
        for ds in datasets:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(ds)
            if status and status.Status == 0x0000:
                acked.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()


def path_uid(path: Path) -> str:
    """The SOP Instance UID of a Part 10 file."""
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class StorescpInetd:
    """A listener that hands each accepted connection to a fresh `storescp --inetd`.

    DCMTK prints nothing when it starts listening; inetd mode gives the test a bound port at once
    without polling, and each association gets its own storescp process.
    """

    def __init__(
        self, out: Path, *, nodelay: bool = True, extra: tuple[str, ...] = (), accept: str = "+xa"
    ) -> None:
        self.out = out
        self.nodelay = nodelay
        self.extra = extra
        #: the transfer syntaxes storescp accepts: "+xa" all, "+xi" Implicit VR LE only, ...
        self.accept = accept
        self.port = 0
        self.results: list[trio.CompletedProcess] = []  # type: ignore[type-arg]

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        task_status.started(self.port)
        async with trio.open_nursery() as nursery:
            with listener:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._run_one, conn)

    async def _run_one(self, conn: trio.socket.SocketType) -> None:
        with conn:
            os.set_blocking(conn.fileno(), True)
            result = await trio.run_process(
                [
                    "storescp",
                    "--inetd",
                    "-od",
                    str(self.out),
                    "+B",
                    self.accept,
                    "-pdu",
                    "131072",
                    *self.extra,
                ],
                stdin=conn.fileno(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=dcmtk_env(self.nodelay),
            )
        self.results.append(result)

    def stored(self) -> dict[str, Path]:
        """SOP Instance UID -> file storescp wrote."""
        found = {}
        for p in self.out.iterdir():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            found[str(ds.SOPInstanceUID)] = p
        return found


class CountingStorescp(StorescpInetd):
    """storescp --inetd that counts the files on disk after each association (`count`)."""

    def __init__(self, out: Path, *, accept: str = "+xa") -> None:
        super().__init__(out, accept=accept)
        self.count = Counter()

    async def _run_one(self, conn: trio.socket.SocketType) -> None:
        await super()._run_one(conn)
        self.count.add(len(list(self.out.iterdir())) - self.count.value)
