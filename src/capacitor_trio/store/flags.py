"""Pause flags: which destinations an operator paused, kept across restarts."""

from __future__ import annotations

import sqlite3

from ..domain.instance import Destination
from .connection import StoreCore


class Flags(StoreCore):
    """The ``paused`` table."""

    async def set_paused(self, destination: Destination, paused: bool) -> None:
        def job(conn: sqlite3.Connection) -> None:
            if paused:
                conn.execute(
                    "INSERT OR IGNORE INTO paused(ae_title, role) VALUES (?, ?)",
                    (destination.ae_title, destination.role),
                )
            else:
                conn.execute(
                    "DELETE FROM paused WHERE ae_title = ? AND role = ?",
                    (destination.ae_title, destination.role),
                )

        await self._write(job)

    async def get_paused(self) -> set[tuple[str, str]]:
        def q(conn: sqlite3.Connection) -> set[tuple[str, str]]:
            return {(r[0], r[1]) for r in conn.execute("SELECT ae_title, role FROM paused")}

        return await self._read(q)
