"""Crash test: the real writer in a child process, SIGKILLed at random points while committing.

After every kill the store is reopened (recovery runs) and checked: every instance whose commit
returned is present, with all its items and its exact bytes (unless the child reported an item
delivered); no temporary file remains; every orphan is an instance whose commit never returned.
"""

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

from .crash_child import COMMITTERS
from .util import content, incoming_leftovers

CHILD = Path(__file__).with_name("crash_child.py")
KILLS = 50


def run_child(root: Path, seed: int, rng: random.Random) -> list[str]:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(root), str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    # let it run for a random while, then pull the plug mid-stream
    time.sleep(rng.uniform(0.0, 0.12))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return out.splitlines()


async def check(
    root: Path, acked: dict[str, list[int]], gone: set[int], unacked: set[int], sent: set[int]
) -> tuple[int, int, set[int]]:
    async with open_store(root, durable=True) as store:
        report = store.recovery_report
        items, _ = await store.list_items(ItemFilter(), limit=1_000_000)
        by_id = {i.id: i for i in items}
        unacked.difference_update(gone)
        for sop, ids in acked.items():
            for item_id in ids:
                if item_id in gone:
                    assert item_id not in by_id
                    continue
                item = by_id.get(item_id)
                if item is None and item_id in sent:
                    continue  # its delivered() was in flight
                assert item is not None, f"acknowledged item {item_id} of {sop} lost"
                assert item.sop_instance_uid == sop and not item.checked_out
                data = await content(store, item)
                assert data.rstrip(b"\0") == sop.encode(), item.path
        # anything else was committed by a call the kill cut off before it returned
        acked_ids = {i for ids in acked.values() for i in ids}
        new_extra = {i for i in by_id if i not in acked_ids and i not in unacked}
        extra_sops = {by_id[i].sop_instance_uid for i in new_extra}
        assert len(extra_sops) <= COMMITTERS, extra_sops
        assert not extra_sops & set(acked)
        unacked.update(new_extra)
        assert report.missing == ()
        assert incoming_leftovers(root / "incoming") == []
        for rel in report.orphans:
            orphan = (root / "orphans" / Path(rel).name).read_bytes().rstrip(b"\0").decode()
            assert orphan not in acked, f"orphan {rel} was acknowledged"
        return len(report.orphans), report.released, set(by_id)


@pytest.mark.slow
def test_sigkill_during_commits_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("CRASH_SEED", "4")))
    root = tmp_path / "cache"
    acked: dict[str, list[int]] = {}
    gone: set[int] = set()
    unacked: set[int] = set()
    sent: set[int] = set()  # delivered() was called; whether it returned is unknown
    orphans = released = commits = reused = 0
    deadline = time.monotonic() + 90
    for kill in range(KILLS):
        for line in run_child(root, kill, rng):
            kind, *rest = line.split()
            if kind == "ok":
                acked[rest[0]] = [int(x) for x in rest[1].split(",")]
                commits += 1
            elif kind == "gone":
                gone.add(int(rest[0]))
            elif kind == "sent":
                sent.update(int(x) for x in rest[0].split(","))
            elif kind == "reused":
                reused += 1
        o, r, present = trio.run(check, root, acked, gone, unacked, sent)
        # a delivered() cut off by the kill either happened or not; now we know which
        gone.update(sent - present)
        sent.clear()
        orphans += o
        released += r
        assert time.monotonic() < deadline, "crash test too slow"
    # the kills must have landed mid-stream: commits happened, some were cut between rename and
    # commit (orphans) or while items were checked out
    assert commits > KILLS * 5
    assert released > 0
    assert reused > 0  # delivered files were written over in place (spares.py)
    print(
        f"crash test: {KILLS} kills, {commits} acked, {len(gone)} delivered, {orphans} orphans, "
        f"{released} released, {reused} files reused"
    )
