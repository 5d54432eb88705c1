"""An add_or_update action's `Destination.Value`: text with capture-group references and tokens.

Read once when the filter file is loaded (`parse_template`), expanded for each instance
(`expand`). The rules (docs/behaviour.md, "Mutate"):

- `$n` is capture group n, one digit only: `$18` is group 1 then the text "8" (Capacitor's
  documented reading); `${n}` names any group (`${12}`, or `${1}8` = `$18`); `$0` is the whole
  match; `$$` is one `$`. A `$` followed by anything else is text. Without a Source there are no
  groups and every `$` is text.
- `:uid:` a new UID, `:timestamp:` Unix time in milliseconds, `:today:` the date as YYYYMMDD,
  `:value:` the destination attribute's current value, `:hash(gggg,eeee,N):` the first N
  characters of a hash of that attribute's value (see `hash_text`). Any other `:word:` is text.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Sequence

import attrs

HASH_MAX_LENGTH = 52  # base32 characters in a SHA-256 digest


@attrs.frozen
class Text:
    text: str


@attrs.frozen
class Group:
    index: int


@attrs.frozen
class Token:
    name: str  # "uid", "timestamp", "today" or "value"


@attrs.frozen
class Hash:
    tag: int
    length: int


Part = Text | Group | Token | Hash


@attrs.frozen
class ValueTemplate:
    """`text` as written in the file; `parts` its pieces in order."""

    text: str
    parts: tuple[Part, ...]

    @property
    def max_group(self) -> int:
        """The highest capture group it refers to, -1 for none."""
        return max((p.index for p in self.parts if isinstance(p, Group)), default=-1)


_PIECE = re.compile(
    r"\$\$|\$\{(?P<braced>\d+)\}|\$(?P<digit>\d)"
    r"|:(?P<token>uid|timestamp|today|value):|:hash\((?P<hash>[^)]*)\):"
)
_TOKENS_ONLY = re.compile(r":(?P<token>uid|timestamp|today|value):|:hash\((?P<hash>[^)]*)\):")
_HASH_ARGS = re.compile(
    r"\s*(?P<group>[0-9a-fA-F]{1,4})\s*,\s*(?P<element>[0-9a-fA-F]{1,4})\s*,\s*(?P<n>\d+)\s*"
)


def parse_template(text: str, *, references: bool) -> ValueTemplate:
    """Read a Value; `references` says whether `$` refers to capture groups (a Source is
    given). Raises ValueError with the reason for a malformed `:hash(...):`."""
    pattern = _PIECE if references else _TOKENS_ONLY
    parts: list[Part] = []
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            parts.append(Text(text[pos : m.start()]))
        parts.append(_piece(m))
        pos = m.end()
    if pos < len(text):
        parts.append(Text(text[pos:]))
    return ValueTemplate(text, tuple(_merge_text(parts)))


def _piece(m: re.Match[str]) -> Part:
    groups = m.groupdict()
    if groups.get("braced") is not None:
        return Group(int(groups["braced"]))
    if groups.get("digit") is not None:
        return Group(int(groups["digit"]))
    if groups.get("token") is not None:
        return Token(groups["token"])
    if groups.get("hash") is not None:
        return _hash(groups["hash"])
    return Text("$")  # `$$`


def _hash(args: str) -> Hash:
    m = _HASH_ARGS.fullmatch(args)
    if m is None:
        raise ValueError(f":hash({args}): must be :hash(gggg,eeee,N): (a tag in hex and a length)")
    length = int(m["n"])
    if not 1 <= length <= HASH_MAX_LENGTH:
        raise ValueError(f":hash({args}): the length must be 1 to {HASH_MAX_LENGTH}")
    return Hash((int(m["group"], 16) << 16) | int(m["element"], 16), length)


def _merge_text(parts: list[Part]) -> list[Part]:
    merged: list[Part] = []
    for part in parts:
        if isinstance(part, Text) and merged and isinstance(merged[-1], Text):
            merged[-1] = Text(merged[-1].text + part.text)
        else:
            merged.append(part)
    return merged


def expand(
    template: ValueTemplate, groups: Sequence[str], token: Callable[[Token | Hash], str]
) -> str:
    """The value: text as is, `groups[i]` for group i ('' for a group that did not take part),
    `token(part)` for tokens and hashes (it may raise ValueError: the action's error)."""
    out: list[str] = []
    for part in template.parts:
        if isinstance(part, Text):
            out.append(part.text)
        elif isinstance(part, Group):
            out.append(groups[part.index] if part.index < len(groups) else "")
        else:
            out.append(token(part))
    return "".join(out)


def hash_text(value: str, length: int) -> str:
    """`:hash(...):`: SHA-256 of the value's UTF-8 bytes, in RFC 4648 base32 (A-Z, 2-7: fits
    CS, SH, LO, PN), first `length` characters. Stable across versions and machines; it is not
    a pseudonym (anyone can hash a guessed value: use anonymize for that)."""
    digest = hashlib.sha256(value.encode("utf-8")).digest()
    return base64.b32encode(digest).decode("ascii")[:length]
