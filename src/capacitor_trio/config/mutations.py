"""mutations.yml's `Actions`: Capacitor's spellings read into the values of domain/mutate.py.

The entry level (Description, Conditions, AeTitles, Affects) is config/filters.py's; it hands each
entry's `Actions` value to `parse_actions`, which raises FilterEntryError with the key's path
inside the entry ("Actions[2].OnError") and the reason.

Field names (docs/configuration.md, "mutations.yml"): `Type`, `Description`, `Source: {Tag,
Expression}`, `Destination: {Tag, Value}`, `OnError`; the query action's `Node`, `Request`,
`Response`. The 2024 names are read too: `SourceTag` (= Source.Tag), `Expression` (=
Source.Expression), `DestinationTag` and a bare `Tag` (= Destination.Tag), `DestinationValue`
(= Destination.Value); giving one field both ways is an error. Unknown keys are errors (a typo
must not silently leave an instance unchanged).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from capacitor_trio.config.filter_errors import FilterEntryError
from capacitor_trio.domain.conditions import compile_regex, parse_tag
from capacitor_trio.domain.dicom_values import destination_vr
from capacitor_trio.domain.filtering import OnError
from capacitor_trio.domain.mutate import (
    DEFAULT_ON_ERROR,
    AddOrUpdate,
    Anonymize,
    ExcludeResult,
    MutationAction,
    Query,
    Remove,
    TagMapping,
)
from capacitor_trio.domain.value_template import ValueTemplate, parse_template

DEFAULT_EXPRESSION = "^(.+)$"
DEFAULT_VALUE = "$1"

_TYPES = ("add_or_update", "remove", "anonymize", "query", "exclude_result", "stamp")
_ON_ERROR = {e.value: e for e in OnError}
_KEYS = frozenset(
    {"Type", "Description", "Source", "Destination", "OnError", "SourceTag", "Expression",
     "DestinationTag", "DestinationValue", "Tag", "Node", "Request", "Response"}
)  # fmt: skip
_LEGACY = {  # legacy key -> (new section, key in it)
    "SourceTag": ("Source", "Tag"),
    "Expression": ("Source", "Expression"),
    "DestinationTag": ("Destination", "Tag"),
    "Tag": ("Destination", "Tag"),
    "DestinationValue": ("Destination", "Value"),
}


def parse_actions(raw: object) -> tuple[MutationAction, ...]:
    """An entry's `Actions` list, read; FilterEntryError on the first invalid key."""
    if not isinstance(raw, list) or not raw:
        raise FilterEntryError("Actions", "must be a list of one or more actions")
    return tuple(_action(item, f"Actions[{i}]") for i, item in enumerate(raw))


def _action(raw: object, key: str) -> MutationAction:
    if not isinstance(raw, Mapping):
        raise FilterEntryError(key, "must be a mapping (Type, Source, Destination, ...)")
    unknown = sorted(str(k) for k in raw if k not in _KEYS)
    if unknown:
        raise FilterEntryError(
            f"{key}.{unknown[0]}", f"unknown key; an action's keys are {', '.join(sorted(_KEYS))}"
        )
    fields = _fields(raw, key)
    kind = _text(raw.get("Type", "add_or_update"), f"{key}.Type")
    if kind not in _TYPES:
        raise FilterEntryError(f"{key}.Type", f"{kind!r} is not one of {', '.join(_TYPES)}")
    if "OnError" in raw and kind not in ("add_or_update", "query"):
        raise FilterEntryError(f"{key}.OnError", f"only add_or_update and query take OnError, not {kind}")
    description = _text(raw.get("Description") or "", f"{key}.Description")
    return _BUILDERS[kind](raw, fields, key, description)


def _fields(raw: Mapping[Any, Any], key: str) -> dict[str, Any]:
    """Source.* and Destination.* as "Source.Tag" -> value, legacy names folded in."""
    fields: dict[str, Any] = {}
    for section in ("Source", "Destination"):
        if section not in raw:
            continue
        value = raw[section]
        if not isinstance(value, Mapping):
            raise FilterEntryError(f"{key}.{section}", "must be a mapping")
        allowed = ("Tag", "Expression") if section == "Source" else ("Tag", "Value")
        for k, v in value.items():
            if k not in allowed:
                raise FilterEntryError(f"{key}.{section}.{k}", f"unknown key; {section} takes {' and '.join(allowed)}")
            fields[f"{section}.{k}"] = v
    for legacy, (section, name) in _LEGACY.items():
        if legacy not in raw:
            continue
        if f"{section}.{name}" in fields:
            raise FilterEntryError(f"{key}.{legacy}", f"given twice: as {legacy} and as {section}.{name}")
        fields[f"{section}.{name}"] = raw[legacy]
    return fields


def _add_or_update(raw: Mapping[Any, Any], fields: dict[str, Any], key: str, description: str) -> MutationAction:
    destination = _required_tag(fields, "Destination.Tag", key)
    _refuse_private(destination, f"{key}.Destination.Tag")
    try:
        destination_vr(destination)
    except ValueError as e:
        raise FilterEntryError(f"{key}.Destination.Tag", str(e)) from None
    on_error = _on_error(raw, key)
    source = fields.get("Source.Tag")
    if source is None:
        if "Source.Expression" in fields:
            raise FilterEntryError(f"{key}.Source.Tag", "Expression is given without a Tag to read")
        if "Destination.Value" not in fields:
            raise FilterEntryError(f"{key}.Destination.Value", "required without a Source (the value to set)")
        value = _template(fields["Destination.Value"], key, references=False)
        return AddOrUpdate(destination, value, on_error=on_error, description=description)
    source_tag = _tag(source, f"{key}.Source.Tag")
    _refuse_private(source_tag, f"{key}.Source.Tag")
    expression = _regex(fields.get("Source.Expression", DEFAULT_EXPRESSION), f"{key}.Source.Expression")
    value = _template(fields.get("Destination.Value", DEFAULT_VALUE), key, references=True)
    if value.max_group > expression.groups:
        raise FilterEntryError(
            f"{key}.Destination.Value",
            f"refers to group {value.max_group} but the Expression has {expression.groups}",
        )
    return AddOrUpdate(destination, value, source_tag, expression, on_error, description)


def _remove(raw: Mapping[Any, Any], fields: dict[str, Any], key: str, description: str) -> MutationAction:
    tag = _required_tag(fields, "Destination.Tag", key)
    _refuse_private(tag, f"{key}.Destination.Tag")
    _refuse(fields, ("Source.Tag", "Source.Expression", "Destination.Value"), key, "remove")
    return Remove(tag, description)


def _anonymize(raw: Mapping[Any, Any], fields: dict[str, Any], key: str, description: str) -> MutationAction:
    _refuse(fields, ("Source.Tag", "Source.Expression", "Destination.Tag"), key, "anonymize")
    if "Destination.Value" not in fields:
        raise FilterEntryError(f"{key}.Destination.Value", "required: the pseudonym mapping file (CSV)")
    mapping = _text(fields["Destination.Value"], f"{key}.Destination.Value")
    if not mapping.strip():
        raise FilterEntryError(f"{key}.Destination.Value", "must name the pseudonym mapping file (CSV)")
    return Anonymize(mapping, description)


def _query(raw: Mapping[Any, Any], fields: dict[str, Any], key: str, description: str) -> MutationAction:
    if "Node" not in raw:
        raise FilterEntryError(f"{key}.Node", "required: the worklist node's AE title")
    node = _text(raw["Node"], f"{key}.Node")
    request = _mappings(raw.get("Request", []), f"{key}.Request")
    response = _mappings(raw.get("Response", []), f"{key}.Response")
    return Query(node, request, response, _on_error(raw, key), description)


def _exclude_result(raw: Mapping[Any, Any], fields: dict[str, Any], key: str, description: str) -> MutationAction:
    _refuse(fields, tuple(fields), key, "exclude_result")
    return ExcludeResult(description)


def _stamp(raw: Mapping[Any, Any], fields: dict[str, Any], key: str, description: str) -> MutationAction:
    raise FilterEntryError(
        f"{key}.Type", "stamp (burning a stamp into the pixel data) is not supported yet; remove the action"
    )


_BUILDERS: dict[str, Callable[[Mapping[Any, Any], dict[str, Any], str, str], MutationAction]] = {
    "add_or_update": _add_or_update,
    "remove": _remove,
    "anonymize": _anonymize,
    "query": _query,
    "exclude_result": _exclude_result,
    "stamp": _stamp,
}


def _mappings(raw: object, key: str) -> tuple[TagMapping, ...]:
    if not isinstance(raw, list):
        raise FilterEntryError(key, "must be a list of {Source: {Tag}, Destination: {Tag}}")
    return tuple(_mapping(item, f"{key}[{i}]") for i, item in enumerate(raw))


def _mapping(raw: object, key: str) -> TagMapping:
    source = raw.get("Source") if isinstance(raw, Mapping) else None
    destination = raw.get("Destination") if isinstance(raw, Mapping) else None
    if not (isinstance(source, Mapping) and isinstance(destination, Mapping)):
        raise FilterEntryError(key, "must be {Source: {Tag: gggg,eeee}, Destination: {Tag: gggg,eeee}}")
    return TagMapping(
        _tag(source.get("Tag"), f"{key}.Source.Tag"),
        _tag(destination.get("Tag"), f"{key}.Destination.Tag"),
    )


def _refuse(fields: dict[str, Any], names: tuple[str, ...], key: str, kind: str) -> None:
    for name in names:
        if name in fields:
            raise FilterEntryError(f"{key}.{name}", f"{kind} takes no {name}")


def _on_error(raw: Mapping[Any, Any], key: str) -> OnError:
    if "OnError" not in raw:
        return DEFAULT_ON_ERROR
    text = _text(raw["OnError"], f"{key}.OnError")
    if text not in _ON_ERROR:
        raise FilterEntryError(f"{key}.OnError", f"{text!r} is not one of {', '.join(_ON_ERROR)}")
    return _ON_ERROR[text]


def _required_tag(fields: dict[str, Any], name: str, key: str) -> int:
    if name not in fields:
        raise FilterEntryError(f"{key}.{name}", "required (a tag, gggg,eeee)")
    return _tag(fields[name], f"{key}.{name}")


def _tag(raw: object, key: str) -> int:
    """A tag as the conditions read it (`parse_tag`: `gggg,eeee` in hex, `8,60`, `(0008,0060)`)."""
    if not isinstance(raw, str):
        raise FilterEntryError(key, f"{raw!r} is not a tag (gggg,eeee in hex, e.g. 0010,0010 or 8,60)")
    try:
        return parse_tag(raw)
    except ValueError as e:
        raise FilterEntryError(key, str(e)) from None


def _refuse_private(tag: int, key: str) -> None:
    if (tag >> 16) % 2 == 1:
        raise FilterEntryError(
            key, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is a private tag: mutations of private tags are not supported"
        )
    if tag >> 16 == 0x0002:
        raise FilterEntryError(key, "file meta information (0002,xxxx) cannot be mutated")


def _regex(raw: object, key: str) -> re.Pattern[str]:
    """Compiled as a condition's regex is (`compile_regex`): .NET-only syntax is refused."""
    try:
        return compile_regex(_text(raw, key))
    except ValueError as e:
        raise FilterEntryError(key, str(e)) from None


def _template(raw: object, key: str, *, references: bool) -> ValueTemplate:
    text = _text(raw, f"{key}.Destination.Value")
    try:
        return parse_template(text, references=references)
    except ValueError as e:
        raise FilterEntryError(f"{key}.Destination.Value", str(e)) from None


def _text(raw: object, key: str) -> str:
    """A string value; a YAML number as it was written (`Value: 0012` is "0012")."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return str(getattr(raw, "text", raw))
    if raw is None:
        raise FilterEntryError(key, "is empty (quote '' for an empty text)")
    raise FilterEntryError(key, f"must be text, not {type(raw).__name__}")
