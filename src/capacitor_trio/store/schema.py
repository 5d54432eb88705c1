"""The index schema and its migrations.

`meta.schema_version` records the version. A later version adds a function to MIGRATIONS that
takes the index from version N-1 to N inside the opening transaction; opening an index written by
a newer version is refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from .errors import StoreError

SCHEMA_VERSION = 3

_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE instances (
    id          INTEGER PRIMARY KEY,
    rel_path    TEXT NOT NULL UNIQUE,
    size_bytes  INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
CREATE TABLE items (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,  -- ids are never reused (API)
    instance_id         INTEGER NOT NULL REFERENCES instances(id),
    state               TEXT NOT NULL,
    checked_out         INTEGER NOT NULL DEFAULT 0,
    source_ae           TEXT NOT NULL,
    destination_ae      TEXT NOT NULL,
    destination_role    TEXT NOT NULL,
    study_uid           TEXT NOT NULL,
    series_uid          TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    modality            TEXT NOT NULL,
    patient_id          TEXT NOT NULL,
    patient_name        TEXT NOT NULL,
    accession_number    TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    size_bytes          INTEGER NOT NULL,
    attempt_count       INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT NOT NULL DEFAULT '',
    next_attempt_at     REAL,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    search_text         TEXT NOT NULL  -- lower-cased UIDs, AE titles, accession, patient ID
);
CREATE INDEX items_instance ON items(instance_id);
CREATE INDEX items_queue ON items(destination_ae, destination_role, state, checked_out, created_at, id);
CREATE INDEX items_dest_study ON items(destination_ae, destination_role, study_uid, created_at);
CREATE INDEX items_failed_due ON items(destination_ae, destination_role, next_attempt_at)
    WHERE state = 'failed' AND checked_out = 0;
CREATE INDEX items_state ON items(state, id);
CREATE INDEX items_created ON items(created_at);
CREATE INDEX items_source ON items(source_ae);
CREATE INDEX items_modality ON items(modality);
CREATE INDEX items_series ON items(series_uid);
CREATE INDEX items_study ON items(study_uid);
-- covering index for free-text search: a substring scan reads this, not the whole rows
CREATE INDEX items_search ON items(search_text);
CREATE INDEX items_checked_out ON items(checked_out) WHERE checked_out = 1;
-- files whose last item went away in a committed transaction: unlinked after the commit,
-- and again by recovery if the process died in between.
CREATE TABLE trash (rel_path TEXT PRIMARY KEY);
CREATE TABLE paused (ae_title TEXT NOT NULL, role TEXT NOT NULL, PRIMARY KEY (ae_title, role));
"""


def _to_v1(conn: sqlite3.Connection) -> None:
    for statement in _V1.split(";"):
        if statement.strip():
            conn.execute(statement)


#: Version 2: small instances kept in the index itself (their bytes committed with their items
#: in one transaction, one fsync) instead of a spool file. Their `instances.rel_path` is
#: `inline/<hex>`, never a file.
_V2 = """
CREATE TABLE blobs (instance_id INTEGER PRIMARY KEY, data BLOB NOT NULL)
"""


def _to_v2(conn: sqlite3.Connection) -> None:
    conn.execute(_V2)


#: Version 3: the per-item prepare stage (filters, transcoding). `received_syntax` is the
#: transfer syntax the instance came in (`transfer_syntax_uid` is the one the item is sent in,
#: a prepared copy's); `sort_key` orders a series' items for delivery (the sort filter);
#: `added_by` names the item whose route added this one; `prepared_copy` is 1 when the item is
#: sent as a prepared copy of its own (its steps ran already). A `new` item's `next_attempt_at` is
#: the time before which it is not prepared again (a filter asked to retry later).
_V3 = (
    "ALTER TABLE items ADD COLUMN received_syntax TEXT NOT NULL DEFAULT ''",
    "UPDATE items SET received_syntax = transfer_syntax_uid",
    "ALTER TABLE items ADD COLUMN sort_key BLOB",
    "ALTER TABLE items ADD COLUMN added_by INTEGER",
    "ALTER TABLE items ADD COLUMN prepared_copy INTEGER NOT NULL DEFAULT 0",
)


def _to_v3(conn: sqlite3.Connection) -> None:
    for statement in _V3:
        conn.execute(statement)


#: MIGRATIONS[n] takes the index from version n to n + 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _to_v1, 1: _to_v2, 2: _to_v3}

#: `instances.rel_path` prefix of an instance kept in the index (table `blobs`), not in a file
INLINE_PREFIX = "inline/"
#: the name ending of a prepared copy's spool file: recovery removes such a file that no
#: instance row names (written, never recorded: its item is still `new` and is prepared again)
PREPARED_SUFFIX = ".prep.dcm"


def current_version(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if row is None:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the index to SCHEMA_VERSION in the caller's transaction; returns the old version."""
    found = current_version(conn)
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"index schema version {found} is newer than this build understands ({SCHEMA_VERSION})"
        )
    for version in range(found, SCHEMA_VERSION):
        MIGRATIONS[version](conn)
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(version + 1),),
        )
    return found
