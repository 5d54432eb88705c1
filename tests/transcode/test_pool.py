"""The worker-process pool on trio: conversions run in processes, bounded, cancellable; a dead
worker is a TranscodeError, never a hang; a failed or cancelled conversion leaves no file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import trio
from pydicom.pixels import pixel_array

from capacitor_trio.transcode import TranscodeError, TranscodePool
from tests.transcode import workers
from tests.transcode.images import make_image, pixels


async def _started(nursery: trio.Nursery, size: int) -> TranscodePool:
    pool = TranscodePool(size, idle_timeout=30)
    await nursery.start(pool.run)
    return pool


async def test_converts_in_a_worker_process(tmp_path: Path) -> None:
    src = make_image(tmp_path, "multi12")
    dst = tmp_path / "out.dcm"
    async with trio.open_nursery() as nursery:
        pool = await _started(nursery, 1)
        result = await pool.convert(src, dst, "1.2.840.10008.1.2.4.70")
        nursery.cancel_scope.cancel()
    assert result.transfer_syntax_uid == "1.2.840.10008.1.2.4.70"
    back = tmp_path / "back.dcm"
    from capacitor_trio.transcode import convert_file

    convert_file(dst, back, "1.2.840.10008.1.2.1")
    np.testing.assert_array_equal(pixel_array(back, raw=True), pixels("multi12"))


async def test_at_most_workers_at_a_time(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.touch()
    async with trio.open_nursery() as nursery:
        pool = await _started(nursery, 1)
        async with trio.open_nursery() as jobs:
            for i in range(3):
                jobs.start_soon(pool._call, workers.slow_write, log, tmp_path / f"{i}", "0.2")
        nursery.cancel_scope.cancel()
    lines = [line.split()[0] for line in log.read_text().splitlines()]
    assert lines == ["start", "end"] * 3


async def test_cancel_kills_the_worker_and_removes_the_partial_file(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.touch()
    dst = tmp_path / "partial.dcm"
    async with trio.open_nursery() as nursery:
        pool = await _started(nursery, 1)
        with trio.move_on_after(30) as scope:
            async with trio.open_nursery() as job:
                job.start_soon(pool._call, workers.slow_write, log, dst, "60")
                # another process's doing: nothing to wait on but the file itself
                while not dst.exists():  # noqa: ASYNC110 (the worker has begun writing)
                    await trio.sleep(0.02)
                job.cancel_scope.cancel()
        assert not scope.cancelled_caught
        pid = int(log.read_text().split()[1])
        assert not dst.exists()
        with trio.fail_after(10):
            while _alive(pid):  # noqa: ASYNC110 (another process's exit)
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_a_dead_worker_is_a_transcode_error_and_the_pool_goes_on(tmp_path: Path) -> None:
    dst = tmp_path / "partial.dcm"
    src = make_image(tmp_path, "mono8")
    async with trio.open_nursery() as nursery:
        pool = await _started(nursery, 1)
        with trio.fail_after(60), pytest.raises(TranscodeError, match="worker process died"):
            await pool._call(workers.die, src, dst, "")
        assert not dst.exists()
        with trio.fail_after(60):
            result = await pool.convert(src, tmp_path / "ok.dcm", "1.2.840.10008.1.2.5")
        assert result.transfer_syntax_uid == "1.2.840.10008.1.2.5"
        nursery.cancel_scope.cancel()


async def test_a_refused_conversion_leaves_no_file(tmp_path: Path) -> None:
    src = make_image(tmp_path, "mono16")
    dst = tmp_path / "out.dcm"
    async with trio.open_nursery() as nursery:
        pool = await _started(nursery, 1)
        with pytest.raises(TranscodeError, match="Bits Stored 16"):
            await pool.convert(src, dst, "1.2.840.10008.1.2.4.50")
        nursery.cancel_scope.cancel()
    assert not dst.exists()


async def test_not_running_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not running"):
        await TranscodePool(1).convert(tmp_path / "a", tmp_path / "b", "1.2.840.10008.1.2")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie not yet reaped counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_stopping_the_pool_lets_a_running_conversion_finish(tmp_path: Path) -> None:
    """The pool stopping on its own is not the instance's fault: a running conversion ends as
    it would have (its caller, cancelled by the same shutdown, would kill it instead); a
    conversion asked afterwards is told the pool is not running."""
    log = tmp_path / "log"
    log.touch()
    dst = tmp_path / "out.dcm"
    outcome: list[object] = []

    async def convert(pool: TranscodePool) -> None:
        try:
            outcome.append(await pool._call(workers.slow_write, log, dst, "1"))
        except BaseException as exc:
            outcome.append(exc)
            raise

    async with trio.open_nursery() as outer, trio.open_nursery() as pool_nursery:
        pool = await _started(pool_nursery, 1)
        outer.start_soon(convert, pool)
        with trio.fail_after(30):
            while not dst.exists():  # noqa: ASYNC110 (another process's doing)
                await trio.sleep(0.02)
        pool_nursery.cancel_scope.cancel()
    assert len(outcome) == 1 and not isinstance(outcome[0], BaseException)
    with pytest.raises(RuntimeError, match="not running"):
        await pool.convert(dst, tmp_path / "again.dcm", "1.2.840.10008.1.2")


async def test_warm_starts_a_worker_ahead_of_the_first_conversion(tmp_path: Path) -> None:
    """Workers start when needed; `warm` has one started (its codecs imported) before any
    conversion, so the first conversion does not wait for it."""
    async with trio.open_nursery() as nursery:
        pool = await _started(nursery, 1)
        assert pool.live_workers == 0
        await pool.warm()
        assert pool.live_workers == 1 and pool.busy == 0
        await pool.warm()  # an idle worker is reused, not another started (a worker may also
        assert pool.live_workers <= 1  # retire after a job: RETIRE_RSS_MB)
        nursery.cancel_scope.cancel()
