"""Benchmark of the durable store (issue 4). A script, not a test.

    .venv/bin/python bench/store.py [--dir DIR] [--items 100000] [--commits 3000] [--rounds 3]

Prints commits per second for 1, 4 and 16 concurrent committers (fsync on, small instances;
each committer hands its instance over the way the acceptor does: bytes for a small one, a
temporary file for a larger one), for
--rounds interleaved rounds and their median, then,
with --items items in the index: process RSS growth, and median/p95 latency of listing by state
(limit 100), a free-text search, and a per-node checkout of the next batch.
Run it on the file system the router will use (DIR defaults to a temporary directory under the
current one, not /tmp, which may be a tmpfs where fsync is free).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import trio

from capacitor_trio.domain.instance import Destination, InstanceHeader
from capacitor_trio.store import ItemFilter, Store, open_store

CT = "1.2.840.10008.5.1.4.1.1.2"
DESTS = [Destination("PACS"), Destination("ARCHIVE"), Destination("AI")]
SMALL = os.urandom(2048)  # a small instance: header plus a tiny image (kept in the index)


def header(n: int, rng: random.Random) -> InstanceHeader:
    study = n // 200
    return InstanceHeader(
        sop_class_uid=CT,
        sop_instance_uid=f"1.2.826.0.1.3680043.10.{n}",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        study_instance_uid=f"1.2.826.0.1.3680043.20.{study}",
        series_instance_uid=f"1.2.826.0.1.3680043.30.{n // 50}",
        modality=rng.choice(["CT", "MR", "CR"]),
        patient_id=f"PID{study % 5000:05d}",
        patient_name="DOE^JANE",
        accession_number=f"ACC{study:07d}",
    )


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


async def run_committers(
    store: Store,
    total: int,
    concurrency: int,
    start: int,
    dests_per: int,
    rng: random.Random,
    payload: bytes = SMALL,
) -> float:
    counter = iter(range(start, start + total))

    async def committer() -> None:
        for n in counter:
            # as the DICOM acceptor does: a small instance is handed over as bytes; a larger one
            # is in a temporary file it wrote (on the loop here, a page-cache write)
            if len(payload) <= store.inline_max_bytes:
                temp, data = None, payload
            else:
                temp, data = store.new_incoming_path(), None
                write(temp, payload)
            await store.commit_instance(
                temp, header(n, rng), "MODALITY", DESTS[:dests_per], data=data
            )

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(committer)
    return time.perf_counter() - t0


async def latencies(fn: Callable[[int], Awaitable[object]], n: int) -> tuple[float, float]:
    out = []
    for k in range(n):
        t0 = time.perf_counter()
        took = await fn(k)
        out.append((took if isinstance(took, float) else time.perf_counter() - t0) * 1000)
    out.sort()
    return statistics.median(out), out[int(len(out) * 0.95) - 1]


async def main(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    rng = random.Random(1)
    try:
        print(f"# store bench in {base} (sqlite WAL, synchronous=FULL, fsync on)")
        payload = SMALL if args.instance_bytes == len(SMALL) else os.urandom(args.instance_bytes)
        print(f"## commit throughput ({len(payload)}-byte instances, 1 destination each)")
        rates: dict[int, list[float]] = {1: [], 4: [], 16: []}
        for rnd in range(1, args.rounds + 1):
            for conc in rates:
                root = base / f"commits-{conc}"
                async with open_store(root, durable=True) as store:
                    await run_committers(store, 100, conc, 0, 1, rng, payload)  # warm up
                    g0 = store.writer_stats.groups
                    secs = await run_committers(store, args.commits, conc, 100, 1, rng, payload)
                    groups = store.writer_stats.groups - g0
                rates[conc].append(args.commits / secs)
                print(
                    f"round {rnd} committers={conc:2d}: {args.commits / secs:7.0f} commits/s "
                    f"({args.commits / groups:.1f} commits per group commit)"
                )
                shutil.rmtree(root)
        for conc, r in rates.items():
            print(
                f"committers={conc:2d}: median {statistics.median(r):7.0f} commits/s "
                f"(rounds: {', '.join(f'{x:.0f}' for x in r)})"
            )

        if args.commits_only:
            return
        print(f"## with {args.items} items in the index")
        gc.collect()
        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        root = base / "big"
        async with open_store(root, durable=False) as store:
            t0 = time.perf_counter()
            await run_committers(store, args.items // 2, 16, 0, 2, rng)  # 2 items per instance
            fill = time.perf_counter() - t0
            now = time.time()
            await store.prepare_ripe(now, 0)
            # a realistic mix: some failed (half of them due), some rejected, the rest prepared
            await store.move_where(ItemFilter(destination="ARCHIVE", modality="MR"), "failed")
            await store.move_where(ItemFilter(destination="ARCHIVE", modality="CR"), "rejected")
            counts = await store.counts()
            print(f"filled in {fill:.1f} s: {counts}")
            n_studies = args.items // 2 // 200

            async def list_by_state(k: int) -> object:
                state = ("prepared", "failed", "rejected")[k % 3]
                return await store.list_items(ItemFilter(state=state), limit=100)

            async def search(k: int) -> object:
                term = (
                    f"ACC{rng.randrange(n_studies):07d}"[-6:]
                    if k % 2
                    else f"3680043.30.{rng.randrange(args.items // 100)}"
                )
                return await store.list_items(ItemFilter(search=term), limit=100)

            async def checkout(k: int) -> object:
                dest = DESTS[k % 2]
                t0 = time.perf_counter()
                batch = await store.checkout_batch(dest, now=now + 3600, limit=20)
                took = time.perf_counter() - t0
                assert batch
                await store.delivered([i.id for i in batch])  # not timed
                return took

            for name, fn in (
                ("list by state, limit 100", list_by_state),
                ("search", search),
                ("checkout 20", checkout),
            ):
                p50, p95 = await latencies(fn, args.samples)
                print(f"{name:26s} p50 {p50:7.2f} ms   p95 {p95:7.2f} ms")
            gc.collect()
            rss1 = proc.memory_info().rss
            print(
                f"RSS growth with the store open and {args.items} items: {(rss1 - rss0) / 2**20:.1f} MB"
            )
        db = sum(f.stat().st_size for f in root.glob("index.db*"))
        print(f"index size on disk: {db / 2**20:.1f} MB")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dir", default=".", help="where to create the temporary stores")
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--commits", type=int, default=3000)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the commit runs")
    ap.add_argument(
        "--instance-bytes",
        type=int,
        default=len(SMALL),
        help="size of the committed instances (above 32768 they get spool files)",
    )
    ap.add_argument("--commits-only", action="store_true", help="skip the 100,000-item part")
    trio.run(main, ap.parse_args())
