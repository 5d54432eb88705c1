"""Typed errors of the store; the API and the acceptor translate them at their edges."""

from __future__ import annotations

import errno
import sqlite3


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class StoreFull(StoreError):
    """Free space below the minimum, or a write failed with ENOSPC/EIO: the acceptor answers 0xA700.

    Nothing of the refused instance remains (no spool file, no item).
    """


class StoreInUse(StoreError):
    """Another process (a second router on the same cache directory) has the store open."""


class TransitionError(StoreError):
    """The requested transition is impossible from the item's current state (API: 409)."""


class ItemCheckedOut(TransitionError):
    """The item is being delivered; operator transitions must wait (API: 409)."""


class ItemNotFound(StoreError):
    """No item with that id (API: 404)."""


#: errno values that mean "the disk cannot take this write now".
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS})


def translate(exc: BaseException) -> BaseException:
    """Map low-level write failures onto StoreFull; leave everything else alone."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        full = StoreFull(f"write refused: {exc}")
        full.__cause__ = exc
        return full
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        # SQLITE_FULL = 13, SQLITE_IOERR = 10, SQLITE_READONLY = 8 (ROFS after EIO on some FS)
        if primary in (13, 10) or "disk is full" in str(exc) or "disk I/O error" in str(exc):
            full = StoreFull(f"index write refused: {exc}")
            full.__cause__ = exc
            return full
    return exc
