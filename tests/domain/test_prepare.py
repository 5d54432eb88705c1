"""The prepare stage's decision, with plain values."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from capacitor_trio.domain.prepare import NothingToPrepare, PrepareAt, PrepareNow, prepare_decision


def test_nothing_new_or_preparing_off_waits_to_be_woken() -> None:
    assert prepare_decision(enabled=True, oldest_new=None, now=100, minimum_age=2) == NothingToPrepare()
    assert prepare_decision(enabled=False, oldest_new=10, now=100, minimum_age=2) == NothingToPrepare()


def test_ripe_items_are_prepared_up_to_the_cutoff() -> None:
    assert prepare_decision(enabled=True, oldest_new=98, now=100, minimum_age=2) == PrepareNow(98)
    assert prepare_decision(enabled=True, oldest_new=50, now=100, minimum_age=2) == PrepareNow(98)


def test_an_item_not_yet_ripe_plans_a_look_when_it_is() -> None:
    assert prepare_decision(enabled=True, oldest_new=99.5, now=100, minimum_age=2) == PrepareAt(101.5)


def test_minimum_age_zero_or_negative_prepares_everything_at_once() -> None:
    assert prepare_decision(enabled=True, oldest_new=100, now=100, minimum_age=0) == PrepareNow(100)
    assert prepare_decision(enabled=True, oldest_new=100, now=100, minimum_age=-5) == PrepareNow(100)


@given(
    oldest=st.floats(0, 1e6), now=st.floats(0, 1e6), age=st.floats(0, 1e4),
)
def test_the_oldest_item_is_prepared_exactly_when_it_is_ripe(oldest: float, now: float, age: float) -> None:
    decision = prepare_decision(enabled=True, oldest_new=oldest, now=now, minimum_age=age)
    if isinstance(decision, PrepareNow):
        assert oldest + age <= now and decision.cutoff >= oldest - 1e-6
    else:
        assert decision == PrepareAt(oldest + age) and decision.at > now
