"""The store as the actors see it: `QueuePort` (node actors and the supervisor) and `StorePort`
(that and the receiver's intake side). `Store` implements both; the actor tests' fakes
(tests/actors/fakes.py) implement them too, and tests/store/test_contract.py runs one suite of
behaviour against both so the two cannot drift apart."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from ..domain.instance import Destination, InstanceHeader
from ..domain.states import NEW
from .model import Counts, Item, ItemFilter, Preparation, PrepareReport


class QueuePort(Protocol):
    """A destination's queue: what a node actor and the supervisor ask of the store."""

    async def counts(self, destination: Destination | None = None) -> Counts: ...

    async def get_paused(self) -> set[tuple[str, str]]: ...

    async def set_paused(self, destination: Destination, paused: bool) -> None: ...

    async def checkout_batch(
        self,
        destination: Destination,
        *,
        now: float,
        limit: int,
        by_series: bool = False,
        sop_class_priorities: Sequence[str] | None = None,
        study_quiet_before: float | None = None,
        exempt_studies: Collection[str] = (),
        series_uid: str | None = None,
    ) -> list[Item]: ...

    async def record_outcomes(
        self,
        delivered: Sequence[int] = (),
        failed: Sequence[tuple[int, str, float | None]] = (),
        rejected: Sequence[tuple[int, str]] = (),
        *,
        durable: bool = True,
    ) -> None: ...

    async def release(self, ids: Iterable[int]) -> None: ...

    async def release_all_checked_out(self, destination: Destination | None = None) -> list[str]: ...

    async def next_eligible_at(self, destination: Destination, now: float) -> float | None: ...

    async def first_quiet_arrival(self, destination: Destination, lookahead: int) -> float | None: ...

    async def prepare_ripe(
        self, now: float, minimum_age: float, destination: Destination | None = None
    ) -> int: ...

    async def oldest_new(self, destination: Destination | None = None) -> float | None: ...

    async def ripe_new(
        self, destination: Destination, now: float, minimum_age: float, limit: int
    ) -> list[Item]: ...

    async def next_ripe_at(self, destination: Destination, minimum_age: float) -> float | None: ...

    async def apply_preparations(self, preparations: Sequence[Preparation]) -> PrepareReport: ...

    async def expire(
        self, now: float, threshold_seconds: float, destination: Destination | None = None
    ) -> int: ...

    async def move(self, item_id: int, target_state: str) -> Item: ...

    async def retry(self, item_id: int) -> Item: ...

    async def delete(self, item_id: int) -> None: ...

    async def move_where(self, f: ItemFilter, target_state: str) -> int: ...

    async def retry_where(self, f: ItemFilter, from_state: str) -> int: ...

    async def delete_where(self, f: ItemFilter) -> int: ...


class StorePort(QueuePort, Protocol):
    """The queue and the intake: what the receiver asks of the store as well."""

    def new_incoming_path(self) -> Path: ...

    def start_sync(self, temp_path: Path, size: int) -> concurrent.futures.Future[None] | None: ...

    def check_admission(self) -> None: ...

    async def commit_instance(
        self,
        temp_path: Path | None,
        header: InstanceHeader,
        source_ae: str,
        destinations: Sequence[Destination],
        *,
        state: str = NEW,
        data: bytes | None = None,
        sync: concurrent.futures.Future[None] | None = None,
    ) -> list[int]: ...
