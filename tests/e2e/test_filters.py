"""The filter chain end to end: `capacitor-trio run` between DCMTK storescu and pynetdicom
destinations, with routings.yml, mutations.yml and sortings.yml in its data directory.

One router serves the route, mutate, save_file and sort cases (each on its own modality or
series description); an invalid filter file refusing start-up and a SIGKILL while items are
being prepared have routers of their own."""

from __future__ import annotations

import gc
import io
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
import trio
from pydicom.dataset import Dataset

from capacitor_trio.audit import AUDIT_LOG, verify
from tests.helpers.datasets import make_dataset, write_dataset
from tests.helpers.peers import (
    PynetdicomDestination,
    RouterProcess,
    free_port,
    needs_dcmtk,
    path_uid,
    pynetdicom_send,
    storescu,
)
from tests.helpers.router_files import (
    CT_ALSO_TO_VNA,
    REMOVE_ACCESSION_NUMBER,
    SWAP_PATIENT_NAME,
    write_router_files,
)

pytestmark = [
    needs_dcmtk,
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

ROUTINGS = (
    """\
- Description: CT also goes to the VNA
  AeTitles: [PACS]
"""
    + CT_ALSO_TO_VNA
    + """\
- Description: no scouts in the archive
  AeTitles: [PACS]
  Conditions:
    - Tag: 8,103e
      MatchExpression: ^SCOUT.*$
  Actions:
    - Type: drop
      Log: info
- Description: a copy of each MR on disk
  AeTitles: [PACS]
  Conditions:
    - Tag: 8,60
      MatchExpression: MR
  Actions:
    - Type: save_file
      Target: saved/#{10,20:!!!000}/#{8,18}.dcm
"""
)

MUTATIONS = (
    """\
- Description: family name last, no accession number
  AeTitles: [PACS]
  Conditions:
    - Tag: 8,60
      MatchExpression: MR
  Actions:
"""
    + SWAP_PATIENT_NAME
    + REMOVE_ACCESSION_NUMBER
)

SORTINGS = """\
- Description: MR series in descending instance number
  AeTitles: [PACS]
  Conditions:
    - Tag: 8,60
      MatchExpression: MR
  Actions:
    - SortTag: 20,13
      SortType: integer
      SortDirection: desc
"""


def write_router(
    data: Path, scp_port: int, nodes: str, *, minimum_age: int = 2, filters: str = "route, mutate, sort"
) -> None:
    """The router's files and the three filter files; `minimum_age` 2 s is the router's default."""
    write_router_files(data, scp_port, nodes, minimum_age=minimum_age, extra=f"filters: {filters}\n")
    (data / "routings.yml").write_text(ROUTINGS)
    (data / "mutations.yml").write_text(MUTATIONS)
    (data / "sortings.yml").write_text(SORTINGS)


def instances(
    directory: Path, modality: str, n: int, *, description: str = "AXIAL", numbers: list[int] | None = None,
    rows: int = 8,
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    series = pydicom.uid.generate_uid()
    study = pydicom.uid.generate_uid()
    paths = []
    for k in range(n):
        ds = make_dataset(rows=rows, columns=rows, modality=modality, seed=k, series_uid=series, study_uid=study)
        ds.SeriesDescription = description
        ds.InstanceNumber = (numbers or list(range(1, n + 1)))[k]
        paths.append(write_dataset(directory / f"{modality}{k:03d}.dcm", ds))
    return paths


def dataset(raw: bytes) -> Dataset:
    """A data set as a destination received it (no file meta: implicit or explicit VR LE)."""
    return pydicom.dcmread(io.BytesIO(raw), force=True)


async def test_route_drop_save_mutate_and_sort(tmp_path: Path, nursery: trio.Nursery) -> None:
    pacs, vna = PynetdicomDestination("PACS"), PynetdicomDestination("VNA")
    pacs_port, vna_port = pacs.start(), vna.start()
    data = tmp_path / "data"
    scp_port = free_port()
    write_router(
        data, scp_port,
        f"- AeTitle: PACS\n  Port: {pacs_port}\n  BatchSize: 0\n  ProcessDelay: 3000\n"
        f"- AeTitle: VNA\n  Port: {vna_port}\n",
        minimum_age=1,
    )
    router = RouterProcess(data)
    try:
        await router.start(nursery)
        ct = instances(tmp_path / "ct", "CT", 3)
        scouts = instances(tmp_path / "scout", "CR", 2, description="SCOUT LATERAL")
        mr = instances(tmp_path / "mr", "MR", 8, numbers=[3, 8, 1, 6, 2, 7, 5, 4])
        await storescu(scp_port, "PACS", [*ct, *scouts, *mr])
        with trio.fail_after(60):
            await pacs.count.wait_for(len(ct) + len(mr))
            await vna.count.wait_for(len(ct))
        # route: CT to PACS and VNA, as received; nothing else to VNA
        assert set(vna.received) == {path_uid(p) for p in ct}
        for path in ct:
            original = pydicom.dcmread(path).to_json_dict()
            assert dataset(pacs.received[path_uid(path)]).to_json_dict() == original
            assert dataset(vna.received[path_uid(path)]).to_json_dict() == original
        # drop: no scout anywhere, and the decision is logged at info
        assert not {path_uid(p) for p in scouts} & set(pacs.received)
        await router.wait_for_line(lambda line: line.startswith("INFO: ") and "drop" in line.lower())
        # mutate: PatientName rewritten with the capture groups, AccessionNumber removed,
        # everything else as received
        for path in mr:
            expected = pydicom.dcmread(path)
            expected.PatientName = "JANE DOE"
            del expected.AccessionNumber
            got = dataset(pacs.received[path_uid(path)])
            assert got.to_json_dict() == expected.to_json_dict()
        # save_file: the masked template, one file per MR instance
        saved = data / "saved" / "001"
        assert {p.name for p in saved.iterdir()} == {f"{path_uid(p)}.dcm" for p in mr}
        # sort: the MR series delivered in descending InstanceNumber
        mr_uids = {path_uid(p) for p in mr}
        order = [int(dataset(raw).InstanceNumber) for uid, raw in pacs.received.items() if uid in mr_uids]
        assert order == sorted(order, reverse=True), order
        router.signal(signal.SIGTERM)
        assert await router.wait() == 0
        assert not any("Traceback" in line for line in router.lines)
        check_audit(data, ct, scouts, mr)
    finally:
        await router.aclose()
        pacs.stop()
        vna.stop()


def check_audit(data: Path, ct: list[Path], scouts: list[Path], mr: list[Path]) -> None:
    """The audit trail verifies, and holds the chain's decision for every instance PACS got:
    CT routed to VNA too, scouts dropped, MR changed (with their PatientName change) and saved."""
    assert verify(data, data / "log") == (len(read_trail(data)), None)
    routing = {e["sop_instance_uid"]: e for e in read_trail(data) if e["event"] == "routing" and e["node"] == "PACS"}
    mutation = {e["sop_instance_uid"]: e for e in read_trail(data) if e["event"] == "mutation"}
    for path in ct:
        assert routing[path_uid(path)]["destinations"] == ["PACS", "VNA"]
    for path in scouts:
        assert (routing[path_uid(path)]["verdict"], routing[path_uid(path)]["destinations"]) == ("dropped", [])
    for path in mr:
        uid = path_uid(path)
        assert routing[uid]["verdict"] == "changed" and len(routing[uid]["saved_files"]) == 1
        changes = {c["keyword"]: (c["before"], c["after"]) for c in mutation[uid]["changes"]}
        assert changes["PatientName"] == ("DOE^JANE", "JANE DOE") and changes["AccessionNumber"][1] is None


def read_trail(data: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (data / "log" / AUDIT_LOG).read_text().splitlines()]


def test_an_invalid_filter_file_refuses_start_up(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_router(data, free_port(), "- AeTitle: PACS\n  Port: 9\n")
    (data / "routings.yml").write_text("- Description: broken\n  Actions:\n    - Type: teleport\n")
    r = subprocess.run(
        [sys.executable, "-m", "capacitor_trio", "run", "--path", str(data)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "routings.yml" in lines[0] and "Traceback" not in r.stderr, r.stderr


async def test_sigkill_while_preparing_loses_nothing(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Killed while its prepare stage writes mutated copies, the router delivers every
    acknowledged instance after a restart, each mutated exactly as the filter says."""
    pacs = PynetdicomDestination("PACS")
    pacs_port = pacs.start()
    data = tmp_path / "data"
    scp_port = free_port()
    write_router(data, scp_port, f"- AeTitle: PACS\n  Port: {pacs_port}\n", minimum_age=0, filters="mutate")
    # 50 KB images: their copies are spool files of their own (*.prep.dcm), written and renamed
    # before the transaction that records them
    mr = instances(tmp_path / "mr", "MR", 150, rows=160)
    router = RouterProcess(data)
    try:
        await router.start(nursery)
        acked: list[str] = []
        async with trio.open_nursery() as inner:
            inner.start_soon(trio.to_thread.run_sync, pynetdicom_send, scp_port, "PACS", mr, acked, 3.0)
            with trio.fail_after(60):
                await pacs.count.wait_for(20)
            router.signal(signal.SIGKILL)
            await router.wait()
        assert len(acked) >= 20
        await router.start(nursery)
        with trio.move_on_after(90):
            await pacs.count.wait_until(lambda: set(acked) <= set(pacs.received))
        assert set(acked) <= set(pacs.received), router.log()
        originals = {path_uid(p): pydicom.dcmread(p) for p in mr}
        for uid in acked:  # whole copies: every attribute and the pixels as the filter says
            expected = originals[uid]
            expected.PatientName = "JANE DOE"
            del expected.AccessionNumber
            assert dataset(pacs.received[uid]).to_json_dict() == expected.to_json_dict()
    finally:
        await router.aclose()
        pacs.stop()
        # the kill breaks pynetdicom_send's association and pynetdicom leaves its socket behind:
        # collected here, where this module's filter applies, not in whichever test runs next
        gc.collect()
