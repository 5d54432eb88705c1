"""What the machine was like during a bench run, printed with the figures.

The same code measured 2x apart from one VM to the next (docs/performance.md, eighth landing):
the ratios to DCMTK moved with the machine's speed for interpreted Python and its disk's fsync
latency. `calibrate()` measures both in a few hundred milliseconds, untimed, so that figures from
different runs can be put side by side.

    .venv/bin/python bench/machine.py [DIR]     # DIR: where the fsyncs go (default: bench/.corpus)
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

#: free page reporting of the virtio balloon: freed guest memory goes back to the host, and
#: touching it again costs a fault on the host
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")


def _python_loop() -> float:
    """Seconds for a million iterations of a trivial Python loop (best of three)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x = 0
        for i in range(1_000_000):
            x += i
        best = min(best, time.perf_counter() - t0)
    return best


def _fdatasync(d: Path, size: int, n: int = 100) -> float:
    """Median seconds to overwrite `size` bytes at the start of a file and fdatasync it. The file
    stays for the next run (a deletion would slow the benches' next file creations: see
    transport.fresh_dir)."""
    path = d / ".calibrate"
    data = os.urandom(size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size < size:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            os.pwrite(fd, data, 0)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return statistics.median(times)


def _page_reporting() -> str:
    try:
        order = (PAGE_REPORTING / "page_reporting_order").read_text().strip()
    except OSError:
        return "off or unknown"
    return f"on (order {order})"


def calibrate(d: Path) -> str:
    """One line: Python loop speed, fsync latencies on `d`'s disk, CPU, load, page reporting."""
    d.mkdir(parents=True, exist_ok=True)
    loop = _python_loop()
    small = _fdatasync(d, 9 * 1024)
    large = _fdatasync(d, 96 * 1024)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"Python loop {loop * 1e3:.0f} ms per million iterations, "
        f"overwrite+fdatasync {small * 1e3:.2f} ms (9 kB) / {large * 1e3:.2f} ms (96 kB), "
        f"load {load:.1f}, free page reporting {_page_reporting()}"
    )


if __name__ == "__main__":
    print(calibrate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / ".corpus"))
