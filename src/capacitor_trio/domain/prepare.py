"""The prepare stage's decision: when a node's new items become prepared.

Every item is committed `new` (or `prepared` at once when `minimumAge` is 0 and preparing is on)
and its node actor prepares it: new -> prepared. Today the stage has one step, ripeness: an item
is prepared once it is `minimumAge` seconds old (a study still arriving is not cut into
batches), while the service's `prepare` flag is on. The filters (route, mutate, sort) and
transcoding are further steps of the same stage, run on the ripe items in the order `filters:`
names them; they will plug in behind `PrepareNow`.

Pure values; `actors/prepare.py` acts on them.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class PrepareNow:
    """Prepare the new items created at or before `cutoff`."""

    cutoff: float


@attrs.frozen
class PrepareAt:
    """Nothing is ripe yet; the oldest new item is at `at`."""

    at: float


@attrs.frozen
class NothingToPrepare:
    """No new item, or preparing is off: wait until woken."""


PrepareDecision = PrepareNow | PrepareAt | NothingToPrepare


def prepare_decision(
    *, enabled: bool, oldest_new: float | None, now: float, minimum_age: float
) -> PrepareDecision:
    """What a node's preparer does next, given its oldest new item's creation time."""
    if not enabled or oldest_new is None:
        return NothingToPrepare()
    ripe_at = oldest_new + max(0.0, minimum_age)
    if ripe_at <= now:
        # never below the oldest item, which is ripe: rounding must not leave it behind
        return PrepareNow(cutoff=max(now - max(0.0, minimum_age), oldest_new))
    return PrepareAt(ripe_at)


#: an integer sort value is clamped to this many bits (signed), then biased to unsigned
_INT_BITS = 64


def sort_bytes(value: int | str, *, descending: bool) -> bytes:
    """An item's place in its series' delivery order as bytes that compare (lexicographically,
    as the index compares BLOBs) in that order: a 0x00 byte and the integer biased to 8
    unsigned bytes, or a 0x01 byte and each code point + 1 of the text in 3 bytes (ordinal order;
    a shorter text first when it is the other's prefix); for `descending` every byte after the
    first complemented, and text ended by 0xFFFFFF so that a longer text comes first. An item
    whose sort tag is absent has no key (None): it goes after the keyed ones."""
    if isinstance(value, int):
        limit = 1 << (_INT_BITS - 1)
        biased = max(-limit, min(limit - 1, value)) + limit
        body = biased.to_bytes(_INT_BITS // 8, "big")
        kind = b"\x00"
    else:
        # code point + 1: 0x000000 is left for the descending end mark
        body = b"".join((ord(c) + 1).to_bytes(3, "big") for c in value)
        kind = b"\x01"
        if descending:
            body += b"\x00\x00\x00"  # complemented below into the 0xFFFFFF end
    if descending:
        body = bytes(0xFF - b for b in body)
    return kind + body
