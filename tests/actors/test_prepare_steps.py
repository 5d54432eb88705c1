"""The per-item prepare stage's seam: steps run in order, their results folded into one plan."""

from __future__ import annotations

import logging
from pathlib import Path

import attrs
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from capacitor_trio.actors.prepare_steps import (
    LATE_CHANGE,
    PrepareSubject,
    StepResult,
    Verdict,
    combine,
    run_steps,
)
from capacitor_trio.domain.filtering import Decision
from capacitor_trio.domain.instance import Destination
from capacitor_trio.domain.prepare import sort_bytes

SUBJECT = PrepareSubject(1, Destination("PACS"), "CT1", "1.2.3", "1.2.840.10008.1.2.1")


@attrs.define
class Scripted:
    """A step that answers from a script and records what it saw."""

    name: str
    result: StepResult
    seen: list[str] = attrs.field(factory=list)
    change: str | None = None

    async def run(self, subject: PrepareSubject, ds: Dataset) -> StepResult:
        self.seen.append(str(ds.get("PatientName", "")))
        if self.change is not None:
            ds.PatientName = self.change
        return self.result


def dataset() -> Dataset:
    ds = Dataset()
    ds.PatientName = "A"
    return ds


def test_no_results_keep_the_item_unchanged() -> None:
    plan = combine([], dataset())
    assert plan.verdict is Verdict.KEEP and plan.dataset is None and plan.add_destinations == ()


def test_a_change_makes_a_copy_and_later_keeps_do_not_undo_it() -> None:
    ds = dataset()
    plan = combine([StepResult(Verdict.CHANGED), StepResult(Verdict.KEEP, sort_key=b"\x01")], ds)
    assert plan.verdict is Verdict.CHANGED and plan.dataset is ds and plan.sort_key == b"\x01"


def test_the_last_sort_key_and_every_added_destination_count() -> None:
    plan = combine(
        [
            StepResult(add_destinations=("VNA",), sort_key=b"\x02"),
            StepResult(add_destinations=("VNA", "DOSE"), sort_key=b"\x01"),
        ],
        dataset(),
    )
    assert plan.add_destinations == ("VNA", "DOSE") and plan.sort_key == b"\x01"


def test_a_drop_keeps_the_added_destinations_retry_and_fail_keep_nothing() -> None:
    adds = StepResult(add_destinations=("VNA",))
    dropped = combine([adds, StepResult(Verdict.DROP, message="scout")], dataset())
    assert (dropped.verdict, dropped.add_destinations) == (Verdict.DROP, ("VNA",))
    for verdict in (Verdict.RETRY, Verdict.FAIL):
        plan = combine([adds, StepResult(verdict, message="no")], dataset())
        assert (plan.verdict, plan.add_destinations, plan.message) == (verdict, (), "no")


def test_an_item_added_by_a_route_follows_no_add_destination() -> None:
    plan = combine([StepResult(add_destinations=("VNA",))], dataset(), follow_adds=False)
    assert plan.add_destinations == ()


async def test_steps_run_in_order_on_the_changed_data_set_and_stop_at_a_drop() -> None:
    info = Decision(logging.INFO, "dropped 1.2.3")
    first = Scripted("one", StepResult(Verdict.CHANGED), change="B")
    second = Scripted("two", StepResult(Verdict.DROP, decisions=(info,)))
    third = Scripted("three", StepResult())
    plan = await run_steps([first, second, third], SUBJECT, dataset())
    assert (first.seen, second.seen, third.seen) == (["A"], ["B"], [])
    assert plan.verdict is Verdict.DROP and plan.decisions == (info,)


async def test_a_step_that_raises_fails_the_item_naming_the_step() -> None:
    class Broken:
        name = "broken"

        async def run(self, subject: PrepareSubject, ds: Dataset) -> StepResult:
            raise OSError("disk gone")

    plan = await run_steps([Broken()], SUBJECT, dataset())
    assert plan.verdict is Verdict.FAIL and plan.message == "prepare step broken failed: disk gone"


async def test_a_step_may_hand_over_a_new_data_set() -> None:
    replacement = dataset()
    replacement.PatientName = "C"
    first = Scripted("one", StepResult(Verdict.CHANGED, dataset=replacement, transfer_syntax="1.2"))
    second = Scripted("two", StepResult())
    plan = await run_steps([first, second], SUBJECT, dataset())
    assert second.seen == ["C"] and plan.dataset is replacement and plan.transfer_syntax == "1.2"


async def test_a_step_may_hand_over_its_finished_copy_as_a_file(tmp_path: Path) -> None:
    """The plan keeps the file (no data set to write); later KEEPs do not undo it."""
    file = tmp_path / "copy.part"
    file.write_bytes(b"converted")
    first = Scripted("filters", StepResult(Verdict.CHANGED), change="B")
    second = Scripted("transcode", StepResult(Verdict.CHANGED, file=file, transfer_syntax="1.2.840.10008.1.2.5"))
    third = Scripted("three", StepResult())
    plan = await run_steps([first, second, third], SUBJECT, dataset())
    assert plan.verdict is Verdict.CHANGED and plan.file == file and plan.dataset is None
    assert plan.transfer_syntax == "1.2.840.10008.1.2.5" and file.exists()


async def test_a_handed_over_file_the_plan_does_not_keep_is_removed(tmp_path: Path) -> None:
    """A later step's FAIL, or a later change (the finished copy would be stale): the file goes."""
    for later, message in (
        (StepResult(Verdict.FAIL, message="no"), "no"),
        (StepResult(Verdict.CHANGED), LATE_CHANGE),
    ):
        file = tmp_path / "copy.part"
        file.write_bytes(b"converted")
        first = Scripted("transcode", StepResult(Verdict.CHANGED, file=file))
        plan = await run_steps([first, Scripted("later", later)], SUBJECT, dataset())
        assert plan.verdict is Verdict.FAIL and plan.message == message and plan.file is None
        assert not file.exists()


@given(st.lists(st.integers(min_value=-(2**70), max_value=2**70), min_size=2), st.booleans())
def test_integer_sort_bytes_order_like_the_integers(values: list[int], descending: bool) -> None:
    limit = 2**63
    clamped = [max(-limit, min(limit - 1, v)) for v in values]
    by_bytes = sorted(range(len(values)), key=lambda k: (sort_bytes(values[k], descending=descending), k))
    by_value = sorted(range(len(values)), key=lambda k: (-clamped[k] if descending else clamped[k], k))
    assert [clamped[k] for k in by_bytes] == [clamped[k] for k in by_value]


@given(st.lists(st.text(), min_size=2), st.booleans())
def test_text_sort_bytes_order_like_ordinal_comparison(values: list[str], descending: bool) -> None:
    by_bytes = sorted(values, key=lambda v: sort_bytes(v, descending=descending))
    assert by_bytes == sorted(values, reverse=descending)
