from __future__ import annotations

import pytest

from capacitor_trio.domain.states import (
    ALL_STATES,
    FAILED,
    NEW,
    REJECTED,
    RETRYABLE,
    ItemState,
    parse_state,
)


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("New", NEW),
        ("new", NEW),
        ("FAILED", FAILED),
        (" Rejected ", REJECTED),
        ("pRePaReD", ItemState.PREPARED),
        ("Expired", ItemState.EXPIRED),
    ],
)
def test_parse_any_case(text, state):
    assert parse_state(text) is state


@pytest.mark.parametrize("text", ["", "checkedOut", "done", "New!", "fail"])
def test_parse_unknown(text):
    with pytest.raises(ValueError, match="unknown item state"):
        parse_state(text)


def test_parse_non_string():
    with pytest.raises(ValueError):
        parse_state(3)  # type: ignore[arg-type]


def test_values_and_api_names():
    assert [s.value for s in ALL_STATES] == ["new", "prepared", "failed", "rejected", "expired"]
    assert [s.api_name for s in ALL_STATES] == ["New", "Prepared", "Failed", "Rejected", "Expired"]
    assert NEW == "new"
    assert f"{FAILED}" == "failed"
    assert parse_state(FAILED) is FAILED
    assert frozenset({FAILED, REJECTED}) == RETRYABLE
