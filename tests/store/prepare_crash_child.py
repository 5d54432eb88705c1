"""Child process of the prepare crash test: receives instances for PACS and AI and prepares
PACS's items with copies of their own (larger than the index keeps) as fast as it can, until it
is killed.

Usage: python prepare_crash_child.py CACHE SEED

Prints ``ready`` once the store is open, ``ok <sop> <PACS item>,<AI item>`` for every commit
that returned, and ``prep <item ids>`` once a batch of preparations was applied; each line
flushed. A received instance's bytes are its SOP Instance UID padded with zeros; a copy's are
``copy:`` and the UID padded with ones. Every other copy is handed over as a finished file
(written and fsync'd in CACHE/../handed, as the transcoding step's converted files are), the
others as bytes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import trio

from capacitor_trio.domain.instance import Destination, InstanceHeader
from capacitor_trio.store import open_store
from capacitor_trio.store.model import Preparation, PreparedCopy, PrepOutcome

PACS, AI = Destination("PACS"), Destination("AI")
SIZE = 40_000  # above the index's 32 KiB: files in the spool, copies as *.prep.dcm


def received_bytes(sop: str) -> bytes:
    return sop.encode().ljust(SIZE, b"\0")


def copy_bytes(sop: str) -> bytes:
    return f"copy:{sop}".encode().ljust(SIZE + 1000, b"\1")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def handed_file(root: Path, sop: str) -> Path:
    """A copy's bytes as a finished, fsync'd file beside the cache (on its file system)."""
    path = root.parent / "handed" / f"{sop}.part"
    path.parent.mkdir(exist_ok=True)
    with path.open("wb") as f:
        f.write(copy_bytes(sop))
        f.flush()
        os.fsync(f.fileno())
    return path


def prepared_copy(root: Path, item_id: int, sop: str, sop_class: str) -> PreparedCopy:
    header = InstanceHeader(sop_class, sop, "1.2.840.10008.1.2")
    if item_id % 2:
        return PreparedCopy(header, file=handed_file(root, sop))
    return PreparedCopy(header, copy_bytes(sop))


async def main(root: Path, seed: int) -> None:
    async with open_store(root, durable=True) as store:
        say("ready")

        async def receive() -> None:
            n = 0
            while True:
                n += 1
                sop = f"2.25.{seed}.{n}"
                header = InstanceHeader("1.2.840.10008.5.1.4.1.1.2", sop, "1.2.840.10008.1.2.1")
                ids = await store.commit_instance(None, header, "CRASH", [PACS, AI], data=received_bytes(sop))
                say(f"ok {sop} {','.join(map(str, ids))}")

        async def prepare() -> None:
            while True:
                items = await store.ripe_new(PACS, time.time(), 0, 8)
                preps = [
                    Preparation(
                        i.id, PrepOutcome.PREPARED,
                        copy=prepared_copy(root, i.id, i.sop_instance_uid, i.sop_class_uid),
                    )
                    for i in items
                ]
                if preps:
                    await store.apply_preparations(preps)
                    say(f"prep {','.join(str(p.item_id) for p in preps)}")
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(prepare)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]))
