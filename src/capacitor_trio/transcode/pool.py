"""The Trio side of transcoding: a bounded set of worker processes (trio-parallel).

Encoding is CPU work and the interpreter has one lock, so conversions run in worker PROCESSES:
at most `workers` at a time (a `trio.CapacityLimiter`), by default one fewer than the machine's
cores (and at least one), so that a core is left to receiving and sending. The runtime starts the
pool with `nursery.start(pool.run)`; `convert` may be called from any task while it runs.

Cancellation kills the worker (`kill_on_cancel`): a conversion that is no longer wanted (a pause,
a shutdown, a deadline) does not run on. Whatever way a conversion ends other than success
(cancelled, refused, the worker killed or crashed), the partial file at `dst` is removed: only a
complete file is left for the caller to rename. A worker that dies (a codec crashing on the data)
gives `TranscodeError`, never a hang; the next conversion gets a new worker. Stopping the pool
(cancelling `run`) lets a running conversion finish (in a shutdown its caller is cancelled too,
which kills it); a conversion asked of a stopped pool gets RuntimeError, not the instance's fault.

A worker whose peak memory has grown past `retire_rss_mb` (a very large multi-frame) is retired
after that conversion, so the memory goes back to the system.

Workers start when first needed; `warm` starts one ahead (a new worker imports the codecs, ≈ 0.6 s
or more), which the runtime asks for whenever a node with a TransferSyntax is in force, so the
first conversion does not pay for it. A worker idle for `idle_timeout` seconds exits.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import trio
import trio_parallel

from capacitor_trio.transcode.codec import Converted, TranscodeError, convert_file

RETIRE_RSS_MB = 512


def default_workers() -> int:
    """One fewer than the cores this process may use, at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _retire_when_large() -> bool:
    """Runs in the worker after each job: retire it once its peak memory passed the bound."""
    return _peak_rss_mb() > RETIRE_RSS_MB


def _warm_up() -> None:
    """Runs in a new worker: import the codecs once, not in its first conversion."""
    from capacitor_trio.transcode import codec, encoders

    codec.can_decode(codec.EXPLICIT_LE)
    encoders.available(encoders.RLE)


def _ready() -> None:
    """The warm-up job: the worker's start (and `_warm_up`) is all it is for."""


class TranscodePool:
    """Worker processes for `convert_file`, bounded and cancellable."""

    def __init__(self, workers: int | None = None, *, idle_timeout: float = 600.0) -> None:
        self.workers = workers if workers is not None else default_workers()
        if self.workers < 1:
            raise ValueError("a transcode pool needs at least one worker")
        self._limiter = trio.CapacityLimiter(self.workers)
        self._idle_timeout = idle_timeout
        self._context: trio_parallel.WorkerContext | None = None

    @property
    def busy(self) -> int:
        """Conversions running now."""
        return int(self._limiter.borrowed_tokens)

    @property
    def live_workers(self) -> int:
        """Worker processes started and not yet exited (idle or converting)."""
        context = self._context
        if context is None:
            return 0
        stats = context.statistics()
        return int(stats.idle_workers + stats.running_workers)

    async def warm(self) -> None:
        """Have a worker process ready (started, the codecs imported): a no-op job, which starts
        one when none is idle. Under the pool's bound, like a conversion."""
        context = self._context
        if context is None:
            raise RuntimeError("the transcode pool is not running")
        await context.run_sync(_ready, kill_on_cancel=True, limiter=self._limiter)

    async def run(
        self, *, task_status: trio.TaskStatus[TranscodePool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve conversions until cancelled; `started` once `convert` may be called."""
        async with trio_parallel.open_worker_context(
            idle_timeout=self._idle_timeout,
            init=_warm_up,
            retire=_retire_when_large,
            grace_period=5.0,
        ) as context:
            self._context = context
            try:
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self._context = None

    async def convert(self, src: Path, dst: Path, target_uid: str) -> Converted:
        """Convert `src` into a complete file at `dst` in a worker process. On any failure or
        cancellation `dst` does not exist afterwards."""
        return await self._call(convert_file, Path(src), Path(dst), target_uid)

    async def _call(
        self, fn: Callable[[Path, Path, str], Converted], src: Path, dst: Path, target_uid: str
    ) -> Converted:
        context = self._context
        if context is None:
            raise RuntimeError("the transcode pool is not running")
        try:
            return await context.run_sync(
                fn, src, dst, target_uid, kill_on_cancel=True, limiter=self._limiter
            )
        except (trio_parallel.BrokenWorkerError, trio.ClosedResourceError) as exc:
            _remove(dst)
            if self._context is not context:  # the pool is stopping: not the instance's fault
                raise RuntimeError("the transcode pool stopped during the conversion") from exc
            raise TranscodeError(f"the conversion's worker process died: {exc}") from None
        except BaseException:
            _remove(dst)
            raise


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
