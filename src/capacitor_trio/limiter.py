"""A CapacityLimiter per Trio run, shared by every task of that run that uses it.

Worker threads that run CPU-bound Python hold the GIL: many at once stall the event loop. Each
kind of such work takes its slots from one limiter per run (a `trio.lowlevel.RunVar`: a limiter
belongs to the run that created it, and tests start many runs in one process).
"""

from __future__ import annotations

from collections.abc import Callable

import trio


def run_var_limiter(name: str, total_tokens: int) -> Callable[[], trio.CapacityLimiter]:
    """A function that gives this run's limiter of `total_tokens` named `name` (created on the
    first call in each run). Call `run_var_limiter` once, at module level."""
    var: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(name)

    def limiter() -> trio.CapacityLimiter:
        try:
            return var.get()
        except LookupError:
            created = trio.CapacityLimiter(total_tokens)
            var.set(created)
            return created

    return limiter
