"""Disk full during a stream: the router's spool is a small tmpfs and its only destination is down,
so the spool fills up. The router refuses with 0xA700 (Out of Resources) — when free space falls
below `minFreeSpace`, or (with `minFreeSpace: 0`) when a write really fails with ENOSPC — loses
nothing it acknowledged, and takes instances again once deliveries have freed space."""

from __future__ import annotations

import functools
import gc
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from capacitor_trio.dicom.acceptor import AcceptorConfig
from capacitor_trio.dicom.listener import serve_acceptor
from tests.helpers.peers import Counter, RouterProcess, free_port
from tests.helpers.sinks import CountingSink
from tests.helpers.soak import Gate, RssSampler, Sender, series_of, write_router_config
from tests.store.util import incoming_leftovers

from .test_crash_cycles import wait_queue_empty

pytestmark = [
    pytest.mark.soak,
    pytest.mark.timeout(3600),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "spool"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)],
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


@pytest.mark.parametrize("min_free", [10, 0], ids=["minFreeSpace", "ENOSPC"])
async def test_disk_full_refuses_loses_nothing_recovers(
    tmp_path: Path, tmpfs: Path, nursery: trio.Nursery, soak: bool, figures: dict[str, Any],
    router_factory: list[RouterProcess], rss: RssSampler, min_free: int,
) -> None:
    if min_free == 0 and not soak:
        pytest.skip("the ENOSPC variant is slow (recovery waits for room for the reserve): only with --soak")
    n = 800 if soak else 300  # 128 KB each: several times the 32 MB spool
    wall = time.monotonic()
    dest_port, scp_port, api_port = free_port(), free_port(), free_port()
    data = tmp_path / "data"
    write_router_config(data, scp_port, {"DEST": dest_port}, api_port=api_port,
                        extra=f"cachePath: {tmpfs}\nminFreeSpace: {min_free}\n")
    router = RouterProcess(data)
    router_factory.append(router)
    await router.start(nursery, timeout=120)

    refusals = Counter()
    space = threading.Event()

    def on_refused(status: int) -> None:
        refusals.add_from_thread()
        space.wait(timeout=1)  # a modality retries a refused instance a little later

    gate = Gate()
    gate.open()
    sender = Sender(scp_port, "DEST", series_of(n, rows=256, patient="FULL"), gate,
                    on_refused=on_refused)
    sink = CountingSink(tmp_path / "dest")
    async with trio.open_nursery() as sending:
        sending.start_soon(functools.partial(trio.to_thread.run_sync, sender.run,
                                             abandon_on_cancel=True))
        try:
            with trio.fail_after(600):
                await refusals.wait_until(lambda: refusals.value >= 3)
            acked_when_full = len(sender.acked)
            # space comes back: the destination returns, deliveries free the spool
            await nursery.start(serve_acceptor, AcceptorConfig(
                ae_title="DEST", host="127.0.0.1", port=dest_port), sink)
            space.set()
        except BaseException:
            sender.stop.set()
            raise
    gate.close()
    gc.collect()
    assert sender.error is None
    assert len(sender.acked) == n  # every instance was taken in the end
    assert set(sender.statuses) <= {0x0000, 0xA700}, sender.statuses
    with trio.fail_after(600):
        await sink.count.wait_until(lambda: set(sender.acked) <= set(sink.received))
        await wait_queue_empty(router, f"http://127.0.0.1:{api_port}")
    assert incoming_leftovers(tmpfs / "incoming") == []
    assert sink.corrupt == []  # bytes as sent
    router.signal(15)
    assert await router.wait(timeout=60) == 0
    key = "disk full (minFreeSpace)" if min_free else "disk full (ENOSPC)"
    figures[f"{key}: acknowledged before the disk filled"] = acked_when_full
    figures[f"{key}: refusals (0xA700)"] = sender.statuses[0xA700]
    figures[f"{key}: acknowledged / delivered / lost"] = (
        f"{len(sender.acked)} / {len(set(sink.received))} / "
        f"{len(set(sender.acked) - set(sink.received))}")
    figures[f"{key}: wall time (s)"] = round(time.monotonic() - wall, 1)
