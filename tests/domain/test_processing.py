"""The idle decision behind GET /api/service/processing-status, with plain values."""

from __future__ import annotations

from typing import Any

import pytest

from capacitor_trio.domain.processing import (
    NodeProcessing,
    ProcessingStatus,
    may_send,
    processing_status,
)


def node(ae: str = "PACS", *, paused: bool = False, sends: int = 0, ready: bool = False, status: str = "running") -> NodeProcessing:
    return NodeProcessing(ae, "Storage", paused, status, sends, ready)


def decide(
    nodes: list[NodeProcessing], *, checked_out: int = 0, preparing: int = 0, ripe: bool = False,
    all_paused: bool = False,
) -> ProcessingStatus:
    return processing_status(
        service_all_paused=all_paused, checked_out=checked_out, preparing=preparing, ripe_unprepared=ripe, nodes=nodes
    )


def test_nothing_queued_nothing_running_is_idle() -> None:
    st = decide([node()])
    assert st.idle and st.active_jobs == 0 and st.checked_out_items == 0 and not st.all_paused
    assert st.nodes == (node(),)


def test_no_nodes_is_idle_and_not_all_paused() -> None:
    st = decide([])
    assert st.idle and not st.all_paused and st.nodes == ()


@pytest.mark.parametrize(
    ("nodes", "kwargs"),
    [
        ([node(sends=1)], {}),  # a send in progress
        ([node()], {"preparing": 1}),  # the preparer is running
        ([node()], {"checked_out": 3}),  # items in flight
        ([node()], {"ripe": True}),  # an item waits ripe for the preparer
        ([node("A"), node("B", ready=True)], {}),  # a node would send now
    ],
)
def test_busy(nodes: list[NodeProcessing], kwargs: dict[str, Any]) -> None:
    assert not decide(nodes, **kwargs).idle


def test_active_jobs_are_sends_and_preparations() -> None:
    st = decide([node("A", sends=2), node("B", sends=1)], preparing=1)
    assert st.active_jobs == 4


def test_all_paused_by_the_service_or_by_every_node() -> None:
    assert decide([node()], all_paused=True).all_paused
    assert decide([node("A", paused=True), node("B", paused=True)]).all_paused
    assert not decide([node("A", paused=True), node("B")]).all_paused


@pytest.mark.parametrize(
    ("delivery", "paused", "status", "in_window", "override", "expected"),
    [
        (True, False, "running", True, False, True),
        (True, False, "running", False, True, True),  # outside the window, overridden
        (True, False, "running", False, False, False),  # outside the window
        (False, False, "running", True, False, False),  # delivery (Storage SCU) off
        (True, True, "running", True, False, False),  # paused
        (True, False, "restarting", True, False, False),
        (True, False, "failed", True, True, False),
    ],
)
def test_may_send(delivery: bool, paused: bool, status: str, in_window: bool, override: bool, expected: bool) -> None:
    assert may_send(delivery=delivery, paused=paused, status=status, in_window=in_window, schedule_override=override) is expected
