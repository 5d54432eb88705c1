"""DIMSE statuses and peer errors, translated into outcome values. Nothing outside dicom/ sees a
raw status integer."""

from __future__ import annotations

import logging

from capacitor_trio.domain.outcomes import Delivered, Outcome, Rejected, RetryLater

log = logging.getLogger("capacitor_trio.dicom")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
# The acceptor's own failure statuses (all in the 0xC000 "cannot understand" class)
STATUS_CANNOT_PROCESS = 0xC001
STATUS_UNPARSEABLE = 0xC210
STATUS_UID_MISMATCH = 0xC211
#: the data set's header was not reached within the header walk's limits (part10.HeaderLimits)
STATUS_HEADER_OUT_OF_BOUNDS = 0xC212

RESOURCE_LIMITATION = 0x0213

#: warnings: the instance was stored (PS3.4 B.2.3 for 0xBxxx, PS3.7 C for the general ones)
_WARNINGS = {
    0x0001: "requested optional attributes are not supported",
    0x0107: "attribute list error",
    0x0116: "attribute value out of range",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}


def store_status_outcome(status: int, error_comment: str | None = None) -> Outcome:
    """The outcome of one C-STORE response status."""
    detail = f" ({error_comment})" if error_comment else ""
    if status == SUCCESS:
        return Delivered()
    if status in _WARNINGS:
        text = f"warning 0x{status:04X}: {_WARNINGS[status]}{detail}"
        log.warning("C-STORE %s", text)
        return Delivered(warning=text)
    if 0xA700 <= status <= 0xA7FF:
        return RetryLater(f"out of resources (0x{status:04X}){detail}", status_class="out_of_resources")
    if 0xA900 <= status <= 0xA9FF:
        return Rejected(f"data set does not match SOP class (0x{status:04X}){detail}", status_class="dataset_mismatch")
    if 0xC000 <= status <= 0xCFFF:
        return Rejected(f"cannot understand (0x{status:04X}){detail}", status_class="cannot_understand")
    if status == SOP_CLASS_NOT_SUPPORTED:
        return Rejected(f"SOP class not supported (0x0122){detail}", status_class="sop_class_not_supported")
    if status == RESOURCE_LIMITATION:
        # a failure by class, but a transient one (the peer is short of memory, disk…)
        return RetryLater(f"resource limitation (0x0213){detail}", status_class="resource_limitation")
    if status == 0xFE00:
        return RetryLater(f"cancelled by peer (0xFE00){detail}", status_class="cancel")
    if 0xB000 <= status <= 0xBFFF:
        # other warnings: the instance was stored
        text = f"warning 0x{status:04X}{detail}"
        log.warning("C-STORE %s", text)
        return Delivered(warning=text)
    return Rejected(f"failure status 0x{status:04X}{detail}", status_class="other")
