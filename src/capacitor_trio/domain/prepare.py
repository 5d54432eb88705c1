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
