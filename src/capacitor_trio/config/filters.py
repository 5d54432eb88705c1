"""The filter files (routings.yml, mutations.yml, sortings.yml) read into the chain config.yml's
`filters` names (domain/filters.py's `FilterChain`).

`load_filters(data_dir, names)` reads the file of each filter the chain names, from the data
directory (`--path`): a missing file turns that filter off (`FilterChain.off`, one warning at
start-up); a file that does not read (YAML, or an entry with an invalid key) raises ConfigError,
one line naming the file, the entry (its number from 1 and its Description) and the key inside
it, e.g. `/data/routings.yml: entry 2 (scouts): Actions[0].Type = 'copy': ...`. Unknown keys
are errors: a typo must not silently leave an instance unfiltered.

Scalars in these files are read as written: `MatchExpression: NO` is the text `NO` (not YAML
1.1's false), `2024-01-31` text (not a date), `0123` text (numbers keep their text).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from capacitor_trio.config.filter_errors import FilterEntryError
from capacitor_trio.config.keys import FILTER_FILES
from capacitor_trio.config.load import _MISSING, ConfigError, parse_yaml
from capacitor_trio.config.models import Config
from capacitor_trio.config.mutations import parse_actions
from capacitor_trio.config.values import _Loader, _YamlFloat, _YamlInt, check_ae_title
from capacitor_trio.domain.conditions import Condition, compile_pattern, parse_tag
from capacitor_trio.domain.filters import (
    STORAGE,
    Filter,
    FilterChain,
    MutateFilter,
    Mutation,
    RouteFilter,
    SortFilter,
)
from capacitor_trio.domain.mutate import ExcludeResult, MutationAction, Query
from capacitor_trio.domain.route import Route, RouteAction, RouteActionType, parse_template
from capacitor_trio.domain.sort import SortDirection, SortEntry, SortRule, SortType

FILE_OF = {name: file for file, name in FILTER_FILES.items()}
AFFECTS = ("storage", "worklist_query", "worklist_result", "qr_find_query", "qr_find_result")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}
E = TypeVar("E")


class _FilterLoader(_Loader):
    """The config loader without YAML 1.1's booleans and timestamps: such scalars stay text."""


_FilterLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}


def load_filters(data_dir: Path, names: Sequence[str], *, drop_unfiltered: bool = False) -> FilterChain:
    """The chain `names` (config.yml's `filters`, checked) with its files read from `data_dir`."""
    filters: list[Filter] = []
    off: list[str] = []
    for name in names:
        path = data_dir / FILE_OF[name]
        raw = _read(path)
        if raw is _MISSING:
            off.append(name)
            continue
        filters.append(_LOADERS[name](path, raw))
    return FilterChain(tuple(names), tuple(filters), tuple(off), drop_unfiltered)


def load_chain(config: Config, storage_aes: frozenset[str], warnings: list[str] | None = None) -> FilterChain:
    """The chain `config` names, read from its data directory and checked: against the Storage
    nodes `storage_aes` (add_destination targets) and dropUnfilteredInstances (which needs a
    filter on, or it would drop everything). Start-up and a reload of the filters use this.
    The lines to log (filters off, files not used) are added to `warnings`."""
    chain = load_filters(config.data_dir, config.filters, drop_unfiltered=config.drop_unfiltered_instances)
    if config.drop_unfiltered_instances and not chain.filters:
        raise ConfigError(
            str(config.data_dir / "config.yml"), "dropUnfilteredInstances", True,
            "would drop every instance: no filter is on (`filters` names none, or their files are missing)",
        )
    check_targets(chain, storage_aes)
    if warnings is not None:
        warnings.extend(chain_warnings(config.data_dir, chain))
        warnings.extend(unknown_ae_titles(chain, storage_aes))
    return chain


def unknown_ae_titles(chain: FilterChain, storage_aes: frozenset[str]) -> list[str]:
    """One line per entry whose AeTitles name a title no Storage node has (a typo there makes
    the entry apply to nothing, silently)."""
    lines = []
    for step in chain.filters:
        for entry in step.entries:
            unknown = [t for t in entry.ae_titles if t not in storage_aes]
            if unknown:
                lines.append(
                    f"{_where(step.file, entry.index, entry.description)}: AeTitles names {', '.join(unknown)}, "
                    "which no Storage node of nodes.yml has: the entry does not apply to it"
                )
    return lines


def _where(file: Path, index: int, description: str) -> str:
    return f"{file}: entry {index + 1}" + (f" ({_short(description)})" if description else "")


def chain_warnings(data_dir: Path, chain: FilterChain) -> list[str]:
    """One line per filter that is off and per filter file the chain does not use."""
    lines = [
        f"filters: {name} is in the chain but {data_dir / FILE_OF[name]} does not exist: the {name} filter is off"
        for name in chain.off
    ]
    for file_name, name in FILTER_FILES.items():
        if name not in chain.names and (data_dir / file_name).exists():
            lines.append(f"{data_dir / file_name}: not used: `filters` in config.yml does not name {name}")
    return lines


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _MISSING
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), "file", _MISSING, f"cannot be read: {getattr(e, 'strerror', None) or e}") from None
    raw = parse_yaml(text, str(path), _FilterLoader)
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(str(path), "file", _MISSING, "must be a YAML list of entries")
    return raw


def _entries(path: Path, raw: list[Any], parse: Callable[[int, Mapping[str, Any]], E]) -> tuple[E, ...]:
    out = []
    for index, entry in enumerate(raw):
        description = entry.get("Description") if isinstance(entry, Mapping) else None
        where = f"{path}: entry {index + 1}" + (f" ({_short(description)})" if isinstance(description, str) else "")
        try:
            if not isinstance(entry, Mapping):
                raise FilterEntryError("entry", "must be a mapping (Description, Conditions, Actions, ...)")
            out.append(parse(index, entry))
        except FilterEntryError as e:
            raise ConfigError(where, e.key, _MISSING, e.message) from None
    return tuple(out)


def _short(text: str) -> str:
    text = re.sub(r"[\x00-\x1f\x7f]", " ", text)
    return text if len(text) <= 60 else text[:57] + "..."


def check_targets(chain: FilterChain, storage_aes: frozenset[str]) -> None:
    """ConfigError when an add_destination names no Storage node (its copies could go nowhere)."""
    for step in chain.filters:
        if not isinstance(step, RouteFilter):
            continue
        for route in step.entries:
            for i, action in enumerate(route.actions):
                if action.type is RouteActionType.ADD_DESTINATION and action.target not in storage_aes:
                    raise ConfigError(
                        _where(step.file, route.index, route.description), f"Actions[{i}].Target", action.target,
                        "names no Storage node in nodes.yml (add_destination queues a copy for a Storage node)",
                    )


# ---------------------------------------------------------------------------------------------
# entries


def _entry_header(raw: Mapping[str, Any]) -> tuple[str, tuple[str, ...], tuple[Condition, ...]]:
    """Description, AeTitles and Conditions: read alike in every filter file's entries."""
    return _description(raw, "Description"), _ae_titles(raw), conditions(raw.get("Conditions"), "Conditions")


def _route_filter(path: Path, raw: list[Any]) -> RouteFilter:
    return RouteFilter(path, _entries(path, raw, functools.partial(_route, path.parent)))


def _route(data_dir: Path, index: int, raw: Mapping[str, Any]) -> Route:
    _known(raw, ("Description", "AeTitles", "Conditions", "Actions"), "")
    actions = _list(raw, "Actions", required=True)
    return Route(
        index,
        *_entry_header(raw),
        tuple(_route_action(a, f"Actions[{i}]", data_dir) for i, a in enumerate(actions)),
    )


def _route_action(raw: Any, key: str, data_dir: Path) -> RouteAction:
    """A save_file Target that is not an absolute path is in the data directory."""
    if not isinstance(raw, Mapping):
        raise FilterEntryError(key, "must be a mapping (Type, Target, RemoveOriginal, Log, Description)")
    _known(raw, ("Type", "Target", "RemoveOriginal", "Log", "Description"), key + ".")
    kinds = {t.value: t for t in RouteActionType}
    kind_text = _as_text(raw.get("Type", "add_destination"))
    if kind_text not in kinds:
        raise FilterEntryError(f"{key}.Type", f"{kind_text!r} is not one of {', '.join(kinds)}")
    kind = kinds[kind_text]
    remove = _flag(raw.get("RemoveOriginal", False), f"{key}.RemoveOriginal")
    log = _log(raw.get("Log"), f"{key}.Log", default=logging.DEBUG)
    description = _description(raw, "Description", key + ".")
    if kind is RouteActionType.DROP:
        return RouteAction(kind, remove_original=remove, log_level=logging.INFO, description=description)
    target = _as_text(raw.get("Target"))
    if not isinstance(target, str) or not target.strip():
        raise FilterEntryError(f"{key}.Target", f"{kind.value} needs a Target ({'an AE title' if kind is RouteActionType.ADD_DESTINATION else 'a path'})")
    if kind is RouteActionType.ADD_DESTINATION:
        try:
            target = check_ae_title(target)
        except ValueError as e:
            raise FilterEntryError(f"{key}.Target", str(e)) from None
        return RouteAction(kind, target, None, remove, log, description)
    if not target.startswith("/"):
        target = f"{data_dir}/{target}"
    try:
        template = parse_template(target)
    except ValueError as e:
        raise FilterEntryError(f"{key}.Target", str(e)) from None
    return RouteAction(kind, target, template, remove, log, description)


def _mutate_filter(path: Path, raw: list[Any]) -> MutateFilter:
    return MutateFilter(path, _entries(path, raw, _mutation))


def _mutation(index: int, raw: Mapping[str, Any]) -> Mutation:
    _known(raw, ("Description", "AeTitles", "Conditions", "Actions", "Affects"), "")
    affects = tuple(_as_text(a) for a in _list(raw, "Affects") or ["storage"])
    for i, value in enumerate(affects):
        if value not in AFFECTS:
            raise FilterEntryError(f"Affects[{i}]", f"{value!r} is not one of {', '.join(AFFECTS)}")
    if "Actions" not in raw:
        raise FilterEntryError("Actions", "is required: a list of one or more actions")
    actions = parse_actions(raw["Actions"])
    _check_phases(affects, actions)
    return Mutation(
        index,
        *_entry_header(raw),
        affects,
        actions,
    )


def _check_phases(affects: tuple[str, ...], actions: tuple[MutationAction, ...]) -> None:
    """Actions the entry's phases cannot run are refused here rather than when an instance
    comes: a worklist lookup (no worklist proxy yet; never in a query phase, as in Capacitor),
    exclude_result outside a result phase."""
    for i, action in enumerate(actions):
        if isinstance(action, Query) and STORAGE in affects:
            raise FilterEntryError(f"Actions[{i}].Type", "query (a worklist lookup) is not supported yet in the storage phase")
        if isinstance(action, Query):
            raise FilterEntryError(f"Actions[{i}].Type", "query is not allowed in a mutation of the query phases")
        if isinstance(action, ExcludeResult) and not set(affects) & {"worklist_result", "qr_find_result"}:
            raise FilterEntryError(f"Actions[{i}].Type", "exclude_result applies to query results only (Affects: worklist_result or qr_find_result)")


def _sort_filter(path: Path, raw: list[Any]) -> SortFilter:
    return SortFilter(path, _entries(path, raw, _sort_entry))


def _sort_entry(index: int, raw: Mapping[str, Any]) -> SortEntry:
    _known(raw, ("Description", "AeTitles", "Conditions", "Actions"), "")
    actions = _list(raw, "Actions", required=True)
    return SortEntry(
        index,
        *_entry_header(raw),
        tuple(_sort_action(a, f"Actions[{i}]") for i, a in enumerate(actions)),
    )


def _sort_action(raw: Any, key: str) -> SortRule:
    if not isinstance(raw, Mapping):
        raise FilterEntryError(key, "must be a mapping (SortTag, SortType, SortDirection)")
    _known(raw, ("Type", "SortTag", "SortType", "SortDirection", "Description"), key + ".")
    if _as_text(raw.get("Type", "sort")) != "sort":
        raise FilterEntryError(f"{key}.Type", f"{_as_text(raw.get('Type'))!r}: the only sort action is sort")
    tag = _tag(raw.get("SortTag"), f"{key}.SortTag")
    kind = _choice(raw, "SortType", SortType, key)
    direction = _choice(raw, "SortDirection", SortDirection, key)
    return SortRule(tag, kind, direction, _description(raw, "Description", key + "."))


_LOADERS: dict[str, Callable[[Path, list[Any]], Filter]] = {
    "route": _route_filter,
    "mutate": _mutate_filter,
    "sort": _sort_filter,
}


# ---------------------------------------------------------------------------------------------
# conditions (§5), shared by every filter


def conditions(raw: Any, key: str) -> tuple[Condition, ...]:
    """A Conditions list (None: no condition); FilterEntryError naming `key[i].Field`."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise FilterEntryError(key, "must be a list of conditions (Tag, MatchExpression, ...)")
    return tuple(_condition(c, f"{key}[{i}]") for i, c in enumerate(raw))


_CONDITION_KEYS = ("Tag", "MatchTag", "MatchExpression", "Expression", "Search", "SequenceItems", "PrivateTagCreator", "Log")


def _condition(raw: Any, key: str) -> Condition:
    if not isinstance(raw, Mapping):
        raise FilterEntryError(key, "must be a mapping (Tag, MatchExpression, ...)")
    _known(raw, _CONDITION_KEYS, key + ".")
    tag_key = _one_of(raw, "Tag", "MatchTag", key)
    if tag_key is None:
        raise FilterEntryError(f"{key}.Tag", "is required (gggg,eeee in hex, e.g. 0008,0060)")
    tag = _tag(raw[tag_key], f"{key}.{tag_key}")
    pattern_key = _one_of(raw, "MatchExpression", "Expression", key)
    pattern = None
    if pattern_key is not None and raw[pattern_key] is not None:
        text = _as_text(raw[pattern_key])
        if not isinstance(text, str):
            raise FilterEntryError(f"{key}.{pattern_key}", "must be a text pattern")
        try:
            pattern = compile_pattern(text)
        except ValueError as e:
            raise FilterEntryError(f"{key}.{pattern_key}", str(e)) from None
    creator = raw.get("PrivateTagCreator")
    if creator is not None and not isinstance(_as_text(creator), str):
        raise FilterEntryError(f"{key}.PrivateTagCreator", "must be text (the private creator's name)")
    items = conditions(raw.get("SequenceItems"), f"{key}.SequenceItems")
    if "SequenceItems" in raw and not items:
        raise FilterEntryError(f"{key}.SequenceItems", "must list at least one condition")
    try:
        return Condition(
            tag,
            pattern,
            _flag(raw.get("Search", False), f"{key}.Search"),
            items,
            None if creator is None else _as_text(creator),
            _log(raw.get("Log"), f"{key}.Log", default=logging.INFO, lenient=True),
        )
    except ValueError as e:
        raise FilterEntryError(key, str(e)) from None


# ---------------------------------------------------------------------------------------------
# values


def _as_text(v: Any) -> Any:
    return v.text if isinstance(v, _YamlInt | _YamlFloat) else v


def _known(raw: Mapping[Any, Any], keys: Sequence[str], prefix: str) -> None:
    unknown = sorted(str(k) for k in raw if k not in keys)
    if unknown:
        raise FilterEntryError(f"{prefix}{unknown[0]}", f"unknown key; the keys here are {', '.join(keys)}")


def _one_of(raw: Mapping[str, Any], name: str, legacy: str, key: str) -> str | None:
    if name in raw and legacy in raw:
        raise FilterEntryError(f"{key}.{legacy}", f"{legacy} is the old name of {name}: give one of them")
    return name if name in raw else legacy if legacy in raw else None


def _tag(raw: Any, key: str) -> int:
    text = _as_text(raw)
    if not isinstance(text, str):
        raise FilterEntryError(key, "must be a tag, gggg,eeee in hex (e.g. 0008,0060 or 8,60)")
    try:
        return parse_tag(text)
    except ValueError as e:
        raise FilterEntryError(key, str(e)) from None


def _flag(raw: Any, key: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[raw.strip().lower()]
    raise FilterEntryError(key, "must be true or false")


def _log(raw: Any, key: str, *, default: int, lenient: bool = False) -> int:
    """`debug` or `info`; a condition's Log is info for anything but debug (§5)."""
    if raw is None:
        return default
    text = _as_text(raw)
    level = _LOG_LEVELS.get(text.strip().lower()) if isinstance(text, str) else None
    if level is None:
        if lenient:
            return logging.INFO
        raise FilterEntryError(key, "must be debug or info")
    return level


def _description(raw: Mapping[str, Any], name: str, prefix: str = "") -> str:
    value = _as_text(raw.get(name, ""))
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FilterEntryError(f"{prefix}{name}", "must be text")
    return re.sub(r"[\x00-\x1f\x7f]", " ", value)


def _list(raw: Mapping[str, Any], name: str, *, required: bool = False) -> list[Any]:
    value = raw.get(name)
    if value is None:
        if required:
            raise FilterEntryError(name, "is required: a list of one or more actions")
        return []
    if not isinstance(value, list) or (required and not value):
        raise FilterEntryError(name, "must be a list" + (" of one or more actions" if required else ""))
    return value


def _ae_titles(raw: Mapping[str, Any]) -> tuple[str, ...]:
    titles = _list(raw, "AeTitles")
    out = []
    for i, title in enumerate(titles):
        try:
            out.append(check_ae_title(title))
        except ValueError as e:
            raise FilterEntryError(f"AeTitles[{i}]", str(e)) from None
    return tuple(out)


def _choice(raw: Mapping[str, Any], name: str, kind: Any, key: str) -> Any:
    text = _as_text(raw.get(name))
    values = [m.value for m in kind]
    if text is None:
        raise FilterEntryError(f"{key}.{name}", f"is required: one of {', '.join(values)}")
    if text not in values:
        raise FilterEntryError(f"{key}.{name}", f"{text!r} is not one of {', '.join(values)} (lowercase)")
    return kind(text)
