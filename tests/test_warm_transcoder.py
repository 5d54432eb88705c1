"""The runtime starts a transcode worker ahead whenever the settings in force have a node with a
TransferSyntax (its own or defaultTransferSyntax): at start-up, and after a reload that brings
one; never for settings without one (issue 22: the first conversion should not pay ~0.6 s for
the worker's start)."""

from __future__ import annotations

from typing import Any

import attrs
import trio
import trio.testing
from trio_util import AsyncValue

from capacitor_trio.config import Settings
from capacitor_trio.config.models import Node
from capacitor_trio.runtime import warm_transcoder
from tests.actors.test_node import config


@attrs.define
class CountingPool:
    warmed: int = 0

    async def warm(self) -> None:
        await trio.lowlevel.checkpoint()
        self.warmed += 1


async def test_a_worker_is_started_ahead_at_start_up_and_after_a_reload(autojump_clock: Any) -> None:
    plain = Settings(config(), nodes=(Node("PACS"),))
    in_force = AsyncValue(plain)
    pool = CountingPool()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(warm_transcoder, in_force, pool)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.warmed == 0  # no node converts: no worker
        in_force.value = attrs.evolve(plain, nodes=(Node("PACS"), Node("VNA", transfer_syntax="RLELossless")))
        await trio.testing.wait_all_tasks_blocked()
        assert pool.warmed == 1  # a reload added a node with a TransferSyntax
        in_force.value = attrs.evolve(plain, config=config(default_transfer_syntax="JPEG2000Lossless"))
        await trio.testing.wait_all_tasks_blocked()
        assert pool.warmed == 2  # the default applies to PACS
        nursery.cancel_scope.cancel()

    in_force = AsyncValue(Settings(config(), nodes=(Node("PACS", transfer_syntax="RLELossless"),)))
    pool = CountingPool()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(warm_transcoder, in_force, pool)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.warmed == 1  # at start-up
        nursery.cancel_scope.cancel()


async def test_a_worker_that_cannot_start_is_logged_not_fatal(autojump_clock: Any, caplog: Any) -> None:
    class Broken:
        async def warm(self) -> None:
            await trio.lowlevel.checkpoint()
            raise OSError("fork failed")

    in_force = AsyncValue(Settings(config(), nodes=(Node("PACS", transfer_syntax="RLELossless"),)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(warm_transcoder, in_force, Broken())
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert any("could not be started ahead: fork failed" in r.getMessage() for r in caplog.records)
