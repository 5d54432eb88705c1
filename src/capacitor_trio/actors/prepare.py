"""The prepare stage of one node's items: new -> prepared, run by the node's actor.

Each node actor runs a `NodePreparer` in its own nursery, so the stage belongs to the owner of
the items (it stops and restarts with the actor) and a slow or stuck stage holds up only its own
node. It has two ways of working, chosen at every look from the steps that apply to the node
(`steps`: the filter chain, transcoding; actors/prepare_steps.py):

* no step (no filter configured, no TransferSyntax): the fast path. What to do next is
  `domain.prepare.prepare_decision` on the oldest new item of the node; the preparer prepares
  what is ripe in one store statement (the items keep the received instance), or waits until
  the oldest item is ripe or until it is woken;
* with steps: item by item. It lists up to PREPARE_BATCH ripe items (`ripe_new`), and for each
  parses the instance, runs the steps in order (`run_steps`) and writes the prepared copy's
  bytes if a step changed the data set (or takes the finished file a step handed over, whose
  header it reads: a converted copy), off the event loop: all three in one worker thread call
  when every step is CPU-only (`CpuStep`, e.g. the filter chain), else reading and writing in
  worker threads and each step doing its own work; it applies the whole batch in one store
  transaction (`apply_preparations`); then it looks again. When no
  item is ripe it waits until the next one ripens (`next_ripe_at`: a retry may hold one back)
  or until woken.

It is woken by a new arrival for the node (`arrived`: on the fast path only when it had nothing
to wait for, since a newer item cannot ripen first; with steps always, since a retried item may
wait longer than a new one), by items put back to `new`, by the service's `prepare` flag or by
a reload (`wake`). After preparing anything it calls `on_prepared`, which wakes the node actor
to send; items it added for other nodes (add_destination) are announced with `on_added`.

What the filter chain decided for an item is recorded in the audit trail (`audit`) once the
store has applied it (a preparation the store skipped, or a retry, records nothing): a
`RoutingDecision` per item and a `TagMutation` per item whose attributes the chain changed.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import attrs
import pydicom
import trio
from pydicom.dataset import Dataset
from pydicom.uid import UID

from capacitor_trio.actors.prepare_steps import (
    CpuStep,
    ItemPlan,
    PrepareStep,
    PrepareSubject,
    Verdict,
    discard,
    in_worker,
    remove_files,
    run_steps,
    run_steps_sync,
)
from capacitor_trio.actors.service import ServiceFlags
from capacitor_trio.actors.wakeup import Wakeup
from capacitor_trio.audit import AuditEvent, AuditPort, RoutingDecision, TagMutation
from capacitor_trio.config.models import Config
from capacitor_trio.domain.instance import Destination, InstanceHeader
from capacitor_trio.domain.prepare import NothingToPrepare, PrepareAt, PrepareNow, prepare_decision
from capacitor_trio.store.errors import StoreError
from capacitor_trio.store.model import Item, Preparation, PreparedCopy, PrepareReport, PrepOutcome

log = logging.getLogger("capacitor_trio.prepare")

#: Ripe items one look of the per-item path prepares (then it applies them and looks again).
PREPARE_BATCH = 32
#: ...and the bytes of prepared copies it makes before applying them (the rest waits): held in
#: memory, or handed over as files (a large conversion is applied, and sent, without waiting for
#: the rest of the batch, and a kill loses little converted work).
PREPARE_COPY_BYTES = 64 * 1024 * 1024
#: How long an item a step asked to retry stays `new` before it is prepared again.
RETRY_DELAY = 60.0
#: How long the per-item path waits after the store refused its preparations (disk full).
STORE_ERROR_WAIT = 10.0


class PrepareStore(Protocol):
    async def oldest_new(self, destination: Destination | None = None) -> float | None: ...

    async def prepare_ripe(
        self, now: float, minimum_age: float, destination: Destination | None = None
    ) -> int: ...

    async def ripe_new(
        self, destination: Destination, now: float, minimum_age: float, limit: int
    ) -> list[Item]: ...

    async def next_ripe_at(self, destination: Destination, minimum_age: float) -> float | None: ...

    async def apply_preparations(self, preparations: Sequence[Preparation]) -> PrepareReport: ...


def _no_steps() -> Sequence[PrepareStep]:
    return ()


def _any_storage_node(ae_title: str) -> Destination | None:
    return Destination(ae_title)


class NodePreparer:
    def __init__(
        self,
        destination: Destination,
        store: PrepareStore,
        config: Callable[[], Config],
        service: ServiceFlags,
        clock: Callable[[], float],
        on_prepared: Callable[[], None],
        *,
        steps: Callable[[], Sequence[PrepareStep]] = _no_steps,
        resolve: Callable[[str], Destination | None] = _any_storage_node,
        on_added: Callable[[Sequence[Destination]], None] = lambda _d: None,
        audit: AuditPort | None = None,
    ) -> None:
        self.destination = destination
        self._store = store
        self._config = config
        self._service = service
        self._clock = clock
        self._on_prepared = on_prepared
        #: the steps that apply to the node now (re-read at every look: a reload changes them)
        self._steps = steps
        #: an add_destination's AE title -> the Storage node it names (None: no such node)
        self._resolve = resolve
        self._on_added = on_added
        self._audit = audit
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
            steps = self._steps()
            wait = await (self._step_items(steps) if steps else self._step())
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

    # ---- the per-item path -------------------------------------------------------------------

    async def _step_items(self, steps: Sequence[PrepareStep]) -> float | None:
        """One look of the per-item path: prepare a batch of ripe items, or say how long to
        wait for the next one."""
        self._idle = True  # any arrival wakes the next look
        if not self._service.prepare:
            return float("inf")
        minimum_age = max(0.0, float(self._config().minimum_age))
        now = self._clock()
        items = await self._store.ripe_new(self.destination, now, minimum_age, PREPARE_BATCH)
        if not items:
            at = await self._store.next_ripe_at(self.destination, minimum_age)
            return float("inf") if at is None else max(0.0, at - self._clock())
        self.preparing = True
        try:
            preparations, audited = await self._prepare_batch(steps, items)
            try:
                report = await self._store.apply_preparations(preparations)
            except StoreError as exc:  # a full disk (the copies): the items stay new meanwhile
                log.warning(
                    "prepare for %s: cannot store the preparations (%s); again in %g s",
                    self.destination.ae_title, exc, STORE_ERROR_WAIT,
                )
                return STORE_ERROR_WAIT
        finally:
            self.preparing = False
        await self._after(report, audited)
        return None

    async def _prepare_batch(
        self, steps: Sequence[PrepareStep], items: Sequence[Item]
    ) -> tuple[list[Preparation], dict[int, tuple[AuditEvent, ...]]]:
        """The preparations of `items`, up to PREPARE_COPY_BYTES of copies (the rest waits for
        the next look), and the audit lines each makes once applied. Cut short (cancelled), the
        files of the copies made so far are removed."""
        preparations: list[Preparation] = []
        audited: dict[int, tuple[AuditEvent, ...]] = {}
        made = 0
        try:
            for item in items:
                prep, audited[item.id] = await self._prepare_item(steps, item)
                preparations.append(prep)
                made += prep.copy.size if prep.copy is not None else 0
                if made >= PREPARE_COPY_BYTES:
                    break
        except BaseException:
            await discard([p.copy.file for p in preparations if p.copy is not None and p.copy.file is not None])
            raise
        return preparations, audited

    async def _after(self, report: PrepareReport, audited: dict[int, tuple[AuditEvent, ...]]) -> None:
        if self._audit is not None:
            for item_id in (*report.prepared, *report.removed):
                for event in audited.get(item_id, ()):
                    await self._audit.record(event)
        if report.prepared:
            self._on_prepared()
        if report.added:
            self._on_added(list(dict.fromkeys(d for _, d in report.added)))

    async def _prepare_item(
        self, steps: Sequence[PrepareStep], item: Item
    ) -> tuple[Preparation, tuple[AuditEvent, ...]]:
        """Read, run the steps, write a changed data set's copy, and turn the plan into the
        store's `Preparation` and the audit lines it makes once applied. An item sent as a copy
        of its own (put back to `new` by an operator) is prepared as it is: its steps ran on the
        received instance already, and running them on the copy would apply them twice."""
        if item.prepared_copy:
            return Preparation(item.id, PrepOutcome.PREPARED, sort_key=item.sort_key), ()
        subject = PrepareSubject(
            item.id, self.destination, item.source_ae, item.sop_instance_uid,
            item.received_syntax or item.transfer_syntax_uid, added=item.added_by is not None,
            received_path=None if item.inline else item.path,
        )
        cpu = [s for s in steps if isinstance(s, CpuStep)]
        if len(cpu) == len(steps):  # one worker thread call for the whole item
            worked = await in_worker(_work_in_thread, cpu, [s.name for s in steps], subject, item)
        else:
            worked = await _work(steps, subject, item)
        where = f"prepare {item.sop_instance_uid} for {self.destination.ae_title}"
        if worked.plan is None:
            log.warning("%s: failed: %s", where, worked.error)
            return Preparation(item.id, PrepOutcome.FAILED, last_error=worked.error), ()
        for decision in worked.plan.decisions:
            log.log(decision.level, "%s", decision.text)
        prep = self._preparation(item, worked, where)
        if worked.copy is not None and worked.copy.file is not None and prep.copy is None:
            await discard([worked.copy.file])  # the item failed after all: its file is not kept
        return prep, self._audit_events(item, worked.plan, prep)

    def _audit_events(self, item: Item, plan: ItemPlan, prep: Preparation) -> tuple[AuditEvent, ...]:
        """The routing decision and the tag changes of a routing step's applied plan."""
        if not plan.routed or prep.outcome not in (PrepOutcome.PREPARED, PrepOutcome.REMOVED):
            return ()
        node = self.destination.ae_title
        dropped = prep.outcome is PrepOutcome.REMOVED
        goes_to = ([] if dropped else [node]) + [d.ae_title for d in prep.add_destinations]
        verdict = "dropped" if dropped else ("changed" if plan.verdict is Verdict.CHANGED else "kept")
        events: list[AuditEvent] = [RoutingDecision(
            item.sop_instance_uid, item.source_ae, tuple(goes_to), node=node, verdict=verdict,
            saved_files=plan.saved_files,
        )]
        if plan.changes and not dropped:
            events.append(TagMutation(item.sop_instance_uid, node, plan.changes))
        return tuple(events)

    def _preparation(self, item: Item, worked: _Worked, where: str) -> Preparation:
        plan = worked.plan
        assert plan is not None
        if plan.verdict is Verdict.RETRY:
            log.info("%s: retry in %g s: %s", where, RETRY_DELAY, plan.message)
            return Preparation(
                item.id, PrepOutcome.RETRY, last_error=plan.message,
                not_before=self._clock() + RETRY_DELAY,
            )
        if plan.verdict is Verdict.FAIL:
            log.warning("%s: failed: %s", where, plan.message)
            return Preparation(item.id, PrepOutcome.FAILED, last_error=plan.message)
        added: list[Destination] = []
        for ae in plan.add_destinations:
            dest = self._resolve(ae)
            if dest is None:
                message = f"a route adds destination {ae}, which names no Storage node"
                log.warning("%s: failed: %s", where, message)
                return Preparation(item.id, PrepOutcome.FAILED, last_error=message)
            if dest != self.destination:
                added.append(dest)
        if plan.verdict is Verdict.DROP:
            return Preparation(item.id, PrepOutcome.REMOVED, add_destinations=tuple(added))
        return Preparation(
            item.id, PrepOutcome.PREPARED, copy=worked.copy, add_destinations=tuple(added),
            sort_key=plan.sort_key,
        )


@attrs.frozen
class _Worked:
    """An item's steps run: their plan and a changed data set's copy; no plan when the item
    could not be read or its copy not written (`error`: its lastError)."""

    plan: ItemPlan | None
    copy: PreparedCopy | None = None
    error: str = ""


def _work_in_thread(
    steps: Sequence[CpuStep], names: Sequence[str], subject: PrepareSubject, item: Item
) -> _Worked:
    """Read the item, run its CPU-only steps and write the copy, all in this worker thread."""
    try:
        ds = _read_dataset(item)
    except Exception as exc:  # unreadable bytes: this item fails, the others go on
        return _Worked(None, error=f"cannot read the instance to prepare it: {exc}")
    return _with_copy(run_steps_sync(steps, names, subject, ds))


async def _work(steps: Sequence[PrepareStep], subject: PrepareSubject, item: Item) -> _Worked:
    """Read the item and write the copy in worker threads; the steps do their own work."""
    try:
        ds = await in_worker(_read_dataset, item)
    except Exception as exc:  # unreadable bytes: this item fails, the others go on
        return _Worked(None, error=f"cannot read the instance to prepare it: {exc}")
    plan = await run_steps(steps, subject, ds)
    if plan.verdict is not Verdict.CHANGED:
        return _Worked(plan)
    try:
        return await in_worker(_with_copy, plan)
    except BaseException:
        await discard([plan.file] if plan.file is not None else [])
        raise


def _with_copy(plan: ItemPlan) -> _Worked:
    """`plan` with its prepared copy: the data set written when it changed, or the finished
    file a step handed over with the identity read from its header (the file is removed when
    that cannot be read)."""
    if plan.verdict is not Verdict.CHANGED:
        return _Worked(plan)
    if plan.file is not None:
        try:
            return _Worked(plan, _file_copy(plan.file))
        except Exception as exc:
            remove_files([plan.file])
            return _Worked(None, error=f"cannot read the prepared copy: {exc}")
    if plan.dataset is None:
        return _Worked(plan)
    try:
        return _Worked(plan, _write_copy(plan.dataset, plan.transfer_syntax))
    except Exception as exc:
        return _Worked(None, error=f"cannot write the prepared copy: {exc}")


def _read_dataset(item: Item) -> Dataset:
    """The item's stored instance as a data set (worker thread). A spool file's large values
    are read when used (`defer_size`), so a step that changes nothing never loads pixel data."""
    if item.data is not None:
        return pydicom.dcmread(io.BytesIO(item.data))
    return pydicom.dcmread(item.path, defer_size="256 KB")


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _write_copy(ds: Dataset, transfer_syntax: str | None) -> PreparedCopy:
    """The Part 10 bytes of a prepared copy and the identity the item is sent as (worker
    thread). The file meta follows the data set: its SOP Class and Instance UIDs (a mutation
    may have changed them) and `transfer_syntax` when a step gives one."""
    meta = ds.file_meta
    if transfer_syntax:
        meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return PreparedCopy(_header(ds), out.getvalue())


def _file_copy(path: Path) -> PreparedCopy:
    """A finished copy's file handed over as it is, with the identity its header gives (read
    up to the pixel data, worker thread)."""
    return PreparedCopy(_header(pydicom.dcmread(path, stop_before_pixels=True)), file=path)


def _header(ds: Dataset) -> InstanceHeader:
    """The identity the item is sent as, from its copy's data set and file meta."""
    meta = ds.file_meta
    return InstanceHeader(
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality"),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        accession_number=_text(ds, "AccessionNumber"),
    )

