"""The router process: one Trio nursery tree.

config -> store -> supervisor (+ node actors) -> receiver -> DICOM listener -> API. Shutdown runs
in reverse: SIGINT/SIGTERM cancel the tree; the listener stops accepting, node actors abort their
sends (items go back to the queue), and the store closes last.
"""

from __future__ import annotations

import logging
import signal

import trio

from capacitor_trio.config import Settings

log = logging.getLogger("capacitor_trio")


async def run_router(settings: Settings, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run every service of the router until cancelled."""
    for warning in settings.warnings:
        log.warning(warning)
    task_status.started()
    await trio.sleep_forever()


async def _main(settings: Settings) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_router, settings)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel(reason="signal")
                    return

            nursery.start_soon(stop_on_signal)
    log.info("stopped")


def run_daemon(settings: Settings, *, log_level: str = "INFO") -> int:
    logging.basicConfig(level=log_level, format="%(levelname)s: %(message)s")
    trio.run(_main, settings)
    return 0
