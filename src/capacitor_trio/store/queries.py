"""Read-only queries for the API: listings, single items, stored bytes, counts. Each runs in one
snapshot on a reader connection in a worker thread (`StoreCore._read`)."""

from __future__ import annotations

import sqlite3
from typing import Any

import attrs

from ..domain.instance import Destination
from ..domain.states import QUEUED
from .connection import StoreCore
from .errors import ItemNotFound
from .model import STATES, Counts, Item, ItemFilter
from .rows import SELECT_ITEMS, ItemRow, blob, chunks, filter_clause, item_rows


class Queries(StoreCore):
    """Listing, counting and reading items (never a write)."""

    async def list_items(
        self, f: ItemFilter, *, skip: int = 0, limit: int = 100, newest_first: bool = False
    ) -> tuple[list[Item], int]:
        """A page of matching items in id (arrival) order, oldest first (or `newest_first`), and
        the total number matching."""
        where, params = filter_clause(f)
        direction = "DESC" if newest_first else "ASC"

        def q(conn: sqlite3.Connection) -> tuple[list[Item], int]:
            if f.search:
                # one scan of the covering search index gives the total and the page's ids
                ids = [
                    r[0]
                    for r in conn.execute(
                        f"SELECT i.id FROM items i INDEXED BY items_search WHERE {where}", params
                    )
                ]
                total = len(ids)
                ids.sort(reverse=newest_first)
                page = ids[max(0, skip) : max(0, skip) + max(0, limit)]
                rows: list[ItemRow] = []
                for chunk in chunks(page):
                    rows += item_rows(
                        conn, f"{SELECT_ITEMS} WHERE i.id IN ({','.join('?' * len(chunk))})", chunk
                    )
                rows.sort(key=lambda r: r["id"], reverse=newest_first)
            else:
                rows = item_rows(
                    conn,
                    f"{SELECT_ITEMS} WHERE {where} ORDER BY i.id {direction} LIMIT ? OFFSET ?",
                    (*params, max(0, limit), max(0, skip)),
                )
                total = conn.execute(
                    f"SELECT COUNT(*) FROM items i WHERE {where}", params
                ).fetchone()[0]
            return [self._item(r) for r in rows], int(total)

        return await self._read(q)

    async def get_item(self, item_id: int, *, with_data: bool = False) -> Item:
        """One item; `with_data` also reads the bytes of a small instance kept in the index
        (`Item.data`), in the same snapshot."""

        def q(conn: sqlite3.Connection) -> Item:
            rows = item_rows(conn, f"{SELECT_ITEMS} WHERE i.id = ?", (item_id,))
            if not rows:
                raise ItemNotFound(f"no item {item_id}")
            item = self._item(rows[0])
            if with_data and item.inline:
                item = attrs.evolve(item, data=blob(conn, item.instance_id))
            return item

        return await self._read(q)

    async def read_inline(self, instance_id: int) -> bytes:
        """The Part 10 bytes of an instance kept in the index (`Item.inline`)."""

        def q(conn: sqlite3.Connection) -> bytes:
            data = blob(conn, instance_id)
            if data is None:
                raise ItemNotFound(f"no stored bytes for instance {instance_id}")
            return data

        return await self._read(q)

    async def counts(self, destination: Destination | None = None) -> Counts:
        """Items per state and checked out, for one destination or for all. Index-only: the
        state index for the states, the partial index of checked-out items for the rest."""

        def q(conn: sqlite3.Connection) -> Counts:
            where = ""
            params: tuple[Any, ...] = ()
            if destination is not None:
                where = " WHERE destination_ae = ? AND destination_role = ?"
                params = (destination.ae_title, destination.role)
            per: dict[str, int] = dict.fromkeys(STATES, 0)
            for state, n in conn.execute(f"SELECT state, COUNT(*) FROM items{where} GROUP BY state", params):
                per[state] = int(n)
            checked_sql = "SELECT COUNT(*) FROM items WHERE checked_out = 1" + where.replace(" WHERE", " AND")
            (checked,) = conn.execute(checked_sql, params).fetchone()
            return Counts(**per, checked_out=int(checked), total=sum(per.values()))

        return await self._read(q)

    async def counts_by_destination(self) -> dict[Destination, Counts]:
        """Counts of every destination that has items, in one scan of the queue index."""

        def q(conn: sqlite3.Connection) -> dict[Destination, Counts]:
            per: dict[Destination, dict[str, int]] = {}
            checked: dict[Destination, int] = {}
            rows = conn.execute(
                "SELECT destination_ae, destination_role, state, checked_out, COUNT(*) FROM items "
                "GROUP BY destination_ae, destination_role, state, checked_out"
            )
            for ae, role, state, co, n in rows:
                dest = Destination(ae, role)
                states = per.setdefault(dest, dict.fromkeys(STATES, 0))
                states[state] += int(n)
                if co:
                    checked[dest] = checked.get(dest, 0) + int(n)
            return {
                d: Counts(**states, checked_out=checked.get(d, 0), total=sum(states.values()))
                for d, states in per.items()
            }

        return await self._read(q)

    async def oldest_waiting(self, destinations: list[Destination]) -> dict[Destination, float]:
        """When the oldest item waiting to be delivered (new, prepared or failed: `QUEUED`) of
        each of `destinations` that has one arrived. One index seek per destination, state and
        checkout flag (the queue index ends in created_at), not a scan: the dashboard asks often."""

        def q(conn: sqlite3.Connection) -> dict[Destination, float]:
            out: dict[Destination, float] = {}
            for dest in destinations:
                found = [
                    conn.execute(
                        "SELECT MIN(created_at) FROM items WHERE destination_ae = ? AND "
                        "destination_role = ? AND state = ? AND checked_out = ?",
                        (dest.ae_title, dest.role, state.value, checked_out),
                    ).fetchone()[0]
                    for state in QUEUED
                    for checked_out in (0, 1)
                ]
                times = [float(t) for t in found if t is not None]
                if times:
                    out[dest] = min(times)
            return out

        return await self._read(q)

    async def destinations(self) -> list[Destination]:
        """Every destination that has items (including nodes since removed from the config)."""

        def q(conn: sqlite3.Connection) -> list[Destination]:
            rows = conn.execute("SELECT DISTINCT destination_ae, destination_role FROM items")
            return [Destination(a, r) for a, r in rows]

        return await self._read(q)
