"""Fixtures for DICOM tests: a directory sink, a running acceptor, DCMTK peers, corpora."""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import pydicom
import pytest
import trio

from capacitor_trio.dicom import (
    AcceptorConfig,
    OutgoingInstance,
    ReceivedInstance,
    serve_acceptor,
)
from capacitor_trio.dicom.part10 import read_meta
from tests.helpers.datasets import make_dataset, write_dataset

HAVE_DCMTK = all(shutil.which(t) for t in ("storescu", "storescp", "echoscu"))
needs_dcmtk = pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK tools not on PATH")


class DirSink:
    """In-test sink: accepts the given called AEs, renames received files into `out`."""

    def __init__(self, root: Path, ae_titles: frozenset[str] = frozenset({"CAPACITOR"})) -> None:
        self.incoming = root / "incoming"
        self.out = root / "out"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ae_titles = ae_titles
        self.received: list[ReceivedInstance] = []
        self.admission_error: Exception | None = None
        self.receive_error: Exception | None = None
        self.on_received: Callable[[ReceivedInstance], None] | None = None
        self.hold: trio.Event | None = None  # block instance_received until set

    def accepts_called_ae(self, called_ae: str) -> bool:
        return called_ae in self.ae_titles

    def new_temp_path(self) -> Path:
        return self.incoming / f"{uuid.uuid4().hex}.part"

    def check_admission(self) -> None:
        if self.admission_error is not None:
            raise self.admission_error

    async def instance_received(self, rx: ReceivedInstance) -> None:
        if self.hold is not None:
            await self.hold.wait()
        if self.receive_error is not None:
            raise self.receive_error
        rx.path.rename(self.out / f"{rx.header.sop_instance_uid}.dcm")
        self.received.append(rx)
        if self.on_received is not None:
            self.on_received(rx)

    def leftovers(self) -> list[Path]:
        return list(self.incoming.iterdir())


@pytest.fixture
def sink(tmp_path: Path) -> DirSink:
    return DirSink(tmp_path / "sink")


@attrs.frozen
class RunningAcceptor:
    port: int
    sink: DirSink
    config: AcceptorConfig


@pytest.fixture
async def acceptor(nursery: trio.Nursery, sink: DirSink) -> AsyncIterator[RunningAcceptor]:
    config = AcceptorConfig(host="127.0.0.1", port=0, artim_timeout=5, client_timeout=30)
    port = await nursery.start(serve_acceptor, config, sink)
    yield RunningAcceptor(port, sink, config)


def write_corpus(
    directory: Path,
    n: int,
    *,
    transfer_syntax: str = pydicom.uid.ExplicitVRLittleEndian,
    rows: int = 64,
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = make_dataset(rows=rows, columns=rows, transfer_syntax=transfer_syntax, seed=i)
        paths.append(write_dataset(directory / f"img{i:04d}.dcm", ds))
    return paths


def outgoing(path: Path) -> OutgoingInstance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return OutgoingInstance(
        path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)
    )


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a Part 10 file (everything after the file meta)."""
    with path.open("rb") as f:
        offset, _ = read_meta(f)
    return path.read_bytes()[offset:]


def assert_same_instance(original: Path, received: Path, *, bit_identical: bool = True) -> None:
    """Every data element equal (tag, VR, value); the dataset bytes too when `bit_identical`."""
    a = pydicom.dcmread(original)
    b = pydicom.dcmread(received)
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
    assert a.file_meta.MediaStorageSOPInstanceUID == b.file_meta.MediaStorageSOPInstanceUID
    assert [e.tag for e in a] == [e.tag for e in b]
    for ea in a:
        eb = b[ea.tag]
        assert (ea.VR, ea.value) == (eb.VR, eb.value), ea.tag
    if bit_identical:
        assert dataset_bytes(original) == dataset_bytes(received)


def dcmtk_env(nodelay: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


class StorescpInetd:
    """A listener that hands each accepted connection to a fresh `storescp --inetd`.

    DCMTK prints nothing when it starts listening; inetd mode gives the test a bound port at once
    without polling, and each association gets its own storescp process.
    """

    def __init__(self, out: Path, *, nodelay: bool = True, extra: tuple[str, ...] = ()) -> None:
        self.out = out
        self.nodelay = nodelay
        self.extra = extra
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
                    "+xa",
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


def dicom_bytes_of(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
