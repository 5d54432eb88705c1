"""A node's preparer on virtual time: ripeness, the prepare flag, wake-ups, one node only."""

from __future__ import annotations

import datetime
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pydicom
import pytest
import trio
from pydicom.dataset import Dataset

from capacitor_trio.actors.filter_step import FilterStep, SaveFiles
from capacitor_trio.actors.prepare import RETRY_DELAY, NodePreparer
from capacitor_trio.actors.prepare_steps import PrepareSubject, StepResult, Verdict
from capacitor_trio.actors.service import ServiceFlags
from capacitor_trio.audit import AUDIT_LOG, AuditTrail, verify
from capacitor_trio.config.filters import load_filters
from capacitor_trio.domain.anonymize import MemoryPseudonyms
from capacitor_trio.domain.instance import Destination
from tests.helpers.datasets import make_dataset, to_part10_bytes

from .fakes import FakeStore
from .test_node import BASE, config


def make(minimum_age: float = 2) -> tuple[NodePreparer, FakeStore, ServiceFlags, list[float]]:
    clock = lambda: BASE + trio.current_time()  # noqa: E731
    store = FakeStore(clock)
    service = ServiceFlags()
    prepared_at: list[float] = []
    cfg = config(minimum_age=minimum_age)
    preparer = NodePreparer(
        Destination("PACS"), store, lambda: cfg, service, clock,
        lambda: prepared_at.append(trio.current_time()),
    )
    return preparer, store, service, prepared_at


async def test_items_are_prepared_when_ripe_and_the_node_is_woken(autojump_clock: Any) -> None:
    preparer, store, _service, prepared_at = make()
    first = store.add(state="new")
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        await trio.sleep(1.5)
        second = store.add(state="new")  # t = 1.5: ripe at 3.5
        preparer.arrived()
        await trio.sleep(2.5)
        assert prepared_at == [2.0, 3.5]
        assert store.items[first.id].state == store.items[second.id].state == "prepared"
        nursery.cancel_scope.cancel()


async def test_only_its_own_node_is_prepared(autojump_clock: Any) -> None:
    preparer, store, _service, prepared_at = make(minimum_age=0)
    mine, other = store.add(state="new"), store.add("VNA", state="new")
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        await trio.testing.wait_all_tasks_blocked()
        assert (store.items[mine.id].state, store.items[other.id].state) == ("prepared", "new")
        assert prepared_at == [0.0]
        nursery.cancel_scope.cancel()


async def test_the_prepare_flag_holds_items_new_until_woken(autojump_clock: Any) -> None:
    preparer, store, service, prepared_at = make()
    service.set_all(False)
    item = store.add(state="new")
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        await trio.sleep(100)
        assert store.items[item.id].state == "new" and prepared_at == []
        service.set_all(True)
        preparer.wake()  # what a change of the service flags does
        await trio.testing.wait_all_tasks_blocked()
        assert store.items[item.id].state == "prepared" and prepared_at == [100.0]
        nursery.cancel_scope.cancel()


async def test_an_arrival_while_it_waits_for_a_ripe_item_costs_no_look(autojump_clock: Any) -> None:
    preparer, store, _service, _prepared_at = make()
    looks: list[float] = []
    real = store.oldest_new

    async def counted(destination: Destination | None = None) -> float | None:
        looks.append(trio.current_time())
        return await real(destination)

    store.oldest_new = counted  # type: ignore[method-assign]
    store.add(state="new")
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        await trio.sleep(1)
        for _ in range(50):  # newer items cannot ripen before the oldest
            store.add(state="new")
            preparer.arrived()
        await trio.sleep(0.5)
        assert looks == [0.0]
        nursery.cancel_scope.cancel()


async def test_an_arrival_when_idle_is_looked_at_at_once(autojump_clock: Any) -> None:
    preparer, store, _service, prepared_at = make(minimum_age=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        await trio.sleep(10)
        store.add(state="new")
        preparer.arrived()
        await trio.testing.wait_all_tasks_blocked()
        assert prepared_at == [10.0]
        nursery.cancel_scope.cancel()


# ---- the per-item path (a node whose prepare stage has steps) ---------------------------------


@attrs.define
class Step:
    """A scripted step: `decide(ds)` changes the data set if it likes and answers."""

    decide: Callable[[Dataset], StepResult]
    name: str = "scripted"
    seen: list[int] = attrs.field(factory=list)

    async def run(self, subject: PrepareSubject, ds: Dataset) -> StepResult:
        self.seen.append(subject.item_id)
        return self.decide(ds)


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return fn(*args)


@pytest.fixture(autouse=True)
def _worker_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU work on the loop, so virtual time stays exact (threads would let the clock jump)."""
    monkeypatch.setattr("capacitor_trio.actors.prepare.in_worker", _inline)


def make_with(
    step: Step, minimum_age: float = 0, nodes: tuple[str, ...] = ("PACS", "VNA")
) -> tuple[NodePreparer, FakeStore, list[float], list[list[Destination]]]:
    clock = lambda: BASE + trio.current_time()  # noqa: E731
    store = FakeStore(clock)
    prepared_at: list[float] = []
    added: list[list[Destination]] = []
    cfg = config(minimum_age=minimum_age)
    preparer = NodePreparer(
        Destination("PACS"), store, lambda: cfg, ServiceFlags(), clock,
        lambda: prepared_at.append(trio.current_time()),
        steps=lambda: (step,),
        resolve=lambda ae: Destination(ae) if ae in nodes else None,
        on_added=lambda dests: added.append(list(dests)),
    )
    return preparer, store, prepared_at, added


def instance(**kw: Any) -> bytes:
    return to_part10_bytes(make_dataset(rows=4, columns=4, **kw))


async def settle(preparer: NodePreparer, seconds: float = 0) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        await trio.sleep(seconds)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_a_changed_data_set_becomes_the_items_own_copy(autojump_clock: Any) -> None:
    def rename(ds: Dataset) -> StepResult:
        ds.PatientName = "ANON"
        return StepResult(Verdict.CHANGED, sort_key=b"\x07")

    preparer, store, prepared_at, _ = make_with(Step(rename))
    data = instance()
    mine = store.add(state="new", data=data)
    theirs = store.add("VNA", state="new", data=data)
    await settle(preparer)
    item = store.items[mine.id]
    assert (item.state, item.sort_key, item.patient_name) == ("prepared", b"\x07", "ANON")
    copy = pydicom.dcmread(io.BytesIO(store.blobs[item.instance_id]))
    assert copy.PatientName == "ANON" and copy.PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData
    assert store.items[theirs.id].state == "new" and store.blobs[theirs.instance_id] == data
    assert prepared_at == [0.0]


async def test_keep_shares_the_received_instance_and_drop_removes_the_item(autojump_clock: Any) -> None:
    verdicts = iter([StepResult(), StepResult(Verdict.DROP)])
    preparer, store, _, _ = make_with(Step(lambda ds: next(verdicts)))
    kept, dropped = store.add(state="new", data=instance()), store.add(state="new", data=instance())
    await settle(preparer)
    assert store.items[kept.id].state == "prepared" and store.items[kept.id].instance_id == kept.instance_id
    assert dropped.id not in store.items


async def test_added_destinations_get_items_their_own_stage_prepares(autojump_clock: Any) -> None:
    preparer, store, _, added = make_with(Step(lambda ds: StepResult(add_destinations=("VNA", "PACS"))))
    item = store.add(state="new", data=instance())
    await settle(preparer)
    [vna] = [i for i in store.items.values() if i.destination_ae == "VNA"]
    assert (vna.state, vna.added_by, vna.instance_id) == ("new", item.id, item.instance_id)
    assert added == [[Destination("VNA")]]  # its own destination is not added again


async def test_an_added_destination_naming_no_storage_node_fails_the_item(autojump_clock: Any) -> None:
    preparer, store, _, added = make_with(Step(lambda ds: StepResult(add_destinations=("NOPE",))))
    item = store.add(state="new", data=instance())
    await settle(preparer)
    failed = store.items[item.id]
    assert failed.state == "failed" and "NOPE" in failed.last_error and added == []


async def test_an_item_added_by_a_route_follows_no_add_destination(autojump_clock: Any) -> None:
    preparer, store, _, added = make_with(Step(lambda ds: StepResult(add_destinations=("VNA",))))
    item = store.add(state="new", data=instance())
    store._set(item.id, added_by=999)
    await settle(preparer)
    assert store.items[item.id].state == "prepared" and added == [] and len(store.items) == 1


async def test_retry_keeps_the_item_new_until_later_and_fail_records_why(autojump_clock: Any) -> None:
    answers = iter([StepResult(Verdict.RETRY, message="busy"), StepResult(Verdict.FAIL, message="bad")])
    step = Step(lambda ds: next(answers))
    preparer, store, _, _ = make_with(step)
    item = store.add(state="new", data=instance())
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        await trio.testing.wait_all_tasks_blocked()
        assert (store.items[item.id].state, store.items[item.id].last_error) == ("new", "busy")
        await trio.sleep(RETRY_DELAY - 1)
        assert step.seen == [item.id]
        await trio.sleep(1)
        await trio.testing.wait_all_tasks_blocked()
        assert step.seen == [item.id, item.id]
        assert (store.items[item.id].state, store.items[item.id].last_error) == ("failed", "bad")
        nursery.cancel_scope.cancel()


async def test_unreadable_bytes_fail_that_item_alone(autojump_clock: Any) -> None:
    preparer, store, _, _ = make_with(Step(lambda ds: StepResult()))
    bad, good = store.add(state="new", data=b"\x00" * 7), store.add(state="new", data=instance())
    await settle(preparer)
    assert store.items[bad.id].state == "failed" and "cannot read" in store.items[bad.id].last_error
    assert store.items[good.id].state == "prepared"


async def test_items_ripen_after_minimum_age_and_arrivals_wake_it(autojump_clock: Any) -> None:
    step = Step(lambda ds: StepResult())
    preparer, store, prepared_at, _ = make_with(step, minimum_age=2)
    store.add(state="new", data=instance())
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        await trio.sleep(10)
        store.add(state="new", data=instance())
        preparer.arrived()
        await trio.sleep(5)
        assert prepared_at == [2.0, 12.0]
        nursery.cancel_scope.cancel()


async def test_an_item_with_its_own_copy_put_back_to_new_is_not_filtered_twice(autojump_clock: Any) -> None:
    step = Step(lambda ds: StepResult(Verdict.CHANGED))
    preparer, store, _, _ = make_with(step)
    item = store.add(state="new", data=instance())
    store._set(item.id, prepared_copy=True, sort_key=b"\x05")
    await settle(preparer)
    assert step.seen == [] and store.items[item.id].state == "prepared" and store.items[item.id].sort_key == b"\x05"


@attrs.define
class CpuOnly:
    """A CPU-only step: the preparer runs it in the thread that read the item."""

    decide: Callable[[Dataset], StepResult]
    name: str = "cpu"

    async def run(self, subject: PrepareSubject, ds: Dataset) -> StepResult:
        raise AssertionError("a CPU-only step is run with run_sync")

    def run_sync(self, subject: PrepareSubject, ds: Dataset) -> StepResult:
        return self.decide(ds)


async def test_cpu_only_steps_run_in_the_thread_that_read_the_item(autojump_clock: Any) -> None:
    def rename(ds: Dataset) -> StepResult:
        if ds.InstanceNumber == 2:
            raise ValueError("no")
        ds.PatientName = "ANON"
        return StepResult(Verdict.CHANGED)

    preparer, store, _, _ = make_with(Step(lambda ds: StepResult()))
    preparer._steps = lambda: (CpuOnly(rename),)
    good, bad = store.add(state="new", data=instance()), store.add(state="new", data=instance(seed=1))
    await settle(preparer)
    assert store.items[good.id].patient_name == "ANON" and store.items[good.id].prepared_copy
    assert (store.items[bad.id].state, store.items[bad.id].last_error) == ("failed", "prepare step cpu failed: no")


# ---- the audit trail: what the filter chain decided, once applied ------------------------------

AUDITED_ROUTINGS = """\
- Description: CT also goes to the VNA
  AeTitles: [PACS]
  Conditions:
    - Tag: 8,60
      MatchExpression: CT
  Actions:
    - Type: add_destination
      Target: VNA
- Description: no scouts
  AeTitles: [PACS]
  Conditions:
    - Tag: 8,103e
      MatchExpression: ^SCOUT$
  Actions:
    - Type: drop
"""

AUDITED_MUTATIONS = """\
- Description: family name last
  AeTitles: [PACS]
  Conditions:
    - Tag: 8,60
      MatchExpression: CT
  Actions:
    - Type: add_or_update
      Source:
        Tag: 10,10
        Expression: ^(\\w+)\\^(\\w+)$
      Destination:
        Tag: 10,10
        Value: $2 $1
"""


def audited_preparer(tmp_path: Path) -> tuple[NodePreparer, FakeStore, AuditTrail]:
    (tmp_path / "routings.yml").write_text(AUDITED_ROUTINGS)
    (tmp_path / "mutations.yml").write_text(AUDITED_MUTATIONS)
    chain = load_filters(tmp_path, ["route", "mutate"])
    step = FilterStep(chain, MemoryPseudonyms(), lambda: datetime.datetime(2026, 1, 1), SaveFiles(tmp_path))
    trail = AuditTrail(tmp_path, tmp_path / "log")  # not running: each record is written at once
    preparer, store, _, _ = make_with(Step(lambda ds: StepResult()))
    preparer._steps = lambda: (step,)
    preparer._audit = trail
    return preparer, store, trail


async def test_the_chains_routing_and_tag_changes_are_audited_once_applied(
    autojump_clock: Any, tmp_path: Path
) -> None:
    preparer, store, trail = audited_preparer(tmp_path)
    routed = store.add(state="new", data=instance(), sop="1.2.3.1")
    scout_ds = make_dataset(rows=4, columns=4, seed=1)
    scout_ds.SeriesDescription = "SCOUT"
    scout = store.add(state="new", data=to_part10_bytes(scout_ds), sop="1.2.3.2")
    await settle(preparer)
    trail.close()
    lines = [json.loads(line) for line in (tmp_path / "log" / AUDIT_LOG).read_text().splitlines()]
    assert verify(tmp_path, tmp_path / "log") == (3, None)  # two routing lines, one mutation
    by_kind = {(line["event"], line["sop_instance_uid"]): line for line in lines}
    kept = by_kind["routing", routed.sop_instance_uid]
    assert (kept["verdict"], kept["node"], kept["destinations"]) == ("changed", "PACS", ["PACS", "VNA"])
    assert by_kind["mutation", routed.sop_instance_uid]["changes"] == [
        {"tag": "(0010,0010)", "keyword": "PatientName", "before": "DOE^JANE", "after": "JANE DOE"}
    ]
    dropped = by_kind["routing", scout.sop_instance_uid]
    assert (dropped["verdict"], dropped["destinations"]) == ("dropped", ["VNA"])  # a CT: VNA still
    assert ("mutation", scout.sop_instance_uid) not in by_kind  # dropped: its changes go nowhere
    assert (tmp_path / "log" / AUDIT_LOG).stat().st_mode & 0o777 == 0o600


async def test_a_retried_or_skipped_preparation_is_not_audited(autojump_clock: Any, tmp_path: Path) -> None:
    preparer, store, trail = audited_preparer(tmp_path)
    item = store.add(state="new", data=instance())
    real = store.apply_preparations

    async def operator_deleted_it(preparations: Any) -> Any:
        del store.items[item.id]  # gone meanwhile: the store skips its preparation
        return await real(preparations)

    store.apply_preparations = operator_deleted_it  # type: ignore[method-assign]
    await settle(preparer)
    trail.close()
    assert not (tmp_path / "log" / AUDIT_LOG).exists()
