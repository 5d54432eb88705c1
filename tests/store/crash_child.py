"""Child process of the crash test: commits instances as fast as it can until it is killed.

Usage: python crash_child.py CACHE SEED

Writes as the acceptor does (into files made ahead or delivered ones reused in place, their
flush started before the commit). Prints ``ready`` once the store is open, then for every commit that returned
``ok <sop_uid> <item ids>``; around each ``delivered`` call ``sent <item ids>`` before and
``gone <item id>`` per item after, ``reused`` when a commit writes over a delivered
instance's file; each line flushed.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import trio

from capacitor_trio.domain.instance import Destination, InstanceHeader
from capacitor_trio.store import open_store

DESTS = [Destination("PACS"), Destination("ARCHIVE"), Destination("SINK")]
COMMITTERS = 6


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def write_file(path: Path, sop: str, size: int) -> None:
    """As the acceptor does: no O_TRUNC (the file may be a delivered one, reused), then cut to
    what was written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, sop.encode().ljust(size, b"\0"))
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


async def main(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    async with open_store(root, durable=True) as store:
        say("ready")

        async def committer(w: int) -> None:
            n = 0
            while True:
                n += 1
                sop = f"2.25.{seed}.{w}.{n}"
                dests = rng.sample(DESTS, rng.randint(1, 3))
                path = store.new_incoming_path()
                if path.parent.parent.name == "spool":
                    say("reused")  # a delivered instance's file, written over in place
                size = rng.choice([200, 5000, 40000, 60000, 90000])
                await trio.to_thread.run_sync(write_file, path, sop, size)
                sync = store.start_sync(path, size)  # as the acceptor does
                header = InstanceHeader("1.2.840.10008.5.1.4.1.1.2", sop, "1.2.840.10008.1.2.1")
                ids = await store.commit_instance(path, header, "CRASH", dests, sync=sync)
                say(f"ok {sop} {','.join(map(str, ids))}")

        async def sink() -> None:
            # a node actor delivering to SINK: exercises checkout, delivered and the trash
            while True:
                now = time.time()
                await store.prepare_ripe(now, 0)
                batch = await store.checkout_batch(Destination("SINK"), now=now, limit=5)
                if batch:
                    await trio.sleep(0.01)  # "sending": a kill here leaves items checked out
                    say(f"sent {','.join(str(i.id) for i in batch)}")
                    await store.delivered([i.id for i in batch])
                    for item in batch:
                        say(f"gone {item.id}")
                await trio.sleep(0.002)

        async with trio.open_nursery() as nursery:
            for w in range(COMMITTERS):
                nursery.start_soon(committer, w)
            nursery.start_soon(sink)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]))
