"""`capacitor-trio filter-test` (and Capacitor's `--mutate` form): the configured chain run on a
file offline, what it decides printed, nothing written but `-o`."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from capacitor_trio.cli import main, mutate_alias
from tests.helpers.datasets import make_dataset, write_dataset
from tests.helpers.router_files import CT_ALSO_TO_VNA, REMOVE_ACCESSION_NUMBER, SWAP_PATIENT_NAME

ROUTINGS = (
    """\
- Description: CT also to the VNA
  AeTitles: [PACS]
"""
    + CT_ALSO_TO_VNA
    + """\
    - Type: save_file
      Target: saved/#{10,20:!!!000}/
- Description: no scouts
  Conditions:
    - Tag: 8,103e
      MatchExpression: ^SCOUT
  Actions:
    - Type: drop
"""
)

MUTATIONS = (
    """\
- Description: family name last, no accession
  AeTitles: [PACS]
  Actions:
"""
    + SWAP_PATIENT_NAME
    + REMOVE_ACCESSION_NUMBER
)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.yml").write_text("filters: route, mutate\napi:\n  enabled: false\n")
    (data / "nodes.yml").write_text(
        "- AeTitle: PACS\n  HostName: 127.0.0.1\n  Port: 9\n- AeTitle: VNA\n  HostName: 127.0.0.1\n  Port: 9\n"
    )
    (data / "routings.yml").write_text(ROUTINGS)
    (data / "mutations.yml").write_text(MUTATIONS)
    return data


def image(tmp_path: Path, description: str = "AXIAL") -> Path:
    ds = make_dataset(rows=4, columns=4, modality="CT", patient_name="DOE^JANE")
    ds.SeriesDescription = description
    return write_dataset(tmp_path / "in.dcm", ds)


def test_it_prints_each_destinations_decision_and_writes_only_the_output(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = image(tmp_path), tmp_path / "out.dcm"
    code = main(["filter-test", "--path", str(data_dir), "--source", "CT1", "--dest", "PACS", str(source), "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "destination PACS: changed" in printed
    assert "adds destination VNA" in printed
    assert f"would save {data_dir / 'saved' / '001'}" in printed
    assert "(0010,0010) PatientName: 'DOE^JANE' -> 'JANE DOE'" in printed
    assert "(0008,0050) AccessionNumber: 'ACC001' -> (absent)" in printed
    assert "destination VNA: kept" in printed
    assert not (data_dir / "saved").exists()
    written = pydicom.dcmread(out)
    assert written.PatientName == "JANE DOE" and "AccessionNumber" not in written


def test_a_dropped_instance_writes_no_output(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, out = image(tmp_path, "SCOUT AP"), tmp_path / "out.dcm"
    assert main(["filter-test", "--path", str(data_dir), "--dest", "PACS", str(source), "-o", str(out)]) == 0
    assert "destination PACS: dropped" in capsys.readouterr().out
    assert not out.exists()


def test_capacitors_mutate_form_is_an_alias(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, out = image(tmp_path), tmp_path / "out.dcm"
    argv = ["--path", str(data_dir), "--mutate", "CT1", "PACS", str(source), str(out)]
    assert mutate_alias(argv) == [
        "filter-test", "--path", str(data_dir), "--source", "CT1", "--dest", "PACS", str(source), "-o", str(out)
    ]
    assert main(argv) == 0
    assert pydicom.dcmread(out).PatientName == "JANE DOE"


def test_an_unreadable_file_and_an_invalid_filter_file_are_one_line_errors(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    assert main(["filter-test", "--path", str(data_dir), "--dest", "PACS", str(junk)]) == 1
    assert "not a DICOM file" in capsys.readouterr().err
    (data_dir / "routings.yml").write_text("- Actions:\n    - Type: teleport\n")
    assert main(["filter-test", "--path", str(data_dir), "--dest", "PACS", str(image(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "routings.yml" in err[0]
