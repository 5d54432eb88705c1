"""How late the event loop wakes a sleeping task: the router's measure of loop stalls.

A task sleeps `INTERVAL` (10 ms) in a loop and records how much later than asked each sleep
wakes. Nothing else can run while a task holds the loop without yielding (a costly parse on the
loop, a blocking call, the GIL held by a thread), so the lateness of this task is the longest
time any association, delivery or API request waited for its turn. The maximum since start and
the number of stalls over `REPORT_MS` are served in `GET /api/metrics` (`loop`); a stall over
`WARN_SECONDS` is logged at WARNING as it ends.

The daemon runs the watch (`run_router(watch_loop=True)`); routers run inside tests do not: a
task waking every 10 ms would make an `autojump_clock` advance in 10 ms steps. Its cost is the
loop's wake-ups, 100 a second (docs/performance.md has the figure).
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

log = logging.getLogger("capacitor_trio.loop")

#: how long the watching task sleeps between two looks
INTERVAL = 0.010
#: stalls longer than this are counted (`stallsOver100ms`)
REPORT_MS = 100.0
#: a stall longer than this is logged at WARNING
WARN_SECONDS = 1.0


@attrs.define
class LoopLag:
    """The bookkeeping of the watch: the longest lateness and how many were over `REPORT_MS`."""

    max_stall: float = 0.0  # s
    stalls_over_report: int = 0
    wakes: int = 0

    def record(self, lateness: float) -> bool:
        """Note one wake `lateness` seconds after it was due; True when it is worth a WARNING."""
        lateness = max(lateness, 0.0)
        self.wakes += 1
        self.max_stall = max(self.max_stall, lateness)
        if lateness * 1000 > REPORT_MS:
            self.stalls_over_report += 1
        return lateness > WARN_SECONDS

    def to_json(self) -> dict[str, Any]:
        return {
            "maxStallMs": round(self.max_stall * 1000, 1),
            "stallsOver100ms": self.stalls_over_report,
        }

    async def watch(self, interval: float = INTERVAL) -> None:
        """Sleep `interval` in a loop, recording how late each sleep wakes; runs until cancelled."""
        while True:
            due = trio.current_time() + interval
            await trio.sleep_until(due)
            lateness = trio.current_time() - due
            if self.record(lateness):
                log.warning(
                    "event loop stalled for %.2f s: every association and API request waited "
                    "that long", lateness,
                )
