"""Node actors and the supervisor on virtual time: exact timestamps, scripted fakes."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from capacitor_trio.actors.handle import NodeHandle
from capacitor_trio.actors.messages import (
    ApproveEdit,
    BulkCommand,
    CommandRefused,
    Echo,
    Expire,
    GetStatus,
    ItemCommand,
    NodeUnavailable,
    Pause,
    Resume,
    SetOverride,
)
from capacitor_trio.actors.node import NodeContext
from capacitor_trio.actors.service import ServiceFlags
from capacitor_trio.actors.supervisor import Supervisor
from capacitor_trio.config.models import Config, Node
from capacitor_trio.domain.outcomes import Delivered, Rejected, RetryLater
from capacitor_trio.domain.restart import RestartPolicy
from capacitor_trio.store import ItemFilter

from .fakes import CR, CT, MR, FakeSender, FakeStore

# 2026-11-30 12:00 UTC, a whole number so that every virtual time stays exact in floats
BASE = int(datetime(2026, 11, 30, 12, 0, tzinfo=UTC).timestamp())


@attrs.define
class World:
    store: FakeStore
    sender: FakeSender
    sup: Supervisor
    service: ServiceFlags

    @property
    def handle(self) -> NodeHandle:
        return self.sup.handles[0]

    def add(self, *args: Any, **kw: Any) -> Any:
        item = self.store.add(*args, **kw)
        self.sup.wake_all()
        return item


def config(**kw: Any) -> Config:
    defaults: dict[str, Any] = dict(storage_interval=0, retry_delay_seconds=30, retry_max_delay_seconds=900)
    defaults.update(kw)
    return Config(data_dir=Path("/nowhere"), cache_path=Path("/nowhere/cache"), **defaults)


def world_factory(
    nursery: trio.Nursery,
) -> Callable[..., Any]:
    async def make(
        nodes: tuple[Node, ...] = (Node("PACS"),),  # or how to read the node set in force
        *,
        base: int = BASE,
        sender: FakeSender | None = None,
        policy: RestartPolicy | None = None,
        store: FakeStore | None = None,
        chaos_every: float = 0.0,
        **cfg: Any,
    ) -> World:
        clock: Callable[[], float] = lambda: base + trio.current_time()  # noqa: E731
        store = store or FakeStore(clock)
        sender = sender or FakeSender()
        service = ServiceFlags()
        ctx = NodeContext(
            store, sender, config(**cfg), service, clock, rng=random.Random(0), retry_jitter=0,
        )
        kw: dict[str, Any] = {"chaos_every": chaos_every, "chaos_rng": random.Random(3)}
        if policy:
            kw["policy"] = policy
        sup = Supervisor(nodes, ctx, **kw)
        await nursery.start(sup.run)
        return World(store, sender, sup, service)

    return make


@pytest.fixture
async def make_world() -> AsyncIterator[Callable[..., Any]]:
    async with trio.open_nursery() as nursery:
        yield world_factory(nursery)
        nursery.cancel_scope.cancel()


async def test_delivers_and_removes(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world()
    for _ in range(3):
        w.add()
    await trio.sleep(1)
    assert w.sender.times == [0.0]  # one series, one association
    assert len(w.sender.delivered) == 3 and w.store.items == {}
    status = await w.handle.call(GetStatus())
    assert status.last_delivered_at == BASE and status.activity == "idle" and status.queue.total == 0


async def test_batch_size_and_priority_and_calling_ae(make_world: Any, autojump_clock: Any) -> None:
    node = Node("PACS", batch_size=2, priority=1, sop_class_priorities=(MR, "default", CR))
    w = await make_world((node,), my_ae_title="ROUTER")
    a = w.store.add(sop_class=CR, series="s1")
    b = w.store.add(sop_class=CT, series="s2")
    c = w.store.add(sop_class=MR, series="s3")
    w.sup.wake_all()
    await trio.sleep(1)
    assert [s.sops for s in w.sender.sends] == [[c.sop_instance_uid, b.sop_instance_uid], [a.sop_instance_uid]]
    assert {s.calling_ae for s in w.sender.sends} == {"ROUTER"} and {s.priority for s in w.sender.sends} == {1}


async def test_impersonate_sends_one_association_per_calling_ae(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world((Node("PACS", batch_size=10, impersonate=True),))
    w.store.add(source="CT1")
    w.store.add(source="MR1")
    w.store.add(source="CT1")
    w.sup.wake_all()
    await trio.sleep(1)
    assert sorted((s.calling_ae, len(s.sops)) for s in w.sender.sends) == [("CT1", 2), ("MR1", 1)]


async def test_storage_interval_between_batches(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world((Node("PACS", batch_size=1),), storage_interval=250)
    for _ in range(3):
        w.add()
    await trio.sleep(5)
    assert w.sender.times == [0.0, 0.25, 0.5]


async def test_retries_at_backoff_times_and_node_backs_off(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world(sender=FakeSender(lambda _i: RetryLater("connection refused")))
    item = w.add()
    await trio.sleep(300)
    assert w.sender.times == [0.0, 30.0, 90.0, 210.0]
    failed = w.store.items[item.id]
    assert failed.state == "failed" and failed.attempt_count == 4 and failed.next_attempt_at == BASE + 450
    status = await w.handle.call(GetStatus())
    assert status.activity == "backing-off" and status.last_error == "connection refused"
    # the destination comes back: the next attempt delivers
    w.sender.script = lambda _i: Delivered()
    await trio.sleep(200)
    assert w.sender.times[-1] == 450.0 and w.store.items == {}


async def test_an_unreachable_node_does_not_hold_up_another(make_world: Any, autojump_clock: Any) -> None:
    """DEAD refuses every connection and backs off; OK delivers each arrival at once."""
    sender = FakeSender(lambda i: RetryLater("connection refused") if i.sop_instance_uid in dead else Delivered())
    w = await make_world((Node("DEAD"), Node("OK")), sender=sender)
    dead = {w.store.add("DEAD").sop_instance_uid}
    w.sup.wake_all()
    for k in range(5):
        await trio.sleep(7)
        w.add("OK", series=f"s{k}")
    await trio.sleep(1)
    ok_sends = [s.at for s in w.sender.sends if s.sops[0] not in dead]
    assert ok_sends == [7.0, 14.0, 21.0, 28.0, 35.0]
    assert [s.at for s in w.sender.sends if s.sops[0] in dead] == [0.0, 30.0]


async def test_max_attempts_leaves_item_failed(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world(sender=FakeSender(lambda _i: RetryLater("timeout")), max_attempts=2)
    item = w.add()
    await trio.sleep(3600)
    assert w.sender.times == [0.0, 30.0]
    assert w.store.items[item.id].state == "failed" and w.store.items[item.id].next_attempt_at is None


async def test_rejected_is_not_retried(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world(sender=FakeSender(lambda i: Rejected("0xA900") if i.sop_class_uid == MR else Delivered()))
    bad = w.store.add(sop_class=MR, series="a")
    w.store.add(sop_class=CT, series="b")
    w.sup.wake_all()
    await trio.sleep(3600)
    assert w.sender.times == [0.0, 0.0]
    assert w.store.states() == {bad.id: "rejected"}


async def test_a_refused_association_rejects_one_batch_per_backoff(make_world: Any, autojump_clock: Any) -> None:
    """A permanent A-ASSOCIATE-RJ (the destination does not know our AE title) rejects the
    batch's items, and the node backs off as for an unreachable destination: an operator who
    fixes the destination finds the rest of the queue still waiting, not all rejected."""
    refused = Rejected("A-ASSOCIATE-RJ permanent: calling AE title not recognized", association=True)
    w = await make_world((Node("PACS", batch_size=2),), sender=FakeSender(lambda _i: refused))
    for n in range(10):
        w.store.add(series=f"s{n}")
    w.sup.wake_all()
    await trio.sleep(100)
    assert w.sender.times == [0.0, 30.0, 90.0]
    assert sorted(w.store.states().values()) == ["prepared"] * 4 + ["rejected"] * 6
    assert (await w.handle.call(GetStatus())).activity == "backing-off"


async def test_with_impersonate_a_refused_association_holds_up_no_other_modality(
    make_world: Any, autojump_clock: Any
) -> None:
    """With Impersonate the calling AE is the source modality's: a destination that does not
    know one modality rejects its batches, and the other modalities' go on at once."""
    refused = Rejected("A-ASSOCIATE-RJ permanent: calling AE title not recognized", association=True)
    sender = FakeSender(lambda i: refused if i.sop_instance_uid in unknown else Delivered())
    w = await make_world((Node("PACS", batch_size=2, impersonate=True),), sender=sender)
    unknown = {w.store.add(series=f"s{n}", source="UNKNOWN").sop_instance_uid for n in range(6)}
    known = w.store.add(series="k", source="KNOWN")
    w.sup.wake_all()
    await trio.sleep(1)
    assert w.sender.times == [0.0] * 4 and w.store.states() == dict.fromkeys(
        [i for i in w.store.items if i != known.id], "rejected"
    )


async def test_operator_actions_that_put_items_back_to_new_go_through_its_prepare_stage(
    make_world: Any, autojump_clock: Any
) -> None:
    w = await make_world(sender=FakeSender(lambda _i: Rejected("0xA900")), minimum_age=5)
    item = w.add()
    await trio.sleep(1)
    assert w.store.items[item.id].state == "rejected" and w.sender.times == [0.0]
    await w.handle.call(ItemCommand("retry", item.id))  # back to new: ripe at 5 (received at 0)
    assert w.store.items[item.id].state == "new"
    await trio.sleep(10)
    assert w.sender.times == [0.0, 5.0]
    await w.handle.call(ItemCommand("move", item.id, "Prepared"))  # no prepare stage: sent at once
    await trio.testing.wait_all_tasks_blocked()
    assert w.sender.times == [0.0, 5.0, 11.0]
    await w.handle.call(BulkCommand("move", ItemFilter(), "NEW"))  # ripe already: prepared at once
    await trio.testing.wait_all_tasks_blocked()
    assert w.sender.times == [0.0, 5.0, 11.0, 11.0]


async def test_its_prepare_stage_prepares_arrivals_when_ripe_and_obeys_the_prepare_flag(
    make_world: Any, autojump_clock: Any
) -> None:
    """What the receiver's preparer did for every node, each node's actor now does for its own
    items: new items are prepared `minimumAge` after they arrived and sent at once, and nothing
    is prepared while the service's prepare flag is off."""
    w = await make_world(minimum_age=2)
    w.store.add(state="new")
    w.handle.items_arrived()
    await trio.sleep(1.5)
    w.store.add(state="new")
    w.handle.items_arrived()
    await trio.sleep(0.49)
    assert w.sender.times == [] and set(w.store.states().values()) == {"new"}
    await trio.sleep(2)  # t = 3.99
    assert w.sender.times == [2.0, 3.5] and w.store.items == {}
    w.service.set_all(False)  # pause-all: items stay new
    w.store.add(state="new")
    w.handle.items_arrived()
    await trio.sleep(60)
    assert set(w.store.states().values()) == {"new"}
    w.service.set_all(True)
    await trio.testing.wait_all_tasks_blocked()
    assert w.sender.times == [2.0, 3.5, 63.99] and w.store.items == {}


async def test_items_left_new_by_a_restart_are_prepared_once_ripe(make_world: Any, autojump_clock: Any) -> None:
    """Items the last run committed `new`: at start the node prepares the ripe ones at once and
    the rest when they are ripe, without another arrival to wake it."""
    clock_base = BASE
    store = FakeStore(lambda: clock_base + trio.current_time())
    old = store.add(state="new", created_at=BASE - 60, series="old")
    recent = store.add(state="new", created_at=BASE - 1, series="recent")
    w = await make_world(store=store, minimum_age=2)
    await trio.testing.wait_all_tasks_blocked()
    assert old.id not in w.store.items and w.store.items[recent.id].state == "new"
    await trio.sleep(1.01)
    assert w.store.items == {} and w.sender.times == [0.0, 1.0]


async def test_pause_aborts_batch_in_flight_and_resume_continues(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world(sender=FakeSender(per_instance=10))
    items = [w.add() for _ in range(3)]
    await trio.sleep(15)
    status = await w.handle.call(Pause())
    assert status.paused
    await trio.testing.wait_all_tasks_blocked()
    assert w.sender.aborted == 1 and w.sender.delivered == [items[0].sop_instance_uid]
    assert all(not i.checked_out and i.state == "prepared" for i in w.store.items.values())
    assert ("PACS", "Storage") in w.store.paused  # persisted
    await trio.sleep(100)
    assert len(w.sender.sends) == 1  # nothing while paused
    await w.handle.call(Resume())
    await trio.sleep(100)
    assert w.sender.times == [0.0, 115.0] and w.store.items == {}


async def test_schedule_window_wraps_midnight_in_new_york(make_world: Any, autojump_clock: Any) -> None:
    # 2026-11-30 20:00 in New York (UTC-5) = 2026-12-01 01:00 UTC
    base = int(datetime(2026, 12, 1, 1, 0, tzinfo=UTC).timestamp())
    w = await make_world((Node("PACS", process_schedule=("22:00 - 06:00",)),), base=base, time_zone="America/New_York")
    w.add()
    await trio.sleep(60)
    status = await w.handle.call(GetStatus())
    assert w.sender.times == [] and status.activity == "waiting-schedule" and not status.in_window
    await trio.sleep(7200)
    assert w.sender.times == [7200.0]  # 22:00 local
    # 06:00 is the last open minute (end inclusive): an item at 06:00:30 goes at once
    await trio.sleep(10 * 3600 + 30 - 7260)
    w.add()
    await trio.sleep(1)
    assert w.sender.times[-1] == 10 * 3600 + 30
    # 06:01 is closed: wait until 22:00 the next evening, unless overridden
    await trio.sleep(60)
    w.add()
    await trio.sleep(3600)
    assert len(w.sender.sends) == 2
    await w.handle.call(SetOverride(True))
    await trio.sleep(1)
    assert len(w.sender.sends) == 3 and w.sender.times[-1] == 10 * 3600 + 91 + 3600
    await w.handle.call(SetOverride(False))
    w.add()
    await trio.sleep(3600)
    assert len(w.sender.sends) == 3
    await trio.sleep(24 * 3600)
    assert w.sender.times[-1] == 24 * 3600 + 7200.0  # the next 22:00


async def test_process_delay_groups_a_study_with_adaptive_window(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world((Node("PACS", process_delay=5000),))
    for _ in range(3):
        w.add(study="S1", series="S1.1")
        await trio.sleep(1)
    await trio.sleep(5)
    assert w.sender.times == [7.0] and len(w.sender.sends[0].sops) == 3
    await trio.sleep(1)
    w.add(study="S1", series="S1.1")  # late image within delay x multiplier of the study's send
    await trio.sleep(0.5)
    assert w.sender.times == [7.0, 9.0]
    await trio.sleep(100)
    w.add(study="S1", series="S1.1")  # long after: waits the delay again
    await trio.sleep(10)
    assert w.sender.times == [7.0, 9.0, 114.5]


async def test_process_delay_sends_a_quiet_study_behind_a_busier_older_one(
    make_world: Any, autojump_clock: Any
) -> None:
    w = await make_world((Node("PACS", process_delay=5000),), process_delay_window_multiplier=0)
    w.add(study="A", series="A1")
    await trio.sleep(0.1)
    quiet = w.add(study="B", series="B1")
    for _ in range(4):  # study A keeps receiving (committed without waking the node)
        await trio.sleep(4.9)
        w.store.add(study="A", series="A1")
    await trio.sleep(20)
    assert w.sender.sends[0].sops == [quiet.sop_instance_uid] and w.sender.times[0] == 5.1


async def test_process_delay_window_multiplier_zero_turns_the_window_off(
    make_world: Any, autojump_clock: Any
) -> None:
    w = await make_world((Node("PACS", process_delay=5000),), process_delay_window_multiplier=0)
    w.add(study="S1", series="S1.1")
    await trio.sleep(6)
    assert w.sender.times == [5.0]
    w.add(study="S1", series="S1.1")  # a late image of a study just sent waits the delay again
    await trio.sleep(6)
    assert w.sender.times == [5.0, 11.0]


async def test_chaos_and_a_failed_node_are_logged_loudly(
    make_world: Any, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(_i: Any) -> Any:
        raise RuntimeError("bug")

    policy = RestartPolicy(max_restarts=1, window_seconds=60, base_delay=1, max_delay=1)
    w = await make_world(sender=FakeSender(boom), policy=policy, chaos_every=1000)
    w.add()
    await trio.sleep(10)
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "CHAOS is ON" in r.message]
    assert len(warnings) == 1 and "about every 1000 s" in warnings[0].message
    assert w.handle.status.value == "failed"
    assert any(
        r.levelname == "ERROR" and "node PACS: 2 crashes within 60 s; node marked failed" in r.message
        for r in caplog.records
    )


async def test_service_pause_all_stops_delivery(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world()
    w.service.set_all(False)
    w.add()
    await trio.sleep(10)
    assert w.sender.sends == []
    assert (await w.handle.call(GetStatus())).activity == "service-paused"
    w.service.set_all(True)
    await trio.sleep(1)
    assert w.sender.times == [10.0]


async def test_node_edit_requires_pause_and_nothing_checked_out(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world(sender=FakeSender(per_instance=10))
    with pytest.raises(CommandRefused, match="paused"):
        await w.handle.call(ApproveEdit(Node("PACS", port=11112)))
    await w.handle.call(Pause())
    held = w.store.add()
    w.store.items[held.id] = attrs.evolve(held, checked_out=True)  # a batch not yet put back
    with pytest.raises(CommandRefused, match="1 item\\(s\\) checked out"):
        await w.handle.call(ApproveEdit(Node("PACS", port=11112)))
    w.store.items[held.id] = held
    await w.handle.call(ApproveEdit(Node("PACS", port=11112)))
    assert w.handle.node.port == 104  # approved, not yet in force: the control port puts it there
    with pytest.raises(CommandRefused, match="AE title or role"):
        await w.handle.call(ApproveEdit(Node("OTHER")))


async def test_handle_reads_the_node_set_in_force(make_world: Any, autojump_clock: Any) -> None:
    """The node's settings have one owner, the node set in force: the handle looks its node up
    there on each use, and keeps the last one seen once the node is gone from it."""
    in_force: list[tuple[Node, ...]] = [(Node("PACS"),)]
    w = await make_world(lambda: in_force[0])
    assert w.handle.node.port == 104
    in_force[0] = (Node("PACS", port=11112),)
    assert w.handle.node.port == 11112
    in_force[0] = ()
    assert w.handle.node.port == 11112 and w.handle.ae_title == "PACS"


async def test_in_window_is_current_while_paused(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world((Node("PACS", process_schedule=("12:00 - 12:59",)),), time_zone="UTC")
    assert (await w.handle.call(GetStatus())).in_window  # BASE is 12:00 UTC
    await w.handle.call(Pause())
    await trio.sleep(7200)  # 14:00: the window closed while the actor looked at nothing
    status = await w.handle.call(GetStatus())
    assert not status.in_window and status.activity == "paused"
    assert not w.sup.snapshot(w.handle).in_window


async def test_a_batch_in_flight_when_the_window_closes_finishes(make_world: Any, autojump_clock: Any) -> None:
    # one open minute, 12:00 (the end minute is inclusive); 20 s per image: the batch of five
    # started at 12:00:00 ends at 12:01:40, after the window closed at 12:01
    node = Node("PACS", batch_size=10, process_schedule=("12:00 - 12:00",))
    w = await make_world((node,), sender=FakeSender(per_instance=20), time_zone="UTC")
    for _ in range(5):
        w.add()
    await trio.sleep(59)
    late = w.add()  # inside the window, but the batch was checked out before it came
    await trio.sleep(200)
    assert w.sender.times == [0.0] and len(w.sender.delivered) == 5
    assert list(w.store.items) == [late.id]  # waits for tomorrow's window
    await trio.sleep(24 * 3600)
    assert w.sender.times == [0.0, 24 * 3600.0] and w.store.items == {}


class HeldPauseStore(FakeStore):
    """`set_paused` waits for `hold` (the flag's write behind a busy store)."""

    hold: trio.Event | None = None

    async def set_paused(self, destination: Any, paused: bool) -> None:
        if self.hold is not None:
            await self.hold.wait()
        await super().set_paused(destination, paused)


async def test_pause_aborts_before_its_flag_is_written(make_world: Any, autojump_clock: Any) -> None:
    store = HeldPauseStore(lambda: BASE + trio.current_time())
    w = await make_world(sender=FakeSender(per_instance=10), store=store)
    w.add()
    w.add()
    await trio.sleep(5)
    store.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.handle.call, Pause())
        await trio.testing.wait_all_tasks_blocked()
        assert w.sender.aborted == 1 and not w.store.paused  # stopped while the write waits
        store.hold.set()
    assert ("PACS", "Storage") in w.store.paused and trio.current_time() == 5


async def test_echo_answers_while_sending(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world(sender=FakeSender(per_instance=100))
    w.add()
    await trio.sleep(1)
    result = await w.handle.call(Echo())
    assert result.success and trio.current_time() == pytest.approx(1.005)


async def test_crash_restarts_with_backoff_then_gives_up(make_world: Any, autojump_clock: Any) -> None:
    def boom(_i: Any) -> Any:
        raise RuntimeError("bug in the sending code")

    policy = RestartPolicy(max_restarts=3, window_seconds=60, base_delay=1, max_delay=8)
    w = await make_world(sender=FakeSender(boom), policy=policy)
    item = w.add()
    await trio.sleep(0.5)
    assert w.handle.status.value == "restarting"
    with trio.fail_after(0.001):  # a restarting node refuses at once
        with pytest.raises(NodeUnavailable, match="restarting"):
            await w.handle.call(GetStatus())
    await trio.sleep(30)
    assert w.sender.times == [0.0, 1.0, 3.0, 7.0]
    assert w.handle.status.value == "failed"
    assert not w.store.items[item.id].checked_out  # released at each crash
    snap = w.sup.snapshot(w.handle)
    # four crashes, three automatic restarts: the fourth crash marked it failed
    assert snap.status == "failed" and snap.restarts == 3 and "bug in the sending code" in snap.last_error
    # an explicit restart brings it back
    w.sender.script = lambda _i: Delivered()
    assert w.sup.restart(w.handle)
    await trio.sleep(1)
    assert w.handle.status.value == "running" and w.store.items == {} and w.sender.times[-1] == 30.5
    assert w.sup.snapshot(w.handle).restarts == 4


class SlowEchoSender(FakeSender):
    async def echo(self, peer: Any, calling_ae: str, *, timeout: float = 10.0) -> Any:  # noqa: ASYNC109 (the interface's signature)
        await trio.sleep(1000)


class HeldCountsStore(FakeStore):
    """`counts` waits for `hold` (a status read stuck in the store)."""

    hold: trio.Event | None = None

    async def counts(self, destination: Any = None) -> Any:
        if self.hold is not None:
            await self.hold.wait()
        return await super().counts(destination)


async def test_calls_in_progress_when_the_actor_crashes_are_refused_at_once(
    make_world: Any, autojump_clock: Any
) -> None:
    """A command the actor was handling (a status read, an echo in its own task) when it
    crashed gets "restarting" at the crash, not the caller's timeout."""

    def boom(_i: Any) -> Any:
        raise RuntimeError("bug in the sending code")

    clock = lambda: BASE + trio.current_time()  # noqa: E731
    store = HeldCountsStore(clock)
    w = await make_world(sender=SlowEchoSender(boom), store=store)
    refused: dict[str, float] = {}

    async def call(name: str, command: Any) -> None:
        with pytest.raises(NodeUnavailable, match="restarting"):
            await w.handle.call(command, timeout=60)
        refused[name] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "echo", Echo(timeout=50))
        await trio.sleep(0.5)
        store.hold = trio.Event()
        nursery.start_soon(call, "status", GetStatus())
        await trio.sleep(0.5)
        w.add()  # t = 1: the send raises, the actor crashes
    assert refused == {"echo": 1.0, "status": 1.0}


async def test_pause_and_override_survive_an_actor_restart(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world(chaos_every=10)
    await w.handle.call(Pause())
    await w.handle.call(SetOverride(True))
    await trio.sleep(60)
    assert w.sup.chaos_kills >= 3
    status = await w.handle.call(GetStatus())
    assert status.paused and status.schedule_override and status.restarts == w.sup.chaos_kills
    w.add()
    await trio.sleep(1)
    assert w.sender.sends == []


async def test_pause_survives_a_process_restart(autojump_clock: Any) -> None:
    clock = lambda: BASE + trio.current_time()  # noqa: E731
    store = FakeStore(clock)
    async with trio.open_nursery() as nursery:
        w = await world_factory(nursery)(store=store)
        await w.handle.call(Pause())
        await w.handle.call(SetOverride(True))
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        w = await world_factory(nursery)(store=store)
        status = await w.handle.call(GetStatus())
        assert status.paused and not status.schedule_override  # the override is in memory only
        nursery.cancel_scope.cancel()


async def test_chaos_kill_mid_batch_requeues_and_delivers_everything(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world(
        (Node("A", batch_size=5), Node("B", batch_size=5)), sender=FakeSender(per_instance=0.3), chaos_every=2
    )
    for i in range(200):
        w.store.add("A" if i % 2 else "B", series=f"s{i}")
    w.sup.wake_all()
    await trio.sleep(600)
    assert w.sup.chaos_kills > 20
    assert w.store.items == {}
    # duplicates only from batches in flight at a kill: at most one instance per kill here
    dupes = len(w.sender.delivered) - len(set(w.sender.delivered))
    assert len(set(w.sender.delivered)) == 200 and dupes <= w.sup.chaos_kills
    repeated = {u for u in w.sender.delivered if w.sender.delivered.count(u) > 1}
    assert repeated <= w.sup.chaos_in_flight  # each was in a batch a kill cut short


async def test_open_association_is_topped_up_with_arrivals_of_its_series(make_world: Any, autojump_clock: Any) -> None:
    sender = FakeSender(per_instance=0.01)
    sender.top_up = True
    w = await make_world(sender=sender)
    w.add()

    async def arrivals() -> None:
        for k in range(5):
            await trio.sleep(0.005)
            w.add(series="other" if k == 2 else "1.2.3.1")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(arrivals)
    await trio.sleep(1)
    # the first association took every later item of its series; the other series came next
    assert [len(s.sops) for s in w.sender.sends] == [5, 1]
    assert w.sender.times[1] >= 0.05 + 0.1  # after the first association's linger
    assert w.store.items == {} and len(w.sender.delivered) == 6


async def _stream(make_world: Any, per_instance: float, gaps: list[float]) -> tuple[Any, list[float]]:
    """A modality sending to a node whose associations take top-ups: one item now, then one after
    each gap. Returns the world and the arrival times, once all have come."""
    sender = FakeSender(per_instance=per_instance)
    sender.top_up = True
    w = await make_world(sender=sender)
    w.add()
    arrived = []
    for gap in gaps:
        await trio.sleep(gap)
        w.add()
        arrived.append(trio.current_time())
    return w, arrived


async def test_streaming_association_records_outcomes_when_arrivals_pause(
    make_world: Any, autojump_clock: Any
) -> None:
    from capacitor_trio.actors.node import RECORD_IDLE, TOP_UP_GATHER

    # one image every 5 ms, then a pause longer than RECORD_IDLE before the last
    w, arrived = await _stream(make_world, 0.001, [0.005] * 9 + [0.05])
    tenth = arrived[8]
    await trio.sleep(1)
    assert len(w.sender.sends) == 1 and w.store.items == {}
    # one record for the ten images that came 5 ms apart, and one for the last: not one store
    # job per image. Each image is answered 1 ms after it is sent, and after each small top-up
    # the association lets arrivals gather for TOP_UP_GATHER (20 ms) before it checks out again:
    # the batch at 0 ms, then top-ups at 5 ms (one image: the first top-up does not gather),
    # 26 ms (four) and 50 ms (four, the tenth, which came at 45 ms, among them: answered at
    # 54 ms); nothing came in the gather after that, nor in the RECORD_IDLE after the gather.
    assert [n for _, n in w.store.checkouts if n] == [1, 1, 4, 4, 1]
    assert [n for _, n in w.store.records] == [10, 1]
    assert w.store.records[0][0] == pytest.approx(
        tenth + 0.005 + 0.004 + TOP_UP_GATHER + RECORD_IDLE
    )


async def test_top_ups_let_arrivals_gather_when_they_bring_few_images(
    make_world: Any, autojump_clock: Any
) -> None:
    from capacitor_trio.actors.node import TOP_UP_FEW, TOP_UP_GATHER

    w, _ = await _stream(make_world, 0.0002, [0.001] * 60)  # one image per millisecond
    await trio.sleep(1)
    assert len(w.sender.sends) == 1 and len(w.sender.delivered) == 61 and w.store.items == {}
    # from the batch on (the node may have looked once before anything was queued)
    first = next(k for k, (_, n) in enumerate(w.store.checkouts) if n)
    checkouts = w.store.checkouts[first:]
    sizes = [n for _, n in checkouts]
    # the batch (1 image), an empty top-up, the arrival at 1 ms taken at once (the first top-up
    # of an association does not gather); that one was few, so the next waits TOP_UP_GATHER after it was answered
    # (1.2 ms) and takes the twenty that came meanwhile; and so on, twenty-odd images per
    # checkout rather than one checkout (a store job) per image
    assert sizes[:4] == [1, 0, 1, 20]
    assert checkouts[3][0] == pytest.approx(0.0012 + TOP_UP_GATHER)
    assert all(n < TOP_UP_FEW for n in sizes) and sum(sizes) == 61
    assert len([n for n in sizes if n]) == 5  # checkouts that took images, for 61 images


async def test_top_up_stops_at_batch_size_and_on_pause(make_world: Any, autojump_clock: Any) -> None:
    sender = FakeSender(per_instance=0.01)
    sender.top_up = True
    w = await make_world((Node("PACS", batch_size=3),), sender=sender)
    for _ in range(2):
        w.add()

    async def arrivals() -> None:
        for _ in range(4):
            await trio.sleep(0.005)
            w.add()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(arrivals)
    await trio.sleep(1)
    assert [len(s.sops) for s in w.sender.sends] == [3, 3]
    # paused while an association waits for more: it ends, nothing stays checked out
    await w.handle.call(Pause())
    w.add()
    await trio.sleep(1)
    assert len(w.sender.sends) == 2
    assert not any(i.checked_out for i in w.store.items.values())


def test_system_time_zone_keeps_dst_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    from capacitor_trio.actors.node import system_time_zone

    system_time_zone.cache_clear()
    monkeypatch.setenv("TZ", "Europe/Berlin")
    try:
        zone = system_time_zone()
        winter = datetime(2026, 1, 15, 12, tzinfo=zone).utcoffset()
        summer = datetime(2026, 7, 15, 12, tzinfo=zone).utcoffset()
        assert (winter, summer) == (timedelta(hours=1), timedelta(hours=2))  # not a fixed offset
        assert NodeContext(None, FakeSender(), config(), ServiceFlags(), lambda: 0.0).tz is zone
    finally:
        system_time_zone.cache_clear()


async def test_a_long_bulk_action_does_not_hold_up_a_pause(make_world: Any, autojump_clock: Any) -> None:
    """A bulk move of many items (one long store statement) runs in the node's bulk lane: a Pause
    sent after it is answered at once; bulk actions are answered in order once done."""
    w = await make_world()
    release = trio.Event()
    real_move_where = w.store.move_where

    async def slow_move_where(f: ItemFilter, target: str) -> int:
        await release.wait()
        return await real_move_where(f, target)

    w.store.move_where = slow_move_where  # type: ignore[method-assign]
    w.store.add(state="failed")
    answers: list[tuple[str, float]] = []

    async def bulk(target: str) -> None:
        await w.handle.call(BulkCommand("move", ItemFilter(), target), timeout=600)
        answers.append((target, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bulk, "REJECTED")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(bulk, "FAILED")
        await trio.testing.wait_all_tasks_blocked()
        status = await w.handle.call(Pause())
        assert status.paused and trio.current_time() == 0.0 and answers == []
        await trio.sleep(100)
        release.set()
    assert answers == [("REJECTED", 100.0), ("FAILED", 100.0)]
    assert set(w.store.states().values()) == {"failed"}


async def test_bulk_actions_waiting_when_the_actor_dies_are_refused_not_left_hanging(
    make_world: Any, autojump_clock: Any
) -> None:
    w = await make_world(policy=RestartPolicy(max_restarts=5, window_seconds=60, base_delay=1, max_delay=1))
    never = trio.Event()

    async def stuck(f: ItemFilter, target: str) -> int:
        await never.wait()
        return 0

    w.store.move_where = stuck  # type: ignore[method-assign]
    errors: list[str] = []

    async def bulk() -> None:
        try:
            await w.handle.call(BulkCommand("move", ItemFilter(), "FAILED"), timeout=600)
        except NodeUnavailable as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bulk)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(bulk)
        await trio.testing.wait_all_tasks_blocked()
        w.sup._slots[w.handle.node.key].scope.cancel()  # the actor dies (as chaos kills it)
    assert errors == ["node PACS is restarting"] * 2 and trio.current_time() < 1


async def test_expiry_is_done_by_the_node_for_its_own_items(make_world: Any, autojump_clock: Any) -> None:
    w = await make_world()
    await w.handle.call(Pause())
    old = w.store.add(created_at=BASE - 1000)
    young = w.store.add(created_at=BASE - 10)
    other = w.store.add("VNA", created_at=BASE - 1000)
    assert await w.handle.call(Expire(500)) == 1
    assert [w.store.items[i.id].state for i in (old, young, other)] == ["expired", "prepared", "prepared"]
