"""Aggregate reads the API serves often: kept recent without recounting on every request."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Recent(Generic[T]):
    """A value recomputed in the background while a recent one is served (stale-while-revalidate).

    Aggregate counts over 100,000+ items cost a full index scan (10 ms idle, far more while the
    router is busy receiving). Requests get a value at most `fresh` seconds old without waiting;
    one between `fresh` and `max_stale` old is served while a single background task recomputes
    it; anything older (or after `invalidate()`, which every API write calls) is recomputed
    before answering. Without a nursery it simply recomputes when not fresh.
    """

    def __init__(self, compute: Callable[[], Awaitable[T]], *, fresh: float = 0.25, max_stale: float = 2.0) -> None:
        self._compute = compute
        self.fresh = fresh
        self.max_stale = max_stale
        self.nursery: trio.Nursery | None = None
        self._value: T | None = None
        self._at = -math.inf
        self._generation = 0
        self._refreshing = False

    def invalidate(self) -> None:
        self._generation += 1
        self._value = None
        self._at = -math.inf

    async def _refresh(self) -> T:
        generation = self._generation
        started = trio.current_time()
        value = await self._compute()
        if generation == self._generation and started >= self._at:
            self._value, self._at = value, started
        return value

    async def _refresh_in_background(self) -> None:
        try:
            await self._refresh()
        except Exception:  # the next request recomputes inline and reports the error
            self._at = -math.inf
        finally:
            self._refreshing = False

    async def get(self) -> T:
        age = trio.current_time() - self._at
        if self._value is not None and age <= self.fresh:
            return self._value
        if self._value is not None and age <= self.max_stale and self.nursery is not None:
            if not self._refreshing:
                self._refreshing = True
                self.nursery.start_soon(self._refresh_in_background)
            return self._value
        return await self._refresh()
