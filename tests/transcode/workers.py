"""Jobs for the pool tests, run inside the pool's worker processes (importable by them)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from capacitor_trio.transcode import Converted


def slow_write(src: Path, dst: Path, target_uid: str) -> Converted:
    """Note its pid and a start line in `src` (a log), write part of `dst`, then work on."""
    with src.open("a") as log:
        log.write(f"start {os.getpid()}\n")
    dst.write_bytes(b"half")
    time.sleep(float(target_uid))
    with src.open("a") as log:
        log.write(f"end {os.getpid()}\n")
    return Converted("1.2.840.10008.1.2.1", 4, False, "1.2.3")


def die(src: Path, dst: Path, target_uid: str) -> Converted:
    """A codec crashing on the data: the worker process dies mid-write."""
    dst.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")
