"""End to end with real peers through `capacitor-trio run` (issue 22): instances reach a
destination in a syntax it accepts, whatever syntax they arrived in.

- a node with blank TransferSyntax behind DCMTK `storescp +xi` (Implicit VR Little Endian only)
  gets instances that arrived as Explicit VR LE, RLE and JPEG Lossless: all delivered (converted
  on the way out), none rejected;
- a node with TransferSyntax gets its prepared copies, also across a SIGKILL while it converts.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import trio
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, RLELossless

from tests.helpers.datasets import write_corpus
from tests.helpers.peers import (
    CountingStorescp,
    PynetdicomDestination,
    RouterProcess,
    dataset_bytes,
    free_port,
    needs_dcmtk,
    path_uid,
    pynetdicom_send,
)
from tests.helpers.router_files import write_router_files

pytestmark = [
    needs_dcmtk,
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def jpeg_lossless_corpus(directory: Path, n: int) -> list[Path]:
    """Instances in JPEG Lossless SV1, made by DCMTK's dcmcjpeg (its default: lossless SV1)."""
    plain = write_corpus(directory / "plain", n)
    out = []
    for p in plain:
        dst = directory / f"{p.stem}-jpegll.dcm"
        subprocess.run(["dcmcjpeg", str(p), str(dst)], check=True, capture_output=True)
        out.append(dst)
    return out


def pixels(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="DCMTK dcmcjpeg not on PATH")
@pytest.mark.parametrize("delivery_process", [True, False])
async def test_an_implicit_le_only_destination_gets_everything(
    tmp_path: Path, nursery: trio.Nursery, delivery_process: bool
) -> None:
    """Converted on the way out in the sender process (a worker thread there), or with
    deliveryProcess off in the router's transcode worker processes."""
    storescp = CountingStorescp(tmp_path / "storescp", accept="+xi")
    port = await nursery.start(storescp.serve)
    router = RouterProcess(tmp_path / "data")
    try:
        scp_port = free_port()
        write_router_files(
            tmp_path / "data", scp_port, f"- AeTitle: STORESCP\n  Port: {port}\n",
            extra=f"deliveryProcess: {str(delivery_process).lower()}\n",
        )
        await router.start(nursery)
        sent = (
            write_corpus(tmp_path / "explicit", 3)
            + write_corpus(tmp_path / "rle", 3, transfer_syntax=RLELossless)
            + jpeg_lossless_corpus(tmp_path / "jpeg", 3)
        )
        assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in sent} >= {RLELossless, JPEGLosslessSV1}
        acked: list[str] = []
        await trio.to_thread.run_sync(pynetdicom_send, scp_port, "STORESCP", sent, acked)
        assert len(acked) == len(sent)
        with trio.fail_after(60):
            await storescp.count.wait_for(len(sent))
        stored = storescp.stored()
        for path in sent:
            got = stored[path_uid(path)]
            assert str(pydicom.dcmread(got).file_meta.TransferSyntaxUID) == ImplicitVRLittleEndian
            assert np.array_equal(pixels(got), pixels(path))  # lossless all the way
        assert "STORESCP rejected" not in router.log()
    finally:
        await router.aclose()


async def test_a_node_with_transfer_syntax_gets_its_prepared_copies(tmp_path: Path, nursery: trio.Nursery) -> None:
    j2k, plain = PynetdicomDestination("J2KDEST"), PynetdicomDestination("PLAIN")
    j2k_port, plain_port = j2k.start(), plain.start()
    router = RouterProcess(tmp_path / "data")
    try:
        scp_port = free_port()
        write_router_files(
            tmp_path / "data", scp_port,
            f"- AeTitle: J2KDEST\n  Port: {j2k_port}\n  TransferSyntax: JPEG2000Lossless\n"
            f"- AeTitle: PLAIN\n  Port: {plain_port}\n",
        )
        await router.start(nursery)
        sent = write_corpus(tmp_path / "in", 6, rows=128)
        acked: list[str] = []
        await trio.to_thread.run_sync(pynetdicom_send, scp_port, "J2KDEST", sent, acked)
        await trio.to_thread.run_sync(pynetdicom_send, scp_port, "PLAIN", sent, acked)
        assert len(acked) == 2 * len(sent)
        with trio.fail_after(60):
            await j2k.count.wait_for(len(sent))
            await plain.count.wait_for(len(sent))
        for path in sent:
            uid = path_uid(path)
            assert j2k.syntax_of[uid] == JPEG2000Lossless
            ds = pydicom.dcmread(io.BytesIO(j2k.received[uid]), force=True)
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
            assert np.array_equal(ds.pixel_array, pixels(path))
            assert plain.received[uid] == dataset_bytes(path)  # the other node: as received
    finally:
        j2k.stop()
        plain.stop()
        await router.aclose()


ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)


@pytest.mark.orthanc
@pytest.mark.skipif(ORTHANC is None, reason="Orthanc binary not installed")
async def test_orthanc_gets_rle_from_a_node_with_transfer_syntax_rle(tmp_path: Path, nursery: trio.Nursery) -> None:
    assert ORTHANC is not None
    dicom_port, http_port = free_port(), free_port()
    (tmp_path / "orthanc.json").write_text(json.dumps({
        "Name": "capacitor-test", "StorageDirectory": str(tmp_path / "storage"),
        "IndexDirectory": str(tmp_path / "index"), "DicomAet": "ORTHANC", "DicomPort": dicom_port,
        "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "Plugins": [], "StorageCompression": False,
    }))
    orthanc = await trio.lowlevel.open_process(
        [ORTHANC, str(tmp_path / "orthanc.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    router = RouterProcess(tmp_path / "data")
    try:
        assert orthanc.stdout is not None
        seen = b""
        with trio.fail_after(30):
            while b"Orthanc has started" not in seen:
                chunk = await orthanc.stdout.receive_some(65536)
                assert chunk, seen.decode(errors="replace")
                seen = seen[-4096:] + chunk
        scp_port = free_port()
        write_router_files(
            tmp_path / "data", scp_port,
            f"- AeTitle: ORTHANC\n  Port: {dicom_port}\n  TransferSyntax: RLELossless\n",
        )
        await router.start(nursery)
        sent = write_corpus(tmp_path / "in", 4, rows=128)
        acked: list[str] = []
        await trio.to_thread.run_sync(pynetdicom_send, scp_port, "ORTHANC", sent, acked)
        assert len(acked) == len(sent)

        def all_delivered(_line: str) -> bool:
            found = (re.search(r"node ORTHANC: delivered (\d+)", line) for line in router.lines)
            return sum(int(m.group(1)) for m in found if m) >= len(sent)

        with trio.fail_after(60):
            await router.wait_for_line(all_delivered)
        stored = _orthanc_files(tmp_path / "storage")
        for path in sent:
            got = stored[path_uid(path)]
            assert str(pydicom.dcmread(got).file_meta.TransferSyntaxUID) == RLELossless
            assert np.array_equal(pixels(got), pixels(path))
    finally:
        await router.aclose()
        orthanc.terminate()
        await orthanc.wait()
        if orthanc.stdout is not None:
            await orthanc.stdout.aclose()


def _orthanc_files(storage: Path) -> dict[str, Path]:
    files = [p for p in storage.rglob("*") if p.is_file() and p.suffix == ""] if storage.exists() else []
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}


async def test_sigkill_while_converting_loses_nothing(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Killed while its prepare stage converts (the worker's files handed to the store and
    renamed into the spool), the router delivers every acknowledged instance after a restart,
    each a whole RLE copy with the sent pixels, and leaves no scratch file behind."""
    pacs = PynetdicomDestination("PACS")
    pacs_port = pacs.start()
    data = tmp_path / "data"
    router = RouterProcess(data)
    try:
        scp_port = free_port()
        write_router_files(
            data, scp_port, f"- AeTitle: PACS\n  Port: {pacs_port}\n  TransferSyntax: RLELossless\n"
        )
        sent = write_corpus(tmp_path / "in", 120, rows=192)  # 72 KB: copies are spool files
        await router.start(nursery)
        acked: list[str] = []
        async with trio.open_nursery() as inner:
            inner.start_soon(trio.to_thread.run_sync, pynetdicom_send, scp_port, "PACS", sent, acked, 3.0)
            with trio.fail_after(60):
                await pacs.count.wait_for(10)
            router.signal(signal.SIGKILL)
            await router.wait()
        assert len(acked) >= 10
        await router.start(nursery)
        with trio.move_on_after(90):
            await pacs.count.wait_until(lambda: set(acked) <= set(pacs.received))
        assert set(acked) <= set(pacs.received), router.log()
        by_uid = {path_uid(p): p for p in sent}
        for uid in acked:
            assert pacs.syntax_of[uid] == RLELossless
            ds = pydicom.dcmread(io.BytesIO(pacs.received[uid]), force=True)
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = RLELossless
            assert np.array_equal(ds.pixel_array, pixels(by_uid[uid]))
    finally:
        await router.aclose()
        pacs.stop()
    assert [p for d in data.rglob("transcode") for p in d.iterdir()] == []
