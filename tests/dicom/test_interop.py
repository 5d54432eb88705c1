"""Interop against real peers on 127.0.0.1: DCMTK, pynetdicom, Orthanc, and ourselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
import trio
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from capacitor_trio.dicom import AcceptorConfig, Peer, SendOptions, echo, send_batch, serve_acceptor
from capacitor_trio.domain.outcomes import Delivered, Rejected, RetryLater
from tests.helpers.datasets import CSA_NON_IMAGE, MADE_UP, vendor_instances

from .conftest import (
    DirSink,
    RunningAcceptor,
    StorescpInetd,
    assert_same_instance,
    collect,
    dataset_bytes,
    dcmtk_env,
    needs_dcmtk,
    outgoing,
    write_corpus,
)

SYNTAXES = {
    "explicit": (ExplicitVRLittleEndian, "-xe"),
    "implicit": (ImplicitVRLittleEndian, "-xi"),
    "rle": (RLELossless, "-xr"),
}


async def storescu(
    port: int, files: list[Path], *, aec: str = "CAPACITOR", flag: str = "-xe", nodelay: bool = True
):
    return await trio.run_process(
        [
            "storescu",
            "-aet",
            "MODALITY",
            "-aec",
            aec,
            flag,
            "-pdu",
            "131072",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=dcmtk_env(nodelay),
    )


# ------------------------------------------------------------------------- into our acceptor


@needs_dcmtk
@pytest.mark.parametrize("nodelay", [True, False], ids=["nodelay", "nagle"])
@pytest.mark.parametrize("syntax", list(SYNTAXES))
async def test_storescu_to_acceptor(
    acceptor: RunningAcceptor, tmp_path: Path, syntax: str, nodelay: bool
) -> None:
    ts, flag = SYNTAXES[syntax]
    files = write_corpus(tmp_path / "in", 5, transfer_syntax=ts)
    result = await storescu(acceptor.port, files, flag=flag, nodelay=nodelay)
    assert result.returncode == 0, result.stderr.decode()
    sink = acceptor.sink
    assert len(sink.received) == 5
    for src in files:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        got = sink.out / f"{ds.SOPInstanceUID}.dcm"
        assert_same_instance(src, got)
    rx = sink.received[0]
    assert (rx.calling_ae, rx.called_ae) == ("MODALITY", "CAPACITOR")
    assert rx.header.transfer_syntax_uid == ts
    assert rx.header.patient_name == "DOE^JANE"
    assert rx.header.modality == "CT"
    assert rx.header.accession_number == "ACC001"
    assert rx.size_bytes == (sink.out / f"{rx.header.sop_instance_uid}.dcm").stat().st_size
    assert sink.leftovers() == []


@needs_dcmtk
async def test_large_images_from_storescu(acceptor: RunningAcceptor, tmp_path: Path) -> None:
    files = write_corpus(tmp_path / "in", 3, rows=512)
    result = await storescu(acceptor.port, files)
    assert result.returncode == 0, result.stderr.decode()
    for src in files:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        assert_same_instance(src, acceptor.sink.out / f"{ds.SOPInstanceUID}.dcm")


@needs_dcmtk
async def test_a_reused_temporary_file_holds_exactly_the_new_instance(
    acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    """The store hands out files of delivered instances again (durable writes): the acceptor
    writes over what such a file held and cuts it to the new instance, bigger or smaller."""
    sink = acceptor.sink
    old = b"OLD PATIENT " * 100_000  # 1.2 MB: longer than any instance below

    def reused_file() -> Path:
        path = sink.incoming / f"retired-{len(sink.received)}.part"
        path.write_bytes(old)
        return path

    sink.new_temp_path = reused_file  # type: ignore[method-assign]
    files = write_corpus(tmp_path / "in", 2, rows=512) + write_corpus(tmp_path / "small", 2, rows=128)
    result = await storescu(acceptor.port, files)
    assert result.returncode == 0, result.stderr.decode()
    for src in files:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        got = sink.out / f"{ds.SOPInstanceUID}.dcm"
        assert_same_instance(src, got)
        assert b"OLD PATIENT" not in got.read_bytes()
    assert sink.leftovers() == []


@needs_dcmtk
@pytest.mark.parametrize("nodelay", [True, False], ids=["nodelay", "nagle"])
async def test_echoscu_to_acceptor(acceptor: RunningAcceptor, nodelay: bool) -> None:
    result = await trio.run_process(
        ["echoscu", "-aec", "CAPACITOR", "127.0.0.1", str(acceptor.port)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=dcmtk_env(nodelay),
    )
    assert result.returncode == 0, result.stderr.decode()


@needs_dcmtk
async def test_unknown_called_ae_is_rejected(
    acceptor: RunningAcceptor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = write_corpus(tmp_path / "in", 1)
    result = await storescu(acceptor.port, files, aec="NOBODY")
    assert result.returncode != 0
    assert b"Called AE Title Not Recognized" in result.stderr + result.stdout
    assert acceptor.sink.received == []
    assert "called AE 'NOBODY' not recognized" in caplog.text


@needs_dcmtk
async def test_concurrent_storescu_associations(acceptor: RunningAcceptor, tmp_path: Path) -> None:
    batches = [write_corpus(tmp_path / f"in{i}", 8) for i in range(4)]
    results = []

    async def run(files: list[Path]) -> None:
        results.append(await storescu(acceptor.port, files))

    async with trio.open_nursery() as nursery:
        for files in batches:
            nursery.start_soon(run, files)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len(acceptor.sink.received) == 32
    assert acceptor.sink.leftovers() == []


async def test_pynetdicom_send_c_store_to_acceptor(
    acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    from pynetdicom import AE

    files = write_corpus(tmp_path / "in", 3) + write_corpus(
        tmp_path / "impl", 2, transfer_syntax=ImplicitVRLittleEndian
    )

    def send() -> list[int]:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context("1.2.840.10008.1.1")
        for f in files:
            ds = pydicom.dcmread(f)
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", acceptor.port, ae_title="CAPACITOR")
        assert assoc.is_established
        statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
        echo_status = assoc.send_c_echo().Status
        assoc.release()
        return [*statuses, echo_status]

    statuses = await trio.to_thread.run_sync(send)
    assert statuses == [0] * 6
    for src in files:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        assert_same_instance(
            src, acceptor.sink.out / f"{ds.SOPInstanceUID}.dcm", bit_identical=False
        )


async def test_pynetdicom_sends_encapsulated_instances_that_arrive_byte_identical(
    acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    """RLE Lossless (encapsulated pixel data) from pynetdicom's send_c_store, given the file
    (its data set bytes sent as they are) and given the data set (pynetdicom encodes it): the
    acceptor stores exactly those bytes, one instance small enough to be received in memory,
    one in a temporary file."""
    from pynetdicom import AE

    files = write_corpus(tmp_path / "small", 1, transfer_syntax=RLELossless) + write_corpus(
        tmp_path / "big", 1, rows=256, transfer_syntax=RLELossless
    )
    sizes = [f.stat().st_size for f in files]
    assert sizes[0] < acceptor.config.memory_max_bytes < sizes[1]

    def send() -> list[int]:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(pydicom.dcmread(files[0]).SOPClassUID, RLELossless)
        assoc = ae.associate("127.0.0.1", acceptor.port, ae_title="CAPACITOR")
        assert assoc.is_established
        by_path = [assoc.send_c_store(f).Status for f in files]
        by_dataset = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
        assoc.release()
        return by_path + by_dataset

    assert await trio.to_thread.run_sync(send) == [0] * 4
    received = acceptor.sink.received
    assert len(received) == 4
    assert [rx.data is not None for rx in received] == [True, False] * 2
    assert {rx.header.transfer_syntax_uid for rx in received} == {RLELossless}
    for src in files:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        assert_same_instance(src, acceptor.sink.out / f"{ds.SOPInstanceUID}.dcm")


# ------------------------------------------------------------------------- from our requestor


@needs_dcmtk
@pytest.mark.parametrize("nodelay", [True, False], ids=["nodelay", "nagle"])
@pytest.mark.parametrize("syntax", list(SYNTAXES))
async def test_requestor_to_storescp(
    nursery: trio.Nursery, tmp_path: Path, syntax: str, nodelay: bool
) -> None:
    ts, _ = SYNTAXES[syntax]
    files = write_corpus(tmp_path / "in", 4, transfer_syntax=ts) + write_corpus(
        tmp_path / "big", 1, rows=512, transfer_syntax=ts
    )
    scp = StorescpInetd(tmp_path / "scp", nodelay=nodelay)
    port = await nursery.start(scp.serve)
    outcomes, on_outcome = collect()
    await send_batch(
        Peer("STORESCP", "127.0.0.1", port),
        [outgoing(f) for f in files],
        SendOptions("CAPACITOR", max_pdu_size=65536),
        on_outcome,
    )
    assert outcomes == {i: Delivered() for i in range(5)}
    stored = scp.stored()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert_same_instance(f, stored[str(ds.SOPInstanceUID)])


async def test_requestor_to_pynetdicom_scp(tmp_path: Path) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: dict[str, bytes] = {}

    def handle_store(event: evt.Event) -> int:
        received[event.request.AffectedSOPInstanceUID] = event.encoded_dataset(include_meta=True)
        return 0

    ae = AE(ae_title="PYSCP")
    ae.add_supported_context("1.2.840.10008.1.1")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(
            cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless]
        )
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)]
    )
    try:
        port = server.server_address[1]
        files = (
            write_corpus(tmp_path / "e", 3)
            + write_corpus(tmp_path / "i", 2, transfer_syntax=ImplicitVRLittleEndian)
            + write_corpus(tmp_path / "r", 2, transfer_syntax=RLELossless)
            + write_corpus(tmp_path / "big", 1, rows=512)
        )
        outcomes, on_outcome = collect()
        await send_batch(
            Peer("PYSCP", "127.0.0.1", port),
            [outgoing(f) for f in files],
            SendOptions("CAPACITOR"),
            on_outcome,
        )
        assert outcomes == {i: Delivered() for i in range(len(files))}
        result = await echo(Peer("PYSCP", "127.0.0.1", port), "CAPACITOR")
        assert result.success and result.latency_ms is not None
    finally:
        await trio.to_thread.run_sync(server.shutdown)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out = tmp_path / "out" / f"{ds.SOPInstanceUID}.dcm"
        out.parent.mkdir(exist_ok=True)
        out.write_bytes(received[str(ds.SOPInstanceUID)])
        assert_same_instance(f, out)


async def test_requestor_fragments_to_a_pynetdicom_peers_small_maximum_pdu(tmp_path: Path) -> None:
    """pynetdicom advertising a maximum PDU length of 4096: every P-DATA-TF it reads from us
    (each PDU whole, as its EVT_DATA_RECV hands them over) has a length field of at most 4096,
    the data fragments exactly that, and the 50 KB instance arrives byte-identical."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    pdus: list[tuple[int, int, int]] = []  # (PDU type, length field, bytes after the header)
    received: dict[str, bytes] = {}

    def on_data(event: evt.Event) -> None:
        data = event.data
        pdus.append((data[0], int.from_bytes(data[2:6], "big"), len(data) - 6))

    def handle_store(event: evt.Event) -> int:
        received[event.request.AffectedSOPInstanceUID] = event.encoded_dataset(include_meta=True)
        return 0

    ae = AE(ae_title="PYSCP")
    ae.maximum_pdu_size = 4096
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ExplicitVRLittleEndian)
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_DATA_RECV, on_data), (evt.EVT_C_STORE, handle_store)],
    )
    try:
        [f] = write_corpus(tmp_path / "in", 1, rows=160)  # 51,200 bytes of pixel data
        outcomes, on_outcome = collect()
        await send_batch(
            Peer("PYSCP", "127.0.0.1", server.server_address[1]),
            [outgoing(f)],
            SendOptions("CAPACITOR"),  # our own maximum: 1 MiB
            on_outcome,
        )
    finally:
        await trio.to_thread.run_sync(server.shutdown)
    assert outcomes == {0: Delivered()}
    assert all(length == rest for _, length, rest in pdus)
    p_data = [length for kind, length, _ in pdus if kind == 0x04]
    assert len(p_data) >= 14 and max(p_data) <= 4096
    assert p_data[1:-1] == [4096] * (len(p_data) - 2)  # the command, full fragments, the rest
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    out = tmp_path / "out.dcm"
    out.write_bytes(received[str(ds.SOPInstanceUID)])
    assert_same_instance(f, out)


async def test_requestor_to_our_acceptor_and_echo(
    acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    files = (
        write_corpus(tmp_path / "e", 3)
        + write_corpus(tmp_path / "r", 1, transfer_syntax=RLELossless)
        + write_corpus(tmp_path / "b", 2, rows=512)
    )
    outcomes, on_outcome = collect()
    peer = Peer("CAPACITOR", "127.0.0.1", acceptor.port)
    await send_batch(
        peer,
        [outgoing(f) for f in files],
        SendOptions("ROUTER", priority=1, max_pdu_size=16384),
        on_outcome,
    )
    assert outcomes == {i: Delivered() for i in range(len(files))}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert_same_instance(f, acceptor.sink.out / f"{ds.SOPInstanceUID}.dcm")
    result = await echo(peer, "ROUTER")
    assert result.success, result.error
    bad = await echo(Peer("NOBODY", "127.0.0.1", acceptor.port), "ROUTER")
    assert not bad.success and "permanent" in (bad.error or "")


async def test_requestor_statuses_from_our_acceptor(
    acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    from capacitor_trio.dicom import CannotProcess, OutOfResources

    files = write_corpus(tmp_path / "e", 1)
    peer = Peer("CAPACITOR", "127.0.0.1", acceptor.port)
    acceptor.sink.admission_error = OutOfResources("disk below minFreeSpace")
    outcomes, on_outcome = collect()
    await send_batch(peer, [outgoing(f) for f in files], SendOptions("ROUTER"), on_outcome)
    assert isinstance(outcomes[0], RetryLater) and "0xA700" in outcomes[0].reason
    acceptor.sink.admission_error = None
    acceptor.sink.receive_error = CannotProcess("nope")
    outcomes, on_outcome = collect()
    await send_batch(peer, [outgoing(f) for f in files], SendOptions("ROUTER"), on_outcome)
    assert isinstance(outcomes[0], Rejected) and "0xC001" in outcomes[0].reason
    assert acceptor.sink.leftovers() == []
    outcomes, on_outcome = collect()
    await send_batch(
        Peer("NOBODY", "127.0.0.1", acceptor.port),
        [outgoing(f) for f in files],
        SendOptions("ROUTER"),
        on_outcome,
    )
    assert isinstance(outcomes[0], Rejected) and "permanent" in outcomes[0].reason


async def test_connection_refused_is_retry_later(tmp_path: Path) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens there now
    files = write_corpus(tmp_path / "e", 2)
    outcomes, on_outcome = collect()
    await send_batch(
        Peer("X", "127.0.0.1", port),
        [outgoing(f) for f in files],
        SendOptions("ROUTER"),
        on_outcome,
    )
    assert all(isinstance(o, RetryLater) for o in outcomes.values()) and len(outcomes) == 2
    result = await echo(Peer("X", "127.0.0.1", port), "ROUTER")
    assert not result.success and result.latency_ms is None


# ------------------------------------------------------------------------- vendor SOP classes

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"


class UnrestrictedStorageScp:
    """A pynetdicom storage SCP that takes any SOP class (UNRESTRICTED_STORAGE_SERVICE, which
    the test sets), keeping each data set's bytes as received."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt

        self.received: dict[str, bytes] = {}
        ae = AE(ae_title="PYSCP")
        for uid in (CSA_NON_IMAGE, MADE_UP):
            ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: object) -> int:
        request = event.request  # type: ignore[attr-defined]
        self.received[str(request.AffectedSOPInstanceUID)] = request.DataSet.getvalue()
        return 0


async def deliver_and_compare(
    nursery: trio.Nursery, tmp_path: Path, sources: list[Path], stored: Path
) -> None:
    """Send what the acceptor stored (in `stored`) to a pynetdicom SCP and to another acceptor
    of ours: each is delivered, its data set byte-identical to the original in `sources`."""
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sources]
    outgoing_instances = [outgoing(stored / f"{uid}.dcm") for uid in uids]
    scp = UnrestrictedStorageScp()
    try:
        outcomes, on_outcome = collect()
        await send_batch(
            Peer("PYSCP", "127.0.0.1", scp.port), outgoing_instances, SendOptions("ROUTER"), on_outcome
        )
    finally:
        await trio.to_thread.run_sync(scp.server.shutdown)
    assert outcomes == {i: Delivered() for i in range(len(sources))}
    assert [scp.received[uid] for uid in uids] == [dataset_bytes(f) for f in sources]

    sink = DirSink(tmp_path / "second")
    config = AcceptorConfig(host="127.0.0.1", port=0, artim_timeout=5, client_timeout=30)
    port = await nursery.start(serve_acceptor, config, sink)
    outcomes, on_outcome = collect()
    await send_batch(
        Peer("CAPACITOR", "127.0.0.1", port), outgoing_instances, SendOptions("ROUTER"), on_outcome
    )
    assert outcomes == {i: Delivered() for i in range(len(sources))}
    for f, uid in zip(sources, uids, strict=True):
        assert_same_instance(f, sink.out / f"{uid}.dcm")


async def test_vendor_classes_from_pynetdicom_are_stored_and_delivered_byte_identical(
    acceptor: RunningAcceptor,
    tmp_path: Path,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A private (Siemens CSA Non-Image) and a made-up SOP class, sent by pynetdicom, are
    accepted at negotiation and stored as received; a Q/R FIND context on the same association
    is still refused. Delivery proposes their contexts and sends them byte-identical."""
    from pynetdicom import AE, _config

    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", True)
    files = vendor_instances(tmp_path / "in")

    def send() -> tuple[set[str], set[str], list[int]]:
        ae = AE(ae_title="MRI")
        for uid in (CSA_NON_IMAGE, MADE_UP, PATIENT_ROOT_FIND):
            ae.add_requested_context(uid, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", acceptor.port, ae_title="CAPACITOR")
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        refused = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        statuses = [assoc.send_c_store(f).Status for f in files]
        assoc.release()
        return accepted, refused, statuses

    accepted, refused, statuses = await trio.to_thread.run_sync(send)
    assert (accepted, refused, statuses) == ({CSA_NON_IMAGE, MADE_UP}, {PATIENT_ROOT_FIND}, [0, 0])
    assert [rx.data is None for rx in acceptor.sink.received] == [True, False]
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert_same_instance(f, acceptor.sink.out / f"{ds.SOPInstanceUID}.dcm")
    await deliver_and_compare(nursery, tmp_path, files, acceptor.sink.out)


@needs_dcmtk
async def test_vendor_classes_from_storescu_are_stored(
    acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    """storescu proposing the private classes from an association profile (as a modality is
    configured to): both accepted, stored byte-identical."""
    files = vendor_instances(tmp_path / "in")
    profile = tmp_path / "private.cfg"
    profile.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "[[PresentationContexts]]\n[Private]\n"
        f"PresentationContext1 = {CSA_NON_IMAGE}\\Uncompressed\n"
        f"PresentationContext2 = {MADE_UP}\\Uncompressed\n"
        "[[Profiles]]\n[Private]\nPresentationContexts = Private\n"
    )
    result = await trio.run_process(
        ["storescu", "-aet", "MRI", "-aec", "CAPACITOR", "-xf", str(profile), "Private",
         "127.0.0.1", str(acceptor.port), *map(str, files)],
        capture_stdout=True, capture_stderr=True, check=False, env=dcmtk_env(),
    )
    assert result.returncode == 0, result.stderr.decode()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert_same_instance(f, acceptor.sink.out / f"{ds.SOPInstanceUID}.dcm")


# ------------------------------------------------------------------------- Orthanc


ORTHANC = shutil.which("Orthanc") or (
    "/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.orthanc
@pytest.mark.skipif(ORTHANC is None, reason="Orthanc binary not installed")
async def test_requestor_to_orthanc(tmp_path: Path) -> None:
    dicom_port, http_port = _free_port(), _free_port()
    config = {
        "Name": "capacitor-test",
        "StorageDirectory": str(tmp_path / "storage"),
        "IndexDirectory": str(tmp_path / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "StorageCompression": False,
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    env = dict(os.environ, TCP_NODELAY="1")
    files = (
        write_corpus(tmp_path / "e", 2)
        + write_corpus(tmp_path / "i", 1, transfer_syntax=ImplicitVRLittleEndian)
        + write_corpus(tmp_path / "r", 1, transfer_syntax=RLELossless)
    )
    proc = await trio.lowlevel.open_process(
        [ORTHANC, str(tmp_path / "orthanc.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        seen = b""
        with trio.fail_after(30):
            while b"Orthanc has started" not in seen:
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, seen.decode(errors="replace")
                seen = seen[-4096:] + chunk
        outcomes, on_outcome = collect()
        await send_batch(
            Peer("ORTHANC", "127.0.0.1", dicom_port),
            [outgoing(f) for f in files],
            SendOptions("CAPACITOR"),
            on_outcome,
        )
        assert outcomes == {i: Delivered() for i in range(len(files))}
        result = await echo(Peer("ORTHANC", "127.0.0.1", dicom_port), "CAPACITOR")
        assert result.success, result.error
    finally:
        proc.terminate()
        await proc.wait()
        await proc.stdout.aclose()
    stored = [p for p in (tmp_path / "storage").rglob("*") if p.is_file() and p.suffix == ""]
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in stored}
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert_same_instance(f, by_uid[uid])


def test_sink_is_a_protocol_instance(tmp_path: Path) -> None:
    from capacitor_trio.dicom import InstanceSink

    sink: InstanceSink = DirSink(tmp_path)
    assert sink.accepts_called_ae("CAPACITOR")
