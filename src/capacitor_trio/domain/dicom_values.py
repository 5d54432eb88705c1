"""Attribute values as text and back, for the mutate filter: what an action reads from a data
set, and a new element built from text that is checked against its VR before it goes in (a
value that does not fit is refused, never written)."""

from __future__ import annotations

import re

from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

__all__ = [
    "NOT_TEXT",
    "destination_vr",
    "is_text",
    "keyword_for_tag",
    "make_element",
    "single_vr",
    "tag_name",
    "value_text",
]

# VRs whose values are not text: an action can neither read them as text nor set them.
NOT_TEXT = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UN", "AT"})
_INTEGER = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT = frozenset({"FL", "FD"})
_ONE_VALUE = frozenset({"LT", "ST", "UT", "UR"})  # a backslash is text, not a separator
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")  # control characters but ESC
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")  # LT/ST/UT keep CR, LF, FF, TAB


def tag_name(tag: int) -> str:
    """`(0010,0010) PatientName`, for messages (no values)."""
    keyword = keyword_for_tag(tag)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" + (f" {keyword}" if keyword else "")


def value_text(element: DataElement) -> str:
    """An element's value as text: values joined with a backslash, '' when empty; binary
    values and sequences as a size (`<12 bytes>`, `<2 items>`)."""
    value = element.value
    if element.VR == "SQ":
        return f"<{len(value)} items>"
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def is_text(element: DataElement) -> bool:
    """Whether an element's value reads as text (not binary, not a sequence)."""
    return not (
        set(str(element.VR).split(" or ")) & NOT_TEXT
        or isinstance(element.value, bytes | bytearray)
    )


def single_vr(vr: str) -> str:
    """One VR for an ambiguous one (`US or SS` -> `US`): the first, as pydicom writes it."""
    return str(vr).split(" or ")[0]


def destination_vr(tag: int) -> str:
    """The VR a new attribute gets: the dictionary's (the first of an ambiguous `US or SS`).
    ValueError for a tag outside the dictionary or one whose value is not text."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        raise ValueError(f"{tag_name(tag)} is not in the DICOM dictionary (its VR is unknown)") from None
    if set(vr.split(" or ")) & NOT_TEXT:
        raise ValueError(f"{tag_name(tag)} has VR {vr}: only text and number values can be set")
    return single_vr(vr)


def make_element(tag: int, vr: str, text: str, ds: Dataset) -> DataElement:
    """A new element holding `text` (several values separated by backslashes where the VR
    allows them), checked against the VR (characters, length, number range, date format) and
    the data set's character set. ValueError says why it does not fit, without the value."""
    if vr in NOT_TEXT:
        raise ValueError(f"{tag_name(tag)} has VR {vr}: only text and number values can be set")
    if text == "":
        return DataElement(tag, vr, None if vr in _INTEGER | _FLOAT else "")
    if vr in _CHARSET_VRS:
        _check_charset(tag, text, ds)
    elif not text.isascii():  # the other VRs take the default repertoire only
        raise ValueError(f"the value for {tag_name(tag)} (VR {vr}) holds characters outside ASCII")
    parts = [text] if vr in _ONE_VALUE else text.split("\\")
    values = [_convert(vr, part, tag) for part in parts]
    for part in values:
        _check(vr, part, tag)
    return DataElement(tag, vr, values[0] if len(values) == 1 else values)


def _convert(vr: str, part: str, tag: int) -> object:
    try:
        if vr in _INTEGER:
            return int(part.strip())
        if vr in _FLOAT:
            return float(part.strip())
    except ValueError:
        raise ValueError(f"the value for {tag_name(tag)} (VR {vr}) is not a number") from None
    return part


def _check(vr: str, value: object, tag: int) -> None:
    if isinstance(value, str):
        control = _TEXT_CONTROL if vr in _ONE_VALUE else _CONTROL
        if control.search(value):
            raise ValueError(f"the value for {tag_name(tag)} (VR {vr}) holds control characters")
    try:
        validate_value(vr, value, config.RAISE)
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"the value does not fit {tag_name(tag)}'s VR {vr} (characters, length or range)") from None


def _check_charset(tag: int, text: str, ds: Dataset) -> None:
    """Text outside ASCII needs a SpecificCharacterSet with one encoding that holds it."""
    if text.isascii():
        return
    charset = ds.get("SpecificCharacterSet")
    names = [] if charset is None else ([charset] if isinstance(charset, str) else list(charset))
    encodings = convert_encodings(names) if names else []
    if len(encodings) == 1 and encodings[0] != "iso8859":
        try:
            text.encode(encodings[0])
            return
        except (UnicodeEncodeError, LookupError):
            pass
    shown = "\\".join(names) or "default repertoire"
    raise ValueError(
        f"the value for {tag_name(tag)} needs characters the data set's SpecificCharacterSet "
        f"({shown}) cannot hold"
    )
