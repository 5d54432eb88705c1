"""Capacitor's condition language (§5 of the reference): the one implementation route, mutate,
sort (and later Lua entries and prefetch rules) decide with.

A `Condition` names a tag and, usually, a pattern; a list of them is AND-ed (`matches_all`, a
pure function of the conditions and the data set). Patterns are classified and compiled once,
when the filter file is loaded (`compile_pattern`); a pattern Python cannot run with the meaning
.NET gives it is refused then, with a message saying why.

Decisions where Capacitor's documentation is silent (docs/behaviour.md lists them):
- Matching is case-sensitive; `(?i)` at the start of a regex makes it insensitive.
- A regex is searched for (matches anywhere unless anchored with `^`/`$`), as .NET's IsMatch
  does; a wildcard and a literal match the whole value.
- An absent attribute matches no pattern (`^.*$` means "present"). A condition with no
  MatchExpression matches when the attribute is present. An empty value is the empty string.
- A multi-valued attribute matches when its whole `\\`-joined text matches or any one value does.
- Values are read as text: strings as stored without padding; numbers in decimal (a float that
  is a whole number without `.0`); dates and times as stored (`20240131`); an AT value as
  `gggg,eeee`; UN bytes decoded as Latin-1 without trailing NUL or spaces; sequences and other
  binary values (OB, OW, OF, ...) as the empty string.
- `A.B` (dots with other characters, no special character) is a wildcard without wildcards:
  it matches `A.B` exactly.
"""

from __future__ import annotations

import enum
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import pydicom
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import DSfloat

FILE_META_GROUP = 0x0002
_TAG_TEXT = re.compile(r"\s*\(?\s*([0-9A-Fa-f]{1,4})\s*,\s*([0-9A-Fa-f]{1,4})\s*\)?\s*")
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ"})


def parse_tag(text: str) -> int:
    """`gggg,eeee` in hex, leading zeros optional (`8,60`, `0008,0060`, `(0008,0060)`) -> the
    tag as an int; ValueError otherwise."""
    m = _TAG_TEXT.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a tag: expected gggg,eeee in hex, e.g. 0008,0060 or 8,60")
    return (int(m[1], 16) << 16) | int(m[2], 16)


def tag_text(tag: int) -> str:
    return f"{tag >> 16:04X},{tag & 0xFFFF:04X}"


class PatternKind(enum.Enum):
    LITERAL = "literal"
    NUMBER = "number"  # digits and dots: exact match
    REGEX = "regex"
    WILDCARD = "wildcard"


_REGEX_MARKS = frozenset("[](){}|+\\")
_NUMBER = re.compile(r"[0-9.]+")
# .NET regex constructs Python's `re` reads differently or not at all: refused at load.
_DOTNET_ONLY = (
    (re.compile(r"-\["), "character class subtraction ([a-z-[aeiou]]) is .NET only"),
    (re.compile(r"\\[pP]\{"), "Unicode categories (\\p{...}) are not supported"),
    (re.compile(r"\(\?<[A-Za-z_]"), "write named groups as (?P<name>...)"),
    (re.compile(r"\(\?'"), "write named groups as (?P<name>...)"),
    (re.compile(r"\\k<"), "write named backreferences as (?P=name)"),
    (re.compile(r"\\[GZz]"), "\\G, \\Z and \\z anchors differ between .NET and Python; use $"),
)


@attrs.frozen
class Pattern:
    """A MatchExpression, classified (§5: literal -> dotted number -> regex -> wildcard) and
    compiled. `regex` is what runs: searched for a REGEX, matched whole otherwise."""

    text: str
    kind: PatternKind
    regex: re.Pattern[str] = attrs.field(eq=False, repr=False)

    def matches(self, value: str) -> bool:
        if self.kind is PatternKind.REGEX:
            return self.regex.search(value) is not None
        if self.kind is PatternKind.WILDCARD:
            return self.regex.fullmatch(value) is not None
        return value == self.text  # literal, dotted number


def classify(text: str) -> PatternKind:
    if not any(c in text for c in "^[](){}|+\\*?."):
        return PatternKind.LITERAL
    if _NUMBER.fullmatch(text):
        return PatternKind.NUMBER
    if text.startswith("^") or any(c in _REGEX_MARKS for c in text):
        return PatternKind.REGEX
    return PatternKind.WILDCARD


def compile_pattern(text: str) -> Pattern:
    """Classify and compile a MatchExpression; ValueError (one line) for a regex Python cannot
    run as .NET would."""
    kind = classify(text)
    if kind is PatternKind.REGEX:
        return Pattern(text, kind, compile_regex(text))
    if kind is PatternKind.WILDCARD:
        body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text)
        return Pattern(text, kind, re.compile(body, re.DOTALL))
    return Pattern(text, kind, re.compile(re.escape(text)))


def compile_regex(text: str) -> re.Pattern[str]:
    """A regular expression from a filter file, compiled; ValueError (one line) for one Python
    would run with another meaning than .NET (Capacitor's dialect) or cannot compile. Every
    regex a filter file holds should come through here."""
    for mark, why in _DOTNET_ONLY:
        if mark.search(text):
            raise ValueError(f"regular expression {text!r}: {why}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. FutureWarning for a nested set "[[...]"
            return re.compile(text)
    except (re.error, FutureWarning, DeprecationWarning) as e:
        raise ValueError(f"regular expression {text!r} is not valid here: {e}") from None


@attrs.frozen
class Condition:
    """One condition: the attribute `tag` (a file-meta tag when its group is 0002; with
    `private_creator`, the element of that creator's block whose low byte is the tag's) matches
    `pattern` (None: is present). `search`: anywhere in the data set, sequences included.
    `sequence_items`: `tag` is a sequence one of whose items matches all of them."""

    tag: int
    pattern: Pattern | None = None
    search: bool = False
    sequence_items: tuple[Condition, ...] = ()
    private_creator: str | None = None
    log_level: int = logging.INFO

    def __attrs_post_init__(self) -> None:
        if self.search and self.sequence_items:
            raise ValueError("Search and SequenceItems cannot be combined")
        if self.sequence_items and self.pattern is not None:
            raise ValueError("MatchExpression and SequenceItems cannot be combined")
        if self.private_creator is not None and not (self.tag >> 16) & 1:
            raise ValueError(f"PrivateTagCreator needs a private (odd) group, not {tag_text(self.tag)}")
        if self.tag >> 16 == FILE_META_GROUP and (self.search or self.sequence_items):
            raise ValueError("a file-meta tag (0002,xxxx) cannot be searched for or have SequenceItems")


def matches_all(conditions: Sequence[Condition], ds: pydicom.Dataset) -> bool:
    """True when every condition matches `ds` (an empty list matches everything)."""
    return all(matches(c, ds) for c in conditions)


def matches(condition: Condition, ds: pydicom.Dataset) -> bool:
    if condition.search:
        return any(_element_matches(condition, e) for e in _occurrences(condition, ds))
    elem = _find(condition, ds)
    return elem is not None and _element_matches(condition, elem)


def _element_matches(condition: Condition, elem: DataElement) -> bool:
    if condition.sequence_items:
        if elem.VR != "SQ" or not elem.value:
            return False
        return any(matches_all(condition.sequence_items, item) for item in elem.value)
    pattern = condition.pattern
    if pattern is None:
        return True
    return any(pattern.matches(text) for text in element_texts(elem))


def _find(condition: Condition, ds: pydicom.Dataset) -> DataElement | None:
    tag = condition.tag
    if tag >> 16 == FILE_META_GROUP:
        meta = getattr(ds, "file_meta", None)
        return meta.get(tag) if meta is not None else None
    if condition.private_creator is not None:
        resolved = private_tag(ds, tag, condition.private_creator)
        if resolved is None:
            return None
        tag = resolved
    return ds.get(tag)


def private_tag(ds: pydicom.Dataset, tag: int, creator: str) -> int | None:
    """The tag of element `tag & 0xFF` in the block `creator` reserved in `tag`'s group, or None
    when no block of that group belongs to `creator` (compared without trailing spaces)."""
    group = tag >> 16
    wanted = creator.rstrip(" ")
    for block in range(0x10, 0x100):
        elem = ds.get((group << 16) | block)
        if elem is not None and isinstance(elem.value, str) and elem.value.rstrip(" ") == wanted:
            return (group << 16) | (block << 8) | (tag & 0xFF)
    return None


#: How deep `Search` looks into nested sequences: real data sets nest a few levels; a hostile
#: one nesting thousands must not exhaust the stack (deeper occurrences are not seen).
SEARCH_DEPTH = 64


def _occurrences(condition: Condition, ds: pydicom.Dataset, depth: int = 0) -> Iterator[DataElement]:
    """The element in `ds` and in every item of its sequences, top level first, down to
    SEARCH_DEPTH sequence levels."""
    elem = _find(condition, ds)
    if elem is not None:
        yield elem
    if depth >= SEARCH_DEPTH:
        return
    for child in ds:
        if child.VR == "SQ" and child.value:
            for item in child.value:
                yield from _occurrences(condition, item, depth + 1)


def element_texts(elem: DataElement) -> list[str]:
    """The texts a pattern is tried on: each value, and the whole `\\`-joined value when there
    are several."""
    value = elem.value
    if type(value) is str:  # the common case: one text value
        return [value]
    if elem.VR in _BINARY_VRS or value is None:
        return [""]
    if isinstance(value, MultiValue | list | tuple):
        texts = [_one_text(v, elem.VR) for v in value]
        if len(texts) > 1:
            texts.append("\\".join(texts))
        return texts or [""]
    return [_one_text(value, elem.VR)]


def _one_text(value: Any, vr: str) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\x00 ") if vr == "UN" else ""
    if isinstance(value, BaseTag):
        return tag_text(int(value))
    if isinstance(value, float) and not isinstance(value, DSfloat):
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    if value is None:
        return ""
    return str(value)


def value_text(ds: pydicom.Dataset, tag: int) -> str | None:
    """The attribute's whole value as text (several values `\\`-joined), None when absent."""
    if tag >> 16 == FILE_META_GROUP:
        meta = getattr(ds, "file_meta", None)
        elem = meta.get(tag) if meta is not None else None
    else:
        elem = ds.get(tag)
    if elem is None:
        return None
    return element_texts(elem)[-1]
