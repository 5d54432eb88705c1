"""What the router knows about one received DICOM instance, read from its header."""

from __future__ import annotations

import attrs


@attrs.frozen
class InstanceHeader:
    """The header fields the queue index keeps for one instance.

    Filled by the DICOM acceptor from the first bytes of the dataset (never from pixel data).
    Strings are as found in the dataset, stripped of DICOM padding; absent values are "".
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    modality: str = ""
    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""


@attrs.frozen
class Destination:
    """One place an instance is queued for: a node's AE title and role."""

    ae_title: str
    role: str = "Storage"
