"""The anonymize action's profile (PS3.15 Annex E, basic profile) and UID replacement."""

from __future__ import annotations

import re

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from capacitor_trio.domain.anonymize import (
    MemoryPseudonyms,
    PatientKey,
    apply_profile,
    deidentify,
    new_pseudonym,
    patient_key,
    replace_uid,
)
from tests.helpers.datasets import make_dataset, to_part10_bytes

SECRET = bytes(range(32))


def identified() -> Dataset:
    ds = make_dataset(patient_id="P1", patient_name="DOE^JANE", accession="ACC1")
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientAge = "056Y"
    ds.PatientAddress = "1 Main St"
    ds.OtherPatientIDs = "X9"
    ds.InstitutionName = "General Hospital"
    ds.InstitutionAddress = "2 Main St"
    ds.ReferringPhysicianName = "WHO^DR"
    ds.StationName = "CT01"
    ds.StudyDescription = "CHEST"
    ds.SeriesDescription = "AXIAL"
    ds.StudyTime = "101010"
    ds.SeriesDate = "20261128"
    ds.ContentDate = "20261128"
    ds.StudyID = "S1"
    ds.FrameOfReferenceUID = "1.2.3.4"
    ds.Manufacturer = "ACME"  # not in the table: kept
    ds.SliceThickness = "1.25"  # not in the table: kept
    ds.add_new(0x00091010, "LO", "vendor secret")
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x50000010, "US", 4)  # a curve
    ds.add_new(0x60004000, "LT", "overlay comment")
    ds.add_new(0x60000010, "US", 8)  # overlay rows: kept
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5"
    ref.add_new(0x00291010, "LO", "nested private")
    ds.ReferencedImageSequence = Sequence([ref])
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    return ds


def test_the_basic_profile() -> None:
    ds = identified()
    sop, study, series = ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID
    deidentify(ds, "ANON1", SECRET)
    # Z: present and empty; X: removed; D: a dummy; K: kept
    assert (ds.AccessionNumber, ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime, ds.StudyID) == ("",) * 6
    assert ds.ReferringPhysicianName == ""
    for keyword in ("IssuerOfPatientID", "PatientAge", "PatientAddress", "OtherPatientIDs", "InstitutionAddress",
                    "StudyDescription", "SeriesDescription", "SeriesDate", "OtherPatientIDsSequence"):  # fmt: skip
        assert keyword not in ds, keyword
    assert (ds.InstitutionName, ds.StationName, ds.ContentDate) == ("ANONYMIZED", "ANONYMIZED", "19000101")
    assert (ds.Manufacturer, ds.SliceThickness, ds.Modality, ds.SOPClassUID) == ("ACME", 1.25, "CT", make_dataset().SOPClassUID)
    assert ds.PatientID == "ANON1" and str(ds.PatientName) == "ANON1"
    # private attributes, curves, overlay comments removed; other overlay attributes kept
    assert all(tag.group % 2 == 0 for tag in list(ds.keys()))
    assert 0x50000010 not in ds and 0x60004000 not in ds and 0x60000010 in ds
    # UIDs
    assert ds.SOPInstanceUID == replace_uid(SECRET, sop) != sop
    assert ds.StudyInstanceUID == replace_uid(SECRET, study)
    assert ds.SeriesInstanceUID == replace_uid(SECRET, series)
    assert ds.FrameOfReferenceUID == replace_uid(SECRET, "1.2.3.4")
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # inside kept sequences, the same rules
    (item,) = ds.ReferencedImageSequence
    assert item.ReferencedSOPInstanceUID == replace_uid(SECRET, "1.2.3.4.5")
    assert item.ReferencedSOPClassUID == ds.SOPClassUID and 0x00291010 not in item
    # what was done is recorded
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    to_part10_bytes(ds)  # still writes (every value fits its VR)


def test_uid_replacement_is_consistent_and_keyed() -> None:
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    replaced = replace_uid(SECRET, uid)
    assert replaced == replace_uid(SECRET, uid)
    assert replaced != replace_uid(b"\0" * 32, uid)
    assert replaced != replace_uid(SECRET, uid + "1")
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", replaced) and len(replaced) <= 64


def test_two_instances_of_one_series_keep_their_links() -> None:
    a = make_dataset(study_uid="1.2.3", series_uid="1.2.3.4")
    b = make_dataset(study_uid="1.2.3", series_uid="1.2.3.4")
    deidentify(a, "ANON1", SECRET)
    deidentify(b, "ANON1", SECRET)
    assert (a.StudyInstanceUID, a.SeriesInstanceUID) == (b.StudyInstanceUID, b.SeriesInstanceUID)
    assert a.SOPInstanceUID != b.SOPInstanceUID


def test_burned_in_annotation_refuses_before_any_change() -> None:
    ds = identified()
    ds.BurnedInAnnotation = "YES"
    before = to_part10_bytes(ds)
    with pytest.raises(ValueError, match="BurnedInAnnotation"):
        deidentify(ds, "ANON1", SECRET)
    assert to_part10_bytes(ds) == before


def test_the_pseudonym_key_is_patient_id_and_issuer() -> None:
    ds = identified()
    assert patient_key(ds) == PatientKey("P1", "HOSP")
    del ds.IssuerOfPatientID
    assert patient_key(ds) == PatientKey("P1", "")
    ds.PatientID = ""
    with pytest.raises(ValueError, match="no PatientID"):
        patient_key(ds)


def test_apply_profile_reports_top_level_tags_changed() -> None:
    ds = Dataset()
    ds.Manufacturer = "ACME"
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = "1.2"
    ds.ReferencedImageSequence = Sequence([ref])
    assert apply_profile(ds, SECRET) == [0x00081140]
    assert apply_profile(Dataset(), SECRET) == []


def test_memory_pseudonyms_are_stable_per_mapping() -> None:
    store = MemoryPseudonyms()
    key = PatientKey("P1", "")
    assert store.pseudonym("a.csv", key) == store.pseudonym("a.csv", key)
    assert store.pseudonym("a.csv", key) != store.pseudonym("b.csv", key)
    assert store.pseudonym("a.csv", key) != store.pseudonym("a.csv", PatientKey("P2", ""))
    assert len(store.secret("a.csv")) == 32 and store.secret("a.csv") == store.secret("a.csv")
    assert re.fullmatch(r"ANON[A-Z2-7]{16}", new_pseudonym())


MARK = "ZZSECRETZZ"
# identifying attributes the profile removes, empties or replaces, with a text VR each
IDENTIFYING = {
    "PatientName": "PN", "PatientID": "LO", "IssuerOfPatientID": "LO", "OtherPatientIDs": "LO",
    "OtherPatientNames": "PN", "PatientBirthName": "PN", "PatientMotherBirthName": "PN",
    "PatientAddress": "LO", "PatientTelephoneNumbers": "SH", "MilitaryRank": "LO",
    "InstitutionName": "LO", "InstitutionAddress": "ST", "InstitutionalDepartmentName": "LO",
    "ReferringPhysicianName": "PN", "PerformingPhysicianName": "PN", "OperatorsName": "PN",
    "NameOfPhysiciansReadingStudy": "PN", "PhysiciansOfRecord": "PN", "StationName": "SH",
    "StudyDescription": "LO", "SeriesDescription": "LO", "AccessionNumber": "SH", "StudyID": "SH",
    "DeviceSerialNumber": "LO", "ProtocolName": "LO", "ImageComments": "LT",
    "AdditionalPatientHistory": "LT", "PatientComments": "LT", "RequestingPhysician": "PN",
    "ScheduledPerformingPhysicianName": "PN", "PerformedProcedureStepDescription": "LO",
    "RequestedProcedureDescription": "LO", "ContentCreatorName": "PN", "PersonName": "PN",
}  # fmt: skip


def test_no_identifying_text_survives_anywhere() -> None:
    ds = make_dataset(patient_id=MARK, patient_name=MARK)
    for keyword, vr in IDENTIFYING.items():
        ds.add_new(keyword, vr, MARK)
    nested = Dataset()
    for keyword, vr in IDENTIFYING.items():
        nested.add_new(keyword, vr, MARK)
    ds.RequestAttributesSequence = Sequence([nested])  # removed whole
    kept = Dataset()
    kept.ReferencedSOPInstanceUID = "1.2.3"
    for keyword, vr in IDENTIFYING.items():
        kept.add_new(keyword, vr, MARK)
    ds.ReferencedImageSequence = Sequence([kept])  # kept: the table applies inside
    ds.add_new(0x00110010, "LO", "PRIVATE CREATOR")
    ds.add_new(0x00111001, "LO", MARK)
    deidentify(ds, "ANON1", SECRET)
    assert MARK.encode() not in to_part10_bytes(ds)


def test_sequences_nested_too_deep_fail_before_any_change() -> None:
    ds = make_dataset(patient_id="P1")
    inner = ds
    for _ in range(80):
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.2.3"
        inner.ReferencedImageSequence = Sequence([item])
        inner = item
    before = to_part10_bytes(ds)
    with pytest.raises(ValueError, match="nested deeper than 64"):
        deidentify(ds, "ANON1", SECRET)
    assert to_part10_bytes(ds) == before
