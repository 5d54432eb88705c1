"""Read-only aggregate queries the API needs fast with 100,000+ items queued.

`Store.counts()` answers for one destination or for all with one GROUP BY that must read every
row (for SUM(checked_out)). The API asks for all counts on every /api/metrics, /api/queue/stats
and /api/nodes, so here the same figures come from covering indexes only: states from
``items_state``, checked-out items from the partial ``items_checked_out`` index, and every node's
queue from one scan of ``items_queue``. They run on the store's reader connections (a consistent
snapshot, in a worker thread), like every other read.
"""

from __future__ import annotations

import math
from typing import Any

import trio

from capacitor_trio.store import STATES, Counts


def _counts(per: dict[str, int], checked: int) -> Counts:
    return Counts(**per, checked_out=checked, total=sum(per.values()))


async def counts_all(store: Any) -> Counts:
    """The same figures as ``store.counts()``, from covering indexes."""

    def q(conn: Any) -> Counts:
        per = dict.fromkeys(STATES, 0)
        for state, n in conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state"):
            per[state] = int(n)
        (checked,) = conn.execute("SELECT COUNT(*) FROM items WHERE checked_out = 1").fetchone()
        return _counts(per, int(checked))

    reader = getattr(store, "_read", None)
    if reader is None:  # another store implementation: its public API
        return await store.counts()
    return await reader(q)


async def counts_by_destination(store: Any) -> dict[tuple[str, str], Counts]:
    """(AE title, role) -> counts, for every destination with items, in one index scan."""

    def q(conn: Any) -> dict[tuple[str, str], Counts]:
        per: dict[tuple[str, str], dict[str, int]] = {}
        checked: dict[tuple[str, str], int] = {}
        rows = conn.execute(
            "SELECT destination_ae, destination_role, state, checked_out, COUNT(*) FROM items "
            "GROUP BY destination_ae, destination_role, state, checked_out"
        )
        for ae, role, state, co, n in rows:
            key = (ae, role)
            states = per.setdefault(key, dict.fromkeys(STATES, 0))
            states[state] = states.get(state, 0) + int(n)
            if co:
                checked[key] = checked.get(key, 0) + int(n)
        return {key: _counts(states, checked.get(key, 0)) for key, states in per.items()}

    reader = getattr(store, "_read", None)
    if reader is None:
        raise NotImplementedError
    return await reader(q)


async def checked_out_count(store: Any) -> int:
    """Items checked out right now (the partial index: no scan)."""

    def q(conn: Any) -> int:
        return int(conn.execute("SELECT COUNT(*) FROM items WHERE checked_out = 1").fetchone()[0])

    reader = getattr(store, "_read", None)
    if reader is None:
        return int((await store.counts()).checked_out)
    return await reader(q)


class Recent:
    """A value recomputed in the background while a recent one is served (stale-while-revalidate).

    Aggregate counts over 100,000+ items cost a full index scan (10 ms idle, far more while the
    router is busy receiving). Requests get a value at most `fresh` seconds old without waiting;
    one between `fresh` and `max_stale` old is served while a single background task recomputes
    it; anything older (or after `invalidate()`, which every API write calls) is recomputed
    before answering. Without a nursery it simply recomputes when not fresh.
    """

    def __init__(self, compute: Any, *, fresh: float = 0.25, max_stale: float = 2.0) -> None:
        self._compute = compute
        self.fresh = fresh
        self.max_stale = max_stale
        self.nursery: Any = None
        self._value: Any = None
        self._at = -math.inf
        self._generation = 0
        self._refreshing = False

    def invalidate(self) -> None:
        self._generation += 1
        self._value = None
        self._at = -math.inf

    async def _refresh(self) -> Any:
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

    async def get(self) -> Any:
        age = trio.current_time() - self._at
        if self._value is not None and age <= self.fresh:
            return self._value
        if self._value is not None and age <= self.max_stale and self.nursery is not None:
            if not self._refreshing:
                self._refreshing = True
                self.nursery.start_soon(self._refresh_in_background)
            return self._value
        return await self._refresh()
