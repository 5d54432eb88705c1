"""Values the prepare stage's filters (route, mutate, sort) produce, shared by their modules.

The filters decide on a pydicom Dataset and say what they decided with these values; the node's
prepare stage (actors/) acts on them: writes a prepared copy, removes or adds items, logs.
"""

from __future__ import annotations

import enum
import logging

import attrs


@attrs.frozen
class TagChange:
    """One attribute a mutation changed: `before`/`after` are its values as text, None when the
    attribute is absent (added: before is None; removed: after is None)."""

    tag: int  # (group << 16) | element, e.g. 0x00100010 for PatientName
    keyword: str  # pydicom's keyword, '' for private or unknown tags
    before: str | None
    after: str | None


class OnError(enum.Enum):
    """What an add_or_update (or query) action does when it cannot be applied."""

    SKIP_ACTION = "skip_action"  # go on with the next action of the same mutation
    END_MUTATION = "end_mutation"  # skip the rest of this mutation, go on with the next one
    RETRY = "retry"  # leave the item new; prepare it again later
    FAIL = "fail"  # the item becomes failed, with the message as its lastError


@attrs.frozen
class FilterFailure:
    """An entry asked to prepare the item again later (`retry`) or to fail it."""

    retry: bool
    message: str  # the item's lastError; no patient data


@attrs.frozen
class Decision:
    """One line of the filter's decision log for an instance, at the level its entry asks for.
    The text names the instance by its identity (UIDs, AE titles), never by patient data, at
    INFO; DEBUG may carry values."""

    level: int = attrs.field(validator=attrs.validators.in_((logging.DEBUG, logging.INFO)))
    text: str
