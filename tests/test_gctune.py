"""`gctune.settle`: what the daemon and the sender process do to the collector once up."""

from __future__ import annotations

import gc
import weakref

from capacitor_trio import gctune


def test_settle_freezes_what_exists_and_still_collects_later_cycles() -> None:
    before = gc.get_threshold()
    try:
        gctune.settle()
        assert gc.get_freeze_count() > 0  # start-up's objects: out of the collector's way
        assert gc.get_threshold() == (gctune.YOUNG_THRESHOLD, *before[1:])

        class Cycle:
            me: object = None

        made = Cycle()
        made.me = made
        ref = weakref.ref(made)
        del made
        gc.collect()
        assert ref() is None  # a cycle made afterwards is still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
