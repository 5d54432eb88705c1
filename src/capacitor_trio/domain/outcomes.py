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


@attrs.frozen
class RetryLater:
    """A transient failure (network, timeout, abort, out of resources): retry after backoff."""

    reason: str


Outcome = Delivered | Rejected | RetryLater
