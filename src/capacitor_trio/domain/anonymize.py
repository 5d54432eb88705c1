"""The anonymize action: PS3.15 Annex E's Basic Application Level Confidentiality Profile on a
pydicom Dataset, with the patient's pseudonym from a mapping (`PseudonymStore`).

The store is a port: the router's is the CSV file of `pseudonyms.py`; `MemoryPseudonyms`
serves tests and offline runs (filter-test) that must not write the operator's mapping file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from typing import Protocol

import attrs
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence


@attrs.frozen
class PatientKey:
    """Who a pseudonym stands for: Patient ID (0010,0020) and Issuer of Patient ID (0010,0021),
    as text ('' when absent)."""

    patient_id: str
    issuer: str


class PseudonymStore(Protocol):
    """Pseudonyms per mapping file (an anonymize action's Destination.Value): the same key
    always gets the same pseudonym from the same mapping, and each mapping has a secret that
    keys the UID replacement."""

    def pseudonym(self, mapping: str, key: PatientKey) -> str:
        """The key's pseudonym in `mapping`, made and recorded durably if it has none yet.
        Raises OSError when the mapping cannot be read or written (the item is retried),
        ValueError when the file is not a mapping (the item fails)."""
        ...

    def secret(self, mapping: str) -> bytes:
        """The mapping's secret (32 bytes), made and recorded durably on first use; the same
        errors."""
        ...


def new_pseudonym() -> str:
    """A random pseudonym: "ANON" and 16 base32 characters (80 bits; fits LO and PN)."""
    return "ANON" + base64.b32encode(secrets.token_bytes(10)).decode("ascii")


class MemoryPseudonyms:
    """A PseudonymStore in memory: consistent within the process, forgotten at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pseudonyms: dict[tuple[str, PatientKey], str] = {}
        self._secrets: dict[str, bytes] = {}

    def pseudonym(self, mapping: str, key: PatientKey) -> str:
        with self._lock:
            return self._pseudonyms.setdefault((mapping, key), new_pseudonym())

    def secret(self, mapping: str) -> bytes:
        with self._lock:
            return self._secrets.setdefault(mapping, secrets.token_bytes(32))


# ---------------------------------------------------------------------------------------------
# PS3.15 Annex E, Table E.1-1, column "Basic Profile", for the attributes it names. Actions:
# X remove, Z empty (zero length), D a dummy value, U a UID replaced consistently (see
# `replace_uid`); a sequence kept (D, U*) has the table applied to its items. Where the table
# gives a choice that depends on the IOD (X/Z, Z/D, X/D, X/Z/D) we take the one valid in every
# IOD: D when it is offered, else Z. Attributes the table does not name are kept (K); private
# attributes, curves (50xx) and overlay data and comments (60xx,3000/4000) are removed.
_X, _Z, _D, _U = "X", "Z", "D", "U"
PROFILE: dict[int, str] = {
    0x00080014: _U, 0x00080017: _U, 0x00080018: _U, 0x00080020: _Z, 0x00080021: _X,
    0x00080022: _Z, 0x00080023: _D, 0x00080025: _X, 0x0008002A: _D, 0x00080030: _Z,
    0x00080031: _X, 0x00080032: _Z, 0x00080033: _D, 0x00080035: _X, 0x00080050: _Z,
    0x00080058: _U, 0x00080080: _D, 0x00080081: _X, 0x00080082: _D, 0x00080090: _Z,
    0x00080092: _X, 0x00080094: _X, 0x00080096: _X, 0x0008010D: _U, 0x00080201: _X,
    0x00081010: _D, 0x00081030: _X, 0x0008103E: _X, 0x00081040: _X, 0x00081048: _X,
    0x00081049: _X, 0x00081050: _X, 0x00081052: _X, 0x00081060: _X, 0x00081062: _X,
    0x00081070: _D, 0x00081072: _D, 0x00081080: _X, 0x00081084: _X, 0x00081110: _Z,
    0x00081111: _D, 0x00081120: _X, 0x00081155: _U, 0x00081195: _U, 0x00082111: _X,
    0x00083010: _U, 0x00084000: _X, 0x00089123: _U,
    0x00100010: _Z, 0x00100020: _Z, 0x00100021: _X, 0x00100030: _Z, 0x00100032: _X,
    0x00100040: _Z, 0x00100050: _X, 0x00100101: _X, 0x00100102: _X, 0x00101000: _X,
    0x00101001: _X, 0x00101002: _X, 0x00101005: _X, 0x00101010: _X, 0x00101020: _X,
    0x00101030: _X, 0x00101040: _X, 0x00101050: _X, 0x00101060: _X, 0x00101080: _X,
    0x00101081: _X, 0x00101090: _X, 0x00102000: _X, 0x00102110: _X, 0x00102150: _X,
    0x00102152: _X, 0x00102154: _X, 0x00102160: _X, 0x00102180: _X, 0x001021A0: _X,
    0x001021B0: _X, 0x001021C0: _X, 0x001021D0: _X, 0x001021F0: _X, 0x00102203: _Z,
    0x00102297: _X, 0x00102299: _X, 0x00104000: _X,
    0x00180010: _D, 0x00181000: _D, 0x00181002: _U, 0x00181004: _X, 0x00181005: _X,
    0x00181007: _X, 0x00181008: _X, 0x00181030: _D, 0x00181400: _D, 0x00184000: _X,
    0x0018700A: _D, 0x0018A003: _X,
    0x0020000D: _U, 0x0020000E: _U, 0x00200010: _Z, 0x00200052: _U, 0x00200200: _U,
    0x00203401: _X, 0x00203404: _X, 0x00203406: _X, 0x00204000: _X, 0x00209158: _X,
    0x00209161: _U, 0x00209164: _U,
    0x00281214: _U, 0x00284000: _X,
    0x00320012: _X, 0x00321020: _X, 0x00321021: _X, 0x00321030: _X, 0x00321032: _X,
    0x00321033: _X, 0x00321060: _Z, 0x00321070: _X, 0x00324000: _X,
    0x00380004: _X, 0x00380010: _X, 0x00380011: _X, 0x0038001E: _X, 0x00380020: _X,
    0x00380021: _X, 0x00380040: _X, 0x00380050: _X, 0x00380060: _X, 0x00380061: _X,
    0x00380062: _X, 0x00380400: _X, 0x00380500: _X, 0x00384000: _X,
    0x00400001: _X, 0x00400002: _X, 0x00400003: _X, 0x00400004: _X, 0x00400005: _X,
    0x00400006: _X, 0x00400007: _X, 0x0040000B: _X, 0x00400010: _X, 0x00400011: _X,
    0x00400012: _X, 0x00400241: _X, 0x00400242: _X, 0x00400243: _X, 0x00400244: _X,
    0x00400245: _X, 0x00400253: _X, 0x00400254: _X, 0x00400275: _X, 0x00400280: _X,
    0x00400555: _X, 0x00401001: _X, 0x00401004: _X, 0x00401005: _X, 0x00401010: _X,
    0x00401011: _X, 0x00401101: _D, 0x00401102: _X, 0x00401103: _X, 0x00401400: _X,
    0x00402001: _X, 0x00402008: _X, 0x00402009: _X, 0x00402010: _X, 0x00402016: _Z,
    0x00402017: _Z, 0x00402400: _X, 0x00403001: _X, 0x00404023: _U, 0x00404025: _X,
    0x00404027: _X, 0x00404028: _X, 0x00404030: _X, 0x00404034: _X, 0x00404035: _X,
    0x00404036: _X, 0x00404037: _X, 0x0040A027: _X, 0x0040A073: _D, 0x0040A075: _D,
    0x0040A078: _X, 0x0040A07A: _X, 0x0040A07C: _X, 0x0040A088: _Z, 0x0040A123: _D,
    0x0040A124: _U, 0x0040A730: _X, 0x0040DB0C: _U, 0x0040DB0D: _U,
    0x00700001: _X, 0x00700084: _Z, 0x00700086: _X, 0x0070031A: _U,
    0x00880140: _U, 0x00880200: _X, 0x00880904: _X, 0x00880906: _X, 0x00880910: _X,
    0x00880912: _X,
    0x20300020: _X, 0x300A0013: _U, 0x30060024: _U, 0x300600C2: _U, 0x300E0008: _Z,
    0x04000100: _X, 0x04000402: _X, 0x04000403: _X, 0x04000404: _X, 0x04000550: _X,
    0x04000561: _X,
    0x40000010: _X, 0x40004000: _X, 0x40080042: _X, 0x40080102: _X, 0x4008010A: _X,
    0x4008010B: _X, 0x4008010C: _X, 0x40080111: _X, 0x40080114: _X, 0x40080115: _X,
    0x40080118: _X, 0x40080119: _X, 0x4008011A: _X, 0x40080202: _X, 0x40080300: _X,
    0x40084000: _X,
    0xFFFAFFFA: _X, 0xFFFCFFFC: _X,
}  # fmt: skip
# Graphic Annotation Sequence (0070,0001) is D in the table (its text replaced); we remove it.

_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y", "IS": "0",
          "DS": "0", "CS": "ANONYMIZED"}  # fmt: skip
_DUMMY_TEXT = "ANONYMIZED"
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})


def replace_uid(secret: bytes, uid: str) -> str:
    """The UID that stands for `uid` under this secret: "2.25." and the first 128 bits of
    HMAC-SHA256(secret, uid) as a decimal number. The same UID always gets the same
    replacement (so study, series and references stay consistent across instances and
    restarts); without the secret it cannot be linked back to the original."""
    digest = hmac.new(secret, uid.strip().encode("ascii", "replace"), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _action_for(tag: int) -> str | None:
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 == 1:
        return _X  # private attributes (and their creators)
    if 0x5000 <= group <= 0x501E or (0x6000 <= group <= 0x601E and element in (0x3000, 0x4000)):
        return _X  # curves, overlay data and comments
    return PROFILE.get(tag)


MAX_DEPTH = 64  # sequences nested deeper fail the item (no real instance comes near)


def apply_profile(ds: Dataset, secret: bytes, depth: int = 0) -> list[int]:
    """Apply the table to `ds` and, recursively, to the items of the sequences it keeps;
    returns the top-level tags changed (in data set order)."""
    changed: list[int] = []
    for tag in list(ds.keys()):
        element = ds[tag]
        action = _action_for(int(tag))
        if action == _X:
            del ds[tag]
            changed.append(int(tag))
        elif _changes(element, action, secret, depth):
            changed.append(int(tag))
    return changed


def _changes(element: DataElement, action: str | None, secret: bytes, depth: int) -> bool:
    """Z, D or U on `element`, or the table on the items of a sequence it does not name."""
    if action is None:
        return element.VR == "SQ" and _items(element, secret, depth)
    return _replace(element, action, secret, depth)


def _too_deep(ds: Dataset, depth: int) -> bool:
    for tag in list(ds.keys()):
        element = ds[tag]
        if element.VR == "SQ" and element.value and (
            depth >= MAX_DEPTH or any(_too_deep(item, depth + 1) for item in element.value)
        ):
            return True
    return False


def _items(element: DataElement, secret: bytes, depth: int) -> bool:
    if depth >= MAX_DEPTH:
        raise ValueError(f"sequences nested deeper than {MAX_DEPTH}")
    return any([bool(apply_profile(item, secret, depth + 1)) for item in element.value])


def _replace(element: DataElement, action: str, secret: bytes, depth: int) -> bool:
    """Z, D or U on one element, in place; whether its value changed."""
    before = element.value
    if element.VR == "SQ":
        if action == _Z:
            element.value = []
            return bool(before)
        return _items(element, secret, depth)
    if action == _U and element.VR == "UI":
        values = [before] if isinstance(before, str) else list(before or [])
        replaced = [replace_uid(secret, str(v)) if str(v).strip() else "" for v in values]
        element.value = replaced[0] if len(replaced) == 1 else replaced
    elif action in (_Z, _U):
        element.value = None if element.VR in _NUMBER_VRS else ""
    else:
        element.value = 0 if element.VR in _NUMBER_VRS else _DUMMY.get(element.VR, _DUMMY_TEXT)
    return element.value != before


METHOD = "DICOM PS3.15 Annex E Basic Profile (capacitor-trio)"


def patient_key(ds: Dataset) -> PatientKey:
    """The key a pseudonym stands for; ValueError when the data set has no Patient ID (patients
    without one would all share a pseudonym)."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    if not patient_id:
        raise ValueError("the data set has no PatientID to key the pseudonym on")
    if any(c in patient_id + issuer for c in "\r\n"):
        raise ValueError("PatientID or IssuerOfPatientID holds a line break")
    return PatientKey(patient_id, issuer)


def deidentify(ds: Dataset, pseudonym: str, secret: bytes) -> set[int]:
    """Apply the profile, give the patient `pseudonym` as Patient ID and Patient's Name, and
    record what was done (Patient Identity Removed, De-identification Method and its code,
    Longitudinal Temporal Information Modified). The file meta's Media Storage SOP Instance
    UID follows the new SOP Instance UID. Returns the top-level tags whose items changed
    (sequences). ValueError, before any change, for pixel data with burned-in annotation and
    for sequences nested deeper than MAX_DEPTH."""
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise ValueError(
            "BurnedInAnnotation is YES: the pixel data may identify the patient, and anonymize "
            "does not clean pixel data"
        )
    if _too_deep(ds, 0):
        raise ValueError(f"sequences nested deeper than {MAX_DEPTH}")
    changed = set(apply_profile(ds, secret))
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return changed
