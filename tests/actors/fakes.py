"""Scripted fakes for actor tests on virtual time.

`FakeStore` keeps items in memory with the same transitions the real store offers the actors
(no threads, so `autojump_clock` stays exact): it implements `QueuePort`, `IntakeStore`
`StorePort`, and tests/store/test_contract.py runs one suite against them and the real store. `FakeSender` records every send with
`trio.current_time()` and answers from a script.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from capacitor_trio.dicom.requestor import EchoResult, OutgoingInstance, Peer, SendOptions
from capacitor_trio.domain.instance import Destination
from capacitor_trio.domain.ordering import sop_class_rank
from capacitor_trio.domain.outcomes import Delivered, Outcome
from capacitor_trio.domain.states import (
    EXPIRED,
    FAILED,
    NEW,
    PREPARED,
    QUEUED,
    REJECTED,
    RETRYABLE,
    parse_state,
)
from capacitor_trio.store import (
    STATES,
    Counts,
    Item,
    ItemCheckedOut,
    ItemFilter,
    ItemNotFound,
    StoreFull,
    TransitionError,
)
from capacitor_trio.store.model import Preparation, PrepareReport, PrepOutcome

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
CR = "1.2.840.10008.5.1.4.1.1.1"


class FakeStore:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.items: dict[int, Item] = {}
        self.paused: set[tuple[str, str]] = set()
        self._ids = itertools.count(1)
        #: (virtual time, number of outcomes) of every record_outcomes call
        self.records: list[tuple[float, int]] = []
        #: (virtual time, number of items) of every checkout_batch call
        self.checkouts: list[tuple[float, int]] = []
        #: instance id -> bytes of the instances kept "in the index"
        self.blobs: dict[int, bytes] = {}

    def add(
        self, dest: str = "PACS", *, study: str = "1.2.3", series: str = "1.2.3.1", sop_class: str = CT,
        state: str = PREPARED, source: str = "MODALITY", created_at: float | None = None,
        role: str = "Storage", sop: str | None = None, data: bytes | None = None,
    ) -> Item:
        """An item of its own instance; with `data`, an instance kept in the index (its bytes
        are what the prepare stage reads)."""
        i = next(self._ids)
        now = self.clock() if created_at is None else created_at
        item = Item(
            id=i, state=parse_state(state).value, checked_out=False, source_ae=source, destination_ae=dest,
            destination_role=role, study_instance_uid=study, series_instance_uid=series,
            sop_instance_uid=sop or f"1.2.826.0.1.{i}", sop_class_uid=sop_class, modality="CT", patient_id="P",
            patient_name="N", accession_number="A", transfer_syntax_uid="1.2.840.10008.1.2.1",
            size_bytes=100, attempt_count=0, last_error="", next_attempt_at=None, created_at=now,
            updated_at=now, path=Path(f"/spool/{i}.dcm"), instance_id=i, inline=data is not None,
            received_syntax="1.2.840.10008.1.2.1",
        )
        self.items[i] = item
        if data is not None:
            self.blobs[i] = data
        return item

    def _set(self, i: int, **changes: Any) -> Item:
        item = attrs.evolve(self.items[i], updated_at=self.clock(), **changes)
        self.items[i] = item
        return item

    def _mine(self, d: Destination) -> list[Item]:
        return [i for i in self.items.values() if (i.destination_ae, i.destination_role) == (d.ae_title, d.role)]

    def states(self) -> dict[int, str]:
        return {i: it.state for i, it in self.items.items()}

    async def counts(self, destination: Destination | None = None) -> Counts:
        await trio.lowlevel.checkpoint()
        items = self._mine(destination) if destination else list(self.items.values())
        by = {s: sum(1 for i in items if i.state == s) for s in STATES}
        return Counts(**by, checked_out=sum(1 for i in items if i.checked_out), total=len(items))

    def _eligible(self, d: Destination, now: float) -> list[Item]:
        return [
            i for i in self._mine(d) if not i.checked_out and (
                i.state == PREPARED or (i.state == FAILED and i.next_attempt_at is not None and i.next_attempt_at <= now)
            )
        ]

    async def checkout_batch(
        self, destination: Destination, *, now: float, limit: int, by_series: bool = False,
        sop_class_priorities: Sequence[str] | None = None, study_quiet_before: float | None = None,
        exempt_studies: Collection[str] = (), series_uid: str | None = None,
    ) -> list[Item]:
        await trio.lowlevel.checkpoint()
        rank = sop_class_rank(sop_class_priorities)
        items = self._eligible(destination, now)
        if study_quiet_before is not None:
            last = {}
            for i in self._mine(destination):
                last[i.study_instance_uid] = max(last.get(i.study_instance_uid, 0.0), i.created_at)
            items = [i for i in items if i.study_instance_uid in exempt_studies or last[i.study_instance_uid] <= study_quiet_before]
        items.sort(key=lambda i: (rank(i.sop_class_uid), i.created_at, i.id))
        in_order = lambda i: (rank(i.sop_class_uid), i.sort_key is None, i.sort_key or b"", i.created_at, i.id)  # noqa: E731
        if series_uid is not None:
            items = sorted((i for i in items if i.series_instance_uid == series_uid), key=in_order)
        if by_series and items:
            items = sorted((i for i in items if i.series_instance_uid == items[0].series_instance_uid), key=in_order)
        batch = items[:limit]
        if series_uid is None and not by_series and any(i.sort_key is not None for i in batch):
            places: dict[str, list[int]] = {}
            for k, i in enumerate(batch):
                places.setdefault(i.series_instance_uid, []).append(k)
            ordered = list(batch)
            for ks in places.values():
                key = lambda i: (i.sort_key is None, i.sort_key or b"", i.created_at, i.id)  # noqa: E731
                for k, i in zip(ks, sorted((batch[k] for k in ks), key=key), strict=True):
                    ordered[k] = i
            batch = ordered
        self.checkouts.append((trio.current_time(), len(batch)))
        return [self._with_data(self._set(i.id, checked_out=True)) for i in batch]

    def _with_data(self, item: Item) -> Item:
        return attrs.evolve(item, data=self.blobs.get(item.instance_id)) if item.inline else item

    async def delivered(self, ids: Iterable[int]) -> None:
        await trio.lowlevel.checkpoint()
        for i in ids:
            del self.items[i]

    async def fail(self, item_id: int, error: str, next_attempt_at: float | None) -> None:
        await trio.lowlevel.checkpoint()
        it = self.items[item_id]
        self._set(item_id, state=FAILED.value, checked_out=False, attempt_count=it.attempt_count + 1,
                  last_error=error, next_attempt_at=next_attempt_at)

    async def reject(self, item_id: int, error: str) -> None:
        await trio.lowlevel.checkpoint()
        it = self.items[item_id]
        self._set(item_id, state=REJECTED.value, checked_out=False, attempt_count=it.attempt_count + 1, last_error=error)

    async def record_outcomes(
        self, delivered: Sequence[int] = (), failed: Sequence[tuple[int, str, float | None]] = (),
        rejected: Sequence[tuple[int, str]] = (),
        *,
        durable: bool = True,
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.records.append((trio.current_time(), len(delivered) + len(failed) + len(rejected)))
        for i in delivered:
            self.items.pop(i, None)
        for item_id, error, at in failed:
            if item_id in self.items:
                it = self.items[item_id]
                self._set(item_id, state=FAILED.value, checked_out=False, attempt_count=it.attempt_count + 1,
                          last_error=error, next_attempt_at=at)
        for item_id, error in rejected:
            if item_id in self.items:
                it = self.items[item_id]
                self._set(item_id, state=REJECTED.value, checked_out=False, attempt_count=it.attempt_count + 1,
                          last_error=error)

    async def release(self, ids: Iterable[int]) -> None:
        await trio.lowlevel.checkpoint()
        for i in ids:
            if i in self.items:
                self._set(i, checked_out=False)

    async def release_all_checked_out(self, destination: Destination | None = None) -> list[str]:
        await trio.lowlevel.checkpoint()
        out = [i for i in (self._mine(destination) if destination else self.items.values()) if i.checked_out]
        for i in out:
            self._set(i.id, checked_out=False)
        return [i.sop_instance_uid for i in out]

    async def next_eligible_at(self, destination: Destination, now: float) -> float | None:
        await trio.lowlevel.checkpoint()
        times = [
            now if i.state == PREPARED else i.next_attempt_at
            for i in self._mine(destination)
            if not i.checked_out and (i.state == PREPARED or (i.state == FAILED and i.next_attempt_at is not None))
        ]
        first = min((t for t in times if t is not None), default=None)
        return None if first is None else max(now, first)

    async def first_quiet_arrival(self, destination: Destination, lookahead: int) -> float | None:
        await trio.lowlevel.checkpoint()
        mine = sorted(self._mine(destination), key=lambda i: (i.created_at, i.id))
        waiting = [i for i in mine if i.state == PREPARED and not i.checked_out][:lookahead]
        studies = {i.study_instance_uid for i in waiting}
        last = [max(i.created_at for i in mine if i.study_instance_uid == s) for s in studies]
        return min(last, default=None)

    async def list_items(self, f: ItemFilter, *, skip: int = 0, limit: int = 100) -> tuple[list[Item], int]:
        await trio.lowlevel.checkpoint()
        items = [
            i for i in sorted(self.items.values(), key=lambda i: i.id)
            if (f.destination is None or i.destination_ae == f.destination) and (f.state is None or i.state == f.state)
        ]
        return items[skip:skip + limit], len(items)

    async def get_paused(self) -> set[tuple[str, str]]:
        await trio.lowlevel.checkpoint()
        return set(self.paused)

    async def set_paused(self, destination: Destination, paused: bool) -> None:
        await trio.lowlevel.checkpoint()
        key = (destination.ae_title, destination.role)
        (self.paused.add if paused else self.paused.discard)(key)

    def _changeable(self, item_id: int) -> Item:
        if item_id not in self.items:
            raise ItemNotFound(f"no item {item_id}")
        if self.items[item_id].checked_out:
            raise ItemCheckedOut(f"item {item_id} is being delivered")
        return self.items[item_id]

    async def move(self, item_id: int, target_state: str) -> Item:
        await trio.lowlevel.checkpoint()
        target = parse_state(target_state)
        self._changeable(item_id)
        nxt = self.clock() if target == FAILED else None
        return self._set(item_id, state=target.value, next_attempt_at=nxt)

    async def retry(self, item_id: int) -> Item:
        await trio.lowlevel.checkpoint()
        if self._changeable(item_id).state not in RETRYABLE:
            raise TransitionError("only failed or rejected items can be retried")
        return self._set(item_id, state=NEW.value, next_attempt_at=None, attempt_count=0)

    async def delete(self, item_id: int) -> None:
        await trio.lowlevel.checkpoint()
        self._changeable(item_id)
        del self.items[item_id]

    def _matching(self, f: ItemFilter) -> list[Item]:
        """Items `f` matches that are not checked out (`search` is not modelled)."""
        wanted = {
            "state": None if f.state is None else parse_state(f.state).value,
            "source_ae": f.source, "destination_ae": f.destination, "destination_role": f.role,
            "modality": f.modality, "study_instance_uid": f.study_uid, "series_instance_uid": f.series_uid,
        }
        return [
            i for i in self.items.values()
            if not i.checked_out and all(v is None or getattr(i, k) == v for k, v in wanted.items())
        ]

    async def move_where(self, f: ItemFilter, target_state: str) -> int:
        await trio.lowlevel.checkpoint()
        target = parse_state(target_state)
        items = self._matching(f)
        for i in items:
            self._set(i.id, state=target.value, next_attempt_at=self.clock() if target == FAILED else None)
        return len(items)

    async def retry_where(self, f: ItemFilter, from_state: str) -> int:
        await trio.lowlevel.checkpoint()
        source = str(from_state).strip().lower()
        if source not in RETRYABLE:
            raise TransitionError(f"only failed or rejected items retry, not {from_state!r}")
        items = [i for i in self._matching(f) if i.state == source]
        for i in items:
            self._set(i.id, state=NEW.value, next_attempt_at=None, attempt_count=0)
        return len(items)

    async def delete_where(self, f: ItemFilter) -> int:
        await trio.lowlevel.checkpoint()
        items = self._matching(f)
        for i in items:
            del self.items[i.id]
        return len(items)

    async def prepare_ripe(
        self, now: float, minimum_age: float, destination: Destination | None = None
    ) -> int:
        await trio.lowlevel.checkpoint()
        ripe = [
            i.id for i in self._new(destination) if i.created_at <= now - minimum_age
        ]
        for i in ripe:
            self._set(i, state=PREPARED.value)
        return len(ripe)

    async def oldest_new(self, destination: Destination | None = None) -> float | None:
        await trio.lowlevel.checkpoint()
        return min((i.created_at for i in self._new(destination)), default=None)

    async def expire(
        self, now: float, threshold_seconds: float, destination: Destination | None = None
    ) -> int:
        await trio.lowlevel.checkpoint()
        old = [
            i.id for i in self.items.values()
            if i.state in QUEUED and not i.checked_out and i.created_at < now - threshold_seconds
            and destination in (None, Destination(i.destination_ae, i.destination_role))
        ]
        for i in old:
            self._set(i, state=EXPIRED.value, next_attempt_at=None)
        return len(old)

    def _ripe(self, destination: Destination, now: float, minimum_age: float) -> list[Item]:
        return [
            i for i in self._new(destination)
            if i.created_at <= now - minimum_age and (i.next_attempt_at is None or i.next_attempt_at <= now)
        ]

    async def ripe_new(
        self, destination: Destination, now: float, minimum_age: float, limit: int
    ) -> list[Item]:
        await trio.lowlevel.checkpoint()
        ripe = sorted(self._ripe(destination, now, minimum_age), key=lambda i: (i.created_at, i.id))
        return [self._with_data(i) for i in ripe[:limit]]

    async def next_ripe_at(self, destination: Destination, minimum_age: float) -> float | None:
        await trio.lowlevel.checkpoint()
        return min(
            (max(i.created_at + minimum_age, i.next_attempt_at or 0.0) for i in self._new(destination)),
            default=None,
        )

    async def apply_preparations(self, preparations: Sequence[Preparation]) -> PrepareReport:
        await trio.lowlevel.checkpoint()
        out: dict[PrepOutcome, list[int]] = {o: [] for o in PrepOutcome}
        added: list[tuple[int, Destination]] = []
        skipped: list[int] = []
        for prep in preparations:
            item = self.items.get(prep.item_id)
            if item is None or item.state != NEW or item.checked_out:
                skipped.append(prep.item_id)
                if prep.copy is not None and prep.copy.file is not None:
                    prep.copy.file.unlink(missing_ok=True)  # a handed-over file not kept
                continue
            if prep.outcome in (PrepOutcome.PREPARED, PrepOutcome.REMOVED):
                added += self._add_destinations(item, prep.add_destinations)
            self._apply(item, prep)
            out[prep.outcome].append(prep.item_id)
        return PrepareReport(
            prepared=tuple(out[PrepOutcome.PREPARED]), removed=tuple(out[PrepOutcome.REMOVED]),
            retried=tuple(out[PrepOutcome.RETRY]), failed=tuple(out[PrepOutcome.FAILED]),
            added=tuple(added), skipped=tuple(skipped),
        )

    def _add_destinations(self, item: Item, dests: Sequence[Destination]) -> list[tuple[int, Destination]]:
        added = []
        for d in dests:
            if any(
                (i.instance_id, i.destination_ae, i.destination_role) == (item.instance_id, d.ae_title, d.role)
                for i in self.items.values()
            ):
                continue
            n = next(self._ids)
            self.items[n] = attrs.evolve(
                item, id=n, state=NEW.value, destination_ae=d.ae_title, destination_role=d.role,
                added_by=item.id, updated_at=self.clock(), data=None, prepared_copy=False,
            )
            added.append((n, d))
        return added

    def _apply(self, item: Item, prep: Preparation) -> None:
        if prep.outcome is PrepOutcome.REMOVED:
            del self.items[item.id]
        elif prep.outcome is PrepOutcome.RETRY:
            self._set(item.id, last_error=prep.last_error, next_attempt_at=prep.not_before)
        elif prep.outcome is PrepOutcome.FAILED:
            self._set(item.id, state=FAILED.value, last_error=prep.last_error, next_attempt_at=None)
        elif prep.copy is None:
            self._set(item.id, state=PREPARED.value, sort_key=prep.sort_key, last_error="", next_attempt_at=None)
        else:
            h, instance, data = prep.copy.header, next(self._ids), prep.copy.data
            if prep.copy.file is not None:  # a handed-over file: adopted (here into memory)
                data = prep.copy.file.read_bytes()
                prep.copy.file.unlink()
            self.blobs[instance] = data
            self._set(
                item.id, state=PREPARED.value, sort_key=prep.sort_key, last_error="", next_attempt_at=None,
                instance_id=instance, inline=True, size_bytes=len(data),
                sop_instance_uid=h.sop_instance_uid, sop_class_uid=h.sop_class_uid,
                study_instance_uid=h.study_instance_uid, series_instance_uid=h.series_instance_uid,
                transfer_syntax_uid=h.transfer_syntax_uid, patient_id=h.patient_id,
                patient_name=h.patient_name, accession_number=h.accession_number, modality=h.modality,
                prepared_copy=True,
            )

    def _new(self, destination: Destination | None) -> list[Item]:
        return [
            i for i in self.items.values()
            if i.state == NEW and not i.checked_out
            and destination in (None, Destination(i.destination_ae, i.destination_role))
        ]


@attrs.define
class Send:
    at: float
    calling_ae: str
    sops: list[str]
    priority: int


class FakeSender:
    """Answers each instance with `script(instance) -> Outcome` after `per_instance` seconds.
    `script` may raise to simulate a crash of the sending code."""

    def __init__(self, script: Callable[[OutgoingInstance], Outcome] | None = None, per_instance: float = 0.0) -> None:
        self.script = script or (lambda _i: Delivered())
        self.per_instance = per_instance
        self.sends: list[Send] = []
        self.delivered: list[str] = []
        self.aborted = 0
        #: call `more()` after the batch (the real requestor's top-up of an open association)
        self.top_up = False

    @property
    def times(self) -> list[float]:
        return [s.at for s in self.sends]

    async def send_batch(
        self, peer: Peer, instances: Sequence[OutgoingInstance], options: SendOptions,
        on_outcome: Callable[[int, Outcome], None], *, more: Any = None,
    ) -> None:
        """Sends `instances`; then, when `top_up` is on, whatever `more()` returns, until it
        returns nothing (like the real requestor; off by default so each batch is one send)."""
        self.sends.append(Send(trio.current_time(), options.calling_ae, [i.sop_instance_uid for i in instances], options.priority))
        try:
            for index, inst in enumerate(instances):
                if self.per_instance:
                    await trio.sleep(self.per_instance)
                outcome = self.script(inst)
                if isinstance(outcome, Delivered):
                    self.delivered.append(inst.sop_instance_uid)
                on_outcome(index, outcome)
            index = len(instances)
            while self.top_up and more is not None:
                extra = list(await more())
                if not extra:
                    break
                self.sends[-1].sops += [i.sop_instance_uid for i in extra]
                for inst in extra:
                    if self.per_instance:
                        await trio.sleep(self.per_instance)
                    outcome = self.script(inst)
                    if isinstance(outcome, Delivered):
                        self.delivered.append(inst.sop_instance_uid)
                    on_outcome(index, outcome)
                    index += 1
            await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            self.aborted += 1
            raise

    async def echo(self, peer: Peer, calling_ae: str, *, timeout: float = 10) -> EchoResult:  # noqa: ASYNC109
        await trio.sleep(0.005)
        return EchoResult(True, 5.0, None)


class IntakeStore(FakeStore):
    """FakeStore with the intake side: commit_instance creates `new` items; `hold` blocks commits."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.hold: trio.Event | None = None
        self.in_commit = 0
        self.full = False

    def new_incoming_path(self) -> Path:
        return Path(f"/incoming/{next(self._ids)}.part")

    def check_admission(self) -> None:
        if self.full:
            raise StoreFull("free space 1.0% below minimum 10%")

    def start_sync(self, temp_path: Path, size: int) -> None:
        return None

    async def commit_instance(
        self, temp_path: Path | None, header: Any, source_ae: str, destinations: Sequence[Destination], *,
        state: str = NEW, data: bytes | None = None, sync: Any = None,
    ) -> list[int]:
        self.check_admission()
        self.in_commit += 1
        try:
            if self.hold is not None:
                await self.hold.wait()
            await trio.lowlevel.checkpoint()
            return [
                self.add(d.ae_title, study=header.study_instance_uid, series=header.series_instance_uid,
                         sop_class=header.sop_class_uid, sop=header.sop_instance_uid, state=state,
                         source=source_ae, role=d.role, data=data).id
                for d in dict.fromkeys(destinations)
            ]
        finally:
            self.in_commit -= 1
