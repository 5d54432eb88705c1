"""Outcome values of sending one instance to a destination.

The DICOM layer translates statuses and peer errors into these; nothing outside dicom/ sees a raw
status integer.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Delivered:
    """The destination stored the instance (success, or a warning status that still stored it)."""

    warning: str = ""


@attrs.frozen
class Rejected:
    """The destination will keep refusing this instance: no automatic retry."""

    reason: str
    #: refused with the whole association (a permanent A-ASSOCIATE-RJ: the destination does not
    #: know our AE title, say): the node backs off as for an unreachable destination, so that
    #: one batch per backoff is rejected, not its whole queue at once
    association: bool = False


@attrs.frozen
class RetryLater:
    """A transient failure (network, timeout, abort, out of resources): retry after backoff."""

    reason: str


Outcome = Delivered | Rejected | RetryLater
