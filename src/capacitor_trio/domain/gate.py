"""Whether a node may send now: one pure decision over its gates.

A node actor asks it before each batch (`step`) and before each top-up of an open association
(`may_continue`), so both apply the same gates in the same order: the node's pause, the service's
Storage SCU flag, the schedule window (unless overridden), the node's backoff after a failure.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Send:
    """Every gate is open: check a batch out and send it."""


@attrs.frozen
class Wait:
    """A gate is closed. `activity` says which (as the node's status reports it); `until` is
    when to look again (a wall-clock time), or None to wait until woken."""

    activity: str
    until: float | None = None


SEND = Send()
PAUSED = Wait("paused")
SERVICE_PAUSED = Wait("service-paused")


def decide(
    *,
    now: float,
    paused: bool,
    service_on: bool,
    override: bool,
    in_window: bool,
    next_window_change: float | None,
    backoff_until: float,
) -> Send | Wait:
    """The gates in order: a node pause or a service pause waits for a wake-up; outside the
    schedule window (without the override) until the window next changes (None: never); a node
    backing off until its backoff ends."""
    if paused:
        return PAUSED
    if not service_on:
        return SERVICE_PAUSED
    if not in_window and not override:
        return Wait("waiting-schedule", next_window_change)
    if backoff_until > now:
        return Wait("backing-off", backoff_until)
    return SEND


def next_look(eligible_at: float | None, next_window_change: float | None, *, override: bool) -> float | None:
    """When an idle node looks again: when its next item becomes eligible, or earlier when its
    schedule window changes (so its in-window flag stays fresh), unless the override makes the
    window irrelevant. None: not until woken."""
    if override or next_window_change is None:
        return eligible_at
    return next_window_change if eligible_at is None else min(eligible_at, next_window_change)
