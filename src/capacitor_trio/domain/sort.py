"""The sort filter (sortings.yml): the order in which a series' instances are delivered.

An entry (`SortEntry`) applies to an item when its AeTitles name the item's destination (or are
absent) and its Conditions match. Each action re-sorts the whole series, so only the last action
counts: the item's rule is the last action of the last matching entry (`rule_for`).

The chain computes one `SortKey` per item when it prepares it (`sort_key`), a small value the
prepare stage stores with the item; delivering a series, the node orders its items with
`order(rule, keys)`:
- `integer`: the value's text read as a whole number (surrounding spaces ignored); text that is
  not one (`12.5`, `abc`, empty) counts as 0.
- `string`: ordinal (code point) comparison, case-sensitive.
- a multi-valued attribute is read as its whole `\\`-joined text (as Capacitor reads a value).
- an item whose tag is absent goes last whatever the direction, and so does an item whose key
  was computed under another rule than the one the series is ordered by.
- ties (and the items that go last) keep the order they came in (a stable sort).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence

import attrs
import pydicom

from capacitor_trio.domain.conditions import Condition, matches_all, value_text


class SortType(enum.Enum):
    INTEGER = "integer"
    STRING = "string"


class SortDirection(enum.Enum):
    ASC = "asc"
    DESC = "desc"


@attrs.frozen
class SortRule:
    """One sort action: order by `tag` read as `type`, in `direction`."""

    tag: int
    type: SortType
    direction: SortDirection
    description: str = attrs.field(default="", eq=False)


@attrs.frozen
class SortEntry:
    """One entry of sortings.yml; `index` is its 0-based place in the file."""

    index: int
    description: str
    ae_titles: tuple[str, ...]
    conditions: tuple[Condition, ...]
    actions: tuple[SortRule, ...]

    def applies_to(self, destination_ae: str) -> bool:
        return not self.ae_titles or destination_ae in self.ae_titles


@attrs.frozen
class SortKey:
    """What an item is ordered by, stored with it: `rule` it was computed under, whether its tag
    is `missing`, its `value` (an int for `integer`, a str for `string`)."""

    rule: SortRule
    missing: bool
    value: int | str

    def to_text(self) -> str:
        """The key as one line of JSON, for the store (`from_text` reads it back)."""
        r = self.rule
        return json.dumps(
            {"tag": r.tag, "type": r.type.value, "direction": r.direction.value, "missing": self.missing, "value": self.value},
            separators=(",", ":"),
        )

    @classmethod
    def from_text(cls, text: str) -> SortKey:
        """ValueError when `text` is not what `to_text` wrote."""
        try:
            d = json.loads(text)
            rule = SortRule(int(d["tag"]), SortType(d["type"]), SortDirection(d["direction"]))
            value = d["value"]
            if not isinstance(value, int | str) or isinstance(value, bool):
                raise ValueError(value)
            return cls(rule, bool(d["missing"]), value)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a sort key: {text!r}") from e


def rule_for(entries: Sequence[SortEntry], ds: pydicom.Dataset, destination_ae: str) -> tuple[SortEntry, SortRule] | None:
    """The last action of the last entry that applies to `ds` for `destination_ae`, with that
    entry; None when no entry applies."""
    found: tuple[SortEntry, SortRule] | None = None
    for entry in entries:
        if entry.actions and entry.applies_to(destination_ae) and matches_all(entry.conditions, ds):
            found = (entry, entry.actions[-1])
    return found


def sort_key(rule: SortRule, ds: pydicom.Dataset) -> SortKey:
    text = value_text(ds, rule.tag)
    if text is None:
        return SortKey(rule, True, 0 if rule.type is SortType.INTEGER else "")
    if rule.type is SortType.STRING:
        return SortKey(rule, False, text)
    return SortKey(rule, False, _integer(text))


def _integer(text: str) -> int:
    stripped = text.strip()
    if not stripped or not stripped.lstrip("+-").isascii() or not stripped.lstrip("+-").isdigit():
        return 0
    if stripped[0] in "+-" and stripped[1:2] in ("+", "-"):
        return 0
    return int(stripped)


def order(rule: SortRule, keys: Sequence[SortKey]) -> list[int]:
    """The indices of `keys` in delivery order under `rule`."""
    present = [i for i, k in enumerate(keys) if not k.missing and k.rule == rule]
    last = [i for i, k in enumerate(keys) if k.missing or k.rule != rule]
    ordered = sorted(present, key=lambda i: keys[i].value, reverse=rule.direction is SortDirection.DESC)
    return ordered + last
