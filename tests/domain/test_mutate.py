"""The mutate actions on pydicom data sets: add_or_update, remove, anonymize, and every OnError."""

from __future__ import annotations

import datetime
import io
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset

from capacitor_trio.config.mutations import parse_actions
from capacitor_trio.config.values import _Loader
from capacitor_trio.domain.anonymize import MemoryPseudonyms, PatientKey
from capacitor_trio.domain.filtering import FilterFailure, TagChange
from capacitor_trio.domain.mutate import MutateContext, MutateResult, apply_actions
from tests.helpers.datasets import make_dataset, to_part10_bytes

NOW = datetime.datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=datetime.UTC)


def ctx(pseudonyms: Any = None) -> MutateContext:
    return MutateContext("MODALITY", "PACS", NOW, pseudonyms)


def run(raw: list[dict[str, Any]], ds: Dataset, pseudonyms: Any = None) -> MutateResult:
    return apply_actions(parse_actions(raw), ds, ctx(pseudonyms))


def set_value(tag: str, value: str, **more: Any) -> dict[str, Any]:
    return {"Destination": {"Tag": tag, "Value": value}, **more}


def test_a_capture_group_rewrites_the_patient_name() -> None:
    ds = make_dataset(patient_name="DOE^JANE")
    result = run([{"Source": {"Tag": "10,10", "Expression": r"^(.+)\^(.+)$"}, "Destination": {"Tag": "10,10", "Value": "$2 $1"}}], ds)
    assert str(ds.PatientName) == "JANE DOE"
    assert result == MutateResult(
        (TagChange(0x00100010, "PatientName", "DOE^JANE", "JANE DOE"),), None, result.decisions
    )
    assert [d.level for d in result.decisions] == [logging.DEBUG]
    assert "DOE" not in result.decisions[0].text  # decisions name tags, not values


def test_dollar_18_is_group_1_then_8_and_braces_name_any_group() -> None:
    ds = make_dataset(accession="AB")
    run([{"Source": {"Tag": "8,50", "Expression": "^(A)(B)$"}, "Destination": {"Tag": "8,50", "Value": "$18-${2}9-$0"}}], ds)
    assert ds.AccessionNumber == "A8-B9-AB"


def test_the_default_expression_and_value_copy_the_source() -> None:
    ds = make_dataset(accession="ACC42")
    run([{"Source": {"Tag": "8,50"}, "Destination": {"Tag": "20,10"}}], ds)
    assert ds.StudyID == "ACC42"


def test_the_expression_is_searched_not_anchored() -> None:
    ds = make_dataset(accession="XX-123-YY")
    run([{"Source": {"Tag": "8,50", "Expression": r"(\d+)"}, "Destination": {"Tag": "8,50"}}], ds)
    assert ds.AccessionNumber == "123"


def test_literal_value_and_tokens() -> None:
    ds = make_dataset(patient_id="P1")
    ds.StationName = "OLD"
    run(
        [
            set_value("8,1010", "CT1_:today:"),
            set_value("8,1030", "t=:timestamp:"),
            set_value("20,10", "$1"),  # no Source: `$1` is text
            set_value("8,1010", ":value:-X"),
            set_value("8,103e", ":hash(0010,0020,10):"),
            set_value("20,52", ":uid:"),
        ],
        ds,
    )
    assert ds.StationName == "CT1_20260304-X"
    assert ds.StudyDescription == f"t={int(NOW.timestamp() * 1000)}" == "t=1772600767890"
    assert ds.StudyID == "$1"
    assert re.fullmatch(r"[A-Z2-7]{10}", ds.SeriesDescription)
    assert re.fullmatch(r"[0-9.]+", ds.FrameOfReferenceUID) and len(ds.FrameOfReferenceUID) <= 64


def test_value_token_of_an_absent_destination_is_empty() -> None:
    ds = make_dataset()
    run([set_value("8,1010", "[:value:]")], ds)
    assert ds.StationName == "[]"


def test_uid_token_is_new_each_time() -> None:
    a, b = make_dataset(), make_dataset()
    run([set_value("20,52", ":uid:")], a)
    run([set_value("20,52", ":uid:")], b)
    assert a.FrameOfReferenceUID != b.FrameOfReferenceUID


def test_an_ambiguous_vr_is_written_as_its_first() -> None:
    ds = make_dataset()
    ds.add_new(0x00280106, "US or SS", 0)  # SmallestImagePixelValue as pydicom leaves it
    run([set_value("28,106", "12")], ds)
    assert ds[0x00280106].VR == "US" and ds.SmallestImagePixelValue == 12
    to_part10_bytes(ds)


def test_a_new_attribute_takes_the_dictionary_vr_and_an_existing_one_keeps_its_own() -> None:
    ds = make_dataset()
    ds.add_new(0x00081010, "LO", "X")  # StationName written with a non-standard VR
    run([set_value("8,1010", "Y"), set_value("20,13", "7"), set_value("28,10", "32")], ds)
    assert ds[0x00081010].VR == "LO" and ds.StationName == "Y"
    assert ds[0x00200013].VR == "IS" and ds.InstanceNumber == 7
    assert ds[0x00280010].VR == "US" and ds.Rows == 32


def test_backslash_separates_values_where_the_vr_has_several() -> None:
    ds = make_dataset()
    run([set_value("8,8", "ORIGINAL\\PRIMARY\\AXIAL"), set_value("20,4000", "a\\b")], ds)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.ImageComments == "a\\b"  # LT holds one value


def test_setting_the_same_value_is_no_change() -> None:
    ds = make_dataset(modality="CT")
    result = run([set_value("8,60", "CT")], ds)
    assert result.changes == () and result.failure is None


@pytest.mark.parametrize(
    ("tag", "value", "says"),
    [
        ("8,60", "MUCH_TOO_LONG_FOR_CS", "VR CS"),
        ("8,60", "lower", "VR CS"),
        ("8,1010", "X" * 17, "VR SH"),
        ("8,1030", "X" * 65, "VR LO"),
        ("8,20", "20241340", "VR DA"),
        ("8,20", "yesterday", "VR DA"),
        ("8,30", "25:00", "VR TM"),
        ("28,10", "70000", "VR US"),
        ("28,10", "ten", "not a number"),
        ("20,52", "1.2.abc", "VR UI"),
        ("20,13", "1.5", "VR IS"),
        ("10,10", "A" * 65, "VR PN"),
        ("8,1030", "line\nbreak", "control characters"),
        ("8,1030", "Müller", "SpecificCharacterSet (default repertoire)"),
    ],
)
def test_a_value_that_does_not_fit_its_vr_is_an_error_not_a_corrupt_data_set(tag: str, value: str, says: str) -> None:
    ds = make_dataset()
    before = to_part10_bytes(ds)
    result = run([set_value(tag, value)], ds)
    assert result.failure is not None and not result.failure.retry
    assert says in result.failure.message
    assert value not in result.failure.message  # lastError carries no values
    assert to_part10_bytes(ds) == before


def test_non_ascii_text_goes_in_when_the_character_set_holds_it() -> None:
    ds = make_dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    run([set_value("8,1030", "Müller")], ds)
    assert ds.StudyDescription == "Müller"
    ds.SpecificCharacterSet = "ISO_IR 192"
    run([set_value("8,1030", "Straße 東京")], ds)
    assert ds.StudyDescription == "Straße 東京"
    result = run([set_value("8,1030", "東京")], make_dataset_with_charset("ISO_IR 100"))
    assert result.failure is not None and "ISO_IR 100" in result.failure.message


def make_dataset_with_charset(charset: str) -> Dataset:
    ds = make_dataset()
    ds.SpecificCharacterSet = charset
    return ds


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"Source": {"Tag": "8,1030"}, "Destination": {"Tag": "8,50"}}, "the source (0008,1030) StudyDescription is absent"),
        ({"Source": {"Tag": "8,50", "Expression": "^(Z)"}, "Destination": {"Tag": "8,50"}}, "does not match the source (0008,0050)"),
        ({"Source": {"Tag": "7fe0,10"}, "Destination": {"Tag": "8,50"}}, "not a text value"),
        ({"Destination": {"Tag": "8,50", "Value": ":hash(0008,1030,8):"}}, "the :hash(): tag (0008,1030) StudyDescription is absent"),
    ],
)
def test_source_errors(raw: dict[str, Any], says: str) -> None:
    result = run([raw], make_dataset())
    assert result.failure is not None and says in result.failure.message, result.failure


# -- OnError ---------------------------------------------------------------------------------

_FAILING = {"Source": {"Tag": "8,1030"}, "Destination": {"Tag": "8,1010"}}  # source absent


def scenario(on_error: str | None) -> tuple[MutateResult, Dataset]:
    ds = make_dataset(modality="CT")
    failing = dict(_FAILING, **({"OnError": on_error} if on_error else {}))
    result = run([set_value("8,70", "FIRST"), failing, set_value("8,1090", "THIRD")], ds)
    return result, ds


def test_on_error_skip_action_goes_on_with_the_next_action() -> None:
    result, ds = scenario("skip_action")
    assert result.failure is None
    assert (ds.Manufacturer, ds.ManufacturerModelName) == ("FIRST", "THIRD")
    assert "StationName" not in ds
    assert [c.keyword for c in result.changes] == ["Manufacturer", "ManufacturerModelName"]
    skipped = result.decisions[1]
    assert skipped.level == logging.INFO and "Actions[1]" in skipped.text and "skip_action" in skipped.text


def test_on_error_end_mutation_stops_this_mutations_actions_without_failure() -> None:
    result, ds = scenario("end_mutation")
    assert result.failure is None
    assert ds.Manufacturer == "FIRST" and "ManufacturerModelName" not in ds
    assert [c.keyword for c in result.changes] == ["Manufacturer"]


@pytest.mark.parametrize(("on_error", "retry"), [("retry", True), ("fail", False), (None, False)])
def test_on_error_retry_and_fail_return_a_failure(on_error: str | None, retry: bool) -> None:
    result, ds = scenario(on_error)
    assert result.failure == FilterFailure(
        retry=retry,
        message="Actions[1] add_or_update (0008,1010) StationName: the source (0008,1030) StudyDescription is absent",
    )
    assert "ManufacturerModelName" not in ds  # nothing after the failing action ran
    assert [c.keyword for c in result.changes] == ["Manufacturer"]


# -- remove ----------------------------------------------------------------------------------


def test_remove_deletes_the_attribute() -> None:
    ds = make_dataset(accession="ACC9")
    result = run([{"Type": "remove", "Destination": {"Tag": "8,50"}}], ds)
    assert "AccessionNumber" not in ds
    assert result.changes == (TagChange(0x00080050, "AccessionNumber", "ACC9", None),)


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([0x00081030, 0x0008103E, 0x00181030, 0x00321060, 0x00400254, 0x00204000]))
def test_removing_an_absent_tag_leaves_the_bytes_untouched(tag: int) -> None:
    ds = make_dataset(seed=1, rows=8, columns=8)
    before = to_part10_bytes(ds)
    result = run([{"Type": "remove", "Tag": f"{tag >> 16:x},{tag & 0xFFFF:x}"}], ds)
    assert result.changes == () and result.failure is None
    assert to_part10_bytes(ds) == before


# -- the storage phase refuses query-phase actions; anonymize ------------------------------


@pytest.mark.parametrize("raw", [{"Type": "exclude_result"}, {"Type": "query", "Node": "RIS"}])
def test_a_query_phase_action_is_never_ignored_silently(raw: dict[str, Any]) -> None:
    result = run([raw], make_dataset())
    assert result.failure is not None
    assert "query-phase" in result.failure.message


def test_a_query_action_skipped_by_its_on_error_is_logged_at_info() -> None:
    result = run([{"Type": "query", "Node": "RIS", "OnError": "skip_action"}], make_dataset())
    assert result.failure is None
    assert [(d.level, "query-phase" in d.text) for d in result.decisions] == [(logging.INFO, True)]


def test_query_on_error_is_honoured_for_its_refusal() -> None:
    result = run([{"Type": "query", "Node": "RIS", "OnError": "retry"}], make_dataset())
    assert result.failure is not None and result.failure.retry


def test_anonymize_without_a_store_fails_the_item() -> None:
    result = run([{"Type": "anonymize", "Destination": {"Value": "m.csv"}}], make_dataset())
    assert result.failure == FilterFailure(False, "Actions[0] anonymize: no pseudonym store is available to anonymize with")


class _BrokenStore:
    def pseudonym(self, mapping: str, key: PatientKey) -> str:
        raise OSError(28, "No space left on device")

    def secret(self, mapping: str) -> bytes:
        return b"k" * 32


def test_anonymize_retries_when_the_mapping_file_cannot_be_written() -> None:
    ds = make_dataset()
    before = to_part10_bytes(ds)
    result = run([{"Type": "anonymize", "Destination": {"Value": "m.csv"}}], ds, _BrokenStore())
    assert result.failure is not None and result.failure.retry
    assert "No space left on device" in result.failure.message
    assert to_part10_bytes(ds) == before


def test_anonymize_reports_each_attribute_it_changed() -> None:
    ds = make_dataset(patient_id="P7", patient_name="DOE^JANE", accession="ACC1")
    store = MemoryPseudonyms()
    result = run([{"Type": "anonymize", "Destination": {"Value": "m.csv"}}], ds, store)
    assert result.failure is None
    pseudonym = store.pseudonym("m.csv", PatientKey("P7", ""))
    changes = {c.keyword: c for c in result.changes}
    assert changes["PatientID"] == TagChange(0x00100020, "PatientID", "P7", pseudonym)
    assert changes["PatientName"].after == pseudonym
    assert changes["AccessionNumber"].after == ""
    assert changes["SOPInstanceUID"].after != changes["SOPInstanceUID"].before
    assert "PixelData" not in changes


def test_anonymize_then_add_or_update_in_one_mutation() -> None:
    ds = make_dataset(patient_id="P7")
    result = run(
        [{"Type": "anonymize", "Destination": {"Value": "m.csv"}}, set_value("8,1030", "RESEARCH :value:")],
        ds,
        MemoryPseudonyms(),
    )
    assert result.failure is None and ds.StudyDescription == "RESEARCH "


def test_anonymize_of_a_data_set_read_from_a_file_reports_only_real_changes() -> None:
    ds = dcmread(io.BytesIO(to_part10_bytes(make_dataset(patient_id="P7"))))
    result = run([{"Type": "anonymize", "Destination": {"Value": "m.csv"}}], ds, MemoryPseudonyms())
    changed = {c.keyword for c in result.changes}
    assert "Rows" not in changed and "PixelData" not in changed and "Modality" not in changed
    assert {"PatientID", "PatientName", "SOPInstanceUID", "StudyDate"} <= changed


def test_the_documented_example_on_an_instance() -> None:
    """configuration.md's mutations.yml, on a CT instance: both entries' actions."""
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "Type: anonymize" in b)
    fix, research = yaml.load(block, Loader=_Loader)
    ds = make_dataset(patient_name="DOE^JANE", accession="12345-X")
    ds.InstitutionName = "General"
    result = apply_actions(parse_actions(fix["Actions"]), ds, ctx())
    assert result.failure is None
    assert (str(ds.PatientName), ds.StationName, ds.StudyID) == ("JANE DOE", "CT1_20260304", "ACC12345")
    assert "InstitutionName" not in ds
    result = apply_actions(parse_actions(research["Actions"]), ds, ctx(MemoryPseudonyms()))
    assert result.failure is None and ds.PatientIdentityRemoved == "YES"


def test_a_new_sop_instance_uid_is_repeated_in_the_file_meta() -> None:
    ds = make_dataset()
    run([set_value("8,18", ":uid:")], ds)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert dcmread(io.BytesIO(to_part10_bytes(ds))).file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
