"""Wakeup on virtual time: a wake-up made while the task looks is kept for its next wait."""

from __future__ import annotations

from typing import Any

import trio

from capacitor_trio.actors.wakeup import Wakeup


async def test_a_wake_up_before_the_wait_is_not_lost(autojump_clock: Any) -> None:
    w = Wakeup()
    w.set()
    w.set()  # a second call before the waiter ran changes nothing
    with trio.fail_after(1):
        await w.wait()
        await w.wait()  # kept until cleared
    assert trio.current_time() == 0.0


async def test_clear_forgets_earlier_wake_ups_and_set_wakes_the_waiter(autojump_clock: Any) -> None:
    w = Wakeup()
    w.set()
    w.clear()
    woken_at: list[float] = []

    async def waiter() -> None:
        await w.wait()
        woken_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(2)
        assert woken_at == []
        w.set()
    assert woken_at == [2.0]
