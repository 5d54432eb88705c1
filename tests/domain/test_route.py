"""issue 21: the route filter's decisions (§2.3) and save_file's templates and masks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from capacitor_trio.domain.conditions import Condition, compile_pattern
from capacitor_trio.domain.route import (
    Placeholder,
    Route,
    RouteAction,
    RouteActionType,
    decide_routes,
    parse_template,
    render,
    render_mask,
)

ADD = RouteActionType.ADD_DESTINATION
SAVE = RouteActionType.SAVE_FILE
DROP = RouteActionType.DROP


def ct() -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientID = "12345678"
    ds.StudyDate = "20240131"
    ds.PatientName = "Doe^John"
    return ds


def set_patient_id(ds: Dataset, value: str) -> None:
    """Any text, even what PS3.5 forbids in an LO (a hostile sender's), without pydicom's warning."""
    ds[0x00100020] = DataElement(0x00100020, "LO", value, validation_mode=pydicom_config.IGNORE)


def modality(value: str) -> tuple[Condition, ...]:
    return (Condition(0x00080060, compile_pattern(value)),)


def save(target: str, **kw: object) -> RouteAction:
    return RouteAction(SAVE, target, parse_template(target), **kw)  # type: ignore[arg-type]


def test_template_parts() -> None:
    t = parse_template("/out/#{10,20}/#{8,20:0000-00}/")
    assert t.parts == ("/out/", Placeholder(0x00100020), "/", Placeholder(0x00080020, "0000-00"), "/")
    assert t.is_directory


@pytest.mark.parametrize(("text", "why"), [("/out/#{PatientID}", "not a tag"), ("/out/#{10,20", "not closed"), ("#{10,20:00`}", "escape")])
def test_bad_templates(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_template(text)


@pytest.mark.parametrize(("value", "mask", "out"), [
    ("123456", "0000-00", "1234-56"),  # the documented example
    ("1234", "0000-00", "1234"),  # the value is used up: the literal after it is not written
    ("20240131", "0000", "2024"),  # the mask ends: the rest is dropped
    ("doe", "AAA", "DOE"),
    ("DOE", "aaa", "doe"),
    ("a1b2", "0000", "12"),  # 0 keeps digits only
    ("x-y", "?!?", "xy"),
    ("20240131", "!!!!00`-00", "01-31"),
    ("ab", "`A`a?", "Aaa"),  # escaped picture characters are written as themselves
])
def test_masks(value: str, mask: str, out: str) -> None:
    assert render_mask(value, mask) == out


def test_render_values_missing_tags_and_directories() -> None:
    ds = ct()
    assert render(parse_template("/out/#{10,20}/#{8,20:0000}/x.dcm"), ds) == Path("/out/12345678/2024/x.dcm")
    assert render(parse_template("/out/#{8,103e}/#{0009,1010}/"), ds) == Path("/out/SeriesDescription/0009,1010/1.2.3.4.dcm")
    del ds.SOPInstanceUID
    assert render(parse_template("/out/"), ds) == Path("/out/SOPInstanceUID.dcm")


@pytest.mark.parametrize("evil", ["../../etc", "a/b", "a\\b", "..", ".", "x\x00y"])
def test_values_cannot_leave_the_directory(evil: str) -> None:
    ds = ct()
    set_patient_id(ds, evil)
    path = render(parse_template("/out/#{10,20}/f.dcm"), ds)
    assert path.parent.parent == Path("/out")
    assert ".." not in path.parts and "\x00" not in str(path)


def test_a_long_value_gives_64_characters() -> None:
    ds = ct()
    ds.StudyComments = "x" * 10000  # LT
    path = render(parse_template("/out/#{32,4000}/"), ds)
    assert path.parent.name == "x" * 64


@settings(deadline=None)
@given(st.text(max_size=80))
def test_any_value_stays_one_component(value: str) -> None:
    ds = ct()
    set_patient_id(ds, value)
    path = render(parse_template("/out/#{10,20}/f.dcm"), ds)
    assert path.parent.parent == Path("/out") and path.parent.name not in ("", ".", "..")


def test_every_matching_route_in_file_order() -> None:
    routes = [
        Route(0, "dose", (), modality("CT"), (RouteAction(ADD, "DOSE"),)),
        Route(1, "mr only", (), modality("MR"), (RouteAction(ADD, "MRARCHIVE"),)),
        Route(2, "copy", (), (), (RouteAction(ADD, "BACKUP"), save("/out/#{8,18}.dcm"))),
    ]
    r = decide_routes(routes, ct(), "PACS", "instance 1.2.3.4")
    assert r.matched and r.keep
    assert r.add_destinations == ("DOSE", "BACKUP")
    assert [s.path for s in r.saves] == [Path("/out/1.2.3.4.dcm")]


def test_remove_original_is_or_ed_and_last() -> None:
    routes = [
        Route(0, "", (), (), (RouteAction(ADD, "A", remove_original=False),)),
        Route(1, "", (), (), (RouteAction(ADD, "B", remove_original=True), RouteAction(ADD, "C"))),
        Route(2, "", (), (), (RouteAction(ADD, "D"),)),
    ]
    r = decide_routes(routes, ct(), "PACS", "i")
    assert not r.keep
    assert r.add_destinations == ("A", "B", "C", "D")  # later actions and routes still run


def test_drop_removes_and_logs_at_info() -> None:
    r = decide_routes([Route(0, "scouts", (), modality("CT"), (RouteAction(DROP),))], ct(), "PACS", "instance 1.2.3.4")
    assert r.matched and not r.keep
    assert all(d.level == logging.INFO for d in r.decisions)
    assert "route 1 (scouts): drops it: instance 1.2.3.4" in [d.text for d in r.decisions]


def test_ae_titles_limit_a_route_to_those_destinations() -> None:
    routes = [Route(0, "", ("ARCHIVE",), (), (RouteAction(DROP),))]
    assert decide_routes(routes, ct(), "PACS", "i").keep
    assert not decide_routes(routes, ct(), "ARCHIVE", "i").keep
    assert not decide_routes(routes, ct(), "PACS", "i").matched


def test_log_levels_and_no_patient_data_at_info() -> None:
    routes = [Route(0, "", (), (), (save("/out/#{10,10}.dcm", log_level=logging.INFO), save("/dbg/#{10,10}.dcm")))]
    r = decide_routes(routes, ct(), "PACS", "instance 1.2.3.4")
    info = [d.text for d in r.decisions if d.level == logging.INFO]
    debug = [d.text for d in r.decisions if d.level == logging.DEBUG]
    assert info and all("Doe" not in t for t in info)
    assert any("/dbg/Doe^John.dcm" in t for t in debug)


def test_add_destination_to_itself_or_twice_adds_once() -> None:
    routes = [Route(0, "", (), (), (RouteAction(ADD, "PACS"), RouteAction(ADD, "X"), RouteAction(ADD, "X")))]
    assert decide_routes(routes, ct(), "PACS", "i").add_destinations == ("X",)


def test_no_match_decides_nothing() -> None:
    r = decide_routes([Route(0, "", (), modality("MR"), (RouteAction(DROP),))], ct(), "PACS", "i")
    assert r == type(r)(matched=False, keep=True)
