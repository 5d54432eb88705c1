"""The filter endpoints: GET /api/filters (the chain in force), POST /api/filters/test (a trial
run on a file, nothing written), POST /api/filters/reload (all files checked before the switch)."""

from __future__ import annotations

from pathlib import Path

from capacitor_trio.config.filters import load_filters
from tests.helpers.datasets import make_dataset, to_part10_bytes
from tests.helpers.router_files import CT_ALSO_TO_VNA, SWAP_PATIENT_NAME

from .conftest import AUTH, StartRouter, dead_node
from .test_endpoints import data, error

ROUTINGS = (
    """\
- Description: CT also to the VNA
"""
    + CT_ALSO_TO_VNA
    + """\
    - Type: save_file
      Target: saved/#{8,18}.dcm
"""
)

MUTATIONS = (
    """\
- Description: family name last
  AeTitles: [PACS]
  Actions:
"""
    + SWAP_PATIENT_NAME
)


def write_filters(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "routings.yml").write_text(ROUTINGS)
    (data_dir / "mutations.yml").write_text(MUTATIONS)


async def start(start_router: StartRouter, tmp_path: Path) -> object:
    files = tmp_path / "router1"  # the data directory start_router gives its first router
    write_filters(files)
    chain = load_filters(files, ("route", "mutate"))
    r = await start_router(
        (dead_node("PACS"), dead_node("VNA")), filters=("route", "mutate"), filter_chain=chain
    )
    assert r.data_dir == files
    return r


async def test_get_filters_shows_the_chain_in_force(start_router: StartRouter, tmp_path: Path) -> None:
    r = await start(start_router, tmp_path)
    shown = data(await r.client.get("/api/filters"))  # type: ignore[attr-defined]
    assert shown["filters"] == ["route", "mutate"] and shown["off"] == []
    assert [f["filter"] for f in shown["files"]] == ["route", "mutate"]
    assert shown["files"][0]["entries"][0]["description"] == "CT also to the VNA"


async def test_a_trial_run_says_what_each_destination_gets_and_writes_nothing(
    start_router: StartRouter, tmp_path: Path
) -> None:
    r = await start(start_router, tmp_path)
    client = r.client  # type: ignore[attr-defined]
    ds = make_dataset(rows=4, columns=4, modality="CT", patient_name="DOE^JANE")
    body = to_part10_bytes(ds)
    url = "/api/filters/test?source=CT1&dest=PACS"
    error(await client.post(url, content=body), "FORBIDDEN", 403)
    answer = data(await client.post(url, content=body, headers={**AUTH, "Content-Type": "application/dicom"}))
    pacs, vna = answer["destinations"]
    assert (pacs["destination"], pacs["verdict"], pacs["addDestinations"]) == ("PACS", "changed", ["VNA"])
    assert pacs["changes"] == [{"tag": "0010,0010", "keyword": "PatientName", "before": "DOE^JANE", "after": "JANE DOE"}]
    assert pacs["savedFiles"] == [str(r.data_dir / "saved" / f"{ds.SOPInstanceUID}.dcm")]  # type: ignore[attr-defined]
    assert (vna["destination"], vna["verdict"], vna["addDestinations"], vna["changes"]) == ("VNA", "kept", [], [])
    assert not (r.data_dir / "saved").exists()  # type: ignore[attr-defined]


async def test_a_trial_run_refuses_what_it_cannot_read(start_router: StartRouter, tmp_path: Path) -> None:
    r = await start(start_router, tmp_path)
    client = r.client  # type: ignore[attr-defined]
    assert "dest" in error(await client.post("/api/filters/test", content=b"x", headers=AUTH), "BAD_REQUEST", 400)
    message = error(await client.post("/api/filters/test?dest=PACS", content=b"\x00" * 10, headers=AUTH), "BAD_REQUEST", 400)
    assert "DICOM" in message


async def test_reload_switches_only_to_a_valid_chain(start_router: StartRouter, tmp_path: Path) -> None:
    r = await start(start_router, tmp_path)
    client, data_dir = r.client, r.data_dir  # type: ignore[attr-defined]
    (data_dir / "routings.yml").write_text(ROUTINGS.replace("CT also to the VNA", "renamed"))
    error(await client.post("/api/filters/reload"), "FORBIDDEN", 403)
    shown = data(await client.post("/api/filters/reload", headers=AUTH))
    assert shown["files"][0]["entries"][0]["description"] == "renamed"
    (data_dir / "routings.yml").write_text("- Actions:\n    - Type: teleport\n")
    message = error(await client.post("/api/filters/reload", headers=AUTH), "BAD_REQUEST", 400)
    assert "routings.yml" in message
    shown = data(await client.get("/api/filters"))
    assert shown["files"][0]["entries"][0]["description"] == "renamed"  # the old chain stays
