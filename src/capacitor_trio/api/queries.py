"""Read-only aggregate queries the API needs fast with 100,000+ items queued.

`Store.counts()` answers for one destination or for all with one GROUP BY that must read every
row (for SUM(checked_out)). The API asks for all counts on every /api/metrics, /api/queue/stats
and /api/nodes, so here the same figures come from covering indexes only: states from
``items_state``, checked-out items from the partial ``items_checked_out`` index, and every node's
queue from one scan of ``items_queue``. They run on the store's reader connections (a consistent
snapshot, in a worker thread), like every other read.
"""

from __future__ import annotations

from typing import Any

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
    return await reader(q)  # type: ignore[no-any-return]


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
    return await reader(q)  # type: ignore[no-any-return]
