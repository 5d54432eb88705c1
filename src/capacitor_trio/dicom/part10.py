"""Part 10 files without datasets: write the preamble and file meta ourselves, read headers only.

The acceptor writes `file_meta_bytes(...)` and then the dataset bytes exactly as received; the
requestor sends a spool file's bytes from `dataset_offset(...)` on. The index's header fields are
read from the first bytes of the dataset by a small element walker (`parse_header_fast`, cheap
enough for the event loop), stopping after (0020,000E) — never near the pixel data. What that
cannot settle (the header beyond the first bytes, deflated or big endian data sets, other
character sets) `read_header` reads by walking the whole data set forward, inflating as it goes,
within `HeaderLimits`: whatever a data set holds, the walk costs bounded memory and time, and
a header it cannot reach within them is a `HeaderLimitExceeded`.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zlib
from pathlib import Path
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
_HEADER_TAGS = [
    0x00080005,  # Specific Character Set (to decode names)
    0x00080016,
    0x00080018,
    0x00080050,
    0x00080060,
    0x00100010,
    0x00100020,
    0x0020000D,
    0x0020000E,
]


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


def parse_header(data: bytes, transfer_syntax_uid: str, *, complete: bool) -> InstanceHeader | None:
    """Read the index fields from the first bytes of a dataset: `parse_header_fast`, and pydicom
    for what that does not settle.

    Returns None when `data` is a prefix (not `complete`) that ends before (0020,000E) was
    passed. Raises HeaderError when the bytes are not a readable dataset. pydicom's cost grows
    with what `data` holds: the acceptor uses `parse_header_fast` and `read_header` instead.
    """
    header = parse_header_fast(data, transfer_syntax_uid, complete=complete)
    if header is not None:
        return header
    return parse_header_pydicom(data, transfer_syntax_uid, complete=complete)


def parse_header_pydicom(
    data: bytes, transfer_syntax_uid: str, *, complete: bool
) -> InstanceHeader | None:
    """`parse_header` through pydicom, for every transfer syntax and character set."""
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


# -- the bounded walk of a whole data set -------------------------------------------------------

_CHUNK = 64 << 10
_TL = {False: struct.Struct("<HHI"), True: struct.Struct(">HHI")}  # tag, 32-bit length
_VR_SHORT_LENGTH = {False: struct.Struct("<H"), True: struct.Struct(">H")}
_UINT32_BY = {False: _UINT32, True: struct.Struct(">I")}
#: the VRs of the header tags, for a data set rebuilt from their raw values (implicit VR)
_HEADER_VRS = {
    0x00080005: b"CS",
    0x00080016: b"UI",
    0x00080018: b"UI",
    0x00080050: b"SH",
    0x00080060: b"CS",
    0x00100010: b"PN",
    0x00100020: b"LO",
    0x0020000D: b"UI",
    0x0020000E: b"UI",
}


class _Stream:
    """A data set's bytes read forward in chunks, from a file object positioned at its start:
    skipped values are sought over, or, in a deflated data set, inflated (at most a chunk at a
    time: `decompressobj` with `max_length`) and dropped. Every byte read or inflated counts
    against `max_bytes`."""

    def __init__(self, fp: BinaryIO, *, deflated: bool, max_bytes: int) -> None:
        self._fp = fp
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self._buf = b""
        self._pos = 0
        self._max_bytes = max_bytes
        self._taken = 0
        #: the offset in the data set of the next byte `read` returns
        self.offset = 0

    def _next_chunk(self) -> bytes:
        z = self._inflater
        if z is None:
            return self._fp.read(_CHUNK)
        while not z.eof:
            data = z.unconsumed_tail or self._fp.read(_CHUNK)
            if not data:
                return b""
            try:
                out = z.decompress(data, _CHUNK)
            except zlib.error as exc:
                raise HeaderError(f"cannot inflate data set: {exc}") from exc
            if out:
                return out
        return b""

    def _fill(self) -> bool:
        """One more chunk in the buffer; False at the end of the data set."""
        chunk = self._next_chunk()
        if not chunk:
            return False
        self._taken += len(chunk)
        if self._taken > self._max_bytes:
            raise HeaderLimitExceeded(f"header not reached within {self._max_bytes} bytes")
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def at_end(self) -> bool:
        return self._pos == len(self._buf) and not self._fill()

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        """The next `st.size` bytes, unpacked."""
        n = st.size
        while len(self._buf) - self._pos < n:
            if not self._fill():
                raise _Truncated
        out = st.unpack_from(self._buf, self._pos)
        self._pos += n
        self.offset += n
        return out

    def read(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            if not self._fill():
                raise _Truncated
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.offset += n
        return out

    def skip(self, n: int) -> None:
        self.offset += n
        have = len(self._buf) - self._pos
        if n <= have:
            self._pos += n
            return
        n -= have
        self._buf, self._pos = b"", 0
        if self._inflater is None:
            self._fp.seek(n, io.SEEK_CUR)  # beyond the end: the next read finds nothing
            return
        while n > 0:
            if not self._fill():
                raise _Truncated
            self._pos = min(n, len(self._buf))
            n -= self._pos


def _read_element(stream: _Stream, implicit: bool, big: bool) -> tuple[int, bytes, int]:
    """(tag, VR, value length) of the next element; the VR is b"" in implicit VR and for items
    and delimiters."""
    group, elem, length = stream.unpack(_TL[big])
    if implicit or group == 0xFFFE:
        return group << 16 | elem, b"", length
    # the four bytes after the tag were read as a length: they are the VR and a 16-bit length
    vr = length.to_bytes(4, "big" if big else "little")[:2]
    if vr[0] not in _VR_LETTERS or vr[1] not in _VR_LETTERS:
        raise _Unsupported  # not explicit VR after all (pydicom knows the tricks)
    if vr in _LONG_VRS:
        return group << 16 | elem, vr, stream.unpack(_UINT32_BY[big])[0]
    return group << 16 | elem, vr, length >> 16 if not big else length & 0xFFFF


class _Walk:
    """What a walk may still pass, of `HeaderLimits`."""

    def __init__(self, limits: HeaderLimits) -> None:
        self.limits = limits
        self.left = limits.max_elements

    def exceeded(self) -> HeaderLimitExceeded:
        return HeaderLimitExceeded(f"header not reached within {self.limits.max_elements} elements")

    def nest(self, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise HeaderLimitExceeded(f"sequences nested deeper than {self.limits.max_depth} before the header")


def _skip_undefined(stream: _Stream, walk: _Walk, implicit: bool, big: bool) -> None:
    """Past a sequence (or encapsulated value) of undefined length whose header was just read,
    iteratively: only a stack of encodings is kept, as deep as the nesting."""
    frames: list[tuple[bool, bool, bool]] = [(False, implicit, big)]  # (in an item?, encoding)
    left = walk.left
    while frames:
        left -= 1
        if left < 0:
            raise walk.exceeded()
        in_item, imp, bg = frames[-1]
        tag, vr, length = _read_element(stream, imp, bg)
        if tag == (_ITEM_END if in_item else _SEQUENCE_END):
            frames.pop()
        elif not in_item and tag == _ITEM:
            if length == _UNDEFINED:
                frames.append((True, imp, bg))
                walk.nest((len(frames) + 1) // 2)
            else:
                stream.skip(length)
        elif not in_item or tag >> 16 == 0xFFFE:
            raise _Unsupported  # neither an item nor its delimiter where one belongs
        elif length == _UNDEFINED:
            # a sequence; a UN one holds implicit VR little endian (PS3.5 6.2.2)
            frames.append((False, imp or vr == b"UN", bg and vr != b"UN"))
            walk.nest((len(frames) + 1) // 2)  # sequences open
        else:
            stream.skip(length)
    walk.left = left


def _walk_header(
    stream: _Stream, implicit: bool, big: bool, limits: HeaderLimits
) -> dict[int, tuple[bytes, bytes]]:
    """{tag: (VR, raw value)} of the header tags among the top-level elements, up to the first
    element past (0020,000E) or the end of the data set."""
    walk = _Walk(limits)
    values: dict[int, tuple[bytes, bytes]] = {}
    while not stream.at_end():
        walk.left -= 1
        if walk.left < 0:
            raise walk.exceeded()
        tag, vr, length = _read_element(stream, implicit, big)
        if tag > _LAST_HEADER_TAG:
            break
        if tag >> 16 == 0xFFFE:
            raise _Unsupported  # an item or delimiter at the top level
        if length == _UNDEFINED:
            if tag in _WANTED:
                raise _Unsupported
            _skip_undefined(stream, walk, implicit, big)
        elif tag in _WANTED:
            if length > limits.max_value:
                raise HeaderLimitExceeded(f"a header value of {length} bytes (at most {limits.max_value})")
            values[tag] = (vr or _HEADER_VRS[tag], stream.read(length))
        else:
            stream.skip(length)
    return values


def _header_from_raw(values: dict[int, tuple[bytes, bytes]], transfer_syntax_uid: str) -> InstanceHeader:
    """The index fields from raw values: decoded here in a simple character set, else by
    pydicom from a small data set rebuilt from those values alone."""
    header = _header_from_values({t: v for t, (_, v) in values.items()}, transfer_syntax_uid)
    if header is not None:
        return header
    rebuilt = b"".join(
        (_TAG_VR_LONG if vr in _LONG_VRS else _TAG_VR_SHORT).pack(tag >> 16, tag & 0xFFFF, vr, len(v)) + v
        for tag, (vr, v) in sorted(values.items())
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(io.BytesIO(rebuilt), False, True)
            return _header_from(ds, transfer_syntax_uid)
    except Exception as exc:
        raise HeaderError(f"cannot read dataset header: {exc!r}") from exc


def _dataset_file(source: Path | bytes) -> BinaryIO:
    """A file object at the start of the data set: of a Part 10 file, or of the bytes given."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    fp = open(source, "rb")  # noqa: SIM115 (returned open)
    try:
        offset, _ = read_meta(fp)
        fp.seek(offset)
    except BaseException:
        fp.close()
        raise
    return fp


def read_header(
    source: Path | bytes, transfer_syntax_uid: str, limits: HeaderLimits = HeaderLimits()
) -> InstanceHeader:
    """Read the index fields of a whole data set — a Part 10 file, or the data set's bytes — by
    walking it forward (inflating a deflated one as it goes) up to (0020,000E), within `limits`.

    Blocking, and up to `limits` costly: call it in a worker thread. Raises HeaderLimitExceeded
    when the header is not reached within the limits, HeaderError when it cannot be read. An
    encoding the walker does not read (implicit VR elements in an explicit VR data set, a data
    set cut inside an element…) is left to pydicom on the data set's first 64 KiB.
    """
    implicit = transfer_syntax_uid == IMPLICIT_VR_LE
    big = transfer_syntax_uid == EXPLICIT_VR_BE
    deflated = transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LE
    try:
        with _dataset_file(source) as fp:
            start = fp.tell()
            try:
                stream = _Stream(fp, deflated=deflated, max_bytes=limits.max_bytes)
                values = _walk_header(stream, implicit, big, limits)
            except (_Unsupported, _Truncated):
                fp.seek(start)
                return _pydicom_prefix(fp, transfer_syntax_uid)
    except OSError as exc:
        raise HeaderError(f"cannot read the data set: {exc}") from exc
    return _checked(_header_from_raw(values, transfer_syntax_uid))


_PREFIX = 64 << 10


def _pydicom_prefix(fp: BinaryIO, transfer_syntax_uid: str) -> InstanceHeader:
    """The header read by pydicom from the data set's first 64 KiB (a bounded cost)."""
    prefix = fp.read(_PREFIX + 1)
    header = parse_header_pydicom(prefix[:_PREFIX], transfer_syntax_uid, complete=len(prefix) <= _PREFIX)
    if header is None:
        raise HeaderError("header not in the first 64 KiB, in an encoding the walker does not read")
    return header


# -- a bounded copy of a data set, for showing it ---------------------------------------------------


@attrs.frozen
class ShowLimits:
    """How much of a data set `bounded_copy` keeps for showing (the API's item detail)."""

    #: elements shown, sequence items included, at every level
    max_elements: int = 2000
    #: bytes of one value shown: a longer text is cut, a longer binary value left out
    max_value: int = 1024
    #: items shown of one sequence
    max_items: int = 100
    #: sequences nested in one another shown
    max_depth: int = 8
    #: bytes of the data set read or inflated, and elements walked past, shown or not
    max_bytes: int = 16 << 20
    max_walked: int = 100_000


@attrs.frozen
class BoundedCopy:
    """A data set cut to `ShowLimits`, in the encoding `implicit` / `big` says (deflated ones
    inflated), and the names of the limits that cut something from it (empty: all of it up to
    the pixel data, bulk data left out)."""

    data: bytes
    implicit: bool
    big: bool
    cut_by: tuple[str, ...]


_TEXT_VRS = frozenset(
    b"AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split()
)
_PIXEL_GROUP = 0x7FE0


def _dictionary_vr(tag: int) -> bytes:
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag)[:2].encode("ascii")
    except (KeyError, ValueError):
        return b"UN"


class _Frame:
    """A sequence or item open in `bounded_copy`'s walk."""

    __slots__ = ("big", "copied", "end", "implicit", "is_item", "shown")

    def __init__(self, is_item: bool, end: int | None, copied: bool, implicit: bool, big: bool) -> None:
        self.is_item = is_item
        self.end = end  # its end's offset in the data set; None: undefined length
        self.copied = copied  # in the copy (else walked past)
        self.implicit = implicit  # how its content is encoded
        self.big = big
        self.shown = 0  # items shown, of a sequence


class _Copy:
    """The writer side of `bounded_copy`: the frames open, what was shown, the limits that cut."""

    def __init__(self, limits: ShowLimits, implicit: bool, big: bool) -> None:
        self.limits = limits
        self.implicit = implicit
        self.big = big
        self.out: list[bytes] = []
        self.shown = 0
        self.cut_by: list[str] = []
        self.frames: list[_Frame] = []

    def cut(self, limit: str) -> None:
        if limit not in self.cut_by:
            self.cut_by.append(limit)

    def depth(self) -> int:
        return sum(1 for f in self.frames if not f.is_item)

    def copying(self) -> bool:
        return not self.frames or self.frames[-1].copied

    def room(self) -> bool:
        """Whether one more element may be shown (counting it)."""
        if self.shown >= self.limits.max_elements:
            self.cut("elements")
            return False
        self.shown += 1
        return True

    def element(self, tag: int, vr: bytes, value: bytes) -> None:
        self.out.append(self._header(tag, vr, len(value)) + value)

    def _header(self, tag: int, vr: bytes, length: int) -> bytes:
        if self.implicit or tag >> 16 == 0xFFFE:
            return _TL[self.big].pack(tag >> 16, tag & 0xFFFF, length)
        if vr in _LONG_VRS:
            fmt = ">HH2s2xI" if self.big else "<HH2s2xI"
        else:
            fmt = ">HH2sH" if self.big else "<HH2sH"
        return struct.pack(fmt, tag >> 16, tag & 0xFFFF, vr, length)

    def open(
        self, is_item: bool, end: int | None, copied: bool, tag: int, encoding: tuple[bool, bool]
    ) -> None:
        if copied:
            self.out.append(self._header(tag, b"SQ", _UNDEFINED))
        self.frames.append(_Frame(is_item, end, copied, *encoding))

    def encoding(self) -> tuple[bool, bool]:
        """(implicit, big) of the elements read next."""
        if self.frames:
            return self.frames[-1].implicit, self.frames[-1].big
        return self.implicit, self.big

    def close(self) -> None:
        frame = self.frames.pop()
        if frame.copied:
            self.out.append(self._header(_ITEM_END if frame.is_item else _SEQUENCE_END, b"", 0))

    def close_all(self) -> None:
        while self.frames:
            self.close()


def bounded_copy(source: Path | BinaryIO, limits: ShowLimits = ShowLimits()) -> BoundedCopy:
    """The data set of a Part 10 file (a path, or a file object at its start) up to its pixel
    data, bulk data (OB, OW, UN… values) left out, cut to `limits`: what is worth showing of it,
    read in bounded memory and time whatever it holds. Blocking: call it in a worker thread.
    Sequences and items come out in undefined length (so that they can be cut)."""
    with contextlib.ExitStack() as stack:
        fp = stack.enter_context(open(source, "rb")) if isinstance(source, Path) else source
        offset, meta = read_meta(fp)
        fp.seek(offset)
        ts = meta.get(0x0010, b"").decode("ascii", "replace").strip("\x00 ")
        implicit, big = ts == IMPLICIT_VR_LE, ts == EXPLICIT_VR_BE
        copy = _Copy(limits, implicit, big)
        stream = _Stream(fp, deflated=ts == DEFLATED_EXPLICIT_VR_LE, max_bytes=limits.max_bytes)
        try:
            _copy_elements(stream, copy)
        except HeaderLimitExceeded:
            copy.cut("readBytes")
        except (_Unsupported, _Truncated, HeaderError):
            copy.cut("unreadable")
        copy.close_all()
        return BoundedCopy(b"".join(copy.out), implicit, big, tuple(copy.cut_by))


#: sequences and items open at once in `bounded_copy`'s walk, shown or walked past
_MAX_FRAMES = 256


def _copy_elements(stream: _Stream, copy: _Copy) -> None:
    walked = 0
    while True:
        frame = copy.frames[-1] if copy.frames else None
        if frame is not None and frame.end is not None and stream.offset >= frame.end:
            copy.close()  # the end of a sequence or item of defined length
            continue
        if frame is None and stream.at_end():
            return
        walked += 1
        if walked > copy.limits.max_walked:
            copy.cut("walkedElements")
            return
        if len(copy.frames) > _MAX_FRAMES:  # nested deeper than anything shown, walked past
            copy.cut("sequenceDepth")
            return
        tag, vr, length = _read_element(stream, *copy.encoding())
        if frame is not None and not frame.is_item:
            _copy_in_sequence(stream, copy, frame, tag, length)
        elif not _copy_in_item(stream, copy, tag, vr, length):
            return


def _copy_in_sequence(stream: _Stream, copy: _Copy, frame: _Frame, tag: int, length: int) -> None:
    if tag == _SEQUENCE_END and frame.end is None:
        copy.close()
        return
    if tag != _ITEM:
        raise _Unsupported
    end = None if length == _UNDEFINED else stream.offset + length
    shown = frame.copied and frame.shown < copy.limits.max_items
    if frame.copied and not shown:
        copy.cut("sequenceItems")
    if shown:
        frame.shown += 1
        shown = copy.room()
    if not shown and end is not None:
        stream.skip(length)
    else:
        copy.open(True, end, shown, _ITEM, copy.encoding())


def _copy_in_item(stream: _Stream, copy: _Copy, tag: int, vr: bytes, length: int) -> bool:
    """One element at the top level or in an item; False at the pixel data (the copy ends)."""
    frame = copy.frames[-1] if copy.frames else None
    if tag == _ITEM_END and frame is not None and frame.end is None:
        copy.close()
        return True
    if tag >> 16 == 0xFFFE:
        raise _Unsupported
    if frame is None and tag >= 0x7FE00008:
        return False  # the pixel data and what follows it are not shown
    implicit, big = copy.encoding()
    vr = vr or _dictionary_vr(tag)
    undefined = length == _UNDEFINED
    if tag >> 16 != _PIXEL_GROUP and (vr == b"SQ" or (undefined and implicit and vr == b"UN")):
        _open_sequence(stream, copy, tag, length)
    elif undefined:  # encapsulated, or UN of undefined length (implicit VR LE inside): not shown
        copy.open(False, None, False, tag, (implicit or vr == b"UN", big and vr != b"UN"))
    elif not copy.copying() or vr[:1] == b"O" or vr == b"UN" or tag >> 16 == _PIXEL_GROUP:
        stream.skip(length)  # walked past, or bulk data
    elif length > copy.limits.max_value and copy.shown < copy.limits.max_elements:
        copy.cut("valueSize")
        if vr in _TEXT_VRS and copy.room():
            keep = copy.limits.max_value & ~1
            copy.element(tag, vr, stream.read(keep))
            stream.skip(length - keep)
        else:
            stream.skip(length)
    elif length <= copy.limits.max_value and copy.room():
        copy.element(tag, vr, stream.read(length))
    else:
        stream.skip(length)
    return True


def _open_sequence(stream: _Stream, copy: _Copy, tag: int, length: int) -> None:
    shown = copy.copying() and copy.depth() < copy.limits.max_depth
    if copy.copying() and not shown:
        copy.cut("sequenceDepth")
    shown = shown and copy.room()
    if not shown and length != _UNDEFINED:
        stream.skip(length)
    else:
        end = None if length == _UNDEFINED else stream.offset + length
        copy.open(False, end, shown, tag, copy.encoding())
