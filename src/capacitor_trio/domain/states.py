"""Queue item states (capacitor-behaviour.md §3.2, §3.3).

Stored and compared as lower-case values; the API spells them capitalised (``New``) and accepts any
case in ``targetState``. ``checkedOut`` is not a state but a flag on an item in flight.
"""

from __future__ import annotations

import enum


class ItemState(enum.StrEnum):
    """The state of one queue item (one instance for one destination)."""

    NEW = "new"
    PREPARED = "prepared"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"

    @property
    def api_name(self) -> str:
        """The spelling the API and Capacitor use: ``New``, ``Prepared``, …"""
        return self.value.capitalize()


NEW = ItemState.NEW
PREPARED = ItemState.PREPARED
FAILED = ItemState.FAILED
REJECTED = ItemState.REJECTED
EXPIRED = ItemState.EXPIRED

ALL_STATES: tuple[ItemState, ...] = tuple(ItemState)

#: States an item waits in to be delivered (expiry applies to these).
QUEUED: tuple[ItemState, ...] = (NEW, PREPARED, FAILED)

#: States from which the API's "retry" moves an item back to New.
RETRYABLE: frozenset[ItemState] = frozenset({FAILED, REJECTED})

#: States a node actor may pick items from for delivery.
DELIVERABLE: frozenset[ItemState] = frozenset({PREPARED})


def parse_state(text: str) -> ItemState:
    """Parse a state name in any case (``New``, ``FAILED``, `` prepared ``)."""
    if isinstance(text, ItemState):
        return text
    if not isinstance(text, str):
        raise ValueError(f"item state must be a string, got {text!r}")
    try:
        return ItemState(text.strip().lower())
    except ValueError:
        names = ", ".join(s.api_name for s in ItemState)
        raise ValueError(f"unknown item state {text!r}; expected one of {names}") from None
