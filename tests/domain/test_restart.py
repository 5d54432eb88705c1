from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capacitor_trio.domain.restart import (
    GiveUp,
    RestartAfter,
    RestartPolicy,
    RestartTracker,
)

POLICY = RestartPolicy(max_restarts=3, window_seconds=60.0, base_delay=1.0, max_delay=3.0)


def crash_all(tracker, times):
    decisions = []
    for t in times:
        tracker, d = tracker.record_crash(t)
        decisions.append(d)
    return tracker, decisions


def test_exponential_delays_then_give_up():
    tracker, decisions = crash_all(RestartTracker(POLICY), [0.0, 1.0, 3.0, 7.0])
    assert decisions == [RestartAfter(1.0), RestartAfter(2.0), RestartAfter(3.0), GiveUp()]
    assert tracker.given_up
    assert tracker.restarts == 3


def test_crashes_outside_window_are_forgotten():
    tracker, decisions = crash_all(RestartTracker(POLICY), [0.0, 10.0, 20.0, 80.5, 90.0])
    # at 80.5 the crashes at 0 and 10 and 20 are out of the 60 s window
    assert decisions == [
        RestartAfter(1.0),
        RestartAfter(2.0),
        RestartAfter(3.0),
        RestartAfter(1.0),
        RestartAfter(2.0),
    ]
    assert tracker.crashes == (80.5, 90.0)
    assert not tracker.given_up
    assert tracker.restarts == 5


def test_window_edge_is_exclusive():
    p = RestartPolicy(max_restarts=1, window_seconds=10.0, base_delay=1.0, max_delay=1.0)
    _, decisions = crash_all(RestartTracker(p), [0.0, 10.0])
    assert decisions == [RestartAfter(1.0), RestartAfter(1.0)]
    _, decisions = crash_all(RestartTracker(p), [0.0, 9.999])
    assert decisions == [RestartAfter(1.0), GiveUp()]


def test_given_up_stays_given_up_until_reset():
    tracker, _ = crash_all(RestartTracker(POLICY), [0.0, 1.0, 2.0, 3.0])
    assert tracker.given_up
    tracker, d = tracker.record_crash(1000.0)
    assert d == GiveUp()
    tracker = tracker.reset()
    assert not tracker.given_up
    assert tracker.crashes == ()
    assert tracker.restarts == 3  # lifetime count survives the operator restart
    tracker, d = tracker.record_crash(1001.0)
    assert d == RestartAfter(1.0)


def test_zero_restarts_gives_up_at_first_crash():
    p = RestartPolicy(max_restarts=0, window_seconds=60.0, base_delay=1.0, max_delay=1.0)
    _, d = RestartTracker(p).record_crash(5.0)
    assert d == GiveUp()


def test_tracker_is_immutable():
    t0 = RestartTracker(POLICY)
    t1, _ = t0.record_crash(1.0)
    assert t0.crashes == ()
    assert t1.crashes == (1.0,)


@pytest.mark.parametrize(
    "args",
    [(-1, 60.0, 1.0, 2.0), (1, 0.0, 1.0, 2.0), (1, 60.0, -1.0, 2.0), (1, 60.0, 3.0, 2.0)],
)
def test_policy_validation(args):
    with pytest.raises(ValueError):
        RestartPolicy(*args)


@given(
    max_restarts=st.integers(0, 5),
    window=st.floats(1, 100),
    gaps=st.lists(st.floats(0, 50), min_size=1, max_size=20),
)
def test_never_more_than_max_restarts_in_any_window(max_restarts, window, gaps):
    policy = RestartPolicy(max_restarts, window, 0.5, 8.0)
    tracker = RestartTracker(policy)
    now = 0.0
    granted = []
    for gap in gaps:
        now += gap
        tracker, d = tracker.record_crash(now)
        if isinstance(d, GiveUp):
            break
        assert 0.5 <= d.delay <= 8.0
        granted.append(now)
    for t in granted:
        assert sum(1 for u in granted if t - window < u <= t) <= max_restarts
