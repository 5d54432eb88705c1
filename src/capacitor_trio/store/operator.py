"""Operator transitions (the API, through the node actors): move, retry and delete one item or
every item a filter matches, and expiry. None of them touches a checked-out item: one by id
raises `ItemCheckedOut`, a bulk one skips it."""

from __future__ import annotations

import sqlite3
from typing import Any

from ..domain.instance import Destination
from ..domain.states import EXPIRED, FAILED, NEW, RETRYABLE
from .connection import StoreCore
from .errors import ItemCheckedOut, ItemNotFound, TransitionError
from .model import QUEUED_STATES, Item, ItemFilter
from .rows import SELECT_ITEMS, ItemRow, filter_clause, item_rows, remove_items, stored_state
from .writer import unlinking


class Operator(StoreCore):
    """State changes an operator asks for."""

    def _get_for_change(self, conn: sqlite3.Connection, item_id: int) -> ItemRow:
        rows = item_rows(conn, f"{SELECT_ITEMS} WHERE i.id = ?", (item_id,))
        if not rows:
            raise ItemNotFound(f"no item {item_id}")
        if rows[0]["checked_out"]:
            raise ItemCheckedOut(f"item {item_id} is being delivered")
        return rows[0]

    @staticmethod
    def _target_next_attempt(target: str, now: float) -> float | None:
        return now if target == FAILED else None

    async def move(self, item_id: int, target_state: str) -> Item:
        """Move an item to any state ('failed': retried on the next cycle)."""
        target_state = stored_state(target_state)
        now = self._clock()
        nxt = self._target_next_attempt(target_state, now)

        def job(conn: sqlite3.Connection) -> Item:
            row = self._get_for_change(conn, item_id)
            conn.execute(
                "UPDATE items SET state = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (target_state, nxt, now, item_id),
            )
            return self._item(row, state=target_state, next_attempt_at=nxt, updated_at=now)

        return await self._write(job)

    async def retry(self, item_id: int) -> Item:
        """failed|rejected -> new, a fresh start (attempt count 0); anything else is a TransitionError."""
        now = self._clock()

        def job(conn: sqlite3.Connection) -> Item:
            row = self._get_for_change(conn, item_id)
            if row["state"] not in RETRYABLE:
                raise TransitionError(
                    f"item {item_id} is {row['state']}; only failed or rejected items retry"
                )
            conn.execute(
                f"UPDATE items SET state = '{NEW}', next_attempt_at = NULL, attempt_count = 0, "
                "updated_at = ? WHERE id = ?",
                (now, item_id),
            )
            return self._item(row, state=NEW.value, next_attempt_at=None, attempt_count=0, updated_at=now)

        return await self._write(job)

    async def delete(self, item_id: int) -> None:
        def job(conn: sqlite3.Connection) -> Any:
            self._get_for_change(conn, item_id)
            return unlinking(None, remove_items(conn, self.root, [item_id]))

        await self._write(job)

    async def move_where(self, f: ItemFilter, target_state: str) -> int:
        """Move every matching item that is not checked out; returns how many were updated."""
        target_state = stored_state(target_state)
        now = self._clock()
        nxt = self._target_next_attempt(target_state, now)
        where, params = filter_clause(f)

        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE items SET state = ?, next_attempt_at = ?, updated_at = ? WHERE id IN "
                f"(SELECT i.id FROM items i WHERE {where} AND i.checked_out = 0)",
                (target_state, nxt, now, *params),
            ).rowcount

        return await self._write(job)

    async def retry_where(self, f: ItemFilter, from_state: str) -> int:
        """Matching items in `from_state` (failed or rejected) go back to new."""
        from_state = str(from_state).strip().lower()
        if from_state not in RETRYABLE:
            raise TransitionError(f"only failed or rejected items retry, not {from_state!r}")
        if f.state is not None and stored_state(f.state) != from_state:
            return 0
        now = self._clock()
        where, params = filter_clause(f)

        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(
                f"UPDATE items SET state = '{NEW}', next_attempt_at = NULL, attempt_count = 0, "
                "updated_at = ? WHERE id IN "
                f"(SELECT i.id FROM items i WHERE {where} AND i.state = ? AND i.checked_out = 0)",
                (now, *params, from_state),
            ).rowcount

        return await self._write(job)

    async def delete_where(self, f: ItemFilter) -> int:
        """Delete every matching item that is not checked out; returns how many."""
        where, params = filter_clause(f)

        def job(conn: sqlite3.Connection) -> Any:
            ids = [
                r[0]
                for r in conn.execute(
                    f"SELECT i.id FROM items i WHERE {where} AND i.checked_out = 0", params
                )
            ]
            return unlinking(len(ids), remove_items(conn, self.root, ids))

        return await self._write(job)

    async def expire(
        self, now: float, threshold_seconds: float, destination: Destination | None = None
    ) -> int:
        """Queued items (new, prepared, failed) created before now - threshold become expired,
        for one destination or for all."""

        def job(conn: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(QUEUED_STATES))
            where = f"created_at < ? AND checked_out = 0 AND state IN ({marks})"
            params: tuple[object, ...] = (now, now - threshold_seconds, *QUEUED_STATES)
            if destination is not None:
                where = "destination_ae = ? AND destination_role = ? AND " + where
                params = (now, destination.ae_title, destination.role, *params[1:])
            return conn.execute(
                f"UPDATE items SET state = '{EXPIRED}', next_attempt_at = NULL, updated_at = ? "
                f"WHERE {where}",
                params,
            ).rowcount

        return await self._write(job)
