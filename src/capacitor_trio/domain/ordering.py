"""Delivery order within a node's queue (capacitor-behaviour.md §1.5, ``SopClassPriorities``).

The queue is FIFO by creation. With ``SopClassPriorities`` the order is (rank, creation): a lower
rank goes first, and items of equal rank stay FIFO. Ranks: the position of the SOP Class UID in
the list (earlier = higher priority); the special entry ``default`` (any case) marks where unlisted
classes go; without it unlisted classes rank after every listed one. A UID listed twice keeps its
first position. No list (None) means every class ranks the same: plain FIFO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

DEFAULT_ENTRY = "default"


def sop_class_rank(priorities: Sequence[str] | None) -> Callable[[str], int]:
    """A function mapping a SOP Class UID to its rank (0 = sent first)."""
    if priorities is None:
        return lambda _sop_class_uid: 0
    if isinstance(priorities, str | bytes):
        raise ValueError(
            f"SopClassPriorities must be a list of SOP Class UIDs, got the string {priorities!r}"
        )
    ranks: dict[str, int] = {}
    unlisted: int | None = None
    for position, entry in enumerate(priorities):
        uid = str(entry).strip()
        if uid.lower() == DEFAULT_ENTRY:
            if unlisted is None:
                unlisted = position
        else:
            ranks.setdefault(uid, position)
    fallback = len(priorities) if unlisted is None else unlisted

    def rank(sop_class_uid: str) -> int:
        return ranks.get(sop_class_uid.strip(), fallback)

    return rank
