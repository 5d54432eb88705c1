"""The mutate filter's actions (mutations.yml `Actions`) and their application to a data set.

`config/mutations.py` reads an entry's `Actions` list into the values below; `apply_actions`
runs them in order on a pydicom Dataset, changing it in place, and says what it changed
(`TagChange`), whether the item must be retried or failed (`FilterFailure`), and what to log
(`Decision`). The entry level (Description, Conditions, AeTitles, Affects) and the chain that
decides which mutations run belong to domain/filters.py.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Sequence

import attrs
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from capacitor_trio.domain.anonymize import PseudonymStore, deidentify, patient_key
from capacitor_trio.domain.dicom_values import (
    destination_vr,
    is_text,
    keyword_for_tag,
    make_element,
    single_vr,
    tag_name,
    value_text,
)
from capacitor_trio.domain.filtering import Decision, FilterFailure, OnError, TagChange
from capacitor_trio.domain.value_template import Hash, Token, ValueTemplate, expand, hash_text

# What an add_or_update (or query) action does when it cannot be applied and its entry does not
# say: fail the item (visible in the queue, retried by the operator once the rule is fixed)
# rather than deliver an instance the operator asked to change, unchanged.
DEFAULT_ON_ERROR = OnError.FAIL


@attrs.frozen
class AddOrUpdate:
    """Set `destination` to `value`, expanded with the capture groups of `expression` searched in
    `source`'s value (no source: `value`'s tokens only, `$` references are text)."""

    destination: int
    value: ValueTemplate
    source: int | None = None
    expression: re.Pattern[str] | None = None
    on_error: OnError = DEFAULT_ON_ERROR
    description: str = ""


@attrs.frozen
class Remove:
    """Delete `tag` from the data set's top level; an absent tag is nothing to do."""

    tag: int
    description: str = ""


@attrs.frozen
class Anonymize:
    """De-identify the data set (PS3.15 Annex E, see domain/anonymize.py) with the patient's
    pseudonym from the mapping file `mapping` (Destination.Value)."""

    mapping: str
    description: str = ""


@attrs.frozen
class TagMapping:
    """One `{Source: {Tag}, Destination: {Tag}}` pair of a query action's Request or Response."""

    source: int
    destination: int


@attrs.frozen
class Query:
    """A worklist lookup merged into the data set: a query-phase action (the proxies), read so
    that a mutations.yml written for Capacitor loads; the storage phase refuses to run it."""

    node: str
    request: tuple[TagMapping, ...] = ()
    response: tuple[TagMapping, ...] = ()
    on_error: OnError = DEFAULT_ON_ERROR
    description: str = ""


@attrs.frozen
class ExcludeResult:
    """Drop the current data set from a C-FIND result: a query-phase action (see `Query`)."""

    description: str = ""


MutationAction = AddOrUpdate | Remove | Anonymize | Query | ExcludeResult

# The actions the storage phase runs; `Query` and `ExcludeResult` belong to the query phases.
STORAGE_ACTIONS: tuple[type, ...] = (AddOrUpdate, Remove, Anonymize)


@attrs.frozen
class MutateContext:
    """What the actions may read besides the data set: the item's AE titles, the time the
    `:timestamp:`/`:today:` tokens stand for, and the pseudonym store anonymize uses (None:
    an anonymize action fails the item)."""

    source_ae: str
    destination_ae: str
    now: datetime.datetime
    pseudonyms: PseudonymStore | None


@attrs.frozen
class MutateResult:
    """What one mutation's actions did: the attributes they changed, in order; the failure that
    stopped them (retry or fail the item), if any; the lines to log."""

    changes: tuple[TagChange, ...]
    failure: FilterFailure | None
    decisions: tuple[Decision, ...]


class ActionError(Exception):
    """An action cannot be applied; the message names tags, never values (it becomes the
    item's lastError)."""


def apply_actions(
    actions: Sequence[MutationAction], ds: Dataset, ctx: MutateContext
) -> MutateResult:
    """Run one mutation's actions in order on `ds` (changed in place).

    An action that cannot be applied follows its OnError: skip_action goes on with the next
    action, end_mutation stops this mutation's actions (the chain goes on with the next
    mutation), retry and fail stop and return a FilterFailure. A failed action leaves `ds` as it
    was before that action. Anonymize has no OnError: a mapping file that cannot be read or
    written retries the item, no pseudonym store fails it; a query-phase action fails it."""
    changes: list[TagChange] = []
    decisions: list[Decision] = []
    for index, action in enumerate(actions):
        name = f"Actions[{index}] {_describe(action)}"
        try:
            done = _apply(action, ds, ctx)
        except ActionError as e:
            on_error = _on_error_of(action, e)
            message = f"{name}: {e}"
            decisions.append(Decision(logging.INFO, f"{message} (OnError {on_error.value})"))
            if on_error is OnError.SKIP_ACTION:
                continue
            if on_error is OnError.END_MUTATION:
                break
            failure = FilterFailure(retry=on_error is OnError.RETRY, message=message)
            return MutateResult(tuple(changes), failure, tuple(decisions))
        changes.extend(done)
        decisions.append(Decision(logging.DEBUG, f"{name}: {_summary(done)}"))
    return MutateResult(tuple(changes), None, tuple(decisions))


class _RetryLater(ActionError):
    """An action without OnError met a failure that may pass (the mapping file's disk)."""


def _on_error_of(action: MutationAction, error: ActionError) -> OnError:
    if isinstance(action, AddOrUpdate | Query):
        return action.on_error
    return OnError.RETRY if isinstance(error, _RetryLater) else OnError.FAIL


def _apply(action: MutationAction, ds: Dataset, ctx: MutateContext) -> list[TagChange]:
    if isinstance(action, AddOrUpdate):
        return _add_or_update(action, ds, ctx)
    if isinstance(action, Remove):
        return _remove(action.tag, ds)
    if isinstance(action, Anonymize):
        return _anonymize(action, ds, ctx)
    raise ActionError("a query-phase action (worklist/C-FIND); the storage phase cannot run it")


def _describe(action: MutationAction) -> str:
    if isinstance(action, AddOrUpdate):
        return f"add_or_update {tag_name(action.destination)}"
    if isinstance(action, Remove):
        return f"remove {tag_name(action.tag)}"
    if isinstance(action, Anonymize):
        return "anonymize"
    return "query" if isinstance(action, Query) else "exclude_result"


def _summary(changes: list[TagChange]) -> str:
    if not changes:
        return "nothing to change"
    names = ", ".join(tag_name(c.tag) for c in changes[:8])
    more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
    return f"changed {names}{more}"


def _remove(tag: int, ds: Dataset) -> list[TagChange]:
    if tag not in ds:
        return []
    before = value_text(ds[tag])
    del ds[tag]
    return [TagChange(tag, keyword_for_tag(tag), before, None)]


def _add_or_update(action: AddOrUpdate, ds: Dataset, ctx: MutateContext) -> list[TagChange]:
    groups = _groups(action, ds)
    current = ds.get(action.destination)
    current_text = value_text(current) if current is not None else None

    def token(part: Token | Hash) -> str:
        if isinstance(part, Hash):
            return hash_text(_source_text(ds, part.tag, "the :hash(): tag"), part.length)
        return _token(part.name, ctx, current_text or "")

    text = expand(action.value, groups, token)
    try:
        if current is not None and current.VR != "UN":
            vr = single_vr(current.VR)
        else:
            vr = destination_vr(action.destination)
        element = make_element(action.destination, vr, text, ds)
    except ValueError as e:
        raise ActionError(str(e)) from None
    after = value_text(element)
    if current is not None and current.VR != "UN" and after == current_text:
        return []
    ds[action.destination] = element
    _follow_in_file_meta(ds, action.destination, element.value)
    return [TagChange(action.destination, keyword_for_tag(action.destination), current_text, after)]


# SOP Class and Instance UIDs the file meta repeats: a Part 10 file must say the same in both
_IN_FILE_META = {0x00080016: "MediaStorageSOPClassUID", 0x00080018: "MediaStorageSOPInstanceUID"}


def _follow_in_file_meta(ds: Dataset, tag: int, value: object) -> None:
    meta = getattr(ds, "file_meta", None)
    keyword = _IN_FILE_META.get(tag)
    if keyword is not None and meta is not None and keyword in meta:
        setattr(meta, keyword, value)


def _groups(action: AddOrUpdate, ds: Dataset) -> list[str]:
    """Group 0 (the whole match) and the Expression's groups in the source's value; [] without
    a Source."""
    if action.source is None or action.expression is None:
        return []
    text = _source_text(ds, action.source, "the source")
    match = action.expression.search(text)
    if match is None:
        raise ActionError(f"the Expression does not match the source {tag_name(action.source)}")
    return [match.group(0), *(g or "" for g in match.groups())]


def _source_text(ds: Dataset, tag: int, role: str) -> str:
    element = ds.get(tag)
    if element is None:
        raise ActionError(f"{role} {tag_name(tag)} is absent")
    if not is_text(element):
        raise ActionError(f"{role} {tag_name(tag)} has VR {element.VR}, not a text value")
    return value_text(element)


def _token(name: str, ctx: MutateContext, current: str) -> str:
    if name == "uid":
        return str(generate_uid())
    if name == "timestamp":
        return str(int(ctx.now.timestamp() * 1000))
    if name == "today":
        return ctx.now.strftime("%Y%m%d")
    return current  # "value"


def _anonymize(action: Anonymize, ds: Dataset, ctx: MutateContext) -> list[TagChange]:
    if ctx.pseudonyms is None:
        raise ActionError("no pseudonym store is available to anonymize with")
    try:
        key = patient_key(ds)
    except ValueError as e:
        raise ActionError(str(e)) from None
    try:
        pseudonym = ctx.pseudonyms.pseudonym(action.mapping, key)
        secret = ctx.pseudonyms.secret(action.mapping)
    except OSError as e:
        raise _RetryLater(f"the pseudonym mapping file cannot be used: {e.strerror or e}") from None
    except ValueError as e:
        raise ActionError(str(e)) from None
    before = _texts(ds)
    try:
        sequences = deidentify(ds, pseudonym, secret)
    except ValueError as e:
        raise ActionError(str(e)) from None
    after = _texts(ds)
    return [
        TagChange(tag, keyword_for_tag(tag), before.get(tag), after.get(tag))
        for tag in sorted(before.keys() | after.keys())
        if before.get(tag) != after.get(tag) or tag in sequences
    ]


def _texts(ds: Dataset) -> dict[int, str]:
    """Each top-level attribute's value as text (`ds[tag]`: an element not read yet is read)."""
    return {int(tag): value_text(ds[tag]) for tag in list(ds.keys())}
