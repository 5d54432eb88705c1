"""Outcome values of sending one instance to a destination.

The DICOM layer translates statuses and peer errors into these; nothing outside dicom/ sees a raw
status integer: a failure carries its DIMSE status class (`status_class`, a response status) or
its association error kind (`kind`: the association itself failed), for the metrics.
"""

from __future__ import annotations

from typing import Literal

import attrs


@attrs.frozen
class Delivered:
    """The destination stored the instance (success, or a warning status that still stored it)."""

    warning: str = ""
    #: the transfer syntax UID the instance was converted into on the way out, because the
    #: destination accepted no syntax it was stored in ("": sent as stored)
    converted_to: str = ""


@attrs.frozen
class Rejected:
    """The destination will keep refusing this instance: no automatic retry."""

    reason: str
    #: refused with the whole association (a permanent A-ASSOCIATE-RJ: the destination does not
    #: know our AE title, say): the node backs off as for an unreachable destination, so that
    #: one batch per backoff is rejected, not its whole queue at once
    association: bool = False
    #: the DIMSE status class of the C-STORE response that refused it ("" when no response did)
    status_class: str = ""
    #: the association error kind when the association failed (`ASSOCIATION_ERROR_KINDS`)
    kind: str = ""
    #: refused because its conversion on the way out failed (the codec cannot convert it)
    unconvertible: bool = False


@attrs.frozen
class RetryLater:
    """A transient failure (network, timeout, abort, out of resources): retry after backoff."""

    reason: str
    #: the DIMSE status class of the C-STORE response ("" when no response did)
    status_class: str = ""
    #: the association error kind when the association failed (`ASSOCIATION_ERROR_KINDS`)
    kind: str = ""


#: DIMSE status classes of a failed C-STORE response (PS3.4 B.2.3, PS3.7 C)
STATUS_CLASSES: tuple[str, ...] = (
    "out_of_resources",  # 0xA7xx
    "dataset_mismatch",  # 0xA9xx
    "cannot_understand",  # 0xCxxx
    "sop_class_not_supported",  # 0x0122
    "resource_limitation",  # 0x0213
    "cancel",  # 0xFE00
    "other",
)
#: why an association failed: no connection, a timeout, an A-ASSOCIATE-RJ, an A-ABORT, a
#: protocol error, the connection lost, no bytes either way (stall)
ASSOCIATION_ERROR_KINDS: tuple[str, ...] = (
    "connect", "timeout", "rejected", "aborted", "protocol", "connection_lost", "stalled",
)


Outcome = Delivered | Rejected | RetryLater


#: what an outcome says of a conversion on the way out (`send_conversion`)
SendConversion = Literal["converted", "failed"]


def send_conversion(outcome: Outcome) -> SendConversion | None:
    """What an outcome says of a conversion on the way out: "converted" (delivered converted),
    "failed" (rejected: it could not be converted), None (none was done)."""
    if isinstance(outcome, Delivered) and outcome.converted_to:
        return "converted"
    if isinstance(outcome, Rejected) and outcome.unconvertible:
        return "failed"
    return None
