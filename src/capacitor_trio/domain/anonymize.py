"""The anonymize action: PS3.15 Annex E's Basic Application Level Confidentiality Profile on a
pydicom Dataset, with the patient's pseudonym from a mapping (`PseudonymStore`).

The store is a port: the router's is the CSV file of `pseudonyms.py`; `MemoryPseudonyms`
serves tests and offline runs (filter-test) that must not write the operator's mapping file.
"""

from __future__ import annotations

import base64
import secrets
import threading
from typing import Protocol

import attrs


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
        Raises OSError when the mapping cannot be read or written."""
        ...

    def secret(self, mapping: str) -> bytes:
        """The mapping's secret (32 bytes), made and recorded durably on first use."""
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
