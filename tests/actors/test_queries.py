"""The read port (actors/queries.py) over a router of scripted fakes, on virtual time: it asks
the owners (supervisor, receiver, store, service flags) and hands back frozen snapshots."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from capacitor_trio.actors.messages import Pause
from capacitor_trio.actors.queries import RouterReads
from capacitor_trio.actors.receiver import Receiver
from capacitor_trio.config.models import Node, Settings
from capacitor_trio.dicom.acceptor import ReceivedInstance
from capacitor_trio.domain.instance import InstanceHeader
from capacitor_trio.domain.processing import NodeProcessing
from capacitor_trio.runtime import Router
from capacitor_trio.store import Counts, Item, ItemNotFound

from .fakes import FakeSender, IntakeStore
from .test_node import BASE, World, config, world_factory

NODES = (Node("PACS"), Node("PACS", role="QueryRetrieve"))


@pytest.fixture
async def make_world() -> AsyncIterator[Callable[..., Any]]:
    async with trio.open_nursery() as nursery:
        yield world_factory(nursery)
        nursery.cancel_scope.cancel()


class DetailStore(IntakeStore):
    """With one item read back, as the item detail asks the real store."""

    async def get_item(self, item_id: int, *, with_data: bool = False) -> Item:
        await trio.lowlevel.checkpoint()
        if item_id not in self.items:
            raise ItemNotFound(f"no item {item_id}")
        return self.items[item_id]


async def reads_for(
    make_world: Callable[..., Any], sender: FakeSender | None = None, **cfg: Any
) -> tuple[RouterReads, World, Receiver]:
    clock: Callable[[], float] = lambda: BASE + trio.current_time()  # noqa: E731
    world: World = await make_world(NODES, store=DetailStore(clock), sender=sender, **cfg)
    receiver = Receiver(config(**cfg), world.store, lambda: list(NODES), world.service, clock)
    settings = Settings(config(**cfg), NODES)
    router = Router(settings, world.store, world.sup, receiver, world.service, clock, clock())
    return RouterReads(router), world, receiver


def received(n: int) -> ReceivedInstance:
    header = InstanceHeader("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{n}", "1.2.840.10008.1.2.1", "9.8", "9.8.1")
    return ReceivedInstance("CT01", "PACS", Path(f"/incoming/{n}.part"), header, 100)


async def test_idle_until_a_received_instance_is_ripe(make_world: Any, autojump_clock: Any) -> None:
    reads, _world, receiver = await reads_for(make_world, minimum_age=60)
    st = await reads.processing_status()
    assert st.idle and not st.all_paused and st.active_jobs == 0 and st.checked_out_items == 0
    assert st.nodes == (NodeProcessing("PACS", "Storage", False, "running", 0, False),)  # actors only
    await receiver.instance_received(received(1))  # new, ripe after minimumAge (no preparer runs)
    assert (await reads.processing_status()).idle
    await trio.sleep(60)
    assert not (await reads.processing_status()).idle
    assert reads.received() == 1


async def test_a_prepared_item_makes_it_busy_only_when_its_node_may_send(make_world: Any, autojump_clock: Any) -> None:
    reads, world, _receiver = await reads_for(make_world, sender=FakeSender(per_instance=1e6))
    await trio.testing.wait_all_tasks_blocked()  # the actor has had its first look: idle
    world.service.storage_scu = False  # as the flag is read; no listener woken, so nothing is sent
    world.store.add("PACS")
    assert (await reads.processing_status()).idle
    world.service.storage_scu = True
    st = await reads.processing_status()
    # ready to send, unless the actor, woken meanwhile, already took the item (its send never
    # ends here): busy either way
    assert not st.idle and (st.nodes[0].ready or st.checked_out_items == 1)
    await world.handle.call(Pause())
    await trio.testing.wait_all_tasks_blocked()  # a send the pause cut short has given its item back
    st = await reads.processing_status()
    assert st.idle and st.all_paused and st.nodes[0].paused


async def test_node_status_with_its_queue(make_world: Any, autojump_clock: Any) -> None:
    reads, world, _receiver = await reads_for(make_world)
    await world.handle.call(Pause())
    world.store.add("PACS")
    world.store.add("PACS", state="failed")
    storage, query_retrieve = reads.nodes()
    status = await reads.node_status_now(storage)
    assert status is not None and status.paused and status.status == "running"
    assert (status.queue.prepared, status.queue.failed, status.queue.total) == (1, 1, 2)
    assert reads.node_status(storage) == attrs.evolve(status, queue=Counts())  # counts given or none
    assert await reads.node_status_now(query_retrieve) is None  # no actor: nothing to show
    assert reads.service_flags()["storageScu"] is True
    assert reads.system().ae_title == world.sup.ctx.config.my_ae_title


async def test_read_stored_only_while_the_item_is_there(make_world: Any, autojump_clock: Any, tmp_path: Path) -> None:
    reads, world, _receiver = await reads_for(make_world)
    await world.handle.call(Pause())
    spooled = attrs.evolve(world.store.add("PACS"), path=tmp_path / "1.dcm")
    spooled.path.write_bytes(b"spool file")
    inline = attrs.evolve(world.store.add("PACS"), inline=True, data=b"in the index")
    read: Callable[[Any], bytes] = lambda source: source.read() if hasattr(source, "read") else source.read_bytes()  # noqa: E731
    assert await reads.read_stored(spooled, read) == b"spool file"
    assert await reads.read_stored(inline, read) == b"in the index"
    assert await reads.read_stored(attrs.evolve(spooled, path=tmp_path / "gone.dcm"), read) is None

    def delivered_while_read(source: Any) -> bytes:
        del world.store.items[spooled.id]  # its file may now hold another instance
        return read(source)

    assert await reads.read_stored(spooled, delivered_while_read) is None
    del world.store.items[inline.id]  # bytes from the index are the instance's own, whatever follows
    assert await reads.read_stored(inline, read) == b"in the index"


async def test_an_item_a_filter_holds_back_until_later_is_not_ripe(make_world: Any, autojump_clock: Any) -> None:
    reads, world, _receiver = await reads_for(make_world, minimum_age=0)
    clock = world.store.clock
    item = world.store.add("PACS", state="new")
    world.store._set(item.id, next_attempt_at=clock() + 60)  # a step's retry
    assert not await reads._ripe_unprepared(clock())
    assert await reads._ripe_unprepared(clock() + 60)
