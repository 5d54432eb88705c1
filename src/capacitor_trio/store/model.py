"""Values the store hands out: items, filters, counts, the recovery report."""

from __future__ import annotations

import enum
import operator
from pathlib import Path

import attrs

from ..domain.instance import Destination, InstanceHeader
from ..domain.states import ALL_STATES, QUEUED

#: The item states' stored spellings, in the order of `domain.states.ItemState`.
STATES: tuple[str, ...] = tuple(s.value for s in ALL_STATES)
#: States an item waits in to be delivered (expiry applies to these).
QUEUED_STATES: tuple[str, ...] = tuple(s.value for s in QUEUED)


def _check_state(_inst: object, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and str(value).strip().lower() not in STATES:
        raise ValueError(f"{attribute.name}: unknown state {value!r}")


@attrs.frozen
class Item:
    """One queue item: an instance queued for one destination (snapshot, never live)."""

    id: int
    state: str
    checked_out: bool
    source_ae: str
    destination_ae: str
    destination_role: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    patient_id: str
    patient_name: str
    accession_number: str
    transfer_syntax_uid: str
    size_bytes: int
    attempt_count: int
    last_error: str
    next_attempt_at: float | None
    created_at: float
    updated_at: float
    path: Path
    instance_id: int = 0
    #: kept in the index, not in a spool file (`path` does not exist; `Store.read_inline`)
    inline: bool = False
    #: the Part 10 bytes of an inline instance, filled in by a checkout only
    data: bytes | None = attrs.field(default=None, repr=False)
    #: the transfer syntax the instance was received in (`transfer_syntax_uid` is the one it
    #: is sent in: a prepared copy's may differ); "" when not read
    received_syntax: str = ""
    #: its place in its series' delivery order (the sort filter), smaller first; None: none
    sort_key: bytes | None = None
    #: the item whose route added this one (add_destination), None for a received item
    added_by: int | None = None
    #: the item is sent as a prepared copy of its own (a filter or transcoding made it): put
    #: back to `new` (an operator's retry), it is prepared as it is, its steps are not run again
    prepared_copy: bool = False

    def without_data(self) -> Item:
        """This item without its bytes (`data`): what a send keeps while the requestor holds them."""
        if self.data is None:
            return self
        values = list(_item_values(self))
        values[_DATA_AT] = None
        return Item(*values)


# the fields in the order of Item's __init__, read at once (quicker than attrs.evolve)
_item_values = operator.attrgetter(*(a.name for a in attrs.fields(Item)))
_DATA_AT = [a.name for a in attrs.fields(Item)].index("data")


@attrs.frozen
class ItemFilter:
    """Which items an API listing or bulk operation applies to; None means "any".

    `search` is a case-insensitive substring match over study/series/SOP instance UIDs, source and
    destination AE titles, accession number and patient ID.
    """

    state: str | None = attrs.field(default=None, validator=_check_state)
    source: str | None = None
    destination: str | None = None
    role: str | None = None
    modality: str | None = None
    search: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None


@attrs.frozen
class Counts:
    new: int = 0
    prepared: int = 0
    failed: int = 0
    rejected: int = 0
    expired: int = 0
    checked_out: int = 0
    total: int = 0


@attrs.frozen
class RecoveryReport:
    """What recovery found and did when the store was opened."""

    released: int = 0
    incoming_removed: int = 0
    trash_removed: int = 0
    orphans: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    rejected_cycled: int = 0


class PrepOutcome(enum.Enum):
    """What the prepare stage did with one `new` item (`Preparation`)."""

    PREPARED = "prepared"  # prepared: the received instance, or a copy of its own
    REMOVED = "removed"  # dropped by a filter: the item goes
    RETRY = "retry"  # stays new, prepared again after `not_before`, with a lastError
    FAILED = "failed"  # failed, with a lastError (no automatic retry)


@attrs.frozen
class PreparedCopy:
    """An item's prepared copy, as Part 10 bytes (`data`) or as a finished file (`file`), and
    the identity read from it (what the item is sent as: its UIDs and transfer syntax may
    differ from the received instance's).

    A `file` is handed over to the store: a complete Part 10 file on the store's file system
    (a large converted instance, never held in memory), which `apply_preparations` adopts
    (fsync'd, renamed into the spool, recorded in the item's transaction) or removes; the
    caller does not use it afterwards."""

    header: InstanceHeader
    data: bytes = attrs.field(default=b"", repr=False)
    file: Path | None = None

    @property
    def size(self) -> int:
        """The copy's size in bytes (a file's as it is now)."""
        return self.file.stat().st_size if self.file is not None else len(self.data)


@attrs.frozen
class Preparation:
    """The prepare stage's decision for one `new` item, applied by the store in one
    transaction (`apply_preparations`)."""

    item_id: int
    outcome: PrepOutcome
    #: PREPARED with a copy of its own; None: the item keeps the received instance
    copy: PreparedCopy | None = None
    #: PREPARED or REMOVED: further destinations that get the received instance, as `new`
    #: items of their own (skipped where that instance already has an item for one)
    add_destinations: tuple[Destination, ...] = ()
    sort_key: bytes | None = None
    #: RETRY / FAILED: the item's lastError
    last_error: str = ""
    #: RETRY: not prepared again before this time
    not_before: float | None = None


@attrs.frozen
class PrepareReport:
    """What `apply_preparations` did: item ids per outcome, the new items added, and the items
    it skipped (gone, no longer new, or checked out: an operator changed them meanwhile)."""

    prepared: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    retried: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()
    added: tuple[tuple[int, Destination], ...] = ()
    skipped: tuple[int, ...] = ()
