"""Item rows: the columns the store selects, their mapping into `Item` by column name, the
filter of listings and bulk operations, and the removal of items with their instances."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .model import STATES, Item, ItemFilter
from .schema import INLINE_PREFIX

T = TypeVar("T")

ITEM_COLUMNS = (
    "i.id, i.state, i.checked_out, i.source_ae, i.destination_ae, i.destination_role, "
    "i.study_uid, i.series_uid, i.sop_instance_uid, i.sop_class_uid, i.modality, i.patient_id, "
    "i.patient_name, i.accession_number, i.transfer_syntax_uid, i.size_bytes, i.attempt_count, "
    "i.last_error, i.next_attempt_at, i.created_at, i.updated_at, n.rel_path, i.instance_id, "
    "i.received_syntax, i.sort_key, i.added_by, i.prepared_copy"
)
#: the names of `ITEM_COLUMNS`, in order
ITEM_FIELDS = tuple(column.split(".")[1] for column in ITEM_COLUMNS.split(", "))
#: a row of an item query, by column name (a dict: `sqlite3.Row` finds a name by comparing it
#: with each column's, case-insensitively, which made reading an item 5 times as slow)
ItemRow = dict[str, Any]
SELECT_ITEMS = f"SELECT {ITEM_COLUMNS} FROM items i JOIN instances n ON n.id = i.instance_id"
SELECT_QUEUE = (
    f"SELECT {ITEM_COLUMNS} FROM items i INDEXED BY items_queue "
    "JOIN instances n ON n.id = i.instance_id"
)

CHUNK = 500  # ids per IN (...) clause


def chunks(seq: Sequence[T], n: int = CHUNK) -> Iterable[Sequence[T]]:
    for k in range(0, len(seq), n):
        yield seq[k : k + n]


def marks(n: int) -> str:
    """``?,?,…`` for an IN (...) clause of `n` values."""
    return ",".join("?" * n)


def _item_row(_cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> ItemRow:
    return dict(zip(ITEM_FIELDS, values, strict=True))


def item_rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[ItemRow]:
    """The rows of an item query (`SELECT_ITEMS`, `SELECT_QUEUE`), read by column name."""
    cur = conn.cursor()
    cur.row_factory = _item_row
    return cur.execute(sql, params).fetchall()


def is_inline(r: ItemRow) -> bool:
    """The row's instance is kept in the index (its bytes in `blobs`), not in a spool file."""
    return bool(r["rel_path"].startswith(INLINE_PREFIX))


def to_item(root: Path, r: ItemRow, **override: Any) -> Item:
    """An `Item` from a row of `item_rows`, with `override` taking the place of columns."""
    fields = dict(
        id=r["id"],
        state=r["state"],
        checked_out=bool(r["checked_out"]),
        source_ae=r["source_ae"],
        destination_ae=r["destination_ae"],
        destination_role=r["destination_role"],
        study_instance_uid=r["study_uid"],
        series_instance_uid=r["series_uid"],
        sop_instance_uid=r["sop_instance_uid"],
        sop_class_uid=r["sop_class_uid"],
        modality=r["modality"],
        patient_id=r["patient_id"],
        patient_name=r["patient_name"],
        accession_number=r["accession_number"],
        transfer_syntax_uid=r["transfer_syntax_uid"],
        size_bytes=r["size_bytes"],
        attempt_count=r["attempt_count"],
        last_error=r["last_error"],
        next_attempt_at=r["next_attempt_at"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        path=root / r["rel_path"],
        instance_id=r["instance_id"],
        inline=is_inline(r),
        received_syntax=r["received_syntax"],
        sort_key=None if r["sort_key"] is None else bytes(r["sort_key"]),
        added_by=r["added_by"],
        prepared_copy=bool(r["prepared_copy"]),
    )
    fields.update(override)
    return Item(**fields)


def blob(conn: sqlite3.Connection, instance_id: int) -> bytes | None:
    row = conn.execute("SELECT data FROM blobs WHERE instance_id = ?", (instance_id,)).fetchone()
    return None if row is None else bytes(row[0])


def stored_state(value: str) -> str:
    """A state's stored spelling; accepts plain strings and `ItemState` members alike."""
    spelled = str(value).strip().lower()
    if spelled not in STATES:
        raise ValueError(f"unknown state {value!r}")
    return spelled


def _like_pattern(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def filter_clause(f: ItemFilter) -> tuple[str, list[Any]]:
    """The WHERE clause (over ``items i``) and its parameters for filter `f`."""
    clauses: list[str] = []
    params: list[Any] = []
    for value, column in (
        (None if f.state is None else stored_state(f.state), "i.state"),
        (f.source, "i.source_ae"),
        (f.destination, "i.destination_ae"),
        (f.role, "i.destination_role"),
        (f.modality, "i.modality"),
        (f.study_uid, "i.study_uid"),
        (f.series_uid, "i.series_uid"),
    ):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if f.search:
        # LIKE is case-insensitive for ASCII, and cheaper than instr() here
        clauses.append("i.search_text LIKE ? ESCAPE '\\'")
        params.append(_like_pattern(f.search.lower()))
    return (" AND ".join(clauses) or "1"), params


def remove_items(conn: sqlite3.Connection, root: Path, ids: Sequence[int]) -> list[Path]:
    """Delete items; instances left without items go to the trash. Returns files to unlink."""
    instance_ids: set[int] = set()
    for chunk in chunks(ids):
        m = marks(len(chunk))
        instance_ids.update(
            r[0] for r in conn.execute(f"SELECT instance_id FROM items WHERE id IN ({m})", chunk)
        )
        conn.execute(f"DELETE FROM items WHERE id IN ({m})", chunk)
    paths: list[Path] = []
    for iid in sorted(instance_ids):
        path = forget_unreferenced(conn, root, iid)
        if path is not None:
            paths.append(path)
    return paths


def forget_unreferenced(conn: sqlite3.Connection, root: Path, instance_id: int) -> Path | None:
    """Delete an instance no item refers to any more: a small one's bytes go with its row, a
    larger one's file goes to the trash; returns that file, to unlink after the commit."""
    if conn.execute("SELECT 1 FROM items WHERE instance_id = ? LIMIT 1", (instance_id,)).fetchone():
        return None
    row = conn.execute("SELECT rel_path FROM instances WHERE id = ?", (instance_id,)).fetchone()
    if row is None:  # pragma: no cover - index corrupted by hand
        return None
    conn.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
    if row[0].startswith(INLINE_PREFIX):
        conn.execute("DELETE FROM blobs WHERE instance_id = ?", (instance_id,))
        return None
    conn.execute("INSERT OR IGNORE INTO trash(rel_path) VALUES (?)", (row[0],))
    return root / row[0]

