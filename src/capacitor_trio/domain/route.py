"""The route filter (routings.yml): extra destinations, copies on disk, drops.

Every route that applies to an item (its AeTitles name the item's destination, or are absent,
and all its Conditions match) runs, in file order; within a route all actions run, and the
original item is removed after the last route when any action asked for it (`RemoveOriginal`,
OR-ed; `drop` always removes). The route decides; writing a `save_file` copy is the caller's
(`SaveFile`, done through the chain's effects port), so the decision stays testable.

`save_file` targets are templates: `#{g,e}` is the value of tag (g,e) (hex, leading zeros
optional), `#{g,e:MASK}` the value through a mask (`render_mask`). A tag that is absent gives
its keyword (`PatientName`; `gggg,eeee` for a tag pydicom does not know). A value's characters
that could leave the directory the template names (`/`, `\\`, NUL and other control
characters) become `_`, a value that is empty, `.` or `..` is `_`, and a value gives at most
its first 64 characters. A target ending in `/` is a
directory: the copy is named `<SOPInstanceUID>.dcm` in it.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import attrs
import pydicom
from pydicom.datadict import keyword_for_tag

from capacitor_trio.domain.conditions import Condition, matches_all, parse_tag, tag_text, value_text
from capacitor_trio.domain.filtering import Decision

SOP_INSTANCE_UID = 0x00080018
_PLACEHOLDER = re.compile(r"#\{([^}:]*)(?::([^}]*))?\}")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


class RouteActionType(enum.Enum):
    ADD_DESTINATION = "add_destination"
    SAVE_FILE = "save_file"
    DROP = "drop"


@attrs.frozen
class Placeholder:
    tag: int
    mask: str | None = None


@attrs.frozen
class Template:
    """A save_file Target: literal text and placeholders, in order."""

    text: str
    parts: tuple[str | Placeholder, ...]

    @property
    def is_directory(self) -> bool:
        return self.text.endswith("/")


def parse_template(text: str) -> Template:
    """ValueError for a placeholder that names no tag or a mask ending in a lone escape."""
    parts: list[str | Placeholder] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        try:
            tag = parse_tag(m[1])
        except ValueError:
            raise ValueError(f"placeholder {m[0]!r}: {m[1]!r} is not a tag (gggg,eeee in hex)") from None
        mask = m[2]
        if mask is not None and _ends_escaped(mask):
            raise ValueError(f"placeholder {m[0]!r}: the mask ends with an escape (`) that escapes nothing")
        parts.append(Placeholder(tag, mask))
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    if "#{" in "".join(p for p in parts if isinstance(p, str)):
        raise ValueError(f"{text!r}: a #{{ is not closed by }}")
    return Template(text, tuple(parts))


def _ends_escaped(mask: str) -> bool:
    escaped = False
    for m in mask:
        escaped = not escaped and m == "`"
    return escaped


def render_mask(value: str, mask: str) -> str:
    """`value` through `mask`: `A` the next character in upper case, `a` in lower case, `0` the
    next character if it is a digit (another one is skipped), `?` the next character as is, `!`
    skips one; `` ` `` writes the mask character after it, and any other mask character is
    written as is. Output stops when the value is used up (literals after it are not written)
    and the value's characters beyond the mask are dropped: `#{8,20:0000}` is the year."""
    out: list[str] = []
    chars = iter(value)
    escaped = False
    remaining = len(value)
    for m in mask:
        if escaped or m not in "Aa0?!`":
            if remaining == 0:
                break
            out.append(m)
            escaped = False
            continue
        if m == "`":
            escaped = True
            continue
        if remaining == 0:
            break
        c = next(chars)
        remaining -= 1
        if m == "A":
            out.append(c.upper())
        elif m == "a":
            out.append(c.lower())
        elif m == "0":
            out.append(c if c.isdigit() else "")
        elif m == "?":
            out.append(c)
    return "".join(out)


#: The most characters one value puts into a path (a UID's, an LO's length): a long text
#: value (LT, UT) must not make a file name longer than the file system allows.
VALUE_MAX = 64


def _safe(text: str) -> str:
    text = _UNSAFE.sub("_", text[:VALUE_MAX])
    return "_" if text in ("", ".", "..") else text


def _tag_name(tag: int) -> str:
    return keyword_for_tag(tag) or tag_text(tag)


def render(template: Template, ds: pydicom.Dataset) -> Path:
    """The path a save_file writes for `ds`."""
    out: list[str] = []
    for part in template.parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value = value_text(ds, part.tag)
        if value is None:
            out.append(_tag_name(part.tag))
        else:
            out.append(_safe(render_mask(value, part.mask) if part.mask is not None else value))
    if template.is_directory:
        uid = value_text(ds, SOP_INSTANCE_UID)
        out.append(_safe(uid) + ".dcm" if uid else "SOPInstanceUID.dcm")
    return Path("".join(out))


@attrs.frozen
class RouteAction:
    type: RouteActionType
    target: str = ""  # the AE title (add_destination) or the template's text (save_file)
    template: Template | None = None  # save_file's
    remove_original: bool = False
    log_level: int = logging.DEBUG
    description: str = ""

    @property
    def removes(self) -> bool:
        return self.remove_original or self.type is RouteActionType.DROP


@attrs.frozen
class Route:
    """One entry of routings.yml; `index` is its 0-based place in the file."""

    index: int
    description: str
    ae_titles: tuple[str, ...]
    conditions: tuple[Condition, ...]
    actions: tuple[RouteAction, ...]

    def applies_to(self, destination_ae: str) -> bool:
        return not self.ae_titles or destination_ae in self.ae_titles


@attrs.frozen
class SaveFile:
    path: Path


@attrs.frozen
class RouteResult:
    """What the route filter decided for one item."""

    matched: bool  # some route applied
    keep: bool
    add_destinations: tuple[str, ...] = ()
    saves: tuple[SaveFile, ...] = ()
    decisions: tuple[Decision, ...] = ()


def decide_routes(routes: Sequence[Route], ds: pydicom.Dataset, destination_ae: str, identity: str) -> RouteResult:
    """Every applicable route's actions, in file order. `identity` names the item in the
    decision log (UIDs and AE titles, no patient data)."""
    matched = False
    remove = False
    adds: list[str] = []
    saves: list[SaveFile] = []
    decisions: list[Decision] = []
    for route in routes:
        if not route.applies_to(destination_ae) or not matches_all(route.conditions, ds):
            continue
        matched = True
        name = _route_name(route)
        for action in route.actions:
            remove = remove or action.removes
            if action.type is RouteActionType.ADD_DESTINATION:
                if action.target not in adds and action.target != destination_ae:
                    adds.append(action.target)
                what = f"adds destination {action.target}"
            elif action.type is RouteActionType.SAVE_FILE:
                assert action.template is not None
                path = render(action.template, ds)
                saves.append(SaveFile(path))
                what = "saves a copy" if action.log_level == logging.INFO else f"saves a copy to {path}"
            else:
                what = "drops it"
            level = logging.INFO if action.type is RouteActionType.DROP else action.log_level
            extra = " (RemoveOriginal)" if action.remove_original else ""
            decisions.append(Decision(level, f"{name}: {what}{extra}: {identity}"))
    if remove:
        decisions.append(Decision(logging.INFO, f"route: original removed: {identity}"))
    return RouteResult(matched, not remove, tuple(adds), tuple(saves), tuple(decisions))


def _route_name(route: Route) -> str:
    described = f" ({route.description})" if route.description else ""
    return f"route {route.index + 1}{described}"
