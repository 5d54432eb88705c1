"""The bounded walk of a whole data set: `read_header`, for what the first bytes of a data set do
not settle (part10.py's `parse_header_fast`).

The data set is read forward in chunks (`_Stream`: skipped values sought over, or inflated and
dropped in a deflated one) up to (0020,000E), within `HeaderLimits`: whatever a data set holds,
the walk costs bounded memory and time, and a header it cannot reach within them is a
`HeaderLimitExceeded`. An encoding the walker does not read is left to pydicom on the data set's
first 64 KiB. `read_header_off_loop` runs it from the event loop: small data sets on the loop,
others in a worker thread. detail.py's bounded copy reads with the same `_Stream`.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

import trio
from pydicom.filereader import read_dataset

from capacitor_trio.domain.instance import InstanceHeader
from capacitor_trio.limiter import run_var_limiter

from .part10 import (
    _ITEM,
    _ITEM_END,
    _LAST_HEADER_TAG,
    _LONG_VRS,
    _SEQUENCE_END,
    _TAG_VR_LONG,
    _TAG_VR_SHORT,
    _UINT32,
    _UNDEFINED,
    _VR_LETTERS,
    _WANTED,
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    HEADER_VRS,
    IMPLICIT_VR_LE,
    HeaderError,
    HeaderLimitExceeded,
    HeaderLimits,
    _checked,
    _header_from,
    _header_from_values,
    _Truncated,
    _Unsupported,
    parse_header_pydicom,
    read_meta,
)

_CHUNK = 64 << 10
_TL = {False: struct.Struct("<HHI"), True: struct.Struct(">HHI")}  # tag, 32-bit length
_VR_SHORT_LENGTH = {False: struct.Struct("<H"), True: struct.Struct(">H")}
_UINT32_BY = {False: _UINT32, True: struct.Struct(">I")}


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
            values[tag] = (vr or HEADER_VRS[tag], stream.read(length))
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


_DEFAULT_LIMITS = HeaderLimits()


def read_header(
    source: Path | bytes, transfer_syntax_uid: str, limits: HeaderLimits = _DEFAULT_LIMITS
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


#: header walks that run at once in worker threads (each holds at most a few hundred KiB)
_HEADER_THREADS = 2
_header_limiter = run_var_limiter("capacitor_trio_header_walk", _HEADER_THREADS)
#: a data set up to this size (not deflated) is walked on the loop: even read by pydicom, a few
#: hundred elements at most (≈ 25 ms), less than a worker thread's hand-over for most
ON_LOOP_BYTES = 4096


async def read_header_off_loop(
    source: Path | bytes, size: int, transfer_syntax: str, limits: HeaderLimits
) -> InstanceHeader:
    """`read_header` of a data set of `size` bytes: on the loop when it is small, else in a
    worker thread (at most `_HEADER_THREADS` at once), since up to its limits it is costly."""
    if size <= ON_LOOP_BYTES and transfer_syntax != DEFLATED_EXPLICIT_VR_LE:
        return read_header(source, transfer_syntax, limits)
    return await trio.to_thread.run_sync(
        read_header, source, transfer_syntax, limits, limiter=_header_limiter()
    )
