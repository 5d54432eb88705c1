"""Fixtures for DICOM tests: a directory sink, a running acceptor, DCMTK peers, corpora."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

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
from tests.helpers.datasets import make_dataset, write_corpus, write_dataset  # noqa: F401 (re-exported)
from tests.helpers.peers import (  # noqa: F401 (re-exported for the dicom tests)
    HAVE_DCMTK,
    StorescpInetd,
    dataset_bytes,
    dcmtk_env,
    needs_dcmtk,
)


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
        self.syncs: list[tuple[Path, int, int]] = []

    def accepts_called_ae(self, called_ae: str) -> bool:
        return called_ae in self.ae_titles

    def called_ae_hint(self, called_ae: str) -> str | None:
        return None

    def new_temp_path(self) -> Path:
        return self.incoming / f"{uuid.uuid4().hex}.part"

    def start_sync(self, path: Path, size: int) -> object:
        """Records the call (path, size, the file's size then) and returns a token."""
        self.syncs.append((path, size, path.stat().st_size))
        return ("sync", len(self.syncs))

    def check_admission(self) -> None:
        if self.admission_error is not None:
            raise self.admission_error

    async def instance_received(self, rx: ReceivedInstance) -> None:
        if self.hold is not None:
            await self.hold.wait()
        if self.receive_error is not None:
            raise self.receive_error
        rx.save_as(self.out / f"{rx.header.sop_instance_uid}.dcm")
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


def outgoing(path: Path) -> OutgoingInstance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return OutgoingInstance(
        path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)
    )


def collect() -> tuple[dict[int, Any], Callable[[int, Any], None]]:
    """(outcomes by index, the `on_outcome` callback that fills it; each index at most once)."""
    got: dict[int, Any] = {}

    def on_outcome(i: int, o: Any) -> None:
        assert i not in got
        got[i] = o

    return got, on_outcome


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


def dicom_bytes_of(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
