"""A node's preparer on virtual time: ripeness, the prepare flag, wake-ups, one node only."""

from __future__ import annotations

from typing import Any

import trio

from capacitor_trio.actors.prepare import NodePreparer
from capacitor_trio.actors.service import ServiceFlags
from capacitor_trio.domain.instance import Destination

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
