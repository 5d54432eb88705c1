"""A bounded copy of a data set, for showing it (the API's item detail): `bounded_copy` keeps a
data set up to its pixel data, bulk data left out, cut to `ShowLimits`, read in bounded memory
and time whatever it holds (with walk.py's `_Stream`).
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import BinaryIO

import attrs

from .part10 import (
    _ITEM,
    _ITEM_END,
    _LONG_VRS,
    _SEQUENCE_END,
    _UNDEFINED,
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    IMPLICIT_VR_LE,
    HeaderError,
    HeaderLimitExceeded,
    _Truncated,
    _Unsupported,
    read_meta,
)
from .walk import _TL, _read_element, _Stream


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
