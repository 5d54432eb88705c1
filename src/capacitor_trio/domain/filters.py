"""The filter chain: config.yml's `filters` (route, mutate, sort, in the order named) run on one
item in the prepare stage.

`run_chain(chain, ds, ctx, effects)` runs the filters that are on, in order, on one item (one
instance for one destination; an entry's AeTitles limit it to items for those destinations),
changing `ds` in place (mutate), and answers a `ChainOutcome`: keep or remove the item, the
destinations to add, the attributes changed, the item's sort key, a failure (retry or fail) and
the decision log. The only I/O, writing a route's save_file copy, goes through the `effects`
port, so everything else is a pure decision.

- route removes the item (drop, RemoveOriginal): the chain stops there; saved copies and added
  destinations stand.
- a mutation fails (OnError retry or fail) or a save_file cannot be written (retry): the chain
  stops and `failure` says what to do with the item; the caller drops `ds` (it may be changed in
  part) and whatever else the outcome says.
- sort: the key is computed where `sort` stands in the chain (after a mutate before it).
- an item a route added (`ChainContext.added_by_route`) skips the route filter.
- `dropUnfilteredInstances`: an item that no entry of any filter in the chain applied to (no
  route, mutation with `storage` among its Affects, or sort entry whose AeTitles and Conditions
  matched it) is removed.
"""

from __future__ import annotations

import datetime
import enum
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
from pydicom.dataset import Dataset

from capacitor_trio.domain.anonymize import PseudonymStore
from capacitor_trio.domain.conditions import Condition, matches_all, tag_text, value_text
from capacitor_trio.domain.filtering import Decision, FilterFailure, TagChange
from capacitor_trio.domain.mutate import MutateContext, MutationAction, apply_actions
from capacitor_trio.domain.route import Route, RouteAction, RouteActionType, decide_routes
from capacitor_trio.domain.sort import SortEntry, SortKey, rule_for, sort_key

STORAGE = "storage"
_SOP_INSTANCE_UID = 0x00080018


@attrs.frozen
class Mutation:
    """One entry of mutations.yml; `index` is its 0-based place in the file."""

    index: int
    description: str
    ae_titles: tuple[str, ...]
    conditions: tuple[Condition, ...]
    affects: tuple[str, ...]
    actions: tuple[MutationAction, ...]

    def applies_to(self, destination_ae: str) -> bool:
        return STORAGE in self.affects and (not self.ae_titles or destination_ae in self.ae_titles)


@attrs.frozen
class RouteFilter:
    file: Path
    entries: tuple[Route, ...]
    name: str = "route"


@attrs.frozen
class MutateFilter:
    file: Path
    entries: tuple[Mutation, ...]
    name: str = "mutate"


@attrs.frozen
class SortFilter:
    file: Path
    entries: tuple[SortEntry, ...]
    name: str = "sort"


Filter = RouteFilter | MutateFilter | SortFilter


@attrs.frozen
class FilterChain:
    """The loaded chain: `names` as `filters` lists them, `filters` those that are on (their
    file was there), `off` those whose file is missing."""

    names: tuple[str, ...] = ()
    filters: tuple[Filter, ...] = ()
    off: tuple[str, ...] = ()
    drop_unfiltered: bool = False

    @property
    def is_empty(self) -> bool:
        """Nothing to run: items are prepared as they arrived."""
        return not self.filters and not self.drop_unfiltered


NO_FILTERS = FilterChain()


@attrs.frozen
class ChainContext:
    """The item the chain runs on, besides its data set. `added_by_route`: the item is a copy a
    route's add_destination made; it does not pass the route filter again (so two routes that
    add each other's destination cannot loop) and counts as filtered for
    dropUnfilteredInstances; mutate and sort run on it for its own destination."""

    source_ae: str
    destination_ae: str
    now: datetime.datetime
    pseudonyms: PseudonymStore | None = None
    added_by_route: bool = False


class ChainEffects(Protocol):
    def save_file(self, target: Path, ds: Dataset) -> None:
        """Write `ds` as a Part 10 file at `target` (creating its directory); OSError when it
        cannot."""
        ...


@attrs.frozen
class ChainOutcome:
    keep: bool
    add_destinations: tuple[str, ...] = ()
    changes: tuple[TagChange, ...] = ()
    sort_key: SortKey | None = None
    failure: FilterFailure | None = None
    decisions: tuple[Decision, ...] = ()
    saved: tuple[Path, ...] = ()  # the save_file copies written


@attrs.define
class _Run:
    identity: str
    matched: bool = False
    adds: list[str] = attrs.Factory(list)
    changes: list[TagChange] = attrs.Factory(list)
    decisions: list[Decision] = attrs.Factory(list)
    saved: list[Path] = attrs.Factory(list)
    sort_key: SortKey | None = None

    def outcome(self, keep: bool = True, failure: FilterFailure | None = None) -> ChainOutcome:
        return ChainOutcome(
            keep, tuple(self.adds), tuple(self.changes), self.sort_key, failure, tuple(self.decisions), tuple(self.saved)
        )


def identity(ds: Dataset, ctx: ChainContext) -> str:
    """How the decision log names an item: its SOP Instance UID and AE titles, no patient data."""
    uid = value_text(ds, _SOP_INSTANCE_UID) or "(no SOP Instance UID)"
    return f"instance {uid} from {ctx.source_ae} for {ctx.destination_ae}"


def run_chain(chain: FilterChain, ds: Dataset, ctx: ChainContext, effects: ChainEffects) -> ChainOutcome:
    run = _Run(identity(ds, ctx), matched=ctx.added_by_route)
    for step in chain.filters:
        if isinstance(step, RouteFilter):
            if ctx.added_by_route:
                continue
            stop = _route(step, ds, ctx, effects, run)
        elif isinstance(step, MutateFilter):
            stop = _mutate(step, ds, ctx, run)
        else:
            _sort(step, ds, ctx, run)
            stop = None
        if stop is not None:
            return stop
    if chain.drop_unfiltered and not run.matched:
        run.decisions.append(Decision(logging.INFO, f"dropUnfilteredInstances: no filter entry matched: removed {run.identity}"))
        return run.outcome(keep=False)
    return run.outcome()


def _route(step: RouteFilter, ds: Dataset, ctx: ChainContext, effects: ChainEffects, run: _Run) -> ChainOutcome | None:
    result = decide_routes(step.entries, ds, ctx.destination_ae, run.identity)
    run.matched = run.matched or result.matched
    run.decisions.extend(result.decisions)
    for save in result.saves:
        try:
            effects.save_file(save.path, ds)
        except OSError as e:
            message = f"route save_file failed: {e.strerror or type(e).__name__}"
            run.decisions.append(Decision(logging.INFO, f"{message}; retried later: {run.identity}"))
            return run.outcome(failure=FilterFailure(retry=True, message=message))
        run.saved.append(save.path)
    run.adds.extend(a for a in result.add_destinations if a not in run.adds)
    return None if result.keep else run.outcome(keep=False)


def _mutate(step: MutateFilter, ds: Dataset, ctx: ChainContext, run: _Run) -> ChainOutcome | None:
    mctx = MutateContext(ctx.source_ae, ctx.destination_ae, ctx.now, ctx.pseudonyms)
    for entry in step.entries:
        if not entry.applies_to(ctx.destination_ae) or not matches_all(entry.conditions, ds):
            continue
        run.matched = True
        run.decisions.append(Decision(logging.DEBUG, f"{_entry_name('mutation', entry.index, entry.description)}: applies to {run.identity}"))
        result = apply_actions(entry.actions, ds, mctx)
        run.changes.extend(result.changes)
        run.decisions.extend(result.decisions)
        if result.failure is not None:
            return run.outcome(failure=result.failure)
    return None


def _sort(step: SortFilter, ds: Dataset, ctx: ChainContext, run: _Run) -> None:
    found = rule_for(step.entries, ds, ctx.destination_ae)
    if found is None:
        return
    entry, rule = found
    run.matched = True
    run.sort_key = sort_key(rule, ds)
    run.decisions.append(
        Decision(
            logging.DEBUG,
            f"{_entry_name('sort', entry.index, entry.description)}: series ordered by {tag_text(rule.tag)} "
            f"{rule.type.value} {rule.direction.value}: {run.identity}",
        )
    )


def _entry_name(kind: str, index: int, description: str) -> str:
    return f"{kind} {index + 1} ({description})" if description else f"{kind} {index + 1}"


def summary(chain: FilterChain) -> str:
    """One line for the start-up log: the chain in order, each filter's entries, what is off."""
    if not chain.names:
        return "filters: none"
    counts = {f.name: len(f.entries) for f in chain.filters}
    parts = [f"{name} ({counts[name]} entries)" if name in counts else f"{name} (off: no file)" for name in chain.names]
    drop = "; dropUnfilteredInstances" if chain.drop_unfiltered else ""
    return "filters: " + ", ".join(parts) + drop


# ---------------------------------------------------------------------------------------------
# describe: the loaded chain as JSON-able values (GET /api/filters)


def describe(chain: FilterChain) -> dict[str, Any]:
    return {
        "filters": list(chain.names),
        "dropUnfilteredInstances": chain.drop_unfiltered,
        "off": list(chain.off),
        "files": [_describe_filter(f) for f in chain.filters],
    }


def _describe_filter(step: Filter) -> dict[str, Any]:
    entries: Sequence[Route | Mutation | SortEntry] = step.entries
    return {"filter": step.name, "file": str(step.file), "entries": [_describe_entry(e) for e in entries]}


def _describe_entry(entry: Route | Mutation | SortEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": entry.index,
        "description": entry.description,
        "aeTitles": list(entry.ae_titles),
        "conditions": [describe_condition(c) for c in entry.conditions],
    }
    if isinstance(entry, Route):
        out["actions"] = [_describe_route_action(a) for a in entry.actions]
    elif isinstance(entry, Mutation):
        out["affects"] = list(entry.affects)
        out["actions"] = [_describe_mutation_action(a) for a in entry.actions]
    else:
        out["actions"] = [
            {"sortTag": tag_text(a.tag), "sortType": a.type.value, "sortDirection": a.direction.value, "description": a.description}
            for a in entry.actions
        ]
    return out


def _describe_route_action(action: RouteAction) -> dict[str, Any]:
    return {
        "type": action.type.value,
        "target": action.target,
        "removeOriginal": action.remove_original or action.type is RouteActionType.DROP,
        "log": logging.getLevelName(action.log_level).lower(),
        "description": action.description,
    }


_ACTION_TYPES = {"AddOrUpdate": "add_or_update", "Remove": "remove", "Anonymize": "anonymize", "Query": "query", "ExcludeResult": "exclude_result"}
_TAG_FIELDS = frozenset({"tag", "source", "destination"})


def _describe_mutation_action(action: MutationAction) -> dict[str, Any]:
    """A mutate action's fields, camelCase, tags as gggg,eeee, patterns and templates as written."""
    out: dict[str, Any] = {"type": _ACTION_TYPES.get(type(action).__name__, type(action).__name__)}
    for field in attrs.fields(type(action)):
        out[_camel(field.name)] = _json_value(field.name, getattr(action, field.name))
    return out


def _json_value(name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        return tag_text(value) if name in _TAG_FIELDS else value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, tuple | list):
        return [_json_value(name, v) for v in value]
    if attrs.has(type(value)):
        text = getattr(value, "text", None)  # a ValueTemplate: as written
        if isinstance(text, str):
            return text
        return {_camel(f.name): _json_value(f.name, getattr(value, f.name)) for f in attrs.fields(type(value))}
    return str(value)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def describe_condition(condition: Condition) -> dict[str, Any]:
    out: dict[str, Any] = {"tag": tag_text(condition.tag), "log": logging.getLevelName(condition.log_level).lower()}
    if condition.pattern is not None:
        out["matchExpression"] = condition.pattern.text
        out["kind"] = condition.pattern.kind.value
    if condition.search:
        out["search"] = True
    if condition.private_creator is not None:
        out["privateTagCreator"] = condition.private_creator
    if condition.sequence_items:
        out["sequenceItems"] = [describe_condition(c) for c in condition.sequence_items]
    return out
