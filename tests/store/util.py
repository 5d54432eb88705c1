"""Small helpers shared by the store tests."""

from __future__ import annotations

import os
from pathlib import Path

from capacitor_trio.domain.instance import Destination, InstanceHeader
from capacitor_trio.store import Store
from capacitor_trio.store.spares import is_unused_spare

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.11"
EXPLICIT = "1.2.840.10008.1.2.1"

PACS = Destination("PACS")
ARCHIVE = Destination("ARCHIVE")
AI = Destination("AI")


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


_counter = [0]


def header(
    *, study: str = "1.2.3.1", series: str = "1.2.3.1.1", sop_class: str = CT, **kw: str
) -> InstanceHeader:
    _counter[0] += 1
    return InstanceHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=kw.pop("sop", f"1.2.3.9.{_counter[0]}"),
        transfer_syntax_uid=EXPLICIT,
        study_instance_uid=study,
        series_instance_uid=series,
        modality=kw.pop("modality", "CT"),
        patient_id=kw.pop("patient_id", "PID001"),
        patient_name=kw.pop("patient_name", "DOE^JANE"),
        accession_number=kw.pop("accession", "ACC001"),
    )


def write_temp(store: Store, data: bytes = b"DICM" * 64) -> Path:
    """What the acceptor does: write the received bytes to a fresh incoming path."""
    path = store.new_incoming_path()
    with open(path, "wb") as f:
        f.write(data)
    return path


async def commit(
    store: Store,
    dests: list[Destination] | None = None,
    *,
    source: str = "MODALITY",
    data: bytes = b"DICM" * 64,
    **kw: str,
) -> list[int]:
    return await store.commit_instance(
        write_temp(store, data), header(**kw), source, dests or [PACS]
    )


def spool_files(root: Path) -> set[Path]:
    out = set()
    for dirpath, _dirs, files in os.walk(root / "spool"):
        out.update(Path(dirpath) / f for f in files)
    return out


def file_paths(items: list) -> set[Path]:  # type: ignore[type-arg]
    """The spool files the items point at (instances kept in the index have none)."""
    return {i.path for i in items if not i.inline}


async def content(store: Store, item: object) -> bytes:
    """The stored bytes of an item's instance, wherever the store keeps them."""
    if item.inline:  # type: ignore[attr-defined]
        return await store.read_inline(item.instance_id)  # type: ignore[attr-defined]
    return item.path.read_bytes()  # type: ignore[attr-defined,no-any-return]


def incoming_leftovers(incoming: Path) -> list[Path]:
    """What receptions left in `incoming/`: everything but the empty files made ahead of need."""
    return [p for p in incoming.iterdir() if not is_unused_spare(p)] if incoming.exists() else []
