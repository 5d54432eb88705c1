"""The send gate with plain values: which gate closes first, and when to look again."""

from __future__ import annotations

from typing import Any

import pytest

from capacitor_trio.domain.gate import SEND, Wait, decide, next_look

OPEN: dict[str, Any] = dict(
    now=100.0, paused=False, service_on=True, override=False, in_window=True,
    next_window_change=None, backoff_until=0.0,
)


def gate(**changes: Any) -> Any:
    return decide(**{**OPEN, **changes})


def test_all_open_sends() -> None:
    assert gate() is SEND
    assert gate(backoff_until=100.0) is SEND  # a backoff that ends now is over


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"paused": True}, Wait("paused")),
        ({"service_on": False}, Wait("service-paused")),
        ({"in_window": False, "next_window_change": 250.0}, Wait("waiting-schedule", 250.0)),
        ({"in_window": False}, Wait("waiting-schedule", None)),  # a window that never opens
        ({"backoff_until": 130.0}, Wait("backing-off", 130.0)),
    ],
)
def test_each_closed_gate(changes: dict[str, Any], expected: Wait) -> None:
    assert gate(**changes) == expected


def test_gates_apply_in_order() -> None:
    everything = dict(paused=True, service_on=False, in_window=False, next_window_change=250.0, backoff_until=130.0)
    assert gate(**everything) == Wait("paused")
    assert gate(**{**everything, "paused": False}) == Wait("service-paused")
    assert gate(**{**everything, "paused": False, "service_on": True}) == Wait("waiting-schedule", 250.0)


def test_override_opens_the_schedule_but_not_the_other_gates() -> None:
    assert gate(in_window=False, override=True) is SEND
    assert gate(in_window=False, override=True, backoff_until=130.0) == Wait("backing-off", 130.0)
    assert gate(in_window=False, override=True, paused=True) == Wait("paused")


def test_next_look() -> None:
    assert next_look(None, None, override=False) is None  # nothing waiting, no schedule: until woken
    assert next_look(120.0, None, override=False) == 120.0
    assert next_look(None, 300.0, override=False) == 300.0  # the window changes: status stays fresh
    assert next_look(120.0, 300.0, override=False) == 120.0
    assert next_look(400.0, 300.0, override=False) == 300.0
    assert next_look(400.0, 300.0, override=True) == 400.0
    assert next_look(None, 300.0, override=True) is None
