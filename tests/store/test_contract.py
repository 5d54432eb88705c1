"""One suite of behaviour for every implementation of `StorePort`: the real store and the actor
tests' fake (tests/actors/fakes.py), so the fake cannot drift from what the actors get in
production. Only the port's methods are used (and `list_items` to look at the items)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from capacitor_trio.actors.node import Sender
from capacitor_trio.domain.instance import Destination
from capacitor_trio.domain.states import FAILED, NEW, PREPARED, REJECTED
from capacitor_trio.store import (
    Item,
    ItemCheckedOut,
    ItemFilter,
    ItemNotFound,
    QueuePort,
    Store,
    StorePort,
    TransitionError,
    open_store,
)
from capacitor_trio.store.model import Preparation, PreparedCopy, PrepOutcome
from tests.actors.fakes import FakeSender, FakeStore, IntakeStore

from .util import CT, MR, SR, FakeClock, header

PACS = Destination("PACS")
AI = Destination("AI")


@attrs.define
class Harness:
    port: Any  # a StorePort: the real Store or the fake
    clock: FakeClock

    async def commit(
        self, dests: list[Destination] | None = None, *, state: str = PREPARED, study: str = "1.2.3.1",
        series: str = "1.2.3.1.1", sop_class: str = CT,
    ) -> list[int]:
        hdr = header(study=study, series=series, sop_class=sop_class)
        ids: list[int] = await self.port.commit_instance(
            None, hdr, "CT01", dests or [PACS], state=state, data=b"DICM" * 64
        )
        return ids

    async def items(self, dest: Destination = PACS) -> dict[int, Item]:
        items, _ = await self.port.list_items(ItemFilter(destination=dest.ae_title), limit=1000)
        return {i.id: i for i in items}

    async def checkout(self, dest: Destination = PACS, **kw: Any) -> list[int]:
        kw.setdefault("limit", 100)
        batch = await self.port.checkout_batch(dest, now=self.clock(), **kw)
        return [i.id for i in batch]


@pytest.fixture(params=["store", "fake"])
async def h(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Harness]:
    if request.param == "fake":
        yield Harness(IntakeStore(clock), clock)
        return
    async with open_store(tmp_path / "cache", durable=False, clock=clock) as store:
        yield Harness(store, clock)


def _signature(cls: type, name: str) -> list[tuple[str, Any, Any]]:
    sig = inspect.signature(getattr(cls, name))
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize(
    ("impl", "port"),
    [(Store, StorePort), (IntakeStore, StorePort), (FakeStore, QueuePort), (FakeSender, Sender)],
)
def test_implementations_have_the_ports_methods_with_the_same_parameters(impl: type, port: type) -> None:
    members = [n for n, v in inspect.getmembers(port) if inspect.isfunction(v) and not n.startswith("_")]
    assert members
    for name in members:
        assert hasattr(impl, name), f"{impl.__name__} has no {name}"
        assert _signature(impl, name) == _signature(port, name), f"{impl.__name__}.{name}"
        assert inspect.iscoroutinefunction(getattr(impl, name)) == inspect.iscoroutinefunction(getattr(port, name))


async def test_commit_queues_one_item_per_distinct_destination(h: Harness) -> None:
    ids = await h.commit([PACS, AI, PACS], state=NEW)
    assert len(ids) == 2
    assert [i.state for i in (await h.items(PACS)).values()] == ["new"]
    counts = await h.port.counts()
    assert (counts.new, counts.total, counts.checked_out) == (2, 2, 0)
    assert (await h.port.counts(AI)).total == 1


async def test_prepare_ripe_prepares_new_items_old_enough(h: Harness) -> None:
    (old,) = await h.commit(state=NEW)
    h.clock.advance(10)
    (young,) = await h.commit(state=NEW)
    assert await h.port.prepare_ripe(h.clock(), 5) == 1
    items = await h.items()
    assert (items[old].state, items[young].state) == ("prepared", "new")


async def test_prepare_ripe_for_one_destination_and_its_oldest_new_item(h: Harness) -> None:
    assert await h.port.oldest_new(PACS) is None and await h.port.oldest_new() is None
    start = h.clock()
    pacs_and_ai = await h.commit([PACS, AI], state=NEW)
    h.clock.advance(10)
    await h.commit([AI], state=NEW)
    assert await h.port.oldest_new(PACS) == start and await h.port.oldest_new(AI) == start
    assert await h.port.oldest_new() == start
    # PACS's ripe item only: AI's stay new
    assert await h.port.prepare_ripe(h.clock(), 5, PACS) == 1
    assert [i.state for i in (await h.items(PACS)).values()] == ["prepared"]
    assert sorted(i.state for i in (await h.items(AI)).values()) == ["new", "new"]
    assert await h.port.oldest_new(PACS) is None and await h.port.oldest_new(AI) == start
    assert await h.port.prepare_ripe(h.clock(), 5, AI) == 1  # the older one of AI's
    assert await h.port.oldest_new(AI) == start + 10
    assert len(pacs_and_ai) == 2


async def test_expire_for_one_destination_or_all(h: Harness) -> None:
    await h.commit([PACS, AI], state=NEW)
    h.clock.advance(100)
    (young,) = await h.commit([PACS])
    assert await h.port.expire(h.clock(), 50, PACS) == 1
    assert sorted(i.state for i in (await h.items(PACS)).values()) == ["expired", "prepared"]
    assert [i.state for i in (await h.items(AI)).values()] == ["new"]
    assert await h.port.expire(h.clock(), 50) == 1  # AI's, the only old queued one left
    assert (await h.items(PACS))[young].state == "prepared"


async def test_checkout_hands_out_prepared_items_oldest_first_once(h: Harness) -> None:
    ids = []
    for _ in range(3):
        ids += await h.commit()
        h.clock.advance(1)
    await h.commit(state=NEW)
    assert await h.checkout(limit=2) == ids[:2]
    assert await h.checkout() == ids[2:]
    assert await h.checkout() == []
    assert (await h.port.counts(PACS)).checked_out == 3


async def test_outcomes_remove_reschedule_or_reject(h: Harness) -> None:
    a, b, c = [(await h.commit())[0] for _ in range(3)]
    assert await h.checkout() == [a, b, c]
    due = h.clock() + 60
    await h.port.record_outcomes(delivered=[a], failed=[(b, "busy", due)], rejected=[(c, "refused")])
    items = await h.items()
    assert set(items) == {b, c}
    assert (items[b].state, items[b].attempt_count, items[b].last_error, items[b].next_attempt_at) == (
        "failed", 1, "busy", due
    )
    assert (items[c].state, items[c].attempt_count, items[c].last_error) == ("rejected", 1, "refused")
    assert not items[b].checked_out and not items[c].checked_out
    # a failed item waits for its time; an id no longer there is skipped
    assert await h.checkout() == []
    assert await h.port.next_eligible_at(PACS, h.clock()) == due
    await h.port.record_outcomes(delivered=[a])
    h.clock.advance(60)
    assert await h.port.next_eligible_at(PACS, h.clock()) == h.clock()
    assert await h.checkout() == [b]


async def test_next_eligible_at(h: Harness) -> None:
    assert await h.port.next_eligible_at(PACS, h.clock()) is None
    (a,) = await h.commit()
    assert await h.port.next_eligible_at(PACS, h.clock()) == h.clock()
    await h.checkout()
    assert await h.port.next_eligible_at(PACS, h.clock()) is None
    await h.port.record_outcomes(failed=[(a, "busy", h.clock() - 5)])
    # overdue: now, not the past
    assert await h.port.next_eligible_at(PACS, h.clock()) == h.clock()


async def test_release_gives_items_back_unchanged(h: Harness) -> None:
    ids = [(await h.commit())[0] for _ in range(2)]
    (other,) = await h.commit([AI])
    assert await h.checkout() == ids
    await h.port.release(ids[:1])
    assert await h.checkout() == ids[:1]
    assert await h.checkout(AI) == [other]
    released = await h.port.release_all_checked_out(PACS)
    items = await h.items()
    assert sorted(released) == sorted(i.sop_instance_uid for i in items.values())
    assert all(i.state == "prepared" and not i.checked_out and i.attempt_count == 0 for i in items.values())
    assert (await h.port.counts(AI)).checked_out == 1
    assert len(await h.port.release_all_checked_out()) == 1


async def test_operator_transitions_of_one_item(h: Harness) -> None:
    a, b = [(await h.commit())[0] for _ in range(2)]
    moved = await h.port.move(a, "Failed")
    assert (moved.state, moved.next_attempt_at) == ("failed", h.clock())
    retried = await h.port.retry(a)
    assert (retried.state, retried.next_attempt_at, retried.attempt_count) == ("new", None, 0)
    with pytest.raises(TransitionError):
        await h.port.retry(b)  # prepared: nothing to retry
    moved = await h.port.move(a, REJECTED)
    assert (moved.state, moved.next_attempt_at) == ("rejected", None)
    await h.port.delete(a)
    assert set(await h.items()) == {b}
    with pytest.raises(ItemNotFound):
        await h.port.move(a, PREPARED)
    with pytest.raises(ValueError):
        await h.port.move(b, "delivered")
    assert await h.checkout() == [b]
    for action in (h.port.retry, h.port.delete, lambda i: h.port.move(i, NEW)):
        with pytest.raises(ItemCheckedOut):
            await action(b)


async def test_retry_resets_the_attempts_of_a_delivery_failure(h: Harness) -> None:
    (a,) = await h.commit()
    await h.checkout()
    await h.port.record_outcomes(failed=[(a, "busy", h.clock() + 60)])
    item = await h.port.retry(a)
    assert (item.state, item.attempt_count, item.next_attempt_at) == ("new", 0, None)


async def test_bulk_transitions_skip_checked_out_items_and_honour_the_filter(h: Harness) -> None:
    busy = (await h.commit(study="S1"))[0]
    s1 = [(await h.commit(study="S1"))[0] for _ in range(2)]
    s2 = (await h.commit(study="S2"))[0]
    (ai,) = await h.commit([AI], study="S1")
    assert await h.checkout(limit=1) == [busy]
    mine = ItemFilter(destination="PACS", role="Storage")
    assert await h.port.move_where(attrs.evolve(mine, study_uid="S1"), FAILED) == 2
    items = await h.items()
    assert {i: items[i].state for i in [busy, *s1, s2]} == {busy: "prepared", s1[0]: "failed", s1[1]: "failed", s2: "prepared"}
    assert all(items[i].next_attempt_at == h.clock() for i in s1)
    with pytest.raises(TransitionError):
        await h.port.retry_where(mine, PREPARED)
    assert await h.port.retry_where(attrs.evolve(mine, state="rejected"), FAILED) == 0
    assert await h.port.retry_where(mine, FAILED) == 2
    assert {(await h.items())[i].state for i in s1} == {"new"}
    assert await h.port.delete_where(attrs.evolve(mine, study_uid="S1")) == 2
    assert set(await h.items()) == {busy, s2}
    assert set(await h.items(AI)) == {ai}


async def test_sop_class_priorities_order_the_checkout(h: Harness) -> None:
    ct = (await h.commit(sop_class=CT))[0]
    h.clock.advance(1)
    mr = (await h.commit(sop_class=MR))[0]
    h.clock.advance(1)
    sr = (await h.commit(sop_class=SR))[0]
    # listed classes first in their order, the rest where "default" stands (any case)
    assert await h.checkout(sop_class_priorities=[SR, "DEFAULT", MR]) == [sr, ct, mr]
    await h.port.release_all_checked_out()
    # no "default": the unlisted ones come last, oldest first
    assert await h.checkout(sop_class_priorities=[MR]) == [mr, ct, sr]
    await h.port.release_all_checked_out()
    assert await h.checkout(sop_class_priorities=[MR], limit=1) == [mr]


async def test_failed_items_due_join_the_prepared_ones_in_arrival_order(h: Harness) -> None:
    ids = []
    for _ in range(3):
        ids += await h.commit()
        h.clock.advance(1)
    a, b, c = ids
    assert await h.checkout(limit=1) == [a]
    await h.port.record_outcomes(failed=[(a, "busy", h.clock() + 10)])
    h.clock.advance(10)
    assert await h.checkout() == [a, b, c]


async def test_series_batches(h: Harness) -> None:
    a1 = (await h.commit(series="A"))[0]
    b1 = (await h.commit(series="B"))[0]
    a2 = (await h.commit(series="A"))[0]
    assert await h.checkout(by_series=True) == [a1, a2]
    await h.port.release_all_checked_out()
    assert await h.checkout(series_uid="B") == [b1]


async def test_process_delay_holds_back_studies_still_arriving(h: Harness) -> None:
    quiet = (await h.commit(study="Q"))[0]
    h.clock.advance(30)
    busy = (await h.commit(study="B"))[0]
    before = h.clock() - 10
    assert await h.port.first_quiet_arrival(PACS, 10) == before - 20
    assert await h.checkout(study_quiet_before=before) == [quiet]
    assert await h.port.first_quiet_arrival(PACS, 10) == h.clock()
    assert await h.checkout(study_quiet_before=before, exempt_studies={"B"}) == [busy]
    assert await h.port.first_quiet_arrival(PACS, 10) is None


async def test_pause_flags(h: Harness) -> None:
    assert await h.port.get_paused() == set()
    await h.port.set_paused(PACS, True)
    await h.port.set_paused(AI, True)
    await h.port.set_paused(AI, False)
    assert await h.port.get_paused() == {("PACS", "Storage")}


# ---- the per-item prepare stage ---------------------------------------------------------------


async def test_ripe_new_lists_ripe_items_with_their_bytes_and_when_the_next_ripens(h: Harness) -> None:
    assert await h.port.next_ripe_at(PACS, 5) is None
    start = h.clock()
    (old,) = await h.commit(state=NEW)
    h.clock.advance(10)
    (young,) = await h.commit(state=NEW)
    await h.commit([AI], state=NEW)
    ripe = await h.port.ripe_new(PACS, h.clock(), 5, 10)
    assert [i.id for i in ripe] == [old] and ripe[0].data == b"DICM" * 64
    assert ripe[0].received_syntax == ripe[0].transfer_syntax_uid != ""
    assert await h.port.next_ripe_at(PACS, 5) == start + 5
    assert [i.id for i in await h.port.ripe_new(PACS, h.clock(), 0, 1)] == [old]
    assert [i.id for i in await h.port.ripe_new(PACS, h.clock(), 0, 10)] == [old, young]


async def test_prepared_unchanged_keeps_the_received_instance_and_the_sort_key(h: Harness) -> None:
    (a,) = await h.commit(state=NEW)
    report = await h.port.apply_preparations([Preparation(a, PrepOutcome.PREPARED, sort_key=b"\x01")])
    assert report.prepared == (a,)
    item = (await h.items())[a]
    assert (item.state, item.sort_key, item.data) == ("prepared", b"\x01", None)
    [out] = await h.port.checkout_batch(PACS, now=h.clock(), limit=10)
    assert out.data == b"DICM" * 64


async def test_a_checked_out_item_without_its_bytes_is_the_same_item(h: Harness) -> None:
    (a,) = await h.commit(state=PREPARED)
    [out] = await h.port.checkout_batch(PACS, now=h.clock(), limit=10)
    assert out.id == a and out.data == b"DICM" * 64
    kept = out.without_data()
    assert kept == attrs.evolve(out, data=None) and kept.data is None
    assert kept.without_data() is kept


async def test_a_prepared_copy_is_sent_for_its_item_alone(h: Harness) -> None:
    a, b = await h.commit([PACS, AI], state=NEW)
    copy_header = attrs.evolve(header(), sop_instance_uid="9.9.9", transfer_syntax_uid="1.2.840.10008.1.2")
    copy = PreparedCopy(copy_header, b"COPY" * 10)
    await h.port.apply_preparations([Preparation(a, PrepOutcome.PREPARED, copy=copy)])
    [mine] = await h.port.checkout_batch(PACS, now=h.clock(), limit=10)
    assert (mine.data, mine.sop_instance_uid, mine.transfer_syntax_uid) == (b"COPY" * 10, "9.9.9", "1.2.840.10008.1.2")
    assert mine.received_syntax == header().transfer_syntax_uid and mine.size_bytes == 40
    assert mine.prepared_copy
    [theirs] = await h.port.ripe_new(AI, h.clock(), 0, 10)
    assert theirs.id == b and theirs.data == b"DICM" * 64 and theirs.sop_instance_uid != "9.9.9"
    assert not theirs.prepared_copy


async def test_a_copy_handed_over_as_a_file_is_adopted(h: Harness, tmp_path: Path) -> None:
    """The store takes the file (renamed into its spool, or read into its index) and the item is
    sent as it; the file is the store's from then on."""
    a, b = await h.commit([PACS, AI], state=NEW)
    file = tmp_path / "converted.part"
    file.write_bytes(b"FILE" * 20_000)  # larger than the index keeps
    copy_header = attrs.evolve(header(), sop_instance_uid="9.9.8", transfer_syntax_uid="1.2.840.10008.1.2.5")
    report = await h.port.apply_preparations([Preparation(a, PrepOutcome.PREPARED, copy=PreparedCopy(copy_header, file=file))])
    assert report.prepared == (a,) and not file.exists()
    [mine] = await h.port.checkout_batch(PACS, now=h.clock(), limit=10)
    assert (mine.sop_instance_uid, mine.transfer_syntax_uid, mine.size_bytes) == ("9.9.8", "1.2.840.10008.1.2.5", 80_000)
    data = mine.data if mine.data is not None else mine.path.read_bytes()
    assert data == b"FILE" * 20_000 and mine.prepared_copy
    [theirs] = await h.port.ripe_new(AI, h.clock(), 0, 10)
    assert theirs.id == b and not theirs.prepared_copy


async def test_removed_retried_and_failed_items(h: Harness) -> None:
    a, b, c = [(await h.commit(state=NEW))[0] for _ in range(3)]
    later = h.clock() + 30
    report = await h.port.apply_preparations([
        Preparation(a, PrepOutcome.REMOVED),
        Preparation(b, PrepOutcome.RETRY, last_error="pseudonyms busy", not_before=later),
        Preparation(c, PrepOutcome.FAILED, last_error="mutation failed"),
    ])
    assert (report.removed, report.retried, report.failed) == ((a,), (b,), (c,))
    items = await h.items()
    assert set(items) == {b, c}
    assert (items[b].state, items[b].last_error, items[b].next_attempt_at) == ("new", "pseudonyms busy", later)
    assert (items[c].state, items[c].last_error, items[c].next_attempt_at) == ("failed", "mutation failed", None)
    assert await h.port.ripe_new(PACS, h.clock(), 0, 10) == []
    assert await h.port.next_ripe_at(PACS, 0) == later
    h.clock.advance(30)
    assert [i.id for i in await h.port.ripe_new(PACS, h.clock(), 0, 10)] == [b]


async def test_added_destinations_share_the_received_instance_once(h: Harness) -> None:
    (a,) = await h.commit(state=NEW)
    dose = Destination("DOSE")
    report = await h.port.apply_preparations([Preparation(a, PrepOutcome.REMOVED, add_destinations=(dose, AI))])
    assert [d for _, d in report.added] == [dose, AI] and report.removed == (a,)
    [added] = await h.port.ripe_new(dose, h.clock(), 0, 10)
    assert (added.added_by, added.state, added.data, added.source_ae) == (a, "new", b"DICM" * 64, "CT01")
    # the same instance is never added twice for one destination
    report = await h.port.apply_preparations([Preparation(added.id, PrepOutcome.PREPARED, add_destinations=(AI,))])
    assert report.added == () and report.prepared == (added.id,)


async def test_an_item_changed_meanwhile_is_skipped(h: Harness) -> None:
    a, b = [(await h.commit(state=NEW))[0] for _ in range(2)]
    await h.port.delete(a)
    await h.port.move(b, FAILED)
    report = await h.port.apply_preparations([Preparation(a, PrepOutcome.PREPARED), Preparation(b, PrepOutcome.REMOVED)])
    assert report.skipped == (a, b) and set(await h.items()) == {b}


async def test_a_series_is_checked_out_in_its_sort_order(h: Harness) -> None:
    ids = [(await h.commit(series="A", state=NEW))[0] for _ in range(3)]
    other = (await h.commit(series="B", state=NEW))[0]
    keys = {ids[0]: b"\x03", ids[1]: b"\x01", ids[2]: b"\x02"}
    await h.port.apply_preparations(
        [Preparation(i, PrepOutcome.PREPARED, sort_key=keys.get(i)) for i in [*ids, other]]
    )
    in_order = [ids[1], ids[2], ids[0]]
    assert await h.checkout(by_series=True) == in_order  # batchSize 0: one series, sorted
    await h.port.release_all_checked_out()
    assert await h.checkout(series_uid="A", limit=2) == in_order[:2]
    await h.port.release_all_checked_out()
    # a batch of several series: each series in its order, in the places its items had
    assert await h.checkout() == [*in_order, other]
