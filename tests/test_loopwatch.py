"""`loopwatch`: how late a task's 10 ms sleeps wake, on virtual time (a jump of the mock clock
by a task that does not yield is the loop held that long)."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from capacitor_trio.loopwatch import LoopLag


def test_record_keeps_the_longest_and_counts_stalls_over_100ms() -> None:
    lag = LoopLag()
    assert lag.record(0.002) is False
    assert lag.record(-0.001) is False  # a wake a hair early is on time
    assert lag.record(0.150) is False
    assert lag.record(0.090) is False
    assert lag.to_json() == {"maxStallMs": 150.0, "stallsOver100ms": 1}
    assert lag.record(1.5) is True  # worth a WARNING
    assert lag.to_json() == {"maxStallMs": 1500.0, "stallsOver100ms": 2}
    assert lag.wakes == 5


async def test_watch_measures_how_long_a_task_held_the_loop(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    lag = LoopLag()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag.watch)
        await trio.sleep(1)
        assert lag.wakes >= 90 and lag.max_stall < 0.001  # an idle loop wakes it on time
        autojump_clock.jump(0.25)  # this task holds the loop for 250 ms (virtual time)
        await trio.sleep(0.05)
        assert 0.239 <= lag.max_stall <= 0.251
        assert lag.stalls_over_report == 1
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        autojump_clock.jump(1.5)
        await trio.sleep(0.05)
        assert 1.489 <= lag.max_stall <= 1.501 and lag.stalls_over_report == 2
        nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "event loop stalled for 1." in warnings[0], warnings
