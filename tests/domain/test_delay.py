from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capacitor_trio.domain.delay import study_is_ready, study_ready_at


def test_no_delay_is_ready_at_arrival():
    assert study_ready_at(100.0, 100.0, 0.0, 2.0, None) == 100.0
    assert study_is_ready(100.0, 100.0, 0.0, 2.0, None)


def test_waits_delay_after_last_arrival():
    assert study_ready_at(100.0, 101.0, 30.0, 2.0, None) == 130.0
    assert not study_is_ready(100.0, 129.9, 30.0, 2.0, None)
    assert study_is_ready(100.0, 130.0, 30.0, 2.0, None)


def test_late_image_within_window_goes_immediately():
    # study sent at 200; a late image arrives at 250, within 30 * 2 = 60 s of that
    assert study_ready_at(250.0, 250.0, 30.0, 2.0, 200.0) == 250.0
    assert study_is_ready(250.0, 250.0, 30.0, 2.0, 200.0)
    # exactly at the window edge still counts
    assert study_is_ready(260.0, 260.0, 30.0, 2.0, 200.0)


def test_late_image_after_window_waits_again():
    assert study_ready_at(261.0, 261.0, 30.0, 2.0, 200.0) == 291.0


def test_multiplier_zero_disables_window():
    assert study_ready_at(201.0, 201.0, 30.0, 0.0, 200.0) == 231.0


def test_arrival_during_flight_counts_as_in_window():
    assert study_is_ready(195.0, 196.0, 30.0, 1.0, 200.0)


def test_ready_stays_ready_when_actor_is_late():
    # found ready inside the window; evaluated much later it is still ready
    assert study_is_ready(250.0, 10_000.0, 30.0, 2.0, 200.0)


@pytest.mark.parametrize(("delay", "multiplier"), [(-1.0, 1.0), (1.0, -1.0)])
def test_rejects_negative(delay, multiplier):
    with pytest.raises(ValueError):
        study_ready_at(0.0, 0.0, delay, multiplier, None)


times = st.floats(0, 1e6)


@given(times, times, st.floats(0, 1e4), st.floats(0, 10), st.one_of(st.none(), times))
def test_never_later_than_plain_delay_and_monotone_in_now(arrival, now, delay, mult, processed):
    ready = study_ready_at(arrival, now, delay, mult, processed)
    assert ready <= arrival + delay
    if ready <= now:
        assert study_is_ready(arrival, now + 1.0, delay, mult, processed)
