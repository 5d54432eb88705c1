"""`Wakeup`: the wake-up call of a task that loops "look, then wait until woken"."""

from __future__ import annotations

import trio
from trio_util import RepeatedEvent


class Wakeup:
    """`set()` wakes the task waiting in `wait()`; with none waiting, the next `wait()` returns at
    once, so a call made while the task was looking is not lost. `clear()` (before looking)
    forgets the calls made before it. Setting it again before the waiter ran costs nothing."""

    __slots__ = ("_event", "_pending")

    def __init__(self) -> None:
        self._event = RepeatedEvent()
        self._pending = False

    def set(self) -> None:
        if not self._pending:
            self._pending = True
            self._event.set()

    def clear(self) -> None:
        self._pending = False

    async def wait(self) -> None:
        if self._pending:
            await trio.lowlevel.checkpoint()
        else:
            await self._event.wait()
