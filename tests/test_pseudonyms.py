"""The CSV pseudonym mapping files: durable, consistent across restarts, threads and processes."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest

from capacitor_trio.domain.anonymize import PatientKey
from capacitor_trio.pseudonyms import CsvPseudonyms

P1 = PatientKey("P1", "")
P2 = PatientKey("P,2 \"quoted\"", "HOSP")


def test_the_file_is_created_0600_with_its_header_and_one_line_per_patient(tmp_path: Path) -> None:
    store = CsvPseudonyms(tmp_path)
    a = store.pseudonym("map.csv", P1)
    b = store.pseudonym("map.csv", P2)
    assert a != b and store.pseudonym("map.csv", P1) == a
    path = tmp_path / "map.csv"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().splitlines() == ["patient_id,issuer,pseudonym", f"P1,,{a}", f'"P,2 ""quoted""",HOSP,{b}']


def test_a_restart_keeps_every_pseudonym(tmp_path: Path) -> None:
    first = CsvPseudonyms(tmp_path)
    a, b = first.pseudonym("map.csv", P1), first.pseudonym("map.csv", P2)
    again = CsvPseudonyms(tmp_path)
    assert (again.pseudonym("map.csv", P1), again.pseudonym("map.csv", P2)) == (a, b)
    assert len((tmp_path / "map.csv").read_text().splitlines()) == 3


def test_lines_another_process_appended_are_read_before_adding(tmp_path: Path) -> None:
    ours, theirs = CsvPseudonyms(tmp_path), CsvPseudonyms(tmp_path)
    ours.pseudonym("map.csv", P2)  # ours has read the file
    added = theirs.pseudonym("map.csv", P1)
    assert ours.pseudonym("map.csv", P1) == added
    assert len((tmp_path / "map.csv").read_text().splitlines()) == 3


@pytest.mark.parametrize("last", ["P1,,ANONTO", "P1,,ANONTORN_BY_A_CRASH_OR_AN_EDITOR"])
def test_a_last_line_without_newline_is_read_and_ended(tmp_path: Path, last: str) -> None:
    path = tmp_path / "map.csv"
    path.write_text(f"patient_id,issuer,pseudonym\nP9,,ANONXYZ\n{last}")
    store = CsvPseudonyms(tmp_path)
    assert store.pseudonym("map.csv", P1) == last.split(",")[2]
    new = store.pseudonym("map.csv", P2)
    assert path.read_text().splitlines()[-2:] == [last, f'"P,2 ""quoted""",HOSP,{new}']
    assert CsvPseudonyms(tmp_path).pseudonym("map.csv", P1) == last.split(",")[2]


@pytest.mark.parametrize("torn", ["P1", "P1,", "P1,,"])
def test_a_line_cut_before_its_pseudonym_is_ignored(tmp_path: Path, torn: str) -> None:
    path = tmp_path / "map.csv"
    path.write_text(f"patient_id,issuer,pseudonym\n{torn}")
    a = CsvPseudonyms(tmp_path).pseudonym("map.csv", P1)
    assert a.startswith("ANON") and CsvPseudonyms(tmp_path).pseudonym("map.csv", P1) == a


def test_a_header_cut_by_a_crash_is_written_again(tmp_path: Path) -> None:
    path = tmp_path / "map.csv"
    path.write_text("patient_id,iss")
    a = CsvPseudonyms(tmp_path).pseudonym("map.csv", P1)
    assert path.read_text() == f"patient_id,issuer,pseudonym\nP1,,{a}\n"


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.csv").write_text("name,phone\n")
    with pytest.raises(ValueError, match="not a pseudonym mapping"):
        CsvPseudonyms(tmp_path).pseudonym("notes.csv", P1)
    assert (tmp_path / "notes.csv").read_text() == "name,phone\n"


def test_the_secret_is_made_once_0600_and_kept(tmp_path: Path) -> None:
    secret = CsvPseudonyms(tmp_path).secret("map.csv")
    key = tmp_path / "map.csv.key"
    assert len(secret) == 32 and key.read_text().strip() == secret.hex()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert CsvPseudonyms(tmp_path).secret("map.csv") == secret
    assert CsvPseudonyms(tmp_path).secret("other.csv") != secret


def test_a_damaged_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "map.csv.key").write_text("")
    with pytest.raises(ValueError, match="mapping secret"):
        CsvPseudonyms(tmp_path).secret("map.csv")


def test_absolute_and_relative_mapping_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    store = CsvPseudonyms(tmp_path)
    store.pseudonym("sub/a.csv", P1)
    store.pseudonym(str(tmp_path / "b.csv"), P1)
    assert (tmp_path / "sub" / "a.csv").exists() and (tmp_path / "b.csv").exists()


def test_an_unwritable_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        CsvPseudonyms(tmp_path).pseudonym("missing-dir/a.csv", P1)


def test_concurrent_threads_give_one_patient_one_pseudonym(tmp_path: Path) -> None:
    stores = [CsvPseudonyms(tmp_path), CsvPseudonyms(tmp_path)]  # two "processes"
    results: list[str] = []

    def work(i: int) -> None:
        results.append(stores[i % 2].pseudonym("map.csv", PatientKey(f"P{i % 3}", "")))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 3
    assert len((tmp_path / "map.csv").read_text().splitlines()) == 1 + 3
    assert os.path.getsize(tmp_path / "map.csv") > 0


def _assign(root: str, ids: list[str], out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = CsvPseudonyms(Path(root))
    out.put({i: store.pseudonym("map.csv", PatientKey(i, "")) for i in ids})


def test_two_processes_give_one_patient_one_pseudonym(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    ids = [f"P{i}" for i in range(40)]
    procs = [ctx.Process(target=_assign, args=(str(tmp_path), ids[::step], out)) for step in (1, -1)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(results[0][i] == results[1][i] for i in ids)
    assert len((tmp_path / "map.csv").read_text().splitlines()) == 1 + len(ids)
