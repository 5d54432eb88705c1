"""Value checkers for config.yml and nodes.yml: (raw value) -> Python value, or ValueError with
the reason shown to the operator; and YAML numbers that remember how they were written (so that a
string-typed key such as an AE title gets the text, `012345` and not 5349).
"""

from __future__ import annotations

import math
import re
import zoneinfo
from collections.abc import Callable
from typing import Any

import yaml

from capacitor_trio.config.models import TRANSFER_SYNTAX_NAMES
from capacitor_trio.domain.schedule import ScheduleError, parse_schedule

# ---------------------------------------------------------------------------------------------
# YAML numbers that remember how they were written


class _YamlInt(int):
    """An int read from a YAML file, with its text: a string-typed key (an AE title, a secret)
    takes the text (`012345` stays `012345`, not YAML 1.1's octal 5349), a whole-number key a
    plain run of digits as decimal."""

    text: str


class _YamlFloat(float):
    text: str


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, except that numbers keep their text (see `_YamlInt`)."""


def _add_number(tag: str, cls: type[_YamlInt] | type[_YamlFloat]) -> None:
    construct = _Loader.yaml_constructors[tag]

    def build(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        value = cls(construct(loader, node))
        value.text = str(node.value)
        return value

    _Loader.add_constructor(tag, build)


_add_number("tag:yaml.org,2002:int", _YamlInt)
_add_number("tag:yaml.org,2002:float", _YamlFloat)


def _as_written(v: Any) -> Any:
    """A YAML number's text, anything else as it is."""
    return v.text if isinstance(v, _YamlInt | _YamlFloat) else v


# ---------------------------------------------------------------------------------------------
# value checkers: (raw value) -> python value, or raise ValueError(reason)


def _int(lo: int | None = 0, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be a whole number")
        text = _as_written(v)
        v = int(text) if isinstance(text, str) and re.fullmatch(r"[+-]?[0-9]+", text) else int(v)
        if lo is not None and v < lo:
            raise ValueError(f"must be at least {lo}" if hi is None else f"must be {lo}..{hi}")
        if hi is not None and v > hi:
            raise ValueError(f"must be {lo}..{hi}")
        return v

    return check


def _float(lo: float = 0.0) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError("must be a number")
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        if v < lo:
            raise ValueError(f"must be at least {lo:g}")
        return float(v)

    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


#: The filters `filters:` may name that capacitor-trio runs, and those it refuses (Capacitor's
#: other filters): a chain naming one of those would send instances unfiltered.
SUPPORTED_FILTERS = ("route", "mutate", "sort")
UNSUPPORTED_FILTERS = (
    "lua", "siemens_cto_converter", "hologic_sco_converter", "siemens_breast_density", "siemens_bonsai",
    "siemens_scorecard", "siemens_histogram", "siemens_positioner_angle", "siemens_distance_source_to_patient",
)


def check_filter_names(v: Any) -> tuple[str, ...]:
    """`filters`: a comma-separated string (Capacitor's form; a YAML list is read too) of
    supported filter names, each at most once, order kept."""
    items = v if isinstance(v, list) else str(_as_written(v)).split(",")
    names = [str(_as_written(item)).strip() for item in items]
    names = [name for name in names if name]
    for name in names:
        if name in UNSUPPORTED_FILTERS:
            raise ValueError(
                f"the {name} filter is not supported yet (instances would be sent unfiltered); "
                f"capacitor-trio runs {', '.join(SUPPORTED_FILTERS)}"
            )
        if name not in SUPPORTED_FILTERS:
            raise ValueError(f"{name!r} is not a filter; the filters are {', '.join(SUPPORTED_FILTERS)}")
        if names.count(name) > 1:
            raise ValueError(f"{name} is named twice")
    return tuple(names)


def _str(v: Any) -> str:
    v = _as_written(v)
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ValueError("must be a string")
    return str(v)


def check_ae_title(v: Any) -> str:
    v = _as_written(v)
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise ValueError("must be a string")
    title = v.strip(" ")  # spaces only: DICOM pads with them; any other control character is refused
    if not title:
        raise ValueError("an AE title cannot be empty")
    if len(title) > 16:
        raise ValueError("an AE title has at most 16 characters")
    if "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
        raise ValueError("an AE title may not contain backslashes or control characters")
    return title


def _ae_prefix(v: Any) -> str:
    """aeTitlePrefix: blank (no prefixed titles), or what can start an AE title."""
    prefix = _str(v)
    if not prefix.strip(" "):
        return ""
    if prefix.startswith(" "):
        raise ValueError("an AE title prefix cannot start with a space")
    return check_ae_title(prefix + "X")[:-1]  # room for at least one character of the title


def _host(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a host name or IP address")
    host = v.strip()
    if not host:
        raise ValueError("a host name cannot be empty")
    if len(host) > 253 or any(c.isspace() or not c.isprintable() for c in host):
        raise ValueError("must be a host name or IP address (no spaces or control characters)")
    return host


def _port(v: Any) -> int:
    return _int(1, 65535)(v)


def _port_or_off(v: Any) -> int:
    return _int(0, 65535)(v)


def _list(item: Callable[[Any], Any]) -> Callable[[Any], tuple[Any, ...]]:
    def check(v: Any) -> tuple[Any, ...]:
        if isinstance(v, str):  # from the environment or the command line: comma separated
            v = [part.strip() for part in v.split(",") if part.strip()]
        if not isinstance(v, list):
            raise ValueError("must be a list")
        return tuple(item(x) for x in v)

    return check


def check_schedule(v: Any) -> tuple[str, ...]:
    entries = _list(_str)(v)
    try:
        parse_schedule(entries)
    except ScheduleError as e:
        raise ValueError(str(e)) from None
    return entries


def _transfer_syntax(v: Any) -> str:
    name = _str(v).strip()
    if name and name not in TRANSFER_SYNTAX_NAMES and name not in TRANSFER_SYNTAX_NAMES.values():
        raise ValueError("unknown transfer syntax; use one of " + ", ".join(TRANSFER_SYNTAX_NAMES))
    return name


def _time_zone(v: Any) -> str:
    name = _str(v).strip()
    if name:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown IANA time zone") from None
    return name


def _uid(v: Any) -> str:
    uid = _str(v).strip()
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64:
        raise ValueError("must be a UID (digits and dots, at most 64 characters)")
    return uid


def _sop_class_priority(v: Any) -> str:
    text = _str(v).strip()
    return "default" if text.lower() == "default" else _uid(text)
