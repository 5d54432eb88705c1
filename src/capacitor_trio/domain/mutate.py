"""The mutate filter's actions (mutations.yml `Actions`) and their application to a data set.

`config/mutations.py` reads an entry's `Actions` list into the values below; `apply_actions`
runs them in order on a pydicom Dataset, changing it in place, and says what it changed
(`TagChange`), whether the item must be retried or failed (`FilterFailure`), and what to log
(`Decision`). The entry level (Description, Conditions, AeTitles, Affects) and the chain that
decides which mutations run belong to domain/filters.py.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence

import attrs
from pydicom.dataset import Dataset

from capacitor_trio.domain.anonymize import PseudonymStore
from capacitor_trio.domain.filtering import Decision, FilterFailure, OnError, TagChange
from capacitor_trio.domain.value_template import ValueTemplate

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


def apply_actions(
    actions: Sequence[MutationAction], ds: Dataset, ctx: MutateContext
) -> MutateResult:
    """Run one mutation's actions in order on `ds` (changed in place).

    An action that cannot be applied follows its OnError: skip_action goes on with the next
    action, end_mutation stops this mutation's actions (the chain goes on with the next
    mutation), retry and fail stop and return a FilterFailure. A failed action leaves `ds` as it
    was before that action."""
    raise NotImplementedError
