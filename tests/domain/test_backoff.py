from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capacitor_trio.domain.backoff import next_attempt, retry_delay


def rng() -> random.Random:
    return random.Random(1234)


def test_exact_doubling_without_jitter():
    delays = [retry_delay(n, base=30, cap=600, jitter=0, rng=rng()) for n in range(1, 8)]
    assert delays == [30, 60, 120, 240, 480, 600, 600]


def test_huge_attempt_is_capped_not_overflowing():
    assert retry_delay(10_000, base=30, cap=600, jitter=0, rng=rng()) == 600
    assert retry_delay(1024, base=1e300, cap=5.0, jitter=0, rng=rng()) == 5.0


def test_jitter_does_not_consume_rng_when_zero():
    r = random.Random(7)
    state = r.getstate()
    retry_delay(3, base=1, cap=100, jitter=0, rng=r)
    assert r.getstate() == state


def test_jitter_is_deterministic_with_seed():
    a = [retry_delay(n, base=10, cap=1000, jitter=0.2, rng=r) for r in [rng()] for n in (1, 2, 3)]
    b = [retry_delay(n, base=10, cap=1000, jitter=0.2, rng=r) for r in [rng()] for n in (1, 2, 3)]
    assert a == b
    assert a != [10, 20, 40]


@given(
    attempt=st.integers(1, 200),
    base=st.floats(0, 1e4),
    cap=st.floats(0, 1e6),
    jitter=st.floats(0, 1),
    seed=st.integers(0, 2**32),
)
def test_jittered_delay_bounds(attempt, base, cap, jitter, seed):
    d = retry_delay(attempt, base=base, cap=cap, jitter=jitter, rng=random.Random(seed))
    raw = min(cap, base * 2.0 ** min(attempt - 1, 1023))
    assert 0 <= d <= cap
    assert raw * (1 - jitter) - 1e-9 * max(1, raw) <= d <= raw * (1 + jitter) + 1e-9 * max(1, raw)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(attempt=0, base=1, cap=2, jitter=0),
        dict(attempt=1, base=-1, cap=2, jitter=0),
        dict(attempt=1, base=1, cap=-2, jitter=0),
        dict(attempt=1, base=1, cap=2, jitter=1.5),
        dict(attempt=1, base=float("nan"), cap=2, jitter=0),
    ],
)
def test_retry_delay_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        retry_delay(rng=rng(), **kwargs)


def test_next_attempt_times_and_max_attempts():
    kw = dict(base=30, cap=600, jitter=0, rng=rng())
    assert next_attempt(100.0, 1, **kw) == 130.0
    assert next_attempt(100.0, 2, **kw) == 160.0
    assert next_attempt(100.0, 50, **kw) == 700.0  # unlimited by default
    assert next_attempt(100.0, 2, max_attempts=3, **kw) == 160.0
    assert next_attempt(100.0, 3, max_attempts=3, **kw) is None
    assert next_attempt(100.0, 4, max_attempts=3, **kw) is None
    assert next_attempt(100.0, 1, max_attempts=1, **kw) is None
    with pytest.raises(ValueError):
        next_attempt(100.0, 1, max_attempts=-1, **kw)
