"""Restart policy of the supervisor for crashed node actors (one-for-one, with intensity limit).

A crash is restarted after an exponential delay: ``base_delay`` for the first crash in the window,
doubling for each further crash still inside the window, capped at ``max_delay``. If more than
``max_restarts`` crashes fall within the last ``window_seconds`` (the new one included), the
supervisor gives up: the node is marked failed until an operator restarts it explicitly
(:meth:`RestartTracker.reset`). After giving up, further crashes keep answering :class:`GiveUp`.

Times are plain floats from the supervisor's clock (``trio.current_time()``).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class RestartPolicy:
    """At most ``max_restarts`` restarts in ``window_seconds``; delays from base doubling to max."""

    max_restarts: int = attrs.field(validator=attrs.validators.ge(0))
    window_seconds: float = attrs.field(validator=attrs.validators.gt(0))
    base_delay: float = attrs.field(validator=attrs.validators.ge(0))
    max_delay: float = attrs.field(validator=attrs.validators.ge(0))

    def __attrs_post_init__(self) -> None:
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay ({self.max_delay}) must be >= base_delay ({self.base_delay})"
            )


@attrs.frozen
class RestartAfter:
    """Restart the actor after ``delay`` seconds."""

    delay: float


@attrs.frozen
class GiveUp:
    """Too many crashes: leave the node failed until an explicit restart."""


RestartDecision = RestartAfter | GiveUp


@attrs.frozen
class RestartTracker:
    """Crash history of one node actor; every method returns a new tracker.

    ``crashes`` holds the times of crashes still inside the window, oldest first; ``restarts`` is
    the lifetime count of restarts granted (for NodeStatus); ``given_up`` is set by a GiveUp.
    """

    policy: RestartPolicy
    crashes: tuple[float, ...] = ()
    restarts: int = 0
    given_up: bool = False

    def record_crash(self, now: float) -> tuple[RestartTracker, RestartDecision]:
        """Record a crash at ``now``; return the new tracker and what to do about it."""
        horizon = now - self.policy.window_seconds
        recent = (*(t for t in self.crashes if t > horizon), now)
        if self.given_up or len(recent) > self.policy.max_restarts:
            return attrs.evolve(self, crashes=recent, given_up=True), GiveUp()
        delay = min(self.policy.max_delay, self.policy.base_delay * 2.0 ** (len(recent) - 1))
        tracker = attrs.evolve(self, crashes=recent, restarts=self.restarts + 1)
        return tracker, RestartAfter(delay)

    def reset(self) -> RestartTracker:
        """Explicit operator restart: forget the crash history (the lifetime count stays)."""
        return attrs.evolve(self, crashes=(), given_up=False)
