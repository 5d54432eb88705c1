"""One send of a node's checked-out batch: associations, top-ups, outcome records.

A node actor (actors/node.py) hands each batch it checked out to a `BatchSend`, which sends it
through the actor's `Sender`, one association per calling AE, and records each outcome
(Delivered: removed; RetryLater: failed with the next attempt time from the backoff, and the whole
node backs off; Rejected: rejected).

While an association is open and everything sent on it has been answered, the requestor asks for
more (`_more`): outcomes are recorded in one store job every RECORD_EVERY items and whenever
nothing new is ready to send within RECORD_IDLE, and items that became eligible meanwhile are
checked out and sent on the same association, up to the batch size (BatchSize, or one series
capped at SERIES_BATCH_CAP when it is 0). If none is eligible, it waits up to TOP_UP_LINGER for
new arrivals before releasing. So a destination fed while a modality is still sending gets one
association per batch rather than one per handful of images. A top-up that follows one of fewer
than TOP_UP_FEW items first waits TOP_UP_GATHER, so that a destination keeping pace with the
arrivals costs a checkout per few images rather than per image.

Cancel. `cancel()` (a pause) aborts the open association at once (the requestor sends A-ABORT).
Outcomes reported so far are recorded, shielded with a deadline, so a cancel never leaves a
reported delivery unrecorded; items whose outcome was not recorded go back to the queue.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import attrs
import trio

from capacitor_trio.audit import Delivery
from capacitor_trio.config.models import effective
from capacitor_trio.dicom.requestor import OutgoingInstance, Peer, SendOptions
from capacitor_trio.domain.backoff import next_attempt, retry_delay
from capacitor_trio.domain.outcomes import Delivered, Outcome, Rejected, RetryLater, send_conversion
from capacitor_trio.logs import instance_identity

if TYPE_CHECKING:
    from capacitor_trio.actors.node import NodeActor

log = logging.getLogger("capacitor_trio.node")

#: Largest batch when BatchSize is 0 ("one series per association").
SERIES_BATCH_CAP = 1000
#: How long recording a batch's outcomes may take when shielded from cancellation.
RECORD_GRACE = 30.0
#: How long an open association waits for new items once everything sent has been answered.
TOP_UP_LINGER = 0.1
#: While items keep coming, outcomes are recorded every this many (one store job, one WAL
#: fsync); they are always recorded before the association waits longer than RECORD_IDLE for
#: new items (TOP_UP_GATHER + RECORD_IDLE after a gathering top-up), or ends.
RECORD_EVERY = 64
#: How long an open association waits for the next arrival before recording the outcomes so far.
RECORD_IDLE = 0.01
#: When a top-up brought fewer than TOP_UP_FEW items (the destination takes images as fast as
#: they arrive), the next one first lets arrivals gather for TOP_UP_GATHER: one checkout, a
#: store job between the commits of the receiving associations, then serves several images, not
#: each one (docs/performance.md).
TOP_UP_FEW = 32
TOP_UP_GATHER = 0.02


@attrs.define(eq=False)
class _Association:
    """One association of a send: the items handed to the requestor on it (growing with its
    top-ups) and the outcomes reported for them and not recorded yet (by index in `items`)."""

    calling_ae: str
    items: list[Any]
    #: BatchSize 0: the series the top-ups come from
    series: str | None
    #: may take more items (false once a top-up brought items for another calling AE)
    top_up: bool
    #: the last top-up brought fewer than TOP_UP_FEW items: let arrivals gather before the next
    few: bool = False
    outcomes: dict[int, Outcome] = attrs.field(factory=dict)
    #: why the association failed, from the first outcome that names a kind ("": it did not)
    error_kind: str = ""

    def on_outcome(self, index: int, outcome: Outcome) -> None:
        self.outcomes[index] = outcome
        kind = getattr(outcome, "kind", "")
        if kind and not self.error_kind:
            self.error_kind = kind


@attrs.define(eq=False)
class BatchSend:
    """One send of a checked-out batch for `actor`'s node."""

    actor: NodeActor
    #: checked out by this send, outcome not recorded yet: released at the end
    pending: dict[int, Any] = attrs.field(factory=dict)
    #: the associations handed to the requestor
    started: list[_Association] = attrs.field(factory=list)
    #: the open association's scope (`cancel` aborts it)
    scope: trio.CancelScope | None = None
    #: most items one association carries
    cap: int = SERIES_BATCH_CAP

    def cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    async def run(self, items: list[Any]) -> None:
        """Send `items`, one association per calling AE; release what was not recorded."""
        actor = self.actor
        node, state, eff = actor.node, actor.state, effective(actor.node, actor.ctx.config)
        peer = Peer(node.ae_title, node.host_name, node.port)
        self.cap = eff.batch_size or SERIES_BATCH_CAP
        # the bytes of small instances (kept in the index) go to the requestor only; what this
        # send keeps for its outcomes does not hold them for the whole association
        outgoing = {i.id: _outgoing(i) for i in items}
        items = [i.without_data() for i in items]
        groups: dict[str, list[Any]] = {}
        for item in items:
            groups.setdefault(actor.calling_ae(item), []).append(item)
        self.pending = {i.id: i for i in items}
        state.activity = "sending"
        state.sends_in_progress += 1
        actor.ctx.sending.value += 1
        try:
            for calling_ae, group in groups.items():
                if state.paused:
                    break
                series = group[0].series_instance_uid if eff.batch_size == 0 else None
                assoc = _Association(calling_ae, group, series, top_up=len(groups) == 1)
                self.started.append(assoc)
                instances = [outgoing.pop(i.id) for i in group]
                await self._associate(peer, self._options(calling_ae, eff), assoc, instances)
        finally:
            state.sends_in_progress -= 1
            actor.ctx.sending.value -= 1
            # sent and not answered (or its answer not recorded): may reach the destination twice
            state.cut_short = [
                i.sop_instance_uid for a in self.started for i in a.items if i.id in self.pending
            ]
            if self.pending:
                with trio.CancelScope(shield=True), trio.move_on_after(RECORD_GRACE):
                    await actor.ctx.store.release(list(self.pending))

    def _options(self, calling_ae: str, eff: Any) -> SendOptions:
        config = self.actor.ctx.config
        return SendOptions(
            calling_ae=calling_ae,
            priority=self.actor.node.priority,
            connect_timeout=float(config.connect_timeout_seconds or 75),
            dimse_timeout=self.actor.ctx.dimse_timeout,
            stall_threshold=float(eff.stall_threshold),
            minimum_line_speed_kbps=float(eff.minimum_line_speed),
            max_pdu_size=config.max_pdu_size,
            scratch_dir=str(config.cache_path / "outgoing"),
        )

    async def _associate(
        self, peer: Peer, options: SendOptions, assoc: _Association, instances: list[OutgoingInstance]
    ) -> None:
        """One association: the requestor sends, `_more` tops it up; the outcomes that came
        back are recorded at the end, even when cancelled (shielded, with a deadline). Its
        duration and, when it failed, its error kind are counted in the metrics."""
        started = trio.current_time()
        try:
            with trio.CancelScope() as self.scope:
                await self.actor.ctx.sender.send_batch(
                    peer, instances, options, assoc.on_outcome,
                    more=functools.partial(self._more, assoc),
                )
        finally:
            self.scope = None
            counters = self.actor.metrics
            counters.send_seconds.observe(trio.current_time() - started)
            if assoc.error_kind:
                counters.association_error(assoc.error_kind)
            with trio.CancelScope(shield=True), trio.move_on_after(RECORD_GRACE):
                await self._flush(assoc)

    async def _flush(self, assoc: _Association) -> None:
        """Record the association's outcomes so far in one store job."""
        if not assoc.outcomes:
            return
        batch = [(assoc.items[i], o) for i, o in sorted(assoc.outcomes.items())]
        assoc.outcomes.clear()
        await self._record(batch)
        for item, _ in batch:
            self.pending.pop(item.id, None)

    async def _more(self, assoc: _Association) -> list[OutgoingInstance]:
        """The requestor's `more()`: the next instances for an open association, or none."""
        actor = self.actor
        if len(assoc.outcomes) >= RECORD_EVERY:
            await self._flush(assoc)
        room = self.cap - len(assoc.items)
        if not assoc.top_up or room <= 0 or not actor.may_continue():
            return []
        if assoc.few:  # let arrivals gather (nothing is checked out while this waits)
            await trio.sleep(TOP_UP_GATHER)
            if not actor.may_continue():
                return []
        extra = await self._top_up_checkout(assoc, room)
        if not extra:
            return []
        for item in extra:
            self.pending[item.id] = item.without_data()
        fit = [i for i in extra if actor.calling_ae(i) == assoc.calling_ae]
        assoc.top_up = len(fit) == len(extra)  # the others need another association
        assoc.few = len(extra) < TOP_UP_FEW
        assoc.items.extend(self.pending[i.id] for i in fit)
        return [_outgoing(i) for i in fit]

    async def _top_up_checkout(self, assoc: _Association, room: int) -> list[Any]:
        """Up to `room` items eligible now, else the first that become eligible within
        TOP_UP_LINGER; none when the linger ends or a gate closes. A modality still sending has
        its next image here within milliseconds, so the outcomes so far are recorded only when
        nothing comes within RECORD_IDLE (one record per many images, not one per image)."""
        actor, handle = self.actor, self.actor.handle
        deadline = trio.current_time() + TOP_UP_LINGER
        while True:
            handle.clear_wake()
            extra = await actor.checkout(actor.ctx.clock(), limit=room, series_uid=assoc.series)
            if extra:
                return extra
            if assoc.outcomes:
                idle_at = min(deadline, trio.current_time() + RECORD_IDLE)
                with trio.move_on_at(idle_at) as idle:
                    await handle.wait_woken()
                if not idle.cancelled_caught and actor.may_continue():
                    continue
                await self._flush(assoc)  # record before waiting longer
            with trio.move_on_at(deadline):
                await handle.wait_woken()
            if trio.current_time() >= deadline or not actor.may_continue():
                return []

    async def _record(self, batch: list[tuple[Any, Outcome]]) -> None:
        """Record (item, outcome) pairs in one store job and update the node's state."""
        ctx, state, node = self.actor.ctx, self.actor.state, self.actor.node
        now = ctx.clock()
        delivered = [item for item, o in batch if isinstance(o, Delivered)]
        failed, rejected = self._tally(batch, now)
        # losing these records in a power cut only repeats deliveries (at least once), unless a
        # spool file is removed with them: records of small instances kept in the index (no
        # file) skip their own WAL fsync; the next durable commit covers them
        durable = not all(getattr(i, "inline", False) for i, _ in batch)
        await ctx.store.record_outcomes(
            delivered=[i.id for i in delivered], failed=failed, rejected=rejected, durable=durable
        )
        if ctx.audit is not None:
            await ctx.audit.record(_delivery(self.actor, batch))
        if delivered:
            self._note_delivered(delivered, now)
        # an association refused for good: with Impersonate it names the source modality, which
        # the destination may not know while it knows the others, so the node goes on
        refused = not node.impersonate and any(isinstance(o, Rejected) and o.association for _, o in batch)
        if (failed or refused) and not delivered:
            # the destination is unreachable, out of resources, or refuses to talk to us at all
            # (its items are rejected, one batch per backoff): the whole node backs off
            state.consecutive_failures += 1
            state.backoff_until = now + retry_delay(
                state.consecutive_failures, base=ctx.config.retry_delay_seconds,
                cap=ctx.config.retry_max_delay_seconds, jitter=ctx.retry_jitter, rng=ctx.rng,
            )
            log.warning(
                "node %s: delivery failed (%s); node backs off for %.0f s",
                node.ae_title, state.last_error, state.backoff_until - now,
            )
        elif delivered:
            log.info("node %s: delivered %d instance(s)", node.ae_title, len(delivered))

    def _tally(
        self, batch: list[tuple[Any, Outcome]], now: float
    ) -> tuple[list[tuple[int, str, float | None]], list[tuple[int, str]]]:
        """The records of the failed (id, reason, next attempt) and rejected (id, reason) items
        of `batch`, counting conversions and failures and noting the last error as it goes."""
        ctx, state, node = self.actor.ctx, self.actor.state, self.actor.node
        counters = self.actor.metrics
        failed: list[tuple[int, str, float | None]] = []
        rejected: list[tuple[int, str]] = []
        for item, outcome in batch:
            conversion = send_conversion(outcome)
            if conversion is not None:
                counters.send_conversion(conversion)
                state.conversions.count_on_send(conversion)
            if isinstance(outcome, Delivered):
                continue
            counters.failure(outcome)
            state.last_error = outcome.reason
            if isinstance(outcome, Rejected):
                rejected.append((item.id, outcome.reason))
                log.warning(
                    "node %s rejected %s: %s [%s]", node.ae_title, item.sop_instance_uid, outcome.reason,
                    instance_identity(ctx.config.log_suffix, item),
                )
            else:
                at = next_attempt(
                    now, item.attempt_count + 1, base=ctx.config.retry_delay_seconds,
                    cap=ctx.config.retry_max_delay_seconds, jitter=ctx.retry_jitter, rng=ctx.rng,
                    max_attempts=ctx.config.max_attempts,
                )
                failed.append((item.id, outcome.reason, at))
        return failed, rejected

    def _note_delivered(self, delivered: list[Any], now: float) -> None:
        ctx, state = self.actor.ctx, self.actor.state
        self.actor.metrics.delivered.inc(len(delivered))
        self.actor.metrics.delivered_bytes.inc(sum(getattr(i, "size_bytes", 0) for i in delivered))
        ctx.delivered_count.value += len(delivered)
        state.record_delivered(now, len(delivered))
        state.consecutive_failures = 0
        state.backoff_until = 0.0
        for item in delivered:
            state.recent_studies[item.study_instance_uid] = now


def _delivery(actor: NodeActor, batch: list[tuple[Any, Outcome]]) -> Delivery:
    """The audit line of one outcome batch."""
    def uids(kind: type) -> tuple[str, ...]:
        return tuple(item.sop_instance_uid for item, o in batch if isinstance(o, kind))

    dest = actor.handle.destination
    return Delivery(dest.ae_title, dest.role, uids(Delivered), uids(RetryLater), uids(Rejected))


def _outgoing(item: Any) -> OutgoingInstance:
    return OutgoingInstance(
        item.path, item.sop_class_uid, item.sop_instance_uid, item.transfer_syntax_uid, item.data
    )

