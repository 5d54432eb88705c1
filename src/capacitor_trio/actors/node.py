"""Node actor: one per Storage node, delivering that node's queue.

Theory of operation
-------------------
Who owns what. The actor owns its node's items while it runs: it is the only task that checks
items out for this destination, records their outcomes, and applies operator commands (pause,
resume, schedule override, item actions, node edits) that arrive through its handle's inbox. The
durable facts (item states, the pause flag) live in the store; the in-memory facts that must
survive an actor restart (pause, override, restart count, last error, last delivery) live in a
`NodeState` the supervisor keeps between incarnations. The handle (and so the inbox) belongs to
the supervisor, so callers keep one handle across restarts.

The loop. A delivery task repeats `step()`: decide whether to send now or wait, with the pure
gate decision of `domain/gate.py` (paused, service paused, outside the schedule window without
override, node backing off), check a batch out of the store, hand it to a `BatchSend`
(actors/sending.py), which sends it through the `Sender` on one association per calling AE and
records each outcome, then pause `storageInterval` ms. While an association is open and answered
up, items that became eligible meanwhile are checked out and sent on it too, up to the batch
size, if the same gates (`may_continue`) still let them, so a study still arriving does not cost
an association per few images. When nothing is eligible it sleeps until the store's next
eligible time or until woken (new items, resume, override, retry...). A command task answers
the inbox concurrently, so the API is answered even while a batch is in flight.

Cancel and crash. Pause cancels the in-flight batch at once (the requestor sends A-ABORT); items
whose outcome was not reported go back to the queue (`release`). Shutdown cancels the same way.
Outcome recording is shielded with a deadline so that a cancel never leaves a reported delivery
unrecorded. If the actor crashes, the supervisor releases every item still checked out for the
node and restarts it: delivery is at-least-once, and only a batch in flight at the crash can
produce duplicates at the destination.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import random
from collections.abc import Callable, Sequence
from datetime import UTC, tzinfo
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
import trio
from trio_util import AsyncValue

from capacitor_trio.actors.handle import NodeHandle, answer
from capacitor_trio.actors.messages import (
    ApproveEdit,
    BulkCommand,
    Call,
    CommandRefused,
    Echo,
    Expire,
    GetStatus,
    ItemCommand,
    NodeStatus,
    NodeUnavailable,
    Pause,
    Resume,
    SetOverride,
    required_state,
)
from capacitor_trio.actors.prepare import NodePreparer
from capacitor_trio.actors.prepare_steps import steps_for
from capacitor_trio.actors.sending import RECORD_IDLE as RECORD_IDLE
from capacitor_trio.actors.sending import SERIES_BATCH_CAP, BatchSend
from capacitor_trio.actors.sending import TOP_UP_FEW as TOP_UP_FEW
from capacitor_trio.actors.sending import TOP_UP_GATHER as TOP_UP_GATHER
from capacitor_trio.actors.service import ServiceFlags
from capacitor_trio.actors.transcoding import ConversionStats, TranscodeContext
from capacitor_trio.audit import AuditPort
from capacitor_trio.config.models import (
    Config,
    ConfigSource,
    Node,
    config_source,
    effective,
    effective_schedule,
)
from capacitor_trio.dicom.conversion import Transcoder
from capacitor_trio.dicom.requestor import (
    EchoResult,
    MoreInstances,
    OutgoingInstance,
    Peer,
    SendOptions,
)
from capacitor_trio.domain.gate import SEND, Send, Wait, decide, next_look
from capacitor_trio.domain.instance import Destination
from capacitor_trio.domain.outcomes import Outcome
from capacitor_trio.domain.schedule import Schedule, parse_schedule, schedule_gate
from capacitor_trio.domain.states import FAILED, NEW, REJECTED
from capacitor_trio.metrics import Metrics, NodeMetrics
from capacitor_trio.store import Counts, QueuePort
from capacitor_trio.store.model import Item

log = logging.getLogger("capacitor_trio.node")

#: How long giving back a predecessor's checkouts may take when shielded from cancellation.
RELEASE_GRACE = 30.0
#: Bulk actions that may wait for a node's bulk lane; more are refused.
BULK_QUEUE = 16
#: ProcessDelay: the next look is planned from the studies of this many of the oldest waiting
#: items (a bounded query), so a quiet study behind a busier older one goes when it is quiet
STUDY_LOOKAHEAD = 100


class Sender(Protocol):
    """What a node needs from the DICOM requestor: the `capacitor_trio.dicom.requestor` module
    itself, or a scripted fake in tests."""

    async def send_batch(
        self,
        peer: Peer,
        instances: Sequence[OutgoingInstance],
        options: SendOptions,
        on_outcome: Callable[[int, Outcome], None],
        *,
        more: MoreInstances | None = None,
    ) -> None: ...

    async def echo(self, peer: Peer, calling_ae: str, *, timeout: float = 10) -> EchoResult: ...  # noqa: ASYNC109


#: The window a node's send rate is measured over (seconds).
RATE_WINDOW = 60.0
#: Most sends remembered for it (a bound, whatever the rate).
MAX_RATE_RECORDS = 4096


@attrs.define
class NodeState:
    """A node's in-memory facts, kept by the supervisor across actor restarts."""

    paused: bool = False
    override: bool = False
    restarts: int = 0
    last_error: str = ""
    last_delivered_at: float | None = None
    activity: str = "starting"
    sends_in_progress: int = 0
    consecutive_failures: int = 0
    backoff_until: float = 0.0
    #: study UID -> wall time its items were last sent (the adaptive ProcessDelay window)
    recent_studies: dict[str, float] = attrs.field(factory=dict)
    #: SOP Instance UIDs the last send handed to the requestor whose outcome it did not record
    #: (cut short by a pause, kill or shutdown): the only ones its destination may get twice
    cut_short: list[str] = attrs.field(factory=list)
    #: SOP Instance UIDs a crash or kill left in flight (released by the next incarnation, or
    #: cut short): the only ones a restart can send twice
    in_flight_at_restart: set[str] = attrs.field(factory=set)
    #: (wall time, instances delivered) of the sends within the last RATE_WINDOW seconds
    deliveries: collections.deque[tuple[float, int]] = attrs.field(factory=collections.deque)

    def record_delivered(self, now: float, count: int) -> None:
        self.last_delivered_at = now
        self.deliveries.append((now, count))
        self._forget_deliveries(now)

    def send_rate(self, now: float) -> float:
        """Instances delivered per second over the last RATE_WINDOW seconds."""
        self._forget_deliveries(now)
        return sum(n for _, n in self.deliveries) / RATE_WINDOW

    def _forget_deliveries(self, now: float) -> None:
        while self.deliveries and (self.deliveries[0][0] <= now - RATE_WINDOW or len(self.deliveries) > MAX_RATE_RECORDS):
            self.deliveries.popleft()
    #: the node's conversions into its TransferSyntax (the prepare stage's transcoding step)
    conversions: ConversionStats = attrs.field(factory=ConversionStats)


@attrs.define(eq=False)
class NodeContext:
    """What every node actor gets from the runtime. `config` is the configuration in force, read
    from its one owner on each use (a reload replaces it whole); pass a Config or a source."""

    store: QueuePort
    sender: Sender
    config_source: ConfigSource = attrs.field(converter=config_source, alias="config")
    service: ServiceFlags
    clock: Callable[[], float]
    rng: random.Random = attrs.field(factory=random.Random)
    retry_jitter: float = 0.1
    dimse_timeout: float = 60.0
    #: items whose delivery was recorded (removed from the queue), across all nodes
    delivered_count: AsyncValue[int] = attrs.field(factory=lambda: AsyncValue(0))
    #: associations sending right now, across all nodes
    sending: AsyncValue[int] = attrs.field(factory=lambda: AsyncValue(0))
    #: the router's counters (the runtime passes its own; each context has one otherwise)
    metrics: Metrics = attrs.field(factory=Metrics)
    #: the audit trail every recorded outcome batch is written to (None: none)
    audit: AuditPort | None = None
    #: the router's transcode worker processes (prepared copies in a node's TransferSyntax);
    #: None: this router converts nothing ahead (tests; delivery still converts on the way out)
    transcoder: Transcoder | None = None
    #: an add_destination's AE title -> the Storage node it names, None if none (the runtime
    #: asks the supervisor; tests take any AE title as a node)
    resolve_destination: Callable[[str], Destination | None] = Destination
    #: a prepare stage added items for these destinations (add_destination): their prepare
    #: stages look (the runtime tells the supervisor)
    items_added: Callable[[Sequence[Destination]], None] = lambda _d: None

    @property
    def config(self) -> Config:
        return self.config_source()

    @property
    def tz(self) -> tzinfo:
        """The zone schedules are read in: `timeZone`, else the system's."""
        return ZoneInfo(self.config.time_zone) if self.config.time_zone else system_time_zone()


class NodeActor:
    def __init__(self, handle: NodeHandle, state: NodeState, ctx: NodeContext) -> None:
        self.handle = handle
        self.state = state
        self.ctx = ctx
        self._batch: BatchSend | None = None
        #: bulk actions waiting for their lane (`_queue_bulk`)
        self._bulk, self._bulk_calls = trio.open_memory_channel[Call](BULK_QUEUE)
        #: this node's prepare stage (new -> prepared), run in the actor's nursery
        self.preparer = NodePreparer(
            handle.destination, ctx.store, lambda: ctx.config, ctx.service, ctx.clock, handle.wake,
            steps=lambda: steps_for(self.node, ctx.config, self._transcoding(), ctx.clock),
            resolve=lambda ae: ctx.resolve_destination(ae),
            on_added=lambda dests: ctx.items_added(dests),
            audit=ctx.audit,
        )

    # ---- derived settings (re-read each time: a node edit or a reload replaces them) ---------

    def _transcoding(self) -> TranscodeContext | None:
        """What the node's transcoding step needs; None without a transcode pool (tests)."""
        transcoder = self.ctx.transcoder
        if transcoder is None:
            return None
        return TranscodeContext(transcoder, self.ctx.config.cache_path / "transcode", self.state.conversions)

    @property
    def node(self) -> Node:
        return self.handle.node

    @property
    def metrics(self) -> NodeMetrics:
        """This node's series in the router's counters."""
        dest = self.handle.destination
        return self.ctx.metrics.node(dest.ae_title, dest.role)

    def _schedule_gate(self, now: float) -> tuple[bool, float | None]:
        return node_schedule_gate(self.node, self.ctx, now)

    # ---- the actor ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._release_predecessors_checkouts()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.preparer.run)
            self.handle.preparer = self.preparer
            nursery.start_soon(self._deliver_forever)
            nursery.start_soon(self._bulk_lane)
            task_status.started()  # serving: the supervisor marks the handle running
            async for call in self.handle.inbox:
                await self._on_call(call, nursery)

    async def _release_predecessors_checkouts(self) -> None:
        """What an incarnation before this one had checked out when it crashed or was killed
        goes back to the queue (the actor owns its items, checkouts included)."""
        released: list[str] = []
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_GRACE):
            released = await self.ctx.store.release_all_checked_out(self.handle.destination)
        if released:
            log.info("node %s: %d checked-out item(s) back to the queue", self.node.ae_title, len(released))
            self.state.in_flight_at_restart.update(released)

    async def _on_call(self, call: Call, nursery: trio.Nursery) -> None:
        cmd = call.command
        try:
            if isinstance(cmd, GetStatus):
                answer(call, await self.status())
            elif isinstance(cmd, Pause):
                await self._set_paused(True)
                answer(call, await self.status())
            elif isinstance(cmd, Resume):
                await self._set_paused(False)
                answer(call, await self.status())
            elif isinstance(cmd, SetOverride):
                self.state.override = cmd.on
                log.info("node %s: schedule override %s", self.node.ae_title, "on" if cmd.on else "off")
                self.handle.wake()
                answer(call, await self.status())
            elif isinstance(cmd, Echo):
                nursery.start_soon(self._echo, call, cmd)
            elif isinstance(cmd, ApproveEdit):
                await self._approve_edit(cmd.node)
                answer(call, await self.status())
            elif isinstance(cmd, ItemCommand):
                answer(call, await self._item_command(cmd))
            elif isinstance(cmd, BulkCommand | Expire):
                self._queue_bulk(call)
            else:
                answer(call, error=CommandRefused(f"unknown command {type(cmd).__name__}"))
        except Exception as exc:  # the caller gets the error; the actor carries on
            answer(call, error=exc)
        except BaseException:  # killed or stopped while at it: the caller must not wait it out
            answer(call, error=self._stopped())
            raise

    def _queue_bulk(self, call: Call) -> None:
        """A bulk action can take long (one statement over 100,000 items): it runs in its own
        lane, one at a time in arrival order, so a Pause or an echo is not held up behind it."""
        try:
            self._bulk.send_nowait(call)
        except trio.WouldBlock:
            answer(call, error=CommandRefused(f"node {self.node.ae_title}: too many bulk actions waiting"))

    async def _bulk_lane(self) -> None:
        try:
            async for call in self._bulk_calls:
                await self._run_bulk(call)
        finally:  # killed or stopped: the bulk actions still waiting are refused, not left hanging
            while True:
                try:
                    answer(self._bulk_calls.receive_nowait(), error=self._stopped())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break

    async def _run_bulk(self, call: Call) -> None:
        cmd = call.command
        try:
            if isinstance(cmd, Expire):
                answer(call, await self._expire(cmd))
            elif isinstance(cmd, BulkCommand):
                answer(call, await self._bulk_command(cmd))
        except Exception as exc:  # the caller gets the error; the lane carries on
            answer(call, error=exc)
        except BaseException:  # killed or stopped while at it
            answer(call, error=self._stopped())
            raise

    def _stopped(self) -> NodeUnavailable:
        """The answer to a call the actor was handling when it crashed or was stopped (an answer
        already sent wins: the reply channel holds one)."""
        return NodeUnavailable(f"node {self.node.ae_title} is restarting")

    async def status(self) -> NodeStatus:
        counts = await self.ctx.store.counts(self.handle.destination)
        return self.snapshot(counts)

    def snapshot(self, counts: Any = None) -> NodeStatus:
        return make_status(self.handle, self.state, self.ctx, counts)

    async def _set_paused(self, paused: bool) -> None:
        if self.state.paused == paused:
            return
        self.state.paused = paused
        if paused and self._batch is not None:
            # pause means stop now: A-ABORT, items back to the queue; before the flag's write,
            # which may wait behind a busy store
            self._batch.cancel()
        await self.ctx.store.set_paused(self.handle.destination, paused)
        log.info("node %s %s", self.node.ae_title, "paused" if paused else "resumed")
        self.handle.wake()

    async def _echo(self, call: Call, cmd: Echo) -> None:
        peer = Peer(self.node.ae_title, self.node.host_name, self.node.port)
        try:
            result = await self.ctx.sender.echo(peer, self.ctx.config.my_ae_title, timeout=cmd.timeout)
        except Exception as exc:
            answer(call, error=exc)
        except BaseException:
            answer(call, error=self._stopped())
            raise
        else:
            answer(call, result)

    async def _approve_edit(self, node: Node) -> None:
        if (node.ae_title, node.role) != (self.node.ae_title, self.node.role):
            raise CommandRefused("a node edit cannot change its AE title or role")
        if not self.state.paused:
            raise CommandRefused(f"node {self.node.ae_title} must be paused before it is edited")
        counts = await self.ctx.store.counts(self.handle.destination)
        if counts.checked_out:
            raise CommandRefused(
                f"node {self.node.ae_title} still has {counts.checked_out} item(s) checked out"
            )

    async def _item_command(self, cmd: ItemCommand) -> Item | None:
        store = self.ctx.store
        result: Item | None
        if cmd.action == "delete":
            await store.delete(cmd.item_id)
            result = None
        elif cmd.action == "retry":
            result = await store.retry(cmd.item_id)
        elif cmd.action in ("fail", "reject", "move"):
            target = {"fail": FAILED, "reject": REJECTED}.get(cmd.action, cmd.target_state)
            result = await store.move(cmd.item_id, required_state(target, cmd.action))
        else:
            raise CommandRefused(f"unknown item action {cmd.action}")
        self._after_operator_change(cmd.action == "retry" or _is_new(cmd.target_state))
        return result

    async def _bulk_command(self, cmd: BulkCommand) -> int:
        store = self.ctx.store
        f = attrs.evolve(cmd.filter, destination=self.node.ae_title, role=self.node.role)
        if cmd.action == "move":
            n = await store.move_where(f, required_state(cmd.target_state, cmd.action))
        elif cmd.action == "retry":
            n = await store.retry_where(f, required_state(cmd.from_state, cmd.action))
        elif cmd.action == "delete":
            n = await store.delete_where(f)
        else:
            raise CommandRefused(f"unknown bulk action {cmd.action}")
        self._after_operator_change(cmd.action == "retry" or _is_new(cmd.target_state))
        return int(n)

    async def _expire(self, cmd: Expire) -> int:
        moved = await self.ctx.store.expire(self.ctx.clock(), cmd.threshold_seconds, self.handle.destination)
        if moved:
            log.warning(
                "node %s: %d item(s) older than expiryThreshold (%d s) moved to expired",
                self.node.ae_title, moved, cmd.threshold_seconds,
            )
        return int(moved)

    def _after_operator_change(self, to_new: bool) -> None:
        """Items may be deliverable now; items back in `new` need the prepare stage first."""
        if to_new:
            self.preparer.wake()
        self.handle.wake()

    # ---- delivery ----------------------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        while True:
            self.handle.clear_wake()
            wake_at = await self.step()
            if wake_at is None:
                await self.handle.wait_woken()
                continue
            delay = wake_at - self.ctx.clock()
            if delay > 0:
                with trio.move_on_after(delay):
                    await self.handle.wait_woken()
            else:
                await trio.lowlevel.checkpoint()

    async def step(self) -> float | None:
        """One decision and, if the gates are open, one batch. Returns when to look again
        (a wall-clock time), or None to wait until woken."""
        ctx, state = self.ctx, self.state
        now = ctx.clock()
        in_window, next_change = self._schedule_gate(now)
        gate = self._gate(now, in_window, next_change)
        if isinstance(gate, Wait):
            state.activity = gate.activity
            return gate.until
        items = await self.checkout(now)
        if items and (state.paused or not ctx.service.storage_scu):
            # paused while the checkout was in progress: do not start this batch
            await ctx.store.release([i.id for i in items])
            return ctx.clock()
        if not items:
            state.activity = "idle"
            return await self._next_look(now, next_change)
        self._batch = BatchSend(self)
        try:
            await self._batch.run(items)
        finally:
            self._batch = None
        # storageInterval: a pause between batches that new arrivals do not cut short
        await trio.sleep(ctx.config.storage_interval / 1000)
        return ctx.clock()

    def _gate(self, now: float, in_window: bool, next_change: float | None) -> Send | Wait:
        state = self.state
        return decide(
            now=now, paused=state.paused, service_on=self.ctx.service.storage_scu, override=state.override,
            in_window=in_window, next_window_change=next_change, backoff_until=state.backoff_until,
        )

    def may_continue(self) -> bool:
        """May an open association take more items (the gates `step` checks)?"""
        now = self.ctx.clock()
        # with the override the window does not count: not worked out (asked once per top-up)
        window = (True, None) if self.state.override else self._schedule_gate(now)
        return self._gate(now, *window) is SEND

    async def checkout(
        self, now: float, *, limit: int | None = None, series_uid: str | None = None
    ) -> list[Any]:
        eff = effective(self.node, self.ctx.config)
        delay = eff.process_delay_ms / 1000
        window = delay * self.ctx.config.process_delay_window_multiplier
        recent = self.state.recent_studies
        for study, at in list(recent.items()):
            if at < now - max(window, 0):
                del recent[study]
        extra: dict[str, Any] = {} if series_uid is None else {"series_uid": series_uid}
        return list(
            await self.ctx.store.checkout_batch(
                self.handle.destination,
                now=now,
                limit=limit if limit is not None else eff.batch_size or SERIES_BATCH_CAP,
                by_series=eff.batch_size == 0,
                sop_class_priorities=self.node.sop_class_priorities,
                study_quiet_before=now - delay if delay > 0 else None,
                exempt_studies=frozenset(recent) if window > 0 else frozenset(),
                **extra,
            )
        )

    async def _next_look(self, now: float, next_change: float | None) -> float | None:
        wake_at = await self.ctx.store.next_eligible_at(self.handle.destination, now)
        delay = effective(self.node, self.ctx.config).process_delay_ms / 1000
        if wake_at is not None and wake_at <= now and delay > 0:
            # something is eligible but held back by ProcessDelay: wake when its study is quiet
            wake_at = await self._study_quiet_at(now, delay)
        return next_look(wake_at, next_change, override=self.state.override)

    async def _study_quiet_at(self, now: float, delay: float) -> float:
        """When the first of the waiting studies will have been quiet for `delay` seconds (the
        studies of the oldest STUDY_LOOKAHEAD waiting items)."""
        last = await self.ctx.store.first_quiet_arrival(self.handle.destination, STUDY_LOOKAHEAD)
        return now + delay if last is None else max(now, last + delay)

    def calling_ae(self, item: Any) -> str:
        if self.node.impersonate and item.source_ae:
            return str(item.source_ae)
        return self.ctx.config.my_ae_title

@functools.lru_cache(maxsize=64)
def _parsed_schedule(windows: tuple[str, ...]) -> Schedule:
    return parse_schedule(windows)



def _is_new(state: object) -> bool:
    return str(state or "").strip().lower() == NEW


def node_schedule_gate(node: Node, ctx: NodeContext, now: float) -> tuple[bool, float | None]:
    """(inside a window of the node's schedule now, when that next changes: None if never)."""
    windows = effective_schedule(node, ctx.config)
    if not windows:  # always open (asked once per image on a streaming association)
        return True, None
    return schedule_gate(_parsed_schedule(windows), ctx.tz, now)


def make_status(
    handle: NodeHandle, state: NodeState, ctx: NodeContext, counts: Counts | None = None
) -> NodeStatus:
    """The node's status now; `in_window` is worked out here, not kept: a paused node, or one
    in a long batch, does not look at its schedule meanwhile."""
    queue = counts if counts is not None else Counts()
    status = handle.status.value
    return NodeStatus(
        ae_title=handle.node.ae_title,
        role=handle.node.role,
        status=status,
        activity=state.activity if status == "running" else status,
        paused=state.paused,
        schedule_override=state.override,
        in_window=node_schedule_gate(handle.node, ctx, ctx.clock())[0],
        last_error=state.last_error,
        last_delivered_at=state.last_delivered_at,
        send_rate=state.send_rate(ctx.clock()),
        restarts=state.restarts,
        queue=queue,
        sends_in_progress=state.sends_in_progress,
    )


@functools.cache
def system_time_zone() -> tzinfo:
    """The system's time zone with its DST rules (a fixed UTC offset would be wrong after the
    next DST change): $TZ, else /etc/localtime, else UTC."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        with contextlib.suppress(ValueError, ZoneInfoNotFoundError):
            return ZoneInfo(name)
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        log.warning("no system time zone found (/etc/localtime); schedules use UTC")
        return UTC

