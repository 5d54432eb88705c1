"""issue 21: Capacitor's condition language (§5) on data sets: every form, and each choice
docs/behaviour.md lists where Capacitor's documentation is silent."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from capacitor_trio.domain.conditions import (
    Condition,
    PatternKind,
    classify,
    compile_pattern,
    matches,
    matches_all,
    parse_tag,
    value_text,
)

MODALITY = 0x00080060
IMAGE_TYPE = 0x00080008
ACCESSION = 0x00080050
SPS_SEQUENCE = 0x00400100


def cond(tag: str, pattern: str | None = None, **kw: object) -> Condition:
    return Condition(parse_tag(tag), None if pattern is None else compile_pattern(pattern), **kw)  # type: ignore[arg-type]


def ds_with(**attrs: object) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(("text", "tag"), [
    ("0008,0060", 0x00080060), ("8,60", 0x00080060), ("20,d", 0x0020000D), ("10,4000", 0x00104000),
    ("0002,0002", 0x00020002), ("(0008,0060)", 0x00080060), (" 8 , 60 ", 0x00080060), ("8,103e", 0x0008103E),
])
def test_tag_forms(text: str, tag: int) -> None:
    assert parse_tag(text) == tag


@pytest.mark.parametrize("text", ["PatientName", "00080060", "8,60,1", "12345,0", "g,e", ""])
def test_bad_tags(text: str) -> None:
    with pytest.raises(ValueError, match="not a tag"):
        parse_tag(text)


@pytest.mark.parametrize(("pattern", "kind"), [
    ("CT", PatternKind.LITERAL),
    ("1.2.840.10008.5.1.4.1.1.2", PatternKind.NUMBER),
    ("^CHEST.*PA$", PatternKind.REGEX),
    ("[ABC]CHEST", PatternKind.REGEX),
    ("(?i)localizer|scout|dose.report", PatternKind.REGEX),
    ("a+b", PatternKind.REGEX),
    ("CHEST*", PatternKind.WILDCARD),
    ("CHEST?", PatternKind.WILDCARD),
    ("*VASCULAR*", PatternKind.WILDCARD),
    ("A.B", PatternKind.WILDCARD),  # dotted, not numeric: a wildcard without wildcards
    ("CHEST$", PatternKind.LITERAL),  # `$` alone makes no regex (§5's list)
    ("", PatternKind.LITERAL),
])
def test_classification_in_order(pattern: str, kind: PatternKind) -> None:
    assert classify(pattern) is kind


def test_documented_examples() -> None:
    ct = ds_with(Modality="CT", StudyDescription="Full body", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    assert matches(cond("8,60", "CT"), ct)
    assert not matches(cond("8,60", "CT"), ds_with(Modality="CTX"))
    assert matches(cond("8,1030", "Full*"), ct)
    assert matches(cond("8,16", "1.2.840.10008.5.1.4.1.1.2"), ct)
    assert not matches(cond("8,16", "1.2.840.10008.5.1.4.1.1.2"), ds_with(SOPClassUID="1.2.840.10008.5.1.4.1.1.20"))
    assert matches(cond("8,103e", "(?i)localizer|scout"), ds_with(SeriesDescription="AP Scout"))
    assert matches(cond("8,103e", "CHEST?"), ds_with(SeriesDescription="CHEST1"))
    assert not matches(cond("8,103e", "CHEST?"), ds_with(SeriesDescription="CHEST"))
    assert not matches(cond("8,103e", "CHEST?"), ds_with(SeriesDescription="CHEST_PA"))
    assert matches(cond("8,103e", "CHEST*"), ds_with(SeriesDescription="CHEST"))
    assert matches(cond("8,1030", "*VASCULAR*"), ds_with(StudyDescription="PERIPHERAL VASCULAR LEG"))


def test_dotted_non_numeric_is_exact() -> None:
    assert matches(cond("8,103e", "A.B"), ds_with(SeriesDescription="A.B"))
    assert not matches(cond("8,103e", "A.B"), ds_with(SeriesDescription="AxB"))


def test_case_sensitive_unless_the_regex_says_so() -> None:
    ds = ds_with(Modality="CT", SeriesDescription="Scout")
    assert not matches(cond("8,60", "ct"), ds)
    assert not matches(cond("8,103e", "scout*"), ds)
    assert not matches(cond("8,103e", "^scout"), ds)
    assert matches(cond("8,103e", "(?i)^scout"), ds)


def test_unanchored_regex_is_searched_wildcard_and_literal_are_whole() -> None:
    ds = ds_with(SeriesDescription="THE CHEST PA VIEW")
    assert matches(cond("8,103e", "CHEST|ABDOMEN"), ds)
    assert not matches(cond("8,103e", "^CHEST|^ABDOMEN"), ds)
    assert not matches(cond("8,103e", "CHEST"), ds)  # literal: the whole value
    assert not matches(cond("8,103e", "CHEST*"), ds)  # wildcard: the whole value


def test_absent_empty_and_presence() -> None:
    empty = ds_with(AccessionNumber="")
    absent = Dataset()
    assert not matches(cond("8,50", "^.*$"), absent)
    assert not matches(cond("8,50", "*"), absent)
    assert not matches(cond("8,50"), absent)
    assert matches(cond("8,50"), empty)  # no MatchExpression: present
    assert matches(cond("8,50", "^.*$"), empty)
    assert matches(cond("8,50", "^$"), empty)
    assert matches(cond("8,50", "*"), empty)
    assert not matches(cond("8,50", "^.+$"), empty)
    assert not matches(cond("8,50", "?*"), empty)
    none_number = Dataset()
    none_number.add_new(0x00200013, "IS", None)
    assert matches(cond("20,13", "^$"), none_number)


def test_multi_valued_each_value_and_the_whole() -> None:
    ds = ds_with(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert matches(cond("8,8", "LOCALIZER"), ds)
    assert matches(cond("8,8", "*LOCALIZER*"), ds)
    assert matches(cond("8,8", r"^ORIGINAL\\PRIMARY\\LOCALIZER$"), ds)
    assert matches(cond("8,8", "ORIGINAL*LOCALIZER"), ds)
    assert not matches(cond("8,8", "SECONDARY"), ds)
    assert value_text(ds, IMAGE_TYPE) == "ORIGINAL\\PRIMARY\\LOCALIZER"


def test_non_string_values_as_text() -> None:
    ds = Dataset()
    ds.Rows = 512
    ds.InstanceNumber = "12"
    ds.SliceThickness = "1.50"
    ds.StudyDate = "20240131"
    ds.PatientName = "Doe^John"
    ds.add_new(0x00189306, "FD", 2.0)  # a whole float: no ".0"
    ds.add_new(0x00189307, "FD", 0.25)
    ds.add_new(0x00209165, "AT", 0x00080060)
    ds.add_new(0x00431001, "UN", b"HELLO\x00")
    ds.add_new(0x7FE00010, "OW", b"\x00\x01")
    assert matches(cond("28,10", "512"), ds)
    assert matches(cond("20,13", "12"), ds)
    assert matches(cond("18,50", "1.50"), ds)  # DS as written
    assert matches(cond("8,20", "2024*"), ds)
    assert matches(cond("10,10", "^Doe\\^"), ds)
    assert matches(cond("18,9306", "2"), ds)
    assert matches(cond("18,9307", "0.25"), ds)
    assert matches(cond("20,9165", "0008,0060"), ds)
    assert matches(cond("43,1001", "HELLO"), ds)
    assert matches(cond("7fe0,10", "^$"), ds)  # binary: the empty string
    assert matches(cond("7fe0,10", "^.*$"), ds)
    assert not matches(cond("7fe0,10", "^.+$"), ds)


def test_file_meta_tags() -> None:
    ds = ds_with(SOPClassUID="1.2.3")
    assert not matches(cond("2,2", "^1\\.2"), ds)  # no file meta: absent
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    assert matches(cond("0002,0002", r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.88\.67$"), ds)
    assert not matches(cond("0002,0002", "1.2.3"), ds)


def test_search_anywhere_including_sequences() -> None:
    inner = ds_with(AccessionNumber="ACC123")
    ds = ds_with(AccessionNumber="OTHER")
    ds.ReferencedStudySequence = Sequence([Dataset(), ds_with(RequestAttributesSequence=Sequence([inner]))])
    assert not matches(cond("8,50", "^ACC123$"), ds)
    assert matches(cond("8,50", "^ACC123$", search=True), ds)
    assert matches(cond("8,50", "OTHER", search=True), ds)
    assert not matches(cond("8,50", "NONE", search=True), ds)


def test_search_depth_is_bounded() -> None:
    """A hostile data set nesting sequences far deeper than any real one: Search looks 64
    levels down and does not exhaust the stack."""
    ds = innermost = ds_with(AccessionNumber="TOP")
    for depth in range(1, 200):
        item = ds_with(AccessionNumber=f"D{depth}")
        innermost.ReferencedStudySequence = Sequence([item])
        innermost = item
    assert matches(cond("8,50", "D64", search=True), ds)
    assert not matches(cond("8,50", "D65", search=True), ds)
    assert not matches(cond("8,50", "D199", search=True), ds)


def test_sequence_items_any_item_all_conditions_on_one_item() -> None:
    a = ds_with(ScheduledProcedureStepStartDate="20230101", Modality="MR")
    b = ds_with(ScheduledProcedureStepStartDate="20240202", Modality="CT")
    ds = Dataset()
    ds.ScheduledProcedureStepSequence = Sequence([a, b])
    sps = Condition(SPS_SEQUENCE, sequence_items=(cond("40,2", "^2024.*$"),))
    assert matches(sps, ds)
    same_item = Condition(SPS_SEQUENCE, sequence_items=(cond("40,2", "^2024"), cond("8,60", "CT")))
    assert matches(same_item, ds)
    across = Condition(SPS_SEQUENCE, sequence_items=(cond("40,2", "^2024"), cond("8,60", "MR")))
    assert not matches(across, ds)  # no single item has both
    empty = Dataset()
    empty.ScheduledProcedureStepSequence = Sequence([])
    assert not matches(sps, empty)
    assert not matches(sps, Dataset())
    assert not matches(sps, ds_with(Modality="CT"))


def test_private_tag_creator_finds_the_block() -> None:
    ds = Dataset()
    ds.add_new(0x00090010, "LO", "OTHER VENDOR")
    ds.add_new(0x00090011, "LO", "SIEMENS CT VA0  COAD ")  # trailing padding ignored
    ds.add_new(0x00091010, "LO", "not this one")
    ds.add_new(0x00091110, "LO", "siemens value")
    c = cond("0009,0010", "^siemens", private_creator="SIEMENS CT VA0  COAD")
    assert matches(c, ds)
    assert matches(cond("0009,1010", "^siemens", private_creator="SIEMENS CT VA0  COAD"), ds)
    assert not matches(cond("0009,0010", "^.*$", private_creator="NOBODY"), ds)
    assert not matches(cond("0009,0010", "^.*$", private_creator="SIEMENS CT VA0 COAD"), ds)  # exact name


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"search": True, "sequence_items": ("x",)}, "Search and SequenceItems"),
    ({"pattern": compile_pattern("x"), "sequence_items": ("x",)}, "MatchExpression and SequenceItems"),
    ({"private_creator": "X"}, "private \\(odd\\) group"),
])
def test_condition_combinations_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Condition(0x00080060, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("pattern", "why"), [
    ("(?<name>CT)", "named groups"),
    ("\\p{L}+", "Unicode categories"),
    ("[a-z-[aeiou]]", "subtraction"),
    ("^CT\\Z", "anchors"),
    ("a(?i)b", "not valid"),  # .NET applies a mid-pattern flag from there on; Python refuses it
    ("^(unclosed", "not valid"),
    ("\\k<n>", "backreferences"),
])
def test_dotnet_only_regexes_refused_at_load(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        compile_pattern(pattern)


def test_matches_all_and_empty_list() -> None:
    ds = ds_with(Modality="CT", BodyPartExamined="CHEST")
    assert matches_all((), ds)
    assert matches_all((cond("8,60", "CT"), cond("18,15", "CHEST")), ds)
    assert not matches_all((cond("8,60", "CT"), cond("18,15", "HEAD")), ds)


# ---- properties ----

_PLAIN = st.text(st.characters(blacklist_characters="^[](){}|+\\*?.", blacklist_categories=("Cs",)), max_size=12)


@given(pattern=_PLAIN, value=st.text(max_size=12))
def test_a_literal_matches_only_itself(pattern: str, value: str) -> None:
    p = compile_pattern(pattern)
    assert p.kind is PatternKind.LITERAL
    assert p.matches(value) == (value == pattern)
    assert p.matches(pattern)


@given(pattern=st.text("ab.-*?", min_size=1, max_size=10).filter(lambda t: "*" in t or "?" in t), value=st.text("ab.-\n", max_size=10))
def test_wildcard_is_fnmatch_on_the_whole_value(pattern: str, value: str) -> None:
    p = compile_pattern(pattern)
    assert p.kind is PatternKind.WILDCARD
    assert p.matches(value) == fnmatch.fnmatchcase(value, pattern)


@given(st.text("0123456789.", min_size=1, max_size=12).filter(lambda t: any(c == "." for c in t)), st.text("0123456789.x", max_size=12))
def test_dotted_numbers_are_exact(pattern: str, value: str) -> None:
    p = compile_pattern(pattern)
    assert p.kind is PatternKind.NUMBER
    assert p.matches(value) == (value == pattern)


@given(st.text(max_size=10), st.sampled_from("[](){}|+\\"))
def test_regex_marks_make_a_regex(text: str, mark: str) -> None:
    assert classify(text + mark) is PatternKind.REGEX
    assert classify("^" + text) is PatternKind.REGEX
