"""The cyclic garbage collector, set for a long-running process that moves bytes.

With CPython's defaults the collector makes young collections every 700 container allocations
(a few per message) and older ones walk everything the process imported (pydicom's and
pynetdicom's tables, Trio, the configuration): a noticeable share of a router's CPU
(docs/performance.md has the profile). Once a process is up, `settle()` moves what exists into a generation the collector never walks
(`gc.freeze`: those objects live as long as the process anyway) and collects young objects less
often. Reference cycles are still collected; they are rare on the hot paths (docs/performance.md).
"""

from __future__ import annotations

import gc

#: allocations of container objects between two young collections (CPython's default is 700)
YOUNG_THRESHOLD = 20_000


def settle() -> None:
    """Call once start-up is done: collect, freeze what is left, and collect less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
