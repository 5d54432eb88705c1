"""The per-destination queue, the node actors' side of the store: new items ripen into
prepared ones, a checkout hands out the next batch (in SOP-class priority order, holding back
studies still arriving for the ProcessDelay), outcomes remove or reschedule the items, releases
give them back, and two reads say when to look next."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import partial
from typing import Any

import attrs

from ..domain.instance import Destination
from ..domain.states import FAILED, NEW, PREPARED, REJECTED
from .connection import StoreCore
from .errors import ItemNotFound
from .model import Item
from .rows import (
    SELECT_ITEMS,
    SELECT_QUEUE,
    ItemRow,
    chunks,
    is_inline,
    item_rows,
    marks,
    remove_items,
)
from .writer import unlinking

log = logging.getLogger("capacitor_trio.store")

#: At most this many bytes of small instances are handed out by one checkout.
CHECKOUT_INLINE_BYTES = 16 * 1024 * 1024

#: a delivery outcome (params: last_error, next_attempt_at, updated_at, id)
_FAIL_SQL = (
    f"UPDATE items SET state = '{FAILED}', checked_out = 0, attempt_count = attempt_count + 1, "
    "last_error = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?"
)
#: a delivery outcome (params: last_error, updated_at, id)
_REJECT_SQL = (
    f"UPDATE items SET state = '{REJECTED}', checked_out = 0, attempt_count = attempt_count + 1, "
    "last_error = ?, next_attempt_at = NULL, updated_at = ? WHERE id = ?"
)

#: an SQL condition over ``items i`` and its parameters
Clause = tuple[str, list[Any]]


def _normalise_priorities(priorities: Sequence[str] | None) -> list[str] | None:
    """UIDs stripped, the ``default`` entry in any case spelled "default" (domain/ordering.py)."""
    if not priorities:
        return None
    out = []
    for entry in priorities:
        uid = str(entry).strip()
        out.append("default" if uid.lower() == "default" else uid)
    return out



def _candidates(dest: Destination, quiet_before: float | None, exempt: list[str]) -> Clause:
    """Items of `dest` not checked out; with `quiet_before`, only of studies that received
    nothing since then (the ProcessDelay), unless the study is in `exempt`."""
    base = "i.destination_ae = ? AND i.destination_role = ? AND i.checked_out = 0"
    base_params: list[Any] = [dest.ae_title, dest.role]
    if quiet_before is not None:
        quiet = (
            "NOT EXISTS (SELECT 1 FROM items j WHERE j.destination_ae = i.destination_ae "
            "AND j.destination_role = i.destination_role AND j.study_uid = i.study_uid "
            "AND j.created_at > ?)"
        )
        params_q: list[Any] = [quiet_before]
        if exempt:
            quiet = f"(i.study_uid IN (SELECT value FROM json_each(?)) OR {quiet})"
            params_q = [json.dumps(exempt), quiet_before]
        base += f" AND {quiet}"
        base_params += params_q
    return base, base_params


def _class_groups(priorities: list[str] | None) -> list[Clause]:
    """The SOP-class groups in rank order (domain/ordering.py): one per listed class, the
    unlisted ones where ``default`` stands or else last."""
    if not priorities:
        return [("1", [])]
    listed = [p for p in priorities if p != "default"]
    unlisted: Clause = (
        "i.sop_class_uid NOT IN (SELECT value FROM json_each(?))",
        [json.dumps(listed)],
    )
    groups: list[Clause] = []
    for p in dict.fromkeys(priorities):
        groups.append(unlisted if p == "default" else ("i.sop_class_uid = ?", [p]))
    if "default" not in priorities:
        groups.append(unlisted)
    return groups


def _failed_due(conn: sqlite3.Connection, dest: Destination, now: float) -> bool:
    """Is any failed item of `dest` due? (the partial index answers at once; when one is, the
    failed items are walked in FIFO order rather than sorted by due time)"""
    row = conn.execute(
        "SELECT MIN(next_attempt_at) FROM items WHERE destination_ae = ? AND "
        f"destination_role = ? AND state = '{FAILED}' AND checked_out = 0 "
        "AND next_attempt_at IS NOT NULL",
        (dest.ae_title, dest.role),
    ).fetchone()
    return bool(row[0] is not None and row[0] <= now)


@attrs.frozen
class _BatchQuery:
    """The selection of one checkout: candidates, class groups, and whether failed items due
    join the prepared ones."""

    conn: sqlite3.Connection
    base: Clause
    groups: list[Clause]
    now: float
    limit: int
    failed_due: bool

    def fetch(
        self, extra: str, extra_params: list[Any], n: int, *, sorted_series: bool = False
    ) -> list[ItemRow]:
        """The first `n` eligible items matching `extra`, oldest first; within one series
        (`sorted_series`) in its sort order first (the sort filter's keys)."""
        base, base_params = self.base
        order = _SERIES_ORDER if sorted_series else "i.created_at, i.id"
        prepared = item_rows(
            self.conn,
            f"{SELECT_ITEMS} WHERE {base} AND i.state = '{PREPARED}' AND {extra} "
            f"ORDER BY {order} LIMIT ?",
            (*base_params, *extra_params, n),
        )
        if not self.failed_due:
            return prepared
        failed = item_rows(
            self.conn,
            f"{SELECT_QUEUE} WHERE {base} AND i.state = '{FAILED}' "
            "AND i.next_attempt_at IS NOT NULL AND i.next_attempt_at <= ? AND "
            f"{extra} ORDER BY {order} LIMIT ?",
            (*base_params, self.now, *extra_params, n),
        )
        key = _series_key if sorted_series else _arrival_key
        both = sorted(prepared + failed, key=key)
        return both[:n]

    def collect(self, series_clause: str, series_params: list[Any]) -> list[ItemRow]:
        """Up to `limit` items, class group by class group (within one series if given, in
        its sort order)."""
        out: list[ItemRow] = []
        for extra, extra_params in self.groups:
            if len(out) >= self.limit:
                break
            clause = extra if not series_clause else f"{extra} AND {series_clause}"
            out += self.fetch(
                clause, extra_params + series_params, self.limit - len(out),
                sorted_series=bool(series_clause),
            )
        return out


#: a series' items in their sort order (the sort filter's keys; items without one last), then
#: in arrival order
_SERIES_ORDER = "i.sort_key IS NULL, i.sort_key, i.created_at, i.id"


def _arrival_key(r: ItemRow) -> tuple[Any, ...]:
    return (r["created_at"], r["id"])


def _series_key(r: ItemRow) -> tuple[Any, ...]:
    key = r["sort_key"]
    return (key is None, b"" if key is None else bytes(key), r["created_at"], r["id"])


def _sorted_within_series(rows: list[ItemRow]) -> list[ItemRow]:
    """A batch of several series with each series' items in its sort order, in the places the
    series' items had (the order of the series among themselves kept)."""
    if all(r["sort_key"] is None for r in rows):
        return rows
    places: dict[str, list[int]] = {}
    for k, r in enumerate(rows):
        places.setdefault(r["series_uid"], []).append(k)
    out = list(rows)
    for positions in places.values():
        for k, r in zip(positions, sorted((rows[p] for p in positions), key=_series_key), strict=True):
            out[k] = r
    return out


def _within_inline_budget(rows: list[ItemRow], budget: int) -> list[ItemRow]:
    """The bytes of small instances come with the batch: the leading `rows` whose inline bytes
    fit `budget` (at least one row; the rest waits for the next checkout or top-up)."""
    kept = list[ItemRow]()
    for r in rows:
        if is_inline(r):
            if kept and r["size_bytes"] > budget:
                break
            budget -= r["size_bytes"]
        kept.append(r)
    return kept


def _mark_checked_out(conn: sqlite3.Connection, ids: list[int], now: float) -> None:
    for chunk in chunks(ids):
        conn.execute(
            f"UPDATE items SET checked_out = 1, updated_at = ? WHERE id IN ({marks(len(chunk))})",
            (now, *chunk),
        )


def _inline_bytes(conn: sqlite3.Connection, rows: list[ItemRow]) -> dict[int, bytes]:
    """The stored bytes of the small instances among `rows` (kept in the index), by instance id."""
    inline = [r for r in rows if is_inline(r)]
    inline_ids = [r["instance_id"] for r in inline]
    data: dict[int, bytes] = {}
    for chunk in chunks(inline_ids):
        data.update(
            conn.execute(
                f"SELECT instance_id, data FROM blobs WHERE instance_id IN ({marks(len(chunk))})",
                chunk,
            ).fetchall()
        )
    for r in inline:
        if r["instance_id"] not in data:
            # the requestor then reports the instance as missing (rejected), with its name
            log.error("store: the stored bytes of %s are missing", r["rel_path"].rsplit("/", 1)[-1])
    return data


def items_with_bytes(
    conn: sqlite3.Connection, rows: list[ItemRow], build: Callable[..., Item], **override: Any
) -> list[Item]:
    """`rows` as items, the small instances among them with their stored bytes (`Item.data`):
    each item built once, with its bytes."""
    data = _inline_bytes(conn, rows)
    return [build(r, data=data.get(r["instance_id"]), **override) for r in rows]


class Queue(StoreCore):
    """Each destination's queue as its node actor works it."""

    async def prepare_ripe(
        self, now: float, minimum_age: float, destination: Destination | None = None
    ) -> int:
        """New items received at least `minimum_age` seconds ago become prepared, for one
        destination or for all; returns how many."""

        def job(conn: sqlite3.Connection) -> int:
            where = f"state = '{NEW}' AND checked_out = 0 AND created_at <= ?"
            params: tuple[object, ...] = (now, now - minimum_age)
            if destination is not None:
                where = "destination_ae = ? AND destination_role = ? AND " + where
                params = (now, destination.ae_title, destination.role, now - minimum_age)
            return conn.execute(
                f"UPDATE items SET state = '{PREPARED}', updated_at = ? WHERE {where}", params
            ).rowcount

        return await self._write(job, durable=False)

    async def oldest_new(self, destination: Destination | None = None) -> float | None:
        """When the oldest new item (of one destination, or of all) was received; None if none."""

        def q(conn: sqlite3.Connection) -> float | None:
            if destination is None:
                row = conn.execute(
                    f"SELECT MIN(created_at) FROM items WHERE state = '{NEW}' AND checked_out = 0"
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT MIN(created_at) FROM items WHERE destination_ae = ? AND "
                    f"destination_role = ? AND state = '{NEW}' AND checked_out = 0",
                    (destination.ae_title, destination.role),
                ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._read(q)

    async def checkout_batch(
        self,
        destination: Destination,
        *,
        now: float,
        limit: int,
        by_series: bool = False,
        sop_class_priorities: Sequence[str] | None = None,
        study_quiet_before: float | None = None,
        exempt_studies: Collection[str] = (),
        series_uid: str | None = None,
    ) -> list[Item]:
        """Check out the next batch for `destination` (see the package docstring for the order).

        `series_uid` restricts the batch to that series (a node topping up an association that
        carries one series)."""
        if limit <= 0:
            return []
        job = partial(
            self._checkout_job,
            destination,
            now,
            limit,
            by_series,
            _normalise_priorities(sop_class_priorities),
            study_quiet_before,
            sorted(exempt_studies),
            series_uid,
        )
        return await self._write(job, durable=False)

    def _checkout_job(
        self,
        dest: Destination,
        now: float,
        limit: int,
        by_series: bool,
        priorities: list[str] | None,
        quiet_before: float | None,
        exempt: list[str],
        series_uid: str | None,
        conn: sqlite3.Connection,
    ) -> list[Item]:
        query = _BatchQuery(
            conn,
            _candidates(dest, quiet_before, exempt),
            _class_groups(priorities),
            now,
            limit,
            _failed_due(conn, dest, now),
        )
        if series_uid is not None:
            rows = query.collect("i.series_uid = ?", [series_uid])
        else:
            rows = query.collect("", [])
        if by_series and rows and series_uid is None:
            rows = query.collect("i.series_uid = ?", [rows[0]["series_uid"]])
        elif series_uid is None:
            rows = _sorted_within_series(rows)
        if not rows:
            return []
        rows = _within_inline_budget(rows, CHECKOUT_INLINE_BYTES)
        _mark_checked_out(conn, [r["id"] for r in rows], now)
        return items_with_bytes(conn, rows, self._item, checked_out=True, updated_at=now)

    async def delivered(self, ids: Iterable[int]) -> None:
        """Delivered items are removed; a file goes when its last item does."""
        id_list = list(ids)
        if not id_list:
            return

        def job(conn: sqlite3.Connection) -> Any:
            return unlinking(None, remove_items(conn, self.root, id_list), delivered=True)

        await self._write(job)

    async def record_outcomes(
        self,
        delivered: Sequence[int] = (),
        failed: Sequence[tuple[int, str, float | None]] = (),
        rejected: Sequence[tuple[int, str]] = (),
        *,
        durable: bool = True,
    ) -> None:
        """A node's outcomes for part of a batch, in one store job: `delivered` ids are removed
        (as `delivered`), `failed` (id, error, next attempt) as `fail`, `rejected` (id, error)
        as `reject`. Ids no longer in the index are skipped, so one vanished item never undoes
        the record of the others.

        `durable=False` commits without a WAL fsync of its own (the next durable commit covers
        it): for outcomes whose loss in a power cut costs only a repeated delivery. A caller
        passes it only when no spool file goes away with the record (small instances kept in
        the index): a file unlinked after a record that a power cut then undoes would leave an
        item without its file."""
        delivered, failed, rejected = list(delivered), list(failed), list(rejected)
        if not (delivered or failed or rejected):
            return
        now = self._clock()

        def job(conn: sqlite3.Connection) -> Any:
            conn.executemany(_FAIL_SQL, [(error, at, now, item_id) for item_id, error, at in failed])
            conn.executemany(_REJECT_SQL, [(error, now, item_id) for item_id, error in rejected])
            paths = remove_items(conn, self.root, delivered) if delivered else []
            if paths and not durable:
                # never unlink after a commit a power cut may undo: the files stay in the trash
                # table, and recovery removes them at the next start
                log.warning("store: %d delivered file(s) left for recovery to remove", len(paths))
                paths = []
            return unlinking(None, paths, delivered=True)

        await self._write(job, durable=durable)

    def _update_one(
        self, conn: sqlite3.Connection, item_id: int, sql: str, params: Sequence[Any]
    ) -> None:
        if conn.execute(sql, (*params, item_id)).rowcount == 0:
            raise ItemNotFound(f"no item {item_id}")

    async def fail(self, item_id: int, error: str, next_attempt_at: float | None) -> None:
        """A delivery attempt failed: attempt+1, lastError, state failed, back in the queue."""
        now = self._clock()
        await self._write(
            lambda conn: self._update_one(
                conn,
                item_id,
                _FAIL_SQL,
                (error, next_attempt_at, now),
            )
        )

    async def reject(self, item_id: int, error: str) -> None:
        """The destination refused the item: attempt+1, state rejected (no automatic retry)."""
        now = self._clock()
        await self._write(
            lambda conn: self._update_one(
                conn,
                item_id,
                _REJECT_SQL,
                (error, now),
            )
        )

    async def release(self, ids: Iterable[int]) -> None:
        """Give checked-out items back unchanged (aborted send, pause)."""
        id_list = list(ids)
        if not id_list:
            return

        def job(conn: sqlite3.Connection) -> None:
            for chunk in chunks(id_list):
                conn.execute(
                    f"UPDATE items SET checked_out = 0 WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )

        await self._write(job, durable=False)

    async def release_all_checked_out(self, destination: Destination | None = None) -> list[str]:
        """Release every checked-out item (of one destination): the supervisor after a crash.
        Returns their SOP Instance UIDs (what may reach the destination twice)."""

        where = "checked_out = 1"
        params: tuple[str, ...] = ()
        if destination is not None:
            where += " AND destination_ae = ? AND destination_role = ?"
            params = (destination.ae_title, destination.role)

        def job(conn: sqlite3.Connection) -> list[str]:
            # (not UPDATE ... RETURNING: that needs SQLite 3.35, and some systems' Python has 3.34)
            select = f"SELECT sop_instance_uid FROM items WHERE {where}"
            uids = [r[0] for r in conn.execute(select, params)]
            conn.execute(f"UPDATE items SET checked_out = 0 WHERE {where}", params)
            return uids

        return await self._write(job, durable=False)

    async def next_eligible_at(self, destination: Destination, now: float) -> float | None:
        """When something of `destination` is next eligible for checkout (now if already)."""

        def q(conn: sqlite3.Connection) -> float | None:
            key = (destination.ae_title, destination.role)
            if conn.execute(
                "SELECT 1 FROM items WHERE destination_ae = ? AND destination_role = ? "
                f"AND state = '{PREPARED}' AND checked_out = 0 LIMIT 1",
                key,
            ).fetchone():
                return now
            row = conn.execute(
                "SELECT MIN(next_attempt_at) FROM items WHERE destination_ae = ? AND "
                f"destination_role = ? AND state = '{FAILED}' AND checked_out = 0 "
                "AND next_attempt_at IS NOT NULL",
                key,
            ).fetchone()
            if row is None or row[0] is None:
                return None
            return max(now, float(row[0]))

        return await self._read(q)

    async def first_quiet_arrival(self, destination: Destination, lookahead: int) -> float | None:
        """Of the studies of the `lookahead` oldest items waiting for `destination` (prepared,
        not checked out), the earliest last arrival: when the first of them fell quiet (the
        ProcessDelay's next look). None when nothing waits."""

        def q(conn: sqlite3.Connection) -> float | None:
            dest = (destination.ae_title, destination.role)
            row = conn.execute(
                "SELECT MIN(last) FROM (SELECT MAX(created_at) AS last FROM items "
                "WHERE destination_ae = ? AND destination_role = ? AND study_uid IN ("
                "SELECT study_uid FROM items WHERE destination_ae = ? AND destination_role = ? "
                f"AND state = '{PREPARED}' AND checked_out = 0 ORDER BY created_at, id LIMIT ?) "
                "GROUP BY study_uid)",
                (*dest, *dest, lookahead),
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._read(q)
