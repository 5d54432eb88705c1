"""The filter chain as a prepare step: its outcome in the seam's terms, its sort key as the
index's bytes, and save_file's atomic write."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom

from capacitor_trio.actors.filter_step import SaveFiles, key_bytes, step_result
from capacitor_trio.actors.prepare_steps import Verdict
from capacitor_trio.domain.filtering import Decision, FilterFailure, TagChange
from capacitor_trio.domain.filters import ChainOutcome
from capacitor_trio.domain.sort import SortDirection, SortKey, SortRule, SortType
from tests.helpers.datasets import make_dataset

DESC = SortRule(0x00200013, SortType.INTEGER, SortDirection.DESC)
CHANGE = TagChange(0x00100010, "PatientName", "DOE^JANE", "JANE DOE")


def test_the_chains_outcome_in_the_seams_terms() -> None:
    log = (Decision(logging.INFO, "removed 1.2.3"),)
    assert step_result(ChainOutcome(keep=True)).verdict is Verdict.KEEP
    assert step_result(ChainOutcome(keep=True, changes=(CHANGE,))).verdict is Verdict.CHANGED
    dropped = step_result(ChainOutcome(keep=False, add_destinations=("VNA",), decisions=log))
    assert (dropped.verdict, dropped.add_destinations, dropped.decisions) == (Verdict.DROP, ("VNA",), log)
    retry = step_result(ChainOutcome(keep=True, add_destinations=("VNA",), failure=FilterFailure(True, "busy")))
    assert (retry.verdict, retry.message, retry.add_destinations) == (Verdict.RETRY, "busy", ())
    failed = step_result(ChainOutcome(keep=True, changes=(CHANGE,), failure=FilterFailure(False, "bad")))
    assert (failed.verdict, failed.message) == (Verdict.FAIL, "bad")


def test_sort_keys_become_bytes_in_the_series_order_and_an_absent_tag_has_none() -> None:
    keys = [key_bytes(SortKey(DESC, False, n)) for n in (3, 10, -1)]
    assert sorted(keys) == [keys[1], keys[0], keys[2]]  # descending: 10, 3, -1
    asc = SortRule(0x0008103E, SortType.STRING, SortDirection.ASC)
    assert key_bytes(SortKey(asc, False, "A")) < key_bytes(SortKey(asc, False, "B"))  # type: ignore[operator]
    assert key_bytes(SortKey(DESC, True, 0)) is None and key_bytes(None) is None


def test_save_file_writes_the_whole_file_under_its_name_only(tmp_path: Path) -> None:
    ds = make_dataset(rows=4, columns=4)
    target = tmp_path / "saved" / "deep" / "x.dcm"
    SaveFiles(tmp_path).save_file(target, ds)
    assert pydicom.dcmread(target).SOPInstanceUID == ds.SOPInstanceUID
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]  # no temporary file left
    SaveFiles(tmp_path).save_file(Path("relative.dcm"), ds)  # relative: in the root
    assert (tmp_path / "relative.dcm").exists()
