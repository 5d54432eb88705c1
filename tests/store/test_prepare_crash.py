"""Crash test of the prepare stage's store side: a child process receives instances and writes
prepared copies (spool files of their own) while it is SIGKILLed at random points.

After every kill the store is reopened (recovery runs) and checked: every acknowledged item is
there; a PACS item is either still `new` on the received bytes or `prepared` on its whole copy
(never on a part of one, whether the copy was written from bytes or handed over as a finished
file); an item whose preparation returned is prepared; AI's item always keeps the received
bytes; no copy's file is left without its row."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from capacitor_trio.store import ItemFilter, open_store
from capacitor_trio.store.schema import PREPARED_SUFFIX

from .prepare_crash_child import copy_bytes, received_bytes
from .util import content

CHILD = Path(__file__).with_name("prepare_crash_child.py")
KILLS = 15


def run_child(root: Path, seed: int, rng: random.Random) -> list[str]:
    proc = subprocess.Popen([sys.executable, str(CHILD), str(root), str(seed)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(rng.uniform(0.02, 0.15))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    return out.splitlines()


async def check(root: Path, acked: dict[str, tuple[int, int]], prepared: set[int]) -> int:
    async with open_store(root, durable=True) as store:
        # a reception cut between its rename and its commit is an orphan (never acknowledged);
        # an unrecorded copy is removed, never an orphan
        assert not any(rel.endswith(PREPARED_SUFFIX) for rel in store.recovery_report.orphans)
        items, _ = await store.list_items(ItemFilter(), limit=1_000_000)
        by_id = {i.id: i for i in items}
        copies = 0
        for sop, (pacs, ai) in acked.items():
            mine, theirs = by_id[pacs], by_id[ai]
            assert await content(store, theirs) == received_bytes(sop)
            data = await content(store, mine)
            if mine.state == "prepared":
                assert data == copy_bytes(sop) and mine.path.name.endswith(PREPARED_SUFFIX), mine
                copies += 1
            else:
                assert pacs not in prepared and mine.state == "new" and data == received_bytes(sop)
        named = {i.path for i in items}
        stray = [p for p in (root / "spool").rglob(f"*{PREPARED_SUFFIX}") if p not in named]
        assert stray == [], stray
        return copies


@pytest.mark.slow
def test_sigkill_while_copies_are_written_loses_nothing_and_keeps_no_part(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("CRASH_SEED", "7")))
    root = tmp_path / "cache"
    acked: dict[str, tuple[int, int]] = {}
    prepared: set[int] = set()
    copies = 0
    for kill in range(KILLS):
        for line in run_child(root, kill, rng):
            kind, *rest = line.split()
            if kind == "ok":
                pacs, ai = (int(x) for x in rest[1].split(","))
                acked[rest[0]] = (pacs, ai)
            elif kind == "prep":
                prepared.update(int(x) for x in rest[0].split(","))
        copies = trio.run(check, root, acked, prepared)
    assert len(acked) > KILLS and copies > 0
    print(f"prepare crash test: {KILLS} kills, {len(acked)} acked, {copies} prepared copies")
