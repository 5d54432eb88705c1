"""The prepare stage of one node's items: new -> prepared, run by the node's actor.

Each node actor runs a `NodePreparer` in its own nursery, so the stage belongs to the owner of
the items (it stops and restarts with the actor) and a slow or stuck stage holds up only its own
node. What to do next is `domain.prepare.prepare_decision` on the oldest new item of the node;
the preparer acts on it: prepares what is ripe (one store write), or waits until the oldest item
is ripe or until it is woken — by a new arrival for the node (`arrived`: only when it had
nothing to wait for, since a newer item cannot ripen first), by items put back to `new`, by the
service's `prepare` flag or by a reload (`wake`). After preparing anything it calls
`on_prepared`, which wakes the node actor to send.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from capacitor_trio.actors.service import ServiceFlags
from capacitor_trio.actors.wakeup import Wakeup
from capacitor_trio.config.models import Config
from capacitor_trio.domain.instance import Destination
from capacitor_trio.domain.prepare import NothingToPrepare, PrepareAt, PrepareNow, prepare_decision


class PrepareStore(Protocol):
    async def oldest_new(self, destination: Destination | None = None) -> float | None: ...

    async def prepare_ripe(
        self, now: float, minimum_age: float, destination: Destination | None = None
    ) -> int: ...


class NodePreparer:
    def __init__(
        self,
        destination: Destination,
        store: PrepareStore,
        config: Callable[[], Config],
        service: ServiceFlags,
        clock: Callable[[], float],
        on_prepared: Callable[[], None],
    ) -> None:
        self.destination = destination
        self._store = store
        self._config = config
        self._service = service
        self._clock = clock
        self._on_prepared = on_prepared
        self._wakeup = Wakeup()
        self._idle = False
        #: a preparation (a store write) in progress, for the processing status
        self.preparing = False

    def wake(self) -> None:
        """Look again now (items put back to `new`, the prepare flag, a new minimumAge)."""
        self._wakeup.set()

    def arrived(self) -> None:
        """A new item for this node was committed `new`."""
        if self._idle:
            self.wake()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wakeup.clear()
            wait = await self._step()
            if wait is None:
                continue
            with trio.move_on_after(wait):
                await self._wakeup.wait()

    async def _step(self) -> float | None:
        """Act on the decision; how long to wait before the next look (inf: until woken), or
        None to look again at once."""
        minimum_age = float(self._config().minimum_age)
        self._idle = True  # an arrival while the oldest item is read wakes the next look
        oldest = await self._store.oldest_new(self.destination)
        now = self._clock()
        decision = prepare_decision(
            enabled=self._service.prepare, oldest_new=oldest, now=now, minimum_age=minimum_age
        )
        self._idle = isinstance(decision, NothingToPrepare)
        if isinstance(decision, PrepareNow):
            self.preparing = True
            try:
                # prepare_ripe takes an age: the one that puts the decision's cutoff at `now`
                moved = await self._store.prepare_ripe(now, now - decision.cutoff, self.destination)
            finally:
                self.preparing = False
            if moved:
                self._on_prepared()
            return None
        if isinstance(decision, PrepareAt):
            return max(0.0, decision.at - now)
        return float("inf")
