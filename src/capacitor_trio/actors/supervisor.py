"""Supervisor: starts one actor per Storage node and restarts a crashed one (one-for-one).

Theory of operation
-------------------
Who owns what. The supervisor owns every node's handle (so its inbox and wake-up) and its
`NodeState`, and keeps them across actor incarnations: a caller's handle keeps working after a
restart, the pause flag and the schedule override survive an actor restart (the pause flag is
also persisted in the store and so survives a process restart; the override does not). It is
the only writer of a handle's `status`, an AsyncValue others wait on ("running" once an actor
serves).

Crash. When an actor raises, the supervisor marks the handle "restarting" (commands are refused
at once with NodeUnavailable, never left hanging), answers any command already queued with the
same refusal, and restarts the actor after an exponential delay; the new incarnation gives back
what its predecessor had checked out before it serves (the actor owns its items). More than
`max_restarts` crashes within `window_seconds` marks the node "failed" (reported in the API and
the log) until an explicit `restart()`; no incarnation runs then, so the supervisor gives its
checkouts back itself, as it does for a node a reload removes.

Chaos. With `chaos.killNodeActorsEverySeconds` set, a chaos task cancels a random running actor
roughly that often, at whatever point it has reached; the supervisor treats it as a crash but
restarts at once without counting it against the intensity limit. Only the soak tests use it.

Cancel. Cancelling the supervisor cancels every actor; each actor releases what it had checked
out on the way down (shielded, with a deadline), and the store recovers anything left on the
next start.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import attrs
import trio
from trio_util import RepeatedEvent

from capacitor_trio.actors.handle import NodeHandle, answer
from capacitor_trio.actors.messages import NodeStatus, NodeUnavailable
from capacitor_trio.actors.node import NodeActor, NodeContext, NodeState, make_status
from capacitor_trio.config.models import Node
from capacitor_trio.domain.instance import Destination
from capacitor_trio.domain.restart import GiveUp, RestartPolicy, RestartTracker
from capacitor_trio.store import Counts

log = logging.getLogger("capacitor_trio.supervisor")

DEFAULT_RESTART_POLICY = RestartPolicy(max_restarts=5, window_seconds=60.0, base_delay=0.5, max_delay=30.0)


class ChaosKill(Exception):
    """Injected by the chaos hook: the actor is treated as crashed."""


@attrs.define(eq=False)
class _Slot:
    handle: NodeHandle
    state: NodeState
    tracker: RestartTracker
    scope: trio.CancelScope | None = None
    #: cancels the whole supervision of this node (a node removed by a reload)
    outer: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    stopped: trio.Event = attrs.field(factory=trio.Event)
    killed: bool = False
    restart_requested: RepeatedEvent = attrs.field(factory=RepeatedEvent)


@attrs.define(eq=False)
class _Serving:
    """An actor's task status: once it serves, its handle is "running"."""

    handle: NodeHandle
    outer: trio.TaskStatus[None]

    def started(self, value: None = None) -> None:
        self.handle.status.value = "running"
        self.outer.started()


class Supervisor:
    """`nodes`: the node set in force, or how to read it (the runtime passes `Router.in_force`'s
    nodes, the one owner of node settings: handles look their node up there on each use)."""

    def __init__(
        self,
        nodes: Sequence[Node] | Callable[[], Sequence[Node]],
        ctx: NodeContext,
        *,
        policy: RestartPolicy = DEFAULT_RESTART_POLICY,
        chaos_every: float = 0.0,
        chaos_rng: random.Random | None = None,
    ) -> None:
        self.ctx = ctx
        self.policy = policy
        self.chaos_every = chaos_every
        self.chaos_kills = 0
        self._chaos_rng = chaos_rng or random.Random()
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._nursery: trio.Nursery | None = None
        fixed = tuple(nodes) if not callable(nodes) else ()
        self._in_force: Callable[[], Sequence[Node]] = nodes if callable(nodes) else (lambda: fixed)
        self._by_key: dict[tuple[str, str], Node] = {}
        self._by_key_of: Sequence[Node] | None = None
        for node in self._in_force():
            if node.role == "Storage":
                self._slots[node.key] = self._new_slot(node)

    def _new_slot(self, node: Node) -> _Slot:
        return _Slot(NodeHandle(node, self._node_in_force), NodeState(), RestartTracker(self.policy))

    def _node_in_force(self, key: tuple[str, str]) -> Node | None:
        """A node's settings in force (the index is rebuilt when the node set is replaced)."""
        nodes = self._in_force()
        if nodes is not self._by_key_of:
            self._by_key = {node.key: node for node in nodes}
            self._by_key_of = nodes
        return self._by_key.get(key)

    # ---- lookup ------------------------------------------------------------------------------

    @property
    def handles(self) -> list[NodeHandle]:
        return [slot.handle for slot in self._slots.values()]

    def handle(self, ae_title: str, role: str = "Storage") -> NodeHandle | None:
        slot = self._slots.get((ae_title, role))
        return slot.handle if slot else None

    @property
    def chaos_in_flight(self) -> set[str]:
        """SOP Instance UIDs a node had in flight when it crashed or chaos killed it: the only
        instances a destination may receive twice (a soak test checks that)."""
        return set().union(*(slot.state.in_flight_at_restart for slot in self._slots.values()))

    def wake_all(self) -> None:
        for slot in self._slots.values():
            slot.handle.wake()

    def storage_destination(self, ae_title: str) -> Destination | None:
        """The Storage node an add_destination's AE title names (exactly, blanks stripped), or
        None if no node with an actor has that title."""
        key = (ae_title.strip(), "Storage")
        return Destination(*key) if key in self._slots else None

    def items_arrived(self, destinations: Sequence[Destination]) -> None:
        """New items were committed `new` for these destinations: their prepare stages look."""
        for d in destinations:
            slot = self._slots.get((d.ae_title, d.role))
            if slot is not None:
                slot.handle.items_arrived()

    def conversions(self) -> dict[str, dict[str, float | int]]:
        """Each Storage node's conversions into its TransferSyntax since the router started
        (its prepare stage's counts, kept across actor restarts), by AE title."""
        return {key[0]: slot.state.conversions.as_json() for key, slot in self._slots.items()}

    def snapshot(self, handle: NodeHandle, counts: Counts | None = None) -> NodeStatus:
        """A status snapshot that does not need the actor (works while it restarts)."""
        return make_status(handle, self._slots[handle.key].state, self.ctx, counts)

    def restart(self, handle: NodeHandle) -> bool:
        """Operator restart of a failed node. Returns False if the node was not failed."""
        slot = self._slots[handle.key]
        if handle.status.value != "failed":
            return False
        slot.restart_requested.set()
        return True

    # ---- node set changes (a configuration reload) --------------------------------------------

    async def add(self, node: Node) -> NodeHandle:
        """Start supervising a new Storage node; returns once its actor serves."""
        assert self._nursery is not None, "the supervisor is not running"
        slot = self._new_slot(node)
        slot.state.paused = node.key in await self.ctx.store.get_paused()
        self._slots[node.key] = slot
        await self._nursery.start(self._supervise, slot)
        return slot.handle

    async def remove(self, key: tuple[str, str]) -> None:
        """Stop a node's actor, give back what it had checked out, and forget the node."""
        slot = self._slots.pop(key)
        slot.outer.cancel(reason="node removed from nodes.yml")
        await slot.stopped.wait()
        self._refuse_queued(slot.handle)
        await self._release(slot)

    async def _release(self, slot: _Slot) -> None:
        """Give back what a node had checked out when no actor of it will run (removed, failed)."""
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            released = await self.ctx.store.release_all_checked_out(slot.handle.destination)
            if released:
                log.info("node %s: %d checked-out item(s) back to the queue", slot.handle.ae_title, len(released))

    def settings_changed(self, key: tuple[str, str]) -> None:
        """A running node's settings in force were replaced (an edit, a reload): its actor and
        prepare stage look again, and use them from their next batch."""
        handle = self._slots[key].handle
        handle.wake()
        handle.wake_preparer()

    # ---- running -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Supervisor] = trio.TASK_STATUS_IGNORED) -> None:
        paused = await self.ctx.store.get_paused()
        for key, slot in self._slots.items():
            slot.state.paused = key in paused
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._wake_on_service_change)
            for slot in self._slots.values():
                await nursery.start(self._supervise, slot)
            if self.chaos_every > 0:
                log.warning(
                    "CHAOS is ON: a random node actor is killed about every %g s (chaos.killNodeActorsEverySeconds)",
                    self.chaos_every,
                )
                nursery.start_soon(self._chaos)
            task_status.started(self)
            await trio.sleep_forever()  # open for nodes a reload adds, even with none yet

    async def _wake_on_service_change(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A change of the service flags (pause-all, resume-all): every node looks again."""
        task_status.started()
        async for _ in self.ctx.service.flags.transitions():
            self.wake_all()
            for slot in self._slots.values():
                slot.handle.wake_preparer()

    async def _supervise(self, slot: _Slot, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with slot.outer:
                await self._supervise_until_cancelled(slot, task_status)
        finally:
            slot.handle.status.value = "stopped"
            slot.stopped.set()

    async def _supervise_until_cancelled(self, slot: _Slot, task_status: trio.TaskStatus[None]) -> None:
        handle = slot.handle
        first = True
        while True:
            slot.killed = False
            error: BaseException | None = None
            try:
                with trio.CancelScope() as slot.scope:
                    outer = task_status if first else trio.TASK_STATUS_IGNORED
                    await NodeActor(handle, slot.state, self.ctx).run(task_status=_Serving(handle, outer))
                error = ChaosKill("killed by chaos") if slot.killed else RuntimeError("actor returned")
            except Exception as exc:
                error = exc
            finally:
                slot.scope = None
                if error is None:  # cancelled from outside: shutting down
                    handle.status.value = "stopped"
            first = False
            await self._after_crash(slot, error)

    async def _after_crash(self, slot: _Slot, error: BaseException) -> None:
        handle = slot.handle
        handle.status.value = "restarting"
        chaos = isinstance(error, ChaosKill)
        if chaos:
            log.info("node %s: actor killed by chaos; restarting", handle.ae_title)
        else:
            log.error("node %s: actor crashed: %r", handle.ae_title, error, exc_info=error)
            slot.state.last_error = f"actor crashed: {error!r}"
        self._refuse_queued(handle)
        # what it had checked out the next incarnation gives back as it starts
        slot.state.in_flight_at_restart.update(slot.state.cut_short)
        slot.state.cut_short = []
        slot.state.sends_in_progress = 0
        if chaos:
            slot.state.restarts += 1
            await trio.lowlevel.checkpoint()
            return
        slot.tracker, decision = slot.tracker.record_crash(trio.current_time())  # monotonic: a clock step cannot change it
        if isinstance(decision, GiveUp):
            handle.status.value = "failed"
            log.error(
                "node %s: %d crashes within %g s; node marked failed until restarted",
                handle.ae_title, len(slot.tracker.crashes), self.policy.window_seconds,
            )
            await self._release(slot)  # no incarnation will until the operator restarts it
            await slot.restart_requested.wait()
            slot.tracker = slot.tracker.reset()
            handle.status.value = "restarting"
            log.info("node %s: restarted by the operator", handle.ae_title)
        else:
            await trio.sleep(decision.delay)
        slot.state.restarts += 1  # counted as it happens: a failed node shows the ones it had

    def _refuse_queued(self, handle: NodeHandle) -> None:
        while True:
            try:
                call = handle.inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            answer(call, error=NodeUnavailable(f"node {handle.ae_title} is restarting"))

    async def _chaos(self) -> None:
        rng = self._chaos_rng
        while True:
            await trio.sleep(self.chaos_every * rng.uniform(0.5, 1.5))
            running = [s for s in self._slots.values() if s.handle.status.value == "running" and s.scope]
            if not running:
                continue
            victim = rng.choice(running)
            victim.killed = True
            self.chaos_kills += 1
            assert victim.scope is not None
            victim.scope.cancel()
