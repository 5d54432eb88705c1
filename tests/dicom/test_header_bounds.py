"""Issue 19 #1 and #3: the header of any data set is read in bounded memory and time.

`read_header` walks a whole data set (inflating a deflated one as it goes) up to its header and
no further, within `HeaderLimits`. It must read what pydicom reads, and a deflate bomb or
millions of items before the header must cost a bounded walk and end in HeaderLimitExceeded.
The acceptor answers such a C-STORE with 0xC212, stores nothing and leaves no file behind.
"""

from __future__ import annotations

import struct
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from capacitor_trio.dicom import AcceptorConfig, dimse
from capacitor_trio.dicom import pdu as P
from capacitor_trio.dicom import status as S
from capacitor_trio.dicom import walk as walk_module
from capacitor_trio.dicom.part10 import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    HeaderError,
    HeaderLimitExceeded,
    HeaderLimits,
    file_meta_bytes,
    parse_header_pydicom,
)
from capacitor_trio.dicom.walk import read_header

from .conftest import DirSink, RunningAcceptor
from .test_header_walker import datasets
from .test_protocol import Harness

CT = "1.2.840.10008.5.1.4.1.1.2"
UID = "1.2.826.0.1.3680043.2.1143.77"
MiB = 1 << 20


def _el(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element."""
    if vr in (b"OB", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" if len(raw) & 1 else raw


HEADER = _el(0x00080016, b"UI", _uid(CT)) + _el(0x00080018, b"UI", _uid(UID))
TAIL = (
    _el(0x00100010, b"PN", b"DOE^JANE")
    + _el(0x0020000D, b"UI", _uid(UID + ".1"))
    + _el(0x0020000E, b"UI", _uid(UID + ".2"))
    + _el(0x00200013, b"IS", b"1 ")
)


def deflate_bomb(inflated: int) -> bytes:
    """A deflated data set whose first element, before (0008,0016), is `inflated` bytes of
    zeros: about inflated/1000 bytes (each MiB of zeros compresses to the same ~1 KiB block
    after a full flush, so the bomb is built without compressing it all)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [c.compress(struct.pack("<HH2s2xI", 0x0008, 0x0015, b"UN", inflated))]
    out.append(c.flush(zlib.Z_FULL_FLUSH))
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    out += [block] * (inflated // MiB)
    out.append(c.compress(bytes(inflated % MiB) + HEADER + TAIL) + c.flush())
    return b"".join(out)


def deflated(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def many_items(count: int) -> Iterator[bytes]:
    """An explicit VR little endian data set with `count` items (32 bytes each, a Referenced SOP
    Instance UID in each) in an undefined-length sequence (0008,1140) between the SOP UIDs and
    the rest of the header, in pieces."""
    yield HEADER + struct.pack("<HH2s2xI", 0x0008, 0x1140, b"SQ", 0xFFFFFFFF)
    content = _el(0x00081155, b"UI", b"1.2.840.1234567\0")
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content
    batch = 1 << 15
    for done in range(0, count, batch):
        yield item * min(batch, count - done)
    yield struct.pack("<HHI", 0xFFFE, 0xE0DD, 0) + TAIL


def _peak(fn: object, *args: object) -> tuple[object, int]:
    """(what fn returned or raised, the peak of memory allocated meanwhile)."""
    tracemalloc.start()
    try:
        try:
            result: object = fn(*args)  # type: ignore[operator]
        except HeaderError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- read_header reads what pydicom reads ----------------------------------------------------------


def _outcome(fn: object, *args: object, **kw: object) -> object:
    try:
        return fn(*args, **kw)  # type: ignore[operator]
    except HeaderError:
        return HeaderError


@settings(max_examples=150, deadline=None)
@given(datasets())
def test_read_header_reads_what_pydicom_reads(sample: tuple[bytes, str]) -> None:
    data, ts = sample
    assert _outcome(read_header, data, ts) == _outcome(parse_header_pydicom, data, ts, complete=True)


@settings(max_examples=60, deadline=None)
@given(datasets())
def test_read_header_of_a_deflated_data_set(sample: tuple[bytes, str]) -> None:
    data, ts = sample
    if ts != EXPLICIT_VR_LE:
        return
    expected = _outcome(parse_header_pydicom, data, ts, complete=True)
    got = _outcome(read_header, deflated(data), DEFLATED_EXPLICIT_VR_LE)
    if expected is HeaderError:
        assert got is HeaderError
    else:
        assert got == attrs.evolve(expected, transfer_syntax_uid=DEFLATED_EXPLICIT_VR_LE)  # type: ignore[misc]


def _big_endian(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = False
    buf.is_implicit_VR = False
    write_dataset(buf, ds)
    return buf.getvalue()


def test_read_header_of_a_big_endian_data_set_with_sequences() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 144"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = UID
    item = Dataset()
    item.ReferencedSOPInstanceUID = UID
    ds.ReferencedImageSequence = [item, item]
    ds.PatientName = "Иванов^Иван"
    ds.SeriesInstanceUID = UID + ".2"
    ds.Rows = 2
    data = _big_endian(ds)
    header = read_header(data, EXPLICIT_VR_BE)
    assert header == parse_header_pydicom(data, EXPLICIT_VR_BE, complete=True)
    assert header.patient_name == "Иванов^Иван" and header.series_instance_uid == UID + ".2"


def test_a_header_beyond_the_first_64_kib_is_found_in_a_file(tmp_path: Path) -> None:
    body = _el(0x00080015, b"UN", bytes(300_000)) + HEADER + TAIL
    for ts, data in ((EXPLICIT_VR_LE, body), (DEFLATED_EXPLICIT_VR_LE, deflated(body))):
        path = tmp_path / "x.dcm"
        path.write_bytes(file_meta_bytes(CT, UID, ts) + data)
        header = read_header(path, ts)
        assert (header.sop_instance_uid, header.series_instance_uid, header.patient_name) == (
            UID,
            UID + ".2",
            "DOE^JANE",
        )


def test_an_implicit_vr_sequence_inside_un_of_undefined_length_is_walked() -> None:
    inner = struct.pack("<HHI", 0x0008, 0x1150, 6) + b"1.2.3\0"  # implicit VR inside the item
    un_seq = (
        struct.pack("<HH2s2xI", 0x0009, 0x1010, b"UN", 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + inner
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    header = read_header(HEADER + un_seq + TAIL, EXPLICIT_VR_LE)
    assert header.series_instance_uid == UID + ".2"


# -- bounded whatever the data set holds -----------------------------------------------------------


def test_a_deflate_bomb_is_refused_in_bounded_memory() -> None:
    bomb = deflate_bomb(64 * MiB)  # 64 KiB that inflate to 64 MiB
    limits = HeaderLimits(max_bytes=4 * MiB)
    result, peak = _peak(read_header, bomb, DEFLATED_EXPLICIT_VR_LE, limits)
    assert isinstance(result, HeaderLimitExceeded)
    assert peak < 2 * MiB
    # within a budget that holds it, the same stream gives its header, still in bounded memory
    result, peak = _peak(read_header, bomb, DEFLATED_EXPLICIT_VR_LE, HeaderLimits(max_bytes=65 * MiB))
    assert getattr(result, "series_instance_uid", None) == UID + ".2"
    assert peak < 2 * MiB


def test_the_2_gib_deflate_bomb_of_the_issue_is_refused_with_the_default_limits(tmp_path: Path) -> None:
    bomb = deflate_bomb(2048 * MiB)
    assert len(bomb) < 3 * MiB
    path = tmp_path / "bomb.dcm"
    path.write_bytes(file_meta_bytes(CT, UID, DEFLATED_EXPLICIT_VR_LE) + bomb)
    del bomb
    result, peak = _peak(read_header, path, DEFLATED_EXPLICIT_VR_LE)
    assert isinstance(result, HeaderLimitExceeded)
    assert peak < 2 * MiB


def test_millions_of_items_before_the_header_are_refused_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "items.dcm"
    with open(path, "wb") as f:
        f.write(file_meta_bytes(CT, UID, EXPLICIT_VR_LE))
        for piece in many_items(2_000_000):  # 64 MB, as in the issue
            f.write(piece)
    result, peak = _peak(read_header, path, EXPLICIT_VR_LE, HeaderLimits(max_elements=20_000))
    assert isinstance(result, HeaderLimitExceeded)
    assert peak < 2 * MiB
    # a few thousand items (a long Referenced Image Sequence) are read
    few = b"".join(many_items(3_000))
    assert read_header(few, EXPLICIT_VR_LE).series_instance_uid == UID + ".2"


def test_nesting_is_bounded() -> None:
    depth = 10_000
    opening = (
        struct.pack("<HH2s2xI", 0x0008, 0x1140, b"SQ", 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ) * depth
    with pytest.raises(HeaderLimitExceeded):
        read_header(HEADER + opening, EXPLICIT_VR_LE)


def test_a_huge_header_value_is_refused() -> None:
    data = HEADER + _el(0x00100010, b"PN", bytes(40_000)) + TAIL
    with pytest.raises(HeaderLimitExceeded):
        read_header(data, EXPLICIT_VR_LE)


def test_read_header_reads_implicit_vr_too() -> None:
    data = b"".join(
        struct.pack("<HHI", t >> 16, t & 0xFFFF, len(v)) + v
        for t, v in ((0x00080016, _uid(CT)), (0x00080018, _uid(UID)), (0x0020000E, _uid(UID + ".2")))
    )
    assert read_header(data, IMPLICIT_VR_LE).series_instance_uid == UID + ".2"


# -- the acceptor refuses, stores nothing, and walks off the loop ----------------------------------


def _store_pdus(data: Iterator[bytes], ctx: int = 1, fragment: int = 60000) -> Iterator[bytes]:
    cmd = dimse.encode_c_store_rq(1, CT, UID)
    yield P.encode_command_pdus(ctx, cmd, 16384)
    pending = b""
    for piece in data:
        pending += piece
        cut = len(pending) - len(pending) % fragment
        if cut == len(pending):
            cut -= fragment  # the last fragment goes out with the last-fragment flag
        for off in range(0, cut, fragment):
            yield P.p_data_header(ctx, 0x00, fragment) + pending[off : off + fragment]
        pending = pending[cut:]
    yield P.p_data_header(ctx, 0x02, len(pending)) + pending


async def _store(tmp: Path, ts: str, data: Iterator[bytes], limits: HeaderLimits) -> tuple[int, DirSink]:
    config = AcceptorConfig(max_pdu_size=65536, header_limits=limits)
    h = Harness(tmp, config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.serve)
        await h.associate(contexts=((1, CT, ts),))
        for pdu in _store_pdus(data):
            await h.send(pdu)
        rsp = await h.read_command()
        await h.send(P.RELEASE_RQ_BYTES)
        t, _ = await h.read()
        assert t == P.A_RELEASE_RP
        await h.client_stream.aclose()
    assert rsp.status is not None
    return rsp.status, h.sink


@pytest.fixture
def walker_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads `read_header` ran in, for the acceptor."""
    names: list[str] = []
    real = walk_module.read_header

    def recorded(*args: object) -> object:
        names.append(threading.current_thread().name)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(walk_module, "read_header", recorded)
    return names


async def test_the_acceptor_refuses_a_deflate_bomb_and_keeps_nothing(
    tmp_path: Path,
    walker_threads: list[str],
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bomb = deflate_bomb(64 * MiB)
    tracemalloc.start()
    try:
        status, sink = await _store(
            tmp_path, DEFLATED_EXPLICIT_VR_LE, iter([bomb]), HeaderLimits(max_bytes=4 * MiB)
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == S.STATUS_HEADER_OUT_OF_BOUNDS
    assert sink.received == [] and sink.leftovers() == [] and list(sink.out.iterdir()) == []
    assert "C-STORE from MODALITY refused (0xC212): header not reached within 4194304 bytes" in caplog.text
    assert walker_threads and threading.main_thread().name not in walker_threads
    assert peak < 8 * MiB


async def test_the_acceptor_refuses_the_2_gib_bomb_with_its_default_limits(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    bomb = deflate_bomb(2048 * MiB)
    tracemalloc.start()
    try:
        status, sink = await _store(tmp_path, DEFLATED_EXPLICIT_VR_LE, iter([bomb]), HeaderLimits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == S.STATUS_HEADER_OUT_OF_BOUNDS
    assert sink.received == [] and sink.leftovers() == []
    assert peak < 16 * MiB


async def test_the_acceptor_refuses_a_data_set_of_too_many_items(
    tmp_path: Path, walker_threads: list[str], autojump_clock: trio.testing.MockClock
) -> None:
    status, sink = await _store(
        tmp_path, EXPLICIT_VR_LE, many_items(20_000), HeaderLimits(max_elements=5_000)
    )
    assert status == S.STATUS_HEADER_OUT_OF_BOUNDS
    assert sink.received == [] and sink.leftovers() == []
    assert walker_threads and threading.main_thread().name not in walker_threads


async def test_the_acceptor_refuses_the_2_million_item_data_set_of_the_issue(
    tmp_path: Path, walker_threads: list[str], autojump_clock: trio.testing.MockClock
) -> None:
    tracemalloc.start()
    try:
        status, sink = await _store(tmp_path, EXPLICIT_VR_LE, many_items(2_000_000), HeaderLimits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == S.STATUS_HEADER_OUT_OF_BOUNDS
    assert sink.received == [] and sink.leftovers() == []
    assert threading.main_thread().name not in walker_threads
    assert peak < 16 * MiB


async def test_the_acceptor_stores_a_deflated_instance_whose_header_is_far_in(
    tmp_path: Path, walker_threads: list[str], autojump_clock: trio.testing.MockClock
) -> None:
    body = _el(0x00080015, b"UN", bytes(300_000)) + HEADER + TAIL
    status, sink = await _store(tmp_path, DEFLATED_EXPLICIT_VR_LE, iter([deflated(body)]), HeaderLimits())
    assert status == S.SUCCESS
    (rx,) = sink.received
    assert rx.header.series_instance_uid == UID + ".2"
    assert rx.header.transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LE
    assert threading.main_thread().name not in walker_threads


async def test_the_acceptor_stores_a_small_deflated_instance_kept_in_memory(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    status, sink = await _store(tmp_path, DEFLATED_EXPLICIT_VR_LE, iter([deflated(HEADER + TAIL)]), HeaderLimits())
    assert status == S.SUCCESS
    (rx,) = sink.received
    assert rx.data is not None and rx.header.patient_name == "DOE^JANE"


async def test_a_deflate_bomb_from_pynetdicom_is_refused_and_a_far_header_stored(
    acceptor: RunningAcceptor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real peer over TCP: pynetdicom sends the bytes of two deflated files as they are, the
    2 GiB bomb of the issue (refused) and an instance whose header is 300 KB in (stored)."""
    from pynetdicom import AE, _config

    # send the files' bytes as they are (else pynetdicom decodes them: the bomb included)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(file_meta_bytes(CT, UID, DEFLATED_EXPLICIT_VR_LE) + deflate_bomb(2048 * MiB))
    fine_uid = UID + ".9"
    sop = _el(0x00080016, b"UI", _uid(CT)) + _el(0x00080018, b"UI", _uid(fine_uid))
    body = _el(0x00080015, b"UN", bytes(300_000)) + sop + TAIL
    fine = tmp_path / "fine.dcm"
    fine.write_bytes(file_meta_bytes(CT, fine_uid, DEFLATED_EXPLICIT_VR_LE) + deflated(body))

    def send() -> list[int]:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(CT, DEFLATED_EXPLICIT_VR_LE)
        assoc = ae.associate("127.0.0.1", acceptor.port, ae_title="CAPACITOR")
        assert assoc.is_established
        statuses = [assoc.send_c_store(f).Status for f in (bomb, fine)]
        assoc.release()
        return statuses

    assert await trio.to_thread.run_sync(send) == [S.STATUS_HEADER_OUT_OF_BOUNDS, S.SUCCESS]
    assert [rx.header.sop_instance_uid for rx in acceptor.sink.received] == [fine_uid]
    assert acceptor.sink.leftovers() == []
