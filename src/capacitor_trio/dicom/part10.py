"""Part 10 files without datasets: write the preamble and file meta ourselves, read headers only.

The acceptor writes `file_meta_bytes(...)` and then the dataset bytes exactly as received; the
requestor sends a spool file's bytes from the offset `read_meta(...)` gives. The index's header
fields are read from the first bytes of the dataset by a small element walker (`parse_header_fast`, cheap
enough for the event loop), stopping after (0020,000E) — never near the pixel data. What that
cannot settle (the header beyond the first bytes, deflated or big endian data sets, other
character sets) walk.py's `read_header` reads by walking the whole data set forward, inflating as
it goes, within `HeaderLimits`: whatever a data set holds, the walk costs bounded memory and time,
and a header it cannot reach within them is a `HeaderLimitExceeded`. The bounded copy of a data
set for showing it is detail.py's.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import BinaryIO

import attrs
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from capacitor_trio.domain.instance import InstanceHeader

from .pdu import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"

PREAMBLE = b"\x00" * 128 + b"DICM"

_TAG_VR_SHORT = struct.Struct("<HH2sH")
_TAG_VR_LONG = struct.Struct("<HH2s2xI")
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}

_LAST_HEADER_TAG = 0x0020000E
#: the header tags the index needs and their VRs (for a data set rebuilt from raw values)
HEADER_VRS = {
    0x00080005: b"CS",  # Specific Character Set (to decode names)
    0x00080016: b"UI",
    0x00080018: b"UI",
    0x00080050: b"SH",
    0x00080060: b"CS",
    0x00100010: b"PN",
    0x00100020: b"LO",
    0x0020000D: b"UI",
    0x0020000E: b"UI",
}
_HEADER_TAGS = list(HEADER_VRS)


class HeaderError(ValueError):
    """The dataset's header cannot be read."""


class HeaderLimitExceeded(HeaderError):
    """The header was not reached within `HeaderLimits` (a deflate bomb, millions of items…)."""


@attrs.frozen
class HeaderLimits:
    """How far `read_header` walks a data set looking for its header: the bound on the memory
    and time one data set can cost, whatever it holds. Real headers are passed within a few
    hundred elements and kilobytes."""

    #: bytes of the data set read (inflated, for a deflated one) before the header is passed
    max_bytes: int = 64 << 20
    #: elements and sequence items passed before the header is passed
    max_elements: int = 50_000
    #: sequences nested in one another
    max_depth: int = 32
    #: one header value (UIDs, names, IDs are at most a few hundred bytes)
    max_value: int = 16 << 10


def _pad(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) & 1 else raw


def _short(elem: int, vr: bytes, value: bytes) -> bytes:
    return _TAG_VR_SHORT.pack(0x0002, elem, vr, len(value)) + value


def file_meta_bytes(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = ""
) -> bytes:
    """Preamble, 'DICM' and a complete File Meta Information group (explicit VR LE)."""
    body = b"".join(
        (
            _TAG_VR_LONG.pack(0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
            _short(0x0002, b"UI", _pad(sop_class_uid.encode("ascii"), b"\x00")),
            _short(0x0003, b"UI", _pad(sop_instance_uid.encode("ascii"), b"\x00")),
            _short(0x0010, b"UI", _pad(transfer_syntax_uid.encode("ascii"), b"\x00")),
            _short(0x0012, b"UI", _pad(IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00")),
            _short(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION.encode("ascii"), b" ")),
            _short(0x0016, b"AE", _pad(source_ae.strip().encode("ascii", "replace"), b" "))
            if source_ae.strip()
            else b"",
        )
    )
    return PREAMBLE + _short(0x0000, b"UL", struct.pack("<I", len(body))) + body


def read_meta(fp: BinaryIO) -> tuple[int, dict[int, bytes]]:
    """Return (offset of the dataset, {element number: raw value}) of a Part 10 file's meta group.

    Walks the group 0002 elements (explicit VR LE) rather than trusting (0002,0000).
    """
    head = fp.read(132)
    if len(head) != 132 or head[128:] != b"DICM":
        raise HeaderError("not a Part 10 file (no DICM prefix)")
    off = 132
    values: dict[int, bytes] = {}
    while True:
        raw = fp.read(8)
        if len(raw) < 8:
            return off, values
        group, elem, vr = struct.unpack("<HH2s", raw[:6])
        if group != 0x0002:
            return off, values
        if vr in _LONG_VRS:
            ext = fp.read(4)
            length = struct.unpack("<I", ext)[0]
            hdr = 12
        else:
            length = struct.unpack("<H", raw[6:8])[0]
            hdr = 8
        values[elem] = fp.read(length)
        off += hdr + length
        fp.seek(off)


#: what `parse_header_pydicom` inflates of a deflated prefix, at most (as much as it reads of
#: any other: its cost grows with what it reads)
_PYDICOM_INFLATED = 64 << 10

_FAST_CHARSETS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}


def _header_from(ds: Dataset, transfer_syntax_uid: str) -> InstanceHeader:
    """The index fields, decoded from the raw element bytes when the character set is simple
    (converting through pydicom's value classes costs ~0.3 ms per instance)."""
    charset_el = ds.get_item(0x00080005)
    charset = ""
    if charset_el is not None and charset_el.value:
        raw_cs = charset_el.value
        charset = (
            raw_cs.decode("ascii", "replace") if isinstance(raw_cs, bytes) else str(raw_cs)
        ).strip("\x00 ")
    codec = _FAST_CHARSETS.get(charset)

    def text(tag: int, keyword: str) -> str:
        el = ds.get_item(tag)
        if el is None or el.value is None:
            return ""
        value = el.value
        if isinstance(value, bytes) and codec is not None:
            return value.decode(codec, "replace").strip("\x00 ")
        converted = ds.get(keyword)
        return "" if converted is None else str(converted).strip("\x00 ")

    return InstanceHeader(
        sop_class_uid=text(0x00080016, "SOPClassUID"),
        sop_instance_uid=text(0x00080018, "SOPInstanceUID"),
        transfer_syntax_uid=transfer_syntax_uid,
        study_instance_uid=text(0x0020000D, "StudyInstanceUID"),
        series_instance_uid=text(0x0020000E, "SeriesInstanceUID"),
        modality=text(0x00080060, "Modality"),
        patient_id=text(0x00100020, "PatientID"),
        patient_name=text(0x00100010, "PatientName"),
        accession_number=text(0x00080050, "AccessionNumber"),
    )


def parse_header_fast(
    data: bytes, transfer_syntax_uid: str, *, complete: bool
) -> InstanceHeader | None:
    """Read the index fields from the first bytes of a dataset with the element walker alone.

    Returns None when that does not settle it — a prefix (not `complete`) that ends before
    (0020,000E) was passed, a data set cut inside an element, big endian or deflated data sets,
    an encoding the walker leaves to pydicom, a character set it does not decode itself — and
    `read_header` then reads the whole data set. Raises HeaderError when the header was read
    and has no SOP UIDs. Cheap (no dataset objects, never more than `data` walked): fit for the
    event loop.
    """
    if transfer_syntax_uid in (EXPLICIT_VR_BE, DEFLATED_EXPLICIT_VR_LE):
        return None
    try:
        values, reached = _scan(data, implicit=transfer_syntax_uid == IMPLICIT_VR_LE)
    except _Unsupported:
        return None
    if reached is None or (not reached and not complete):
        return None
    header = _header_from_values(values, transfer_syntax_uid)
    return None if header is None else _checked(header)


def parse_header_pydicom(
    data: bytes, transfer_syntax_uid: str, *, complete: bool
) -> InstanceHeader | None:
    """The index fields through pydicom, for every transfer syntax and character set: what
    `parse_header_fast` does not settle. Its cost grows with what `data` holds: the acceptor
    calls it on a bounded prefix only (`walk.read_header`)."""
    reached = False

    def stop(tag: int, vr: str | None, length: int) -> bool:
        nonlocal reached
        if tag > _LAST_HEADER_TAG:
            reached = True
            return True
        return False

    implicit = transfer_syntax_uid == IMPLICIT_VR_LE
    little = transfer_syntax_uid != EXPLICIT_VR_BE
    if transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LE:
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, _PYDICOM_INFLATED)
        except zlib.error as exc:
            raise HeaderError(f"cannot inflate dataset: {exc}") from exc
        complete = False  # a prefix of the inflated stream at best
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(
                io.BytesIO(data), implicit, little, stop_when=stop, specific_tags=_HEADER_TAGS
            )
            if not reached and not complete:
                return None
            header = _header_from(ds, transfer_syntax_uid)
    except HeaderError:
        raise
    except Exception as exc:
        if not complete:
            return None
        raise HeaderError(f"cannot read dataset header: {exc!r}") from exc
    return _checked(header)


def _checked(header: InstanceHeader) -> InstanceHeader:
    if not header.sop_class_uid or not header.sop_instance_uid:
        raise HeaderError("dataset has no SOP Class UID or SOP Instance UID")
    return header


# -- the element walker --------------------------------------------------------------------------

_WANTED = frozenset(_HEADER_TAGS)
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_TAG_LENGTH = struct.Struct("<HHI")
_UINT32 = struct.Struct("<I")
_VR_LETTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class _Unsupported(Exception):
    """The walker leaves this dataset to pydicom."""


class _Truncated(Exception):
    """The bytes end inside an element."""


def _element(data: bytes, pos: int, implicit: bool) -> tuple[int, int, int]:
    """(tag, value length or _UNDEFINED, value offset) of the element at `pos`."""
    if pos + 8 > len(data):
        raise _Truncated
    group, elem, length = _TAG_LENGTH.unpack_from(data, pos)
    tag = group << 16 | elem
    if implicit:
        return tag, length, pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr[0] not in _VR_LETTERS or vr[1] not in _VR_LETTERS:
        raise _Unsupported  # not explicit VR after all (pydicom knows the tricks)
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _Truncated
        length = _UINT32.unpack_from(data, pos + 8)[0]
        if length == _UNDEFINED and vr != b"SQ":
            raise _Unsupported  # UN of undefined length (implicit VR inside), encapsulated data
        return tag, length, pos + 12
    return tag, length >> 16, pos + 8


def _skip_sequence(data: bytes, pos: int, implicit: bool) -> int:
    """Past the items of a sequence of undefined length starting at `pos`: the offset after its
    delimiter."""
    while True:
        if pos + 8 > len(data):
            raise _Truncated
        group, elem, length = _TAG_LENGTH.unpack_from(data, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unsupported
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements up to the item delimiter
            if pos + 8 > len(data):
                raise _Truncated
            if _TAG_LENGTH.unpack_from(data, pos)[:2] == (0xFFFE, 0xE00D):
                pos += 8
                break
            tag, length, pos = _element(data, pos, implicit)
            pos = _skip_sequence(data, pos, implicit) if length == _UNDEFINED else pos + length


def _scan(data: bytes, implicit: bool) -> tuple[dict[int, bytes], bool | None]:
    """The raw values of the header tags among the top-level elements of a little endian
    dataset, and whether the walk got past (0020,000E): True; False when the bytes ended before,
    between two elements; None when they ended inside an element."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(data)
    try:
        while pos < end:
            tag, length, pos = _element(data, pos, implicit)
            if tag > _LAST_HEADER_TAG:
                return values, True
            if tag >> 16 == 0xFFFE:
                raise _Unsupported  # an item or delimiter at the top level
            if length == _UNDEFINED:
                if tag in _WANTED:
                    raise _Unsupported
                pos = _skip_sequence(data, pos, implicit)
                continue
            if pos + length > end:
                raise _Truncated
            if tag in _WANTED:
                values[tag] = data[pos : pos + length]
            pos += length
    except _Truncated:
        return values, None
    except RecursionError:
        raise _Unsupported from None
    return values, False


def _header_from_values(values: dict[int, bytes], transfer_syntax_uid: str) -> InstanceHeader | None:
    """The index fields from raw values, as `_header_from` decodes them; None for a character
    set the walker does not decode itself."""
    charset = values.get(0x00080005, b"").decode("ascii", "replace").strip("\x00 ")
    codec = _FAST_CHARSETS.get(charset)
    if codec is None:
        return None

    def text(tag: int) -> str:
        return values.get(tag, b"").decode(codec, "replace").strip("\x00 ")

    return InstanceHeader(
        sop_class_uid=text(0x00080016),
        sop_instance_uid=text(0x00080018),
        transfer_syntax_uid=transfer_syntax_uid,
        study_instance_uid=text(0x0020000D),
        series_instance_uid=text(0x0020000E),
        modality=text(0x00080060),
        patient_id=text(0x00100020),
        patient_name=text(0x00100010),
        accession_number=text(0x00080050),
    )
