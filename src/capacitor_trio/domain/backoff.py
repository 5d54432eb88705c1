"""Retry backoff for failed items and for an unreachable destination node.

Capacitor documents no backoff (capacitor-behaviour.md §3.4 is [UNDOC]); our choice:

* A failed item (outcome RetryLater) waits ``retryDelaySeconds`` after its first failure, doubling
  after each further failure, capped at ``retryMaxDelaySeconds``.
* Jitter spreads retries by ±``jitter`` * delay, drawn from an injected ``random.Random`` (seed it
  in tests, or pass ``jitter=0`` for exact virtual times). The cap is a hard maximum: a jittered
  delay never exceeds it, and never goes below zero.
* ``maxAttempts`` > 0 bounds the attempts: after that many the item stays failed (until the API
  retries it or it expires). 0 means retry until expiry.
* When a batch delivers nothing and fails transiently (connect refused, timeout, transient
  association reject, 0xA7xx) the whole node backs off with the same curve, counted in
  consecutive failed batches, and resets on the first delivery (actors/node.py). The items of
  that batch are each charged an attempt; items that were not in it are not.
"""

from __future__ import annotations

import math
import random


def _check(base: float, cap: float, jitter: float) -> None:
    if not (base >= 0 and math.isfinite(base)):
        raise ValueError(f"base delay must be a finite number >= 0, got {base!r}")
    if not cap >= 0:
        raise ValueError(f"cap must be >= 0, got {cap!r}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter must be a fraction in [0, 1], got {jitter!r}")


def retry_delay(
    attempt: int, *, base: float, cap: float, jitter: float, rng: random.Random
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first failure).

    ``base`` for attempt 1, doubling per attempt, capped at ``cap``; then ± ``jitter`` as a fraction
    of that, clamped to [0, cap]. ``rng`` is only consulted when ``jitter`` > 0.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt!r}")
    _check(base, cap, jitter)
    exponent = attempt - 1
    raw = cap if exponent >= 1023 else min(cap, base * 2.0**exponent)
    if jitter == 0 or raw == 0:
        return raw
    return min(cap, max(0.0, raw * (1.0 + rng.uniform(-jitter, jitter))))


def next_attempt(
    now: float,
    attempt: int,
    *,
    base: float,
    cap: float,
    jitter: float,
    rng: random.Random,
    max_attempts: int = 0,
) -> float | None:
    """When to retry an item whose attempt number ``attempt`` just failed, or None to leave it failed.

    None when ``max_attempts`` > 0 and ``attempt`` >= ``max_attempts``.
    """
    if max_attempts < 0:
        raise ValueError(f"max_attempts must be >= 0 (0 = unlimited), got {max_attempts!r}")
    if max_attempts > 0 and attempt >= max_attempts:
        return None
    return now + retry_delay(attempt, base=base, cap=cap, jitter=jitter, rng=rng)
