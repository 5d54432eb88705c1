"""JSON shapes of the API: nodes, items, DICOM tags. Plain functions from core values to dicts."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from capacitor_trio.actors.messages import NodeStatus
from capacitor_trio.config.models import Node
from capacitor_trio.dicom.detail import ShowLimits, bounded_copy
from capacitor_trio.store import STATES, Counts, Item

from .envelope import iso


def queue_json(q: Any) -> dict[str, int]:
    """Items per state (`domain.states`, in its order) and checked out."""
    return {**{s: getattr(q, s) for s in STATES}, "checkedOut": q.checked_out}


def node_json(node: Node, status: NodeStatus | None, *, now: float | None = None) -> dict[str, Any]:
    """A node in camelCase. Override fields are the node's own values (null: inherits the global
    setting). Nodes without an actor (roles other than Storage) show an empty queue and status
    "none". `now` (wall time) gives the oldest waiting item's age."""
    oldest = status.oldest_waiting_at if status is not None else None
    return {
        "aeTitle": node.ae_title,
        "hostName": node.host_name,
        "port": node.port,
        "role": node.role,
        "aliases": list(node.aliases),
        "priority": node.priority,
        "processDelay": node.process_delay,
        "impersonate": node.impersonate,
        "transferSyntax": node.transfer_syntax,
        "batchSize": node.batch_size,
        "minimumLineSpeed": node.minimum_line_speed,
        "stallThreshold": node.stall_threshold,
        "processSchedule": list(node.process_schedule),
        "sopClassPriorities": None if node.sop_class_priorities is None else list(node.sop_class_priorities),
        "queue": queue_json(status.queue if status is not None else Counts()),
        "paused": status.paused if status is not None else False,
        "scheduleOverride": status.schedule_override if status is not None else False,
        "inWindow": status.in_window if status is not None else True,
        "status": status.status if status is not None else "none",
        "activity": status.activity if status is not None else "none",
        "lastError": (status.last_error or None) if status is not None else None,
        "lastDeliveredAt": iso(status.last_delivered_at) if status is not None else None,
        "restarts": status.restarts if status is not None else 0,
        "sendRate": round(status.send_rate, 3) if status is not None else 0.0,
        "oldestWaitingAt": iso(oldest),
        "oldestWaitingSeconds": None if oldest is None or now is None else max(0, int(now - oldest)),
    }


def item_json(item: Item, *, names: bool = True) -> dict[str, Any]:
    """An item in camelCase; `names` False: without the patient's name (a read without a
    credential while one is configured)."""
    return {
        "id": item.id,
        "state": item.state,
        "checkedOut": item.checked_out,
        "sourceAeTitle": item.source_ae,
        "destinationAeTitle": item.destination_ae,
        "destinationRole": item.destination_role,
        "studyInstanceUid": item.study_instance_uid,
        "seriesInstanceUid": item.series_instance_uid,
        "sopInstanceUid": item.sop_instance_uid,
        "sopClassUid": item.sop_class_uid,
        "modality": item.modality,
        "patientId": item.patient_id,
        "patientName": item.patient_name if names else None,
        "accessionNumber": item.accession_number,
        "transferSyntaxUid": item.transfer_syntax_uid,
        "receivedTransferSyntaxUid": item.received_syntax or item.transfer_syntax_uid,
        "sizeBytes": item.size_bytes,
        "attemptCount": item.attempt_count,
        "lastError": item.last_error or None,
        "nextAttemptAt": iso(item.next_attempt_at),
        "createdAt": iso(item.created_at),
        "updatedAt": iso(item.updated_at),
    }


#: The patient's identity shown without a credential (the item's patientId is shown too); the
#: rest of the Patient group (0010: birth date, sex, address, other IDs, comments...) is not.
PATIENT_IDENTITY = frozenset({0x00100020, 0x00100021})  # PatientID, IssuerOfPatientID


def _personal(tag: str, vr: Any) -> bool:
    """True for an element a read without a credential does not show: a person's name or what
    may be one (VR PN as sent; a tag whose dictionary VR is PN, sent under another VR, e.g.
    PatientName as LO in explicit VR), the patient's demographics (group 0010 but
    `PATIENT_IDENTITY`), and a private element (its meaning is the vendor's: it may hold anything)."""
    if vr == "PN":
        return True
    try:
        number = int(tag, 16)
    except ValueError:
        return True  # not a tag: shown to nobody without a credential
    group = number >> 16
    if group % 2 == 1 or (group == 0x0010 and number not in PATIENT_IDENTITY):
        return True
    try:
        return "PN" in dictionary_VR(number)
    except KeyError:  # not in the dictionary (a retired or unknown public tag): shown
        return False


def without_names(tags: dict[str, Any]) -> dict[str, Any]:
    """DICOM JSON `tags` without what a read without a credential does not show (`_personal`:
    names, the patient's demographics, private elements), in sequences too."""
    out: dict[str, Any] = {}
    for tag, elem in tags.items():
        if _personal(tag, elem.get("vr")):
            continue
        if elem.get("vr") == "SQ" and elem.get("Value"):
            elem = {**elem, "Value": [without_names(child) for child in elem["Value"]]}
        out[tag] = elem
    return out


def _is_bulk(vr: str) -> bool:
    # OB, OD, OF, OL, OV, OW, "OB or OW", UN: binary values are bulk data in PS3.18 F.2
    return vr.startswith("O") or vr.startswith("UN")


def _strip_bulk(ds: Dataset) -> None:
    for elem in list(ds):
        if elem.VR == "SQ":
            for child in elem.value or ():
                _strip_bulk(child)
        elif _is_bulk(str(elem.VR)):
            del ds[elem.tag]


@attrs.frozen
class Tags:
    """What the item detail shows of an instance's header, and the limits that cut it."""

    json: dict[str, Any]
    cut_by: tuple[str, ...]


#: what the item detail shows of a header at most
SHOW_LIMITS = ShowLimits()


def read_tags(path: Path | BinaryIO, limits: ShowLimits = SHOW_LIMITS) -> Tags:
    """The header of a Part 10 file in the DICOM JSON model, up to the pixel data, bulk data left
    out, cut to `limits` (elements, value sizes, items per sequence, nesting, bytes read): bounded
    in memory and time whatever the file holds. Blocking: call in a worker thread."""
    copy = bounded_copy(path, limits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(io.BytesIO(copy.data), copy.implicit, not copy.big)
        _strip_bulk(ds)
        return Tags(ds.to_json_dict(suppress_invalid_tags=True), copy.cut_by)
