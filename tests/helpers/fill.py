"""Queue many items fast, for tests and benchmarks that need a large index.

One real instance is committed through the store; the other rows share its file (as fan-out
items do) and are inserted in one write job. The SQL mirrors the store's schema: when the schema
changes, this is the one place outside store/ to follow it.
"""

from __future__ import annotations

from typing import Any

import trio

from capacitor_trio.domain.instance import Destination, InstanceHeader
from tests.helpers.datasets import make_dataset, write_dataset

MODALITIES = ("CT", "MR", "US", "CR")
SOURCES = ("MOD_A", "MOD_B")
STATES = ("new", "prepared", "failed", "rejected")


async def bulk_insert(
    store: Any, n: int, *, dest: str = "PACS", role: str = "Storage", state: str = "failed",
    spread: bool = True, patients: int = 50, retry_in: float = 0.0,
) -> None:
    """Queue `n` items for `dest`. With `spread`, modality, source and state cycle through their
    values; failed items are due `retry_in` seconds from now."""
    (first,) = await _commit_one(store, dest, role)
    now = store._clock()

    def job(conn: Any) -> None:
        (instance_id,) = conn.execute("SELECT instance_id FROM items WHERE id = ?", (first,)).fetchone()
        rows = []
        for k in range(n - 1):
            modality = MODALITIES[k % 4] if spread else "CT"
            source = SOURCES[k % 2] if spread else "MODALITY"
            st = STATES[k % 4] if spread else state
            study, sop = f"1.2.3.{k // 100}", f"1.2.3.{k // 100}.{k}"
            rows.append((
                instance_id, st, source, dest, role, study, study + ".1", sop, "1.2.840.10008.5.1.4.1.1.2",
                modality, f"PID{k % patients}", "DOE^JANE", f"ACC{k}", "1.2.840.10008.1.2.1", 910,
                now + retry_in if st == "failed" else None, now, now,
                "\x1f".join((study, study + ".1", sop, source, dest, f"ACC{k}", f"PID{k % patients}")).lower(),
            ))
        conn.executemany(
            "INSERT INTO items(instance_id, state, source_ae, destination_ae, destination_role, "
            "study_uid, series_uid, sop_instance_uid, sop_class_uid, modality, patient_id, "
            "patient_name, accession_number, transfer_syntax_uid, size_bytes, next_attempt_at, "
            "created_at, updated_at, search_text) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )

    await store._write(job)


async def _commit_one(store: Any, dest: str, role: str) -> list[int]:
    ds = make_dataset(rows=8, columns=8)
    temp = store.new_incoming_path()
    await trio.to_thread.run_sync(write_dataset, temp, ds)
    header = InstanceHeader(
        sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID, modality="CT", patient_id="PID001",
        patient_name="DOE^JANE", accession_number="ACC001",
    )
    return list(await store.commit_instance(temp, header, "MOD_A", [Destination(dest, role)], state="failed"))
