"""The receiver: called-AE routing, durable hand-off, back-pressure, and the preparer on virtual time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from capacitor_trio.actors.receiver import Receiver
from capacitor_trio.actors.service import ServiceFlags
from capacitor_trio.config.models import Config, Node
from capacitor_trio.dicom.acceptor import CannotProcess, OutOfResources, ReceivedInstance
from capacitor_trio.domain.instance import Destination, InstanceHeader
from capacitor_trio.store import StoreError

from .fakes import IntakeStore
from .test_node import BASE, config

NODES = [
    Node("PACS", aliases=("ARCHIVE",)),
    Node("PACS", role="QueryRetrieve"),
    Node("VNA"),
    Node("MWL", role="Worklist"),
]


def rx(called: str, n: int = 0) -> ReceivedInstance:
    header = InstanceHeader("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{n}", "1.2.840.10008.1.2.1", "9.8", "9.8.1")
    return ReceivedInstance("CT01", called, Path(f"/incoming/{n}.part"), header, 100)


def make(
    on_new_items: Callable[[Sequence[Destination]], None] = lambda destinations: None,
    in_force: list[Config] | None = None,
    **cfg: Any,
) -> tuple[Receiver, IntakeStore, ServiceFlags, list[int]]:
    """`in_force`: the configuration in force as a one-element list a test may replace."""
    clock = lambda: BASE + trio.current_time()  # noqa: E731
    store = IntakeStore(clock)
    service = ServiceFlags()
    woken: list[int] = []
    if in_force is None:
        in_force = [config(**cfg)]
    current = in_force
    receiver = Receiver(
        lambda: current[0], store, lambda: NODES, service, clock, lambda: woken.append(1),
        on_new_items=lambda destinations: on_new_items(list(destinations)), max_in_flight=2,
    )
    return receiver, store, service, woken


def test_called_ae_resolution() -> None:
    receiver, *_ = make()
    storage = Destination("PACS", "Storage")
    for called in ("PACS", "ARCHIVE", "DCP_PACS", "DCP_ARCHIVE", "PACS  "):
        assert receiver.accepts_called_ae(called)
        assert receiver.destinations_for(called) == [storage]
    assert receiver.destinations_for("VNA") == [Destination("VNA", "Storage")]
    assert receiver.accepts_called_ae("CAPACITOR") and receiver.destinations_for("CAPACITOR") == []
    for called in ("MWL", "DCP_MWL", "NOBODY", "pacs"):
        assert not receiver.accepts_called_ae(called)


def test_called_ae_in_another_case_is_refused_with_a_hint() -> None:
    """issue 19 #17: AE titles match exactly; a near miss in case names the title it resembles
    (the acceptor puts it in the reject's log line: tests/test_cli_run.py)."""
    receiver, *_ = make()
    for called, near in (("pacs", "PACS"), ("dcp_Archive", "DCP_ARCHIVE"), ("capacitor ", "CAPACITOR")):
        assert not receiver.accepts_called_ae(called)
        assert receiver.destinations_for(called) == []
        assert receiver.called_ae_hint(called) == near
    assert not receiver.accepts_called_ae("NOBODY") and receiver.called_ae_hint("NOBODY") is None


async def test_commit_routes_one_item_to_the_storage_node(autojump_clock: Any) -> None:
    receiver, store, _, _ = make()
    await receiver.instance_received(rx("DCP_ARCHIVE"))
    (item,) = store.items.values()
    assert (item.destination_ae, item.destination_role, item.state, item.source_ae) == ("PACS", "Storage", "new", "CT01")


async def test_no_destination_and_full_store_are_refused(autojump_clock: Any) -> None:
    receiver, store, _, _ = make()
    with pytest.raises(CannotProcess, match="no destination node for called AE 'CAPACITOR'"):
        await receiver.instance_received(rx("CAPACITOR"))
    store.full = True
    with pytest.raises(OutOfResources, match="free space"):
        receiver.check_admission()
    with pytest.raises(OutOfResources):
        await receiver.instance_received(rx("PACS"))
    assert store.items == {}


async def test_a_store_error_asks_the_sender_to_retry(autojump_clock: Any) -> None:
    receiver, store, _, _ = make()

    async def broken(*_args: Any, **_kw: Any) -> list[int]:
        raise StoreError("database disk image is malformed")

    store.commit_instance = broken  # type: ignore[method-assign]
    with pytest.raises(OutOfResources, match="store error: database disk image is malformed"):
        await receiver.instance_received(rx("PACS"))


async def test_new_items_are_handed_to_their_nodes_and_ripe_ones_wake_them(autojump_clock: Any) -> None:
    """Committed `new` (minimumAge > 0), the destinations are told (their nodes' prepare stage
    takes over); committed prepared (minimumAge 0), the nodes are woken to send."""
    arrived: list[list[Destination]] = []
    in_force = [config(minimum_age=2)]
    receiver, store, service, woken = make(on_new_items=arrived.append, in_force=in_force)
    await receiver.instance_received(rx("PACS", 1))
    await receiver.instance_received(rx("VNA", 2))
    assert arrived == [[Destination("PACS")], [Destination("VNA")]] and woken == []
    assert set(store.states().values()) == {"new"}
    in_force[0] = config(minimum_age=0)  # a reload
    await receiver.instance_received(rx("PACS", 3))
    assert len(arrived) == 2 and woken == [1] and sorted(store.states().values()) == ["new", "new", "prepared"]
    service.set_all(False)  # preparing off: committed new, for the node to prepare later
    await receiver.instance_received(rx("PACS", 4))
    assert len(arrived) == 3 and woken == [1]


async def test_back_pressure_bounds_commits_in_flight(autojump_clock: Any) -> None:
    receiver, store, _, _ = make()
    store.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(receiver.instance_received, rx("PACS", n))
        await trio.testing.wait_all_tasks_blocked()
        assert store.in_commit == 2  # the other three senders wait (their C-STORE is not answered)
        store.hold.set()
    assert len(store.items) == 5 and receiver.received == 5


def _counted(receiver: Receiver, name: str, **labels: str) -> float | None:
    return receiver.metrics.registry.get_sample_value(name, labels)


async def test_intake_is_counted_and_refusals_by_reason(autojump_clock: Any) -> None:
    """The router's counters (metrics.py): instances, bytes and commit latency of what was
    committed; refusals by reason (free space at admission and at commit, a store error)."""
    receiver, store, _, _ = make()
    await receiver.instance_received(rx("PACS", 1))
    await receiver.instance_received(rx("VNA", 2))
    store.full = True
    with pytest.raises(OutOfResources):
        receiver.check_admission()
    with pytest.raises(OutOfResources):
        await receiver.instance_received(rx("PACS", 3))
    store.full = False

    async def broken(*_args: Any, **_kw: Any) -> list[int]:
        raise StoreError("disk I/O error")

    store.commit_instance = broken  # type: ignore[method-assign]
    with pytest.raises(OutOfResources):
        await receiver.instance_received(rx("PACS", 4))
    assert receiver.received == 2
    assert _counted(receiver, "capacitor_intake_instances_total") == 2
    assert _counted(receiver, "capacitor_intake_bytes_total") == 200
    assert _counted(receiver, "capacitor_intake_commit_duration_seconds_count") == 2
    assert _counted(receiver, "capacitor_intake_admission_refusals_total", reason="free_space") == 2
    assert _counted(receiver, "capacitor_intake_admission_refusals_total", reason="store_error") == 1
