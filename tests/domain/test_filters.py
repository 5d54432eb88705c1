"""issue 21: the filter chain on one item: order, AeTitles, route removal, mutate failures,
sort keys, dropUnfilteredInstances, the effects port, describe; and the property that a chain
with no matching entry leaves the data set's bytes untouched."""

from __future__ import annotations

import datetime
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from capacitor_trio.domain import filters as filters_module
from capacitor_trio.domain.conditions import Condition, compile_pattern, parse_tag
from capacitor_trio.domain.filtering import Decision, FilterFailure, TagChange
from capacitor_trio.domain.filters import (
    ChainContext,
    FilterChain,
    MutateFilter,
    Mutation,
    RouteFilter,
    SortFilter,
    describe,
    run_chain,
    summary,
)
from capacitor_trio.domain.mutate import MutateContext, MutateResult, MutationAction, Remove
from capacitor_trio.domain.route import Route, RouteAction, RouteActionType, parse_template
from capacitor_trio.domain.sort import SortDirection, SortEntry, SortKey, SortRule, SortType

CTX = ChainContext("MODALITY", "PACS", datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC))
ROUTES = Path("/data/routings.yml")
BY_NUMBER = SortRule(0x00200013, SortType.INTEGER, SortDirection.DESC)


def instance() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.Modality = "CT"
    ds.PatientName = "Doe^John"
    ds.PatientID = "12345678"
    ds.StudyDate = "20240131"
    ds.InstanceNumber = "7"
    ds.SliceThickness = "1.50"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesDescription = "AXIAL 1.5"
    item = Dataset()
    item.AccessionNumber = "ACC1"
    item.CodeValue = "X1"
    ds.RequestAttributesSequence = DicomSequence([item])
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091001, "LO", "private text")
    ds.Rows = 2
    ds.Columns = 2
    ds.add_new(0x7FE00010, "OB", b"\x00\x01\x02\x03\x04\x05\x06\x07")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Effects:
    def __init__(self, fail: bool = False) -> None:
        self.saved: list[tuple[Path, str]] = []
        self.fail = fail

    def save_file(self, target: Path, ds: Dataset) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.saved.append((target, str(ds.PatientName)))


def when(tag: str, pattern: str) -> tuple[Condition, ...]:
    return (Condition(parse_tag(tag), compile_pattern(pattern)),)


def route(*actions: RouteAction, conditions: tuple[Condition, ...] = (), ae_titles: tuple[str, ...] = (), index: int = 0) -> Route:
    return Route(index, "", ae_titles, conditions, actions)


def chain(*steps: RouteFilter | MutateFilter | SortFilter, drop_unfiltered: bool = False) -> FilterChain:
    return FilterChain(tuple(s.name for s in steps), steps, (), drop_unfiltered)


def mutation(conditions: tuple[Condition, ...] = (), ae_titles: tuple[str, ...] = (), affects: tuple[str, ...] = ("storage",), index: int = 0) -> Mutation:
    return Mutation(index, "rename", ae_titles, conditions, affects, (Remove(0x00100010),))


@pytest.fixture
def fake_mutate(monkeypatch: pytest.MonkeyPatch) -> list[MutateContext]:
    """apply_actions (filt-mutate's) replaced by one that renames the patient, or fails when the
    action list holds a Remove of (0010,0020)."""
    seen: list[MutateContext] = []

    def apply(actions: Sequence[MutationAction], ds: Dataset, ctx: MutateContext) -> MutateResult:
        seen.append(ctx)
        if any(isinstance(a, Remove) and a.tag == 0x00100020 for a in actions):
            return MutateResult((), FilterFailure(retry=False, message="cannot"), ())
        before = str(ds.PatientName)
        ds.PatientName = "ANON"
        return MutateResult((TagChange(0x00100010, "PatientName", before, "ANON"),), None, (Decision(logging.DEBUG, "renamed"),))

    monkeypatch.setattr(filters_module, "apply_actions", apply)
    return seen


def test_empty_chain_keeps_the_item() -> None:
    out = run_chain(FilterChain(), instance(), CTX, Effects())
    assert out.keep and out.add_destinations == () and out.sort_key is None and out.failure is None


def test_filters_run_in_order_on_the_changed_data_set(fake_mutate: list[MutateContext]) -> None:
    effects = Effects()
    save = RouteAction(RouteActionType.SAVE_FILE, "/out/", parse_template("/out/"))
    steps = (MutateFilter(Path("m"), (mutation(),)), RouteFilter(ROUTES, (route(save),)))
    out = run_chain(chain(*steps), instance(), CTX, effects)
    assert effects.saved == [(Path("/out/1.2.826.0.1.3680043.8.498.1.dcm"), "ANON")]  # route after mutate
    assert out.changes == (TagChange(0x00100010, "PatientName", "Doe^John", "ANON"),)
    assert out.saved == (Path("/out/1.2.826.0.1.3680043.8.498.1.dcm"),)
    assert fake_mutate == [MutateContext("MODALITY", "PACS", CTX.now, None)]
    effects = Effects()
    run_chain(chain(*reversed(steps)), instance(), CTX, effects)
    assert effects.saved[0][1] == "Doe^John"  # route before mutate


def test_route_removal_stops_the_chain_adds_stand(fake_mutate: list[MutateContext]) -> None:
    r = route(RouteAction(RouteActionType.ADD_DESTINATION, "DOSE", remove_original=True))
    out = run_chain(chain(RouteFilter(ROUTES, (r,)), MutateFilter(Path("m"), (mutation(),))), instance(), CTX, Effects())
    assert not out.keep and out.add_destinations == ("DOSE",)
    assert fake_mutate == [] and out.changes == ()


def test_mutation_failure_stops_the_chain(fake_mutate: list[MutateContext]) -> None:
    failing = Mutation(1, "", (), (), ("storage",), (Remove(0x00100020),))
    steps = (MutateFilter(Path("m"), (mutation(), failing, mutation(index=2))), SortFilter(Path("s"), (SortEntry(0, "", (), (), (BY_NUMBER,)),)))
    out = run_chain(chain(*steps), instance(), CTX, Effects())
    assert out.failure == FilterFailure(retry=False, message="cannot")
    assert len(fake_mutate) == 2 and out.sort_key is None
    assert len(out.changes) == 1


def test_mutation_entry_level_ae_titles_conditions_affects(fake_mutate: list[MutateContext]) -> None:
    entries = (
        mutation(ae_titles=("ARCHIVE",)),
        mutation(conditions=when("8,60", "MR")),
        mutation(affects=("worklist_query",)),
    )
    out = run_chain(chain(MutateFilter(Path("m"), entries)), instance(), CTX, Effects())
    assert fake_mutate == [] and out.changes == ()
    out = run_chain(chain(MutateFilter(Path("m"), entries)), instance(), attrs_evolve(CTX, "ARCHIVE"), Effects())
    assert len(fake_mutate) == 1


def attrs_evolve(ctx: ChainContext, destination: str) -> ChainContext:
    return ChainContext(ctx.source_ae, destination, ctx.now, ctx.pseudonyms)


def test_save_file_failure_retries_the_item() -> None:
    save = RouteAction(RouteActionType.SAVE_FILE, "/out/", parse_template("/out/"))
    out = run_chain(chain(RouteFilter(ROUTES, (route(save),))), instance(), CTX, Effects(fail=True))
    assert out.failure is not None and out.failure.retry
    assert "No space left" in out.failure.message and "Doe" not in out.failure.message


def test_sort_key_where_sort_stands() -> None:
    entries = (SortEntry(0, "", (), (), (BY_NUMBER,)),)
    out = run_chain(chain(SortFilter(Path("s"), entries)), instance(), CTX, Effects())
    assert out.sort_key == SortKey(BY_NUMBER, False, 7)
    assert out.keep


def test_drop_unfiltered_instances() -> None:
    mr_route = route(RouteAction(RouteActionType.ADD_DESTINATION, "MRARCHIVE"), conditions=when("8,60", "MR"))
    c = chain(RouteFilter(ROUTES, (mr_route,)), drop_unfiltered=True)
    out = run_chain(c, instance(), CTX, Effects())
    assert not out.keep
    assert any(d.level == logging.INFO and "dropUnfilteredInstances" in d.text for d in out.decisions)
    ct_route = route(RouteAction(RouteActionType.ADD_DESTINATION, "CTARCHIVE"), conditions=when("8,60", "CT"))
    assert run_chain(chain(RouteFilter(ROUTES, (ct_route,)), drop_unfiltered=True), instance(), CTX, Effects()).keep
    sort = SortFilter(Path("s"), (SortEntry(0, "", (), (), (BY_NUMBER,)),))
    assert run_chain(chain(RouteFilter(ROUTES, (mr_route,)), sort, drop_unfiltered=True), instance(), CTX, Effects()).keep


def test_an_item_a_route_added_skips_route_and_counts_as_filtered(fake_mutate: list[MutateContext]) -> None:
    """Two routes adding each other's destination cannot loop: the copy does not pass route."""
    loop = (
        route(RouteAction(RouteActionType.ADD_DESTINATION, "B"), ae_titles=("PACS",)),
        route(RouteAction(RouteActionType.ADD_DESTINATION, "PACS"), ae_titles=("B",), index=1),
    )
    added = ChainContext("MODALITY", "B", CTX.now, None, added_by_route=True)
    c = chain(RouteFilter(ROUTES, loop), MutateFilter(Path("m"), (mutation(),)), drop_unfiltered=True)
    out = run_chain(c, instance(), added, Effects())
    assert out.keep and out.add_destinations == ()
    assert len(fake_mutate) == 1 and fake_mutate[0].destination_ae == "B"
    assert run_chain(c, instance(), CTX, Effects()).add_destinations == ("B",)


def test_decisions_at_info_carry_no_patient_data() -> None:
    steps = RouteFilter(ROUTES, (route(RouteAction(RouteActionType.DROP), conditions=when("10,10", "^Doe")),))
    out = run_chain(chain(steps), instance(), CTX, Effects())
    info = [d.text for d in out.decisions if d.level == logging.INFO]
    assert info and all("Doe" not in t and "12345678" not in t for t in info)
    assert all("1.2.826.0.1.3680043.8.498.1" in t for t in info)


def test_describe_is_json() -> None:
    steps = (
        RouteFilter(ROUTES, (route(RouteAction(RouteActionType.DROP), conditions=when("8,103e", "(?i)scout")),)),
        MutateFilter(Path("m"), (mutation(),)),
        SortFilter(Path("s"), (SortEntry(0, "by number", (), (), (BY_NUMBER,)),)),
    )
    c = FilterChain(("route", "mutate", "sort", ), steps, (), True)
    d = json.loads(json.dumps(describe(c)))
    assert d["filters"] == ["route", "mutate", "sort"] and d["dropUnfilteredInstances"] is True
    route_entry = d["files"][0]["entries"][0]
    assert route_entry["conditions"] == [{"tag": "0008,103E", "log": "info", "matchExpression": "(?i)scout", "kind": "regex"}]
    assert route_entry["actions"][0]["type"] == "drop"
    assert d["files"][2]["entries"][0]["actions"][0]["sortTag"] == "0020,0013"
    assert d["files"][1]["entries"][0]["actions"] == [{"type": "remove", "tag": "0010,0010", "description": ""}]


# ---- property: no matching entry, no change ----

_TAGS = ["8,60", "10,10", "10,20", "8,8", "20,13", "18,50", "8,50", "8,100", "9,1001", "7fe0,10", "2,2"]
_conditions = st.lists(
    st.builds(
        lambda tag, text, search: Condition(
            parse_tag(tag), compile_pattern(text), search and not tag.startswith("2,"),
            private_creator="ACME 1.0" if tag.startswith("9,") else None,
        ),
        st.sampled_from(_TAGS),
        st.sampled_from(["NOMATCH", "^never$", "never*", "9.9.9", "(?i)nothing|none"]),
        st.booleans(),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_conditions, min_size=1, max_size=4), st.booleans())
def test_no_matching_entry_leaves_the_bytes_untouched(entry_conditions: list[tuple[Condition, ...]], through_file: bool) -> None:
    original = part10(instance())
    ds = dcmread(io.BytesIO(original)) if through_file else instance()
    before = part10(ds)
    steps = (
        RouteFilter(ROUTES, tuple(route(RouteAction(RouteActionType.DROP), conditions=tuple(c), index=i) for i, c in enumerate(entry_conditions))),
        MutateFilter(Path("m"), tuple(Mutation(i, "", (), tuple(c), ("storage",), (Remove(0x00100010),)) for i, c in enumerate(entry_conditions))),
        SortFilter(Path("s"), tuple(SortEntry(i, "", (), tuple(c), (BY_NUMBER,)) for i, c in enumerate(entry_conditions))),
    )
    out = run_chain(chain(*steps), ds, CTX, Effects())
    assert out.keep and out.changes == () and out.add_destinations == () and out.sort_key is None
    assert part10(ds) == before == original


def test_summary_line() -> None:
    sort = SortFilter(Path("s"), (SortEntry(0, "", (), (), (BY_NUMBER,)),))
    c = FilterChain(("route", "mutate", "sort"), (RouteFilter(ROUTES, ()), sort), ("mutate",), True)
    assert summary(c) == "filters: route (0 entries), mutate (off: no file), sort (1 entries); dropUnfilteredInstances"
    assert summary(FilterChain()) == "filters: none"
