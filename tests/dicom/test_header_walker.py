"""The acceptor's header walker reads exactly what pydicom reads.

`parse_header_fast` walks the top-level elements of little endian datasets itself and leaves
everything else to pydicom (`parse_header_pydicom`); on any dataset, whole or cut short, the two
together (`parse_header` below) and pydicom alone must give the same header, the same "read
more" (None) or the same HeaderError.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from capacitor_trio.dicom.part10 import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    HeaderError,
    InstanceHeader,
    parse_header_fast,
    parse_header_pydicom,
)


def parse_header(data: bytes, transfer_syntax_uid: str, *, complete: bool) -> InstanceHeader | None:
    """The fast walker, and pydicom for what it does not settle."""
    header = parse_header_fast(data, transfer_syntax_uid, complete=complete)
    if header is not None:
        return header
    return parse_header_pydicom(data, transfer_syntax_uid, complete=complete)

_TEXT = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789^ -", max_size=16)
_UID = st.from_regex(r"1\.2\.[1-9][0-9]{0,19}(\.[1-9][0-9]{0,8}){0,4}", fullmatch=True)  # <= 64 chars
_CHARSETS = st.sampled_from([None, "", "ISO_IR 100", "ISO_IR 192", "ISO_IR 6", "ISO_IR 144"])


def _item(draw: st.DrawFn, depth: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = draw(_UID)
    item.ReferencedSOPInstanceUID = draw(_UID)
    if depth < 2 and draw(st.booleans()):
        item.add(_sequence(draw, 0x00081140, depth + 1))  # Referenced Image Sequence
    item.is_undefined_length_sequence_item = draw(st.booleans())
    return item


def _sequence(draw: st.DrawFn, tag: int, depth: int = 0) -> DataElement:
    items = [_item(draw, depth) for _ in range(draw(st.integers(0, 2)))]
    elem = DataElement(tag, "SQ", Sequence(items))
    elem.is_undefined_length = draw(st.booleans())
    return elem


@st.composite
def datasets(draw: st.DrawFn) -> tuple[bytes, str]:
    ds = Dataset()
    charset = draw(_CHARSETS)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if draw(st.booleans()):
        ds.SOPClassUID = draw(_UID)
    if draw(st.booleans()):
        ds.SOPInstanceUID = draw(_UID)
    if draw(st.booleans()):
        ds.StudyDate = "20261128"
    if draw(st.booleans()):
        ds.AccessionNumber = draw(_TEXT)
    if draw(st.booleans()):
        ds.Modality = draw(st.sampled_from(["CT", "MR", "", "OT"]))
    if draw(st.booleans()):
        ds.add(_sequence(draw, 0x00081110))  # Referenced Study Sequence
    if draw(st.booleans()):
        ds.PatientName = draw(_TEXT)
    if draw(st.booleans()):
        ds.PatientID = draw(_TEXT)
    if draw(st.booleans()):
        ds.add(_sequence(draw, 0x00101002))  # Other Patient IDs Sequence
    if draw(st.booleans()):
        ds.StudyInstanceUID = draw(_UID)
    if draw(st.booleans()):
        ds.SeriesInstanceUID = draw(_UID)
    if draw(st.booleans()):
        ds.InstanceNumber = 1
    if draw(st.booleans()):
        ds.add(DataElement(0x7FE00010, "OW", bytes(draw(st.integers(0, 64)) * 2)))
    implicit = draw(st.booleans())
    return _encode(ds, implicit), IMPLICIT_VR_LE if implicit else EXPLICIT_VR_LE


def _encode(ds: Dataset, implicit: bool) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _outcome(fn: object, data: bytes, ts: str, complete: bool) -> object:
    try:
        return fn(data, ts, complete=complete)  # type: ignore[operator]
    except HeaderError:
        return HeaderError


@settings(max_examples=300, deadline=None)
@given(datasets(), st.floats(0, 1), st.booleans())
def test_walker_reads_what_pydicom_reads(sample: tuple[bytes, str], cut: float, complete: bool) -> None:
    data, ts = sample
    for piece in (data, data[: int(len(data) * cut)]):
        assert _outcome(parse_header, piece, ts, complete) == _outcome(
            parse_header_pydicom, piece, ts, complete
        )


@pytest.mark.parametrize("ts", [IMPLICIT_VR_LE, EXPLICIT_VR_LE])
def test_walker_needs_more_bytes_for_a_prefix_that_ends_early(ts: str) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.3"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.add(DataElement(0x7FE00010, "OW", b"\0" * 64))
    data = _encode(ds, ts == IMPLICIT_VR_LE)
    header = parse_header(data, ts, complete=False)
    assert header is not None and header.series_instance_uid == "1.2.3.4.5"
    assert parse_header(data[:30], ts, complete=False) is None  # ends inside the header
    with pytest.raises(HeaderError):
        parse_header(data[:8], ts, complete=True)  # no SOP UIDs in what there is
