"""ProcessDelay and the adaptive study delivery window (capacitor-behaviour.md §1.5).

``ProcessDelay`` D groups a study: its items wait until D seconds have passed since the study's
last arrival T, so a study still arriving is not sent piecemeal. The adaptive window: once the
study has been processed (sent) at P, late images that arrive within D * M of that (M =
``processDelayWindowMultiplier``) go out immediately instead of waiting D again; M = 0 disables
this.

Our reading of "late images arriving within D * M of the study being processed": the window is
measured from P to the study's last arrival T, i.e. ``T - P <= D * M`` (T before P counts, too: an
image that arrived while the study was in flight). We measure it to the arrival rather than to
"now" so readiness is stable: an item found ready stays ready however late the actor gets to it
(after a pause, a busy batch or a closed schedule window), instead of flipping back to waiting when
"now" leaves the window. Evaluated at arrival time, the two readings agree.

Times are epoch or monotonic seconds, consistently; D in seconds (config gives milliseconds: the
config layer converts).
"""

from __future__ import annotations


def study_ready_at(
    last_arrival: float,
    now: float,
    delay: float,
    multiplier: float,
    last_processed: float | None,
) -> float:
    """The time from which a study's items may be sent; they are ready when this is <= ``now``.

    ``last_arrival``: when the study's most recent instance arrived. ``last_processed``: when the
    study was last sent to this node (None if never). Returns ``last_arrival + delay`` normally, or
    at most ``now`` when the adaptive window applies (ready immediately).
    """
    if delay < 0:
        raise ValueError(f"ProcessDelay must be >= 0, got {delay!r}")
    if multiplier < 0:
        raise ValueError(f"processDelayWindowMultiplier must be >= 0, got {multiplier!r}")
    waited = last_arrival + delay
    if (
        delay > 0
        and multiplier > 0
        and last_processed is not None
        and last_arrival - last_processed <= delay * multiplier
    ):
        return min(now, waited)
    return waited


def study_is_ready(
    last_arrival: float,
    now: float,
    delay: float,
    multiplier: float,
    last_processed: float | None,
) -> bool:
    """Whether a study's items may be sent at ``now`` (see :func:`study_ready_at`)."""
    return study_ready_at(last_arrival, now, delay, multiplier, last_processed) <= now
