"""The read port: everything the API shows, asked of the owners without changing anything.

`ReadPort` is what the API may read; `RouterReads` answers it from the running router. Each read
goes to the owner of the fact, as `actors/control.py` does for writes:

| fact                                        | asked of                                   |
|---------------------------------------------|--------------------------------------------|
| the node set in force                       | `Router.in_force` (a node edit or a reload replaces it) |
| a node's status (pause, override, activity) | the supervisor's snapshot (works while the actor restarts) |
| item listings, one item, counts             | the store's read-only queries (a snapshot on a reader connection) |
| an item's stored bytes (the item detail's tags) | its spool file or the index, checked against reuse |
| received, the metrics' counters             | the router's `Metrics` (metrics.py)        |
| preparing, ripe for preparing               | each node actor's prepare stage, the store |
| service flags                               | `ServiceFlags`                             |
| loop stalls, recent log lines               | `LoopLag`, the log ring buffer             |
| the configuration shown (secrets redacted)  | `Router.settings`, nodes.yml and the filter files via `config/show.py` |
| the filter chain in force, a trial run of it | the configuration in force (`Router.settings`) |

Whether the router is idle is decided by `domain.processing` from these inputs; the API only
formats the snapshot it gets.
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar

import attrs
import trio

from capacitor_trio.actors.filter_step import DestinationTrial, chain_of, try_chain
from capacitor_trio.actors.messages import NodeStatus
from capacitor_trio.config.models import Node
from capacitor_trio.config.show import effective_config, settings_files
from capacitor_trio.domain.filters import describe
from capacitor_trio.domain.instance import Destination
from capacitor_trio.domain.processing import (
    NodeProcessing,
    ProcessingStatus,
    may_send,
    processing_status,
)
from capacitor_trio.limiter import run_var_limiter
from capacitor_trio.logs import LogEntry
from capacitor_trio.metrics import NodeFigures, Snapshot
from capacitor_trio.store import STATES, Counts, Item, ItemFilter, ItemNotFound

if TYPE_CHECKING:
    from capacitor_trio.runtime import Router

#: a node's key: (AE title, role)
NodeKey = tuple[str, str]
T = TypeVar("T")

#: item-detail reads and their JSON encodings that run at once in worker threads (CPU-bound
#: Python that holds the GIL: more at once would stall the loop, and DICOM intake with it)
DETAIL_THREADS = 2
detail_limiter = run_var_limiter("capacitor_trio_item_detail", DETAIL_THREADS)


@attrs.frozen
class SystemInfo:
    ae_title: str
    started_at: float  # wall clock, seconds
    uptime_seconds: int


@attrs.frozen
class SettingsView:
    """The configuration in force (config.yml's keys, secrets redacted), nodes.yml's text and
    the filter files' (name, text): read-only, for the Settings page."""

    config: dict[str, Any]
    nodes_yml: str | None
    filter_files: list[tuple[str, str | None]]


class ReadPort(Protocol):
    """What the API reads of the running router (never a change)."""

    def nodes(self) -> list[Node]: ...

    def node_status(self, node: Node, counts: Counts | None = None) -> NodeStatus | None: ...

    async def node_status_now(self, node: Node) -> NodeStatus | None: ...

    async def counts(self) -> Counts: ...

    async def counts_by_node(self) -> dict[NodeKey, Counts]: ...

    async def oldest_waiting_by_node(self) -> dict[NodeKey, float]: ...

    def now(self) -> float: ...

    async def list_items(
        self, f: ItemFilter, *, skip: int, limit: int, newest_first: bool = False
    ) -> tuple[list[Item], int]: ...

    async def get_item(self, item_id: int, *, with_data: bool = False) -> Item: ...

    async def read_stored(self, item: Item, read: Callable[[Path | BinaryIO], T]) -> T | None: ...

    async def processing_status(self) -> ProcessingStatus: ...

    def received(self) -> int: ...

    async def metrics_text(self) -> bytes: ...

    def service_flags(self) -> dict[str, bool]: ...

    def loop_figures(self) -> dict[str, Any]: ...

    def conversions(self) -> dict[str, dict[str, float | int]]: ...

    def recent_logs(self, lines: int, level: str | None) -> list[LogEntry]: ...

    def system(self) -> SystemInfo: ...

    async def settings(self) -> SettingsView: ...
    def filters(self) -> dict[str, Any]: ...

    async def try_filters(self, data: bytes, source_ae: str, destination_ae: str) -> list[DestinationTrial]: ...


class StoreReads(Protocol):
    """The store's read-only queries the read port uses."""

    async def counts(self, destination: Destination | None = None) -> Counts: ...

    async def counts_by_destination(self) -> dict[Destination, Counts]: ...

    async def oldest_waiting(self, destinations: list[Destination]) -> dict[Destination, float]: ...

    async def list_items(
        self, f: ItemFilter, *, skip: int = 0, limit: int = 100, newest_first: bool = False
    ) -> tuple[list[Item], int]: ...

    async def get_item(self, item_id: int, *, with_data: bool = False) -> Item: ...

    async def next_eligible_at(self, destination: Destination, now: float) -> float | None: ...

    async def next_ripe_at(self, destination: Destination, minimum_age: float) -> float | None: ...



class RouterReads:
    """`ReadPort` over the running router; every read looks the owner up at call time (a reload
    replaces the settings and the node list)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    @property
    def _store(self) -> StoreReads:
        store: StoreReads = self.router.store
        return store

    # ---- nodes --------------------------------------------------------------------------------

    def nodes(self) -> list[Node]:
        return list(self.router.nodes)

    def node_status(self, node: Node, counts: Counts | None = None) -> NodeStatus | None:
        """The node actor's snapshot with `counts` as its queue; None for a node without an actor
        (a role other than Storage)."""
        supervisor = self.router.supervisor
        handle = supervisor.handle(node.ae_title, node.role)
        return None if handle is None else supervisor.snapshot(handle, counts)

    async def node_status_now(self, node: Node) -> NodeStatus | None:
        """`node_status` with the node's queue counted now."""
        if self.router.supervisor.handle(node.ae_title, node.role) is None:
            return None
        counts = await self._store.counts(Destination(node.ae_title, node.role))
        return self.node_status(node, counts)

    # ---- items --------------------------------------------------------------------------------

    async def counts(self) -> Counts:
        return await self._store.counts()

    async def counts_by_node(self) -> dict[NodeKey, Counts]:
        by_dest = await self._store.counts_by_destination()
        return {(d.ae_title, d.role): c for d, c in by_dest.items()}

    async def oldest_waiting_by_node(self) -> dict[NodeKey, float]:
        """When each node's oldest item waiting to be delivered arrived (wall time)."""
        destinations = [Destination(n.ae_title, n.role) for n in self.router.nodes]
        by_dest = await self._store.oldest_waiting(destinations)
        return {(d.ae_title, d.role): at for d, at in by_dest.items()}

    def now(self) -> float:
        """The router's wall clock (what items' times are measured on)."""
        return self.router.clock()

    async def list_items(
        self, f: ItemFilter, *, skip: int, limit: int, newest_first: bool = False
    ) -> tuple[list[Item], int]:
        return await self._store.list_items(f, skip=skip, limit=limit, newest_first=newest_first)

    async def get_item(self, item_id: int, *, with_data: bool = False) -> Item:
        """One item (ItemNotFound if there is none); `with_data`: with the bytes of an instance
        kept in the index."""
        return await self._store.get_item(item_id, with_data=with_data)

    async def read_stored(self, item: Item, read: Callable[[Path | BinaryIO], T]) -> T | None:
        """`read` applied in a worker thread (at most `DETAIL_THREADS` at once, with the detail
        view's JSON encoding) to the stored Part 10 bytes of `item` (as
        `get_item(..., with_data=True)` gave it): `read` must be bounded in memory and time.
        None when they cannot be read, or when a spool file's item went away while it was read:
        a spool file is reused for a new reception only after the commit that removed its items,
        so what was read may then be another instance's."""
        try:
            source = io.BytesIO(item.data) if item.data is not None else item.path
            result = await trio.to_thread.run_sync(read, source, limiter=detail_limiter())
        except Exception:  # a missing or unreadable file: the item is still there to show
            return None
        if item.data is None:
            try:
                await self._store.get_item(item.id)
            except ItemNotFound:
                return None
        return result

    # ---- the router as a whole ----------------------------------------------------------------

    async def processing_status(self) -> ProcessingStatus:
        """Whether the router is idle, with the inputs read from their owners now (the
        checked-out count live: `idle` must be exact)."""
        router = self.router
        service, supervisor = router.service, router.supervisor
        now = router.clock()
        ripe = service.prepare and await self._ripe_unprepared(now)
        nodes: list[NodeProcessing] = []
        busy = ripe
        for handle in supervisor.handles:
            snap = supervisor.snapshot(handle)
            ready = False
            if not busy and _may_send(service.storage_scu, snap):
                at = await self._store.next_eligible_at(handle.destination, now)
                ready = busy = at is not None and at <= now
            nodes.append(NodeProcessing(snap.ae_title, snap.role, snap.paused, snap.status, snap.sends_in_progress, ready))
        # counted last: an item a node checked out while the others were read is counted here
        # (read first, it could be missed by both: "idle" while it is being sent)
        checked_out = (await self._store.counts()).checked_out
        return processing_status(
            service_all_paused=service.all_paused,
            checked_out=checked_out,
            preparing=sum(1 for h in supervisor.handles if h.preparer and h.preparer.preparing),
            ripe_unprepared=ripe,
            nodes=nodes,
        )

    async def _ripe_unprepared(self, now: float) -> bool:
        """Has a node with an actor a new item old enough for its prepare stage (and not held
        back by a step's retry until later, like a failed item waiting for its next attempt)?"""
        minimum_age = self.router.settings.config.minimum_age
        for handle in self.router.supervisor.handles:
            ripe_at = await self._store.next_ripe_at(handle.destination, minimum_age)
            if ripe_at is not None and ripe_at <= now:
                return True
        return False

    def received(self) -> int:
        """Instances received (and committed) since start."""
        return self.router.receiver.received  # the router's counter (the receiver writes it)

    async def metrics_text(self) -> bytes:
        """The router's counters and the owners' gauges in Prometheus's text format."""
        return self.router.metrics.render(await self.metrics_snapshot())

    async def metrics_snapshot(self) -> Snapshot:
        """What `GET /metrics` reads of the owners: each node's queue counts and oldest waiting
        item (the store's read-only queries), its pause, window and restarts (the supervisor's
        snapshot), free space (the store: one statvfs, as admission does)."""
        router = self.router
        by_dest = await self._store.counts_by_destination()
        oldest = await self._store.oldest_waiting(
            [h.destination for h in router.supervisor.handles]
        )
        now = router.clock()
        figures = []
        for handle in router.supervisor.handles:
            dest = handle.destination
            counts = by_dest.get(dest, Counts())
            snap = router.supervisor.snapshot(handle, counts)
            since = oldest.get(dest)
            figures.append(NodeFigures(
                dest.ae_title, dest.role, {s: getattr(counts, s) for s in STATES}, counts.checked_out,
                0.0 if since is None else max(0.0, now - since),
                snap.paused, snap.in_window, snap.restarts,
            ))
        return Snapshot(
            tuple(figures), router.store.free_space_percent(), float(router.settings.config.min_free_space)
        )

    def service_flags(self) -> dict[str, bool]:
        return self.router.service.as_dict()

    def loop_figures(self) -> dict[str, Any]:
        return self.router.loop.to_json()

    def conversions(self) -> dict[str, dict[str, float | int]]:
        """Each Storage node's conversions (count, failures, seconds), from the supervisor."""
        return self.router.supervisor.conversions()

    def recent_logs(self, lines: int, level: str | None) -> list[LogEntry]:
        ring = self.router.ring
        return ring.recent(lines, level) if ring is not None else []

    def system(self) -> SystemInfo:
        router = self.router
        uptime = max(0, int(router.clock() - router.started_at))
        return SystemInfo(router.settings.config.my_ae_title, router.started_at, uptime)

    async def settings(self) -> SettingsView:
        config = self.router.settings.config
        nodes_yml, filters = await trio.to_thread.run_sync(settings_files, config.data_dir)
        return SettingsView(effective_config(config), nodes_yml, filters)
    # ---- filters ------------------------------------------------------------------------------

    def filters(self) -> dict[str, Any]:
        """The filter chain in force and each file's entries (`domain.filters.describe`)."""
        return describe(chain_of(self.router.settings.config))

    async def try_filters(self, data: bytes, source_ae: str, destination_ae: str) -> list[DestinationTrial]:
        """The chain in force run on `data` as the filter-test tool runs it (nothing written),
        in a worker thread under the item detail's limiter (CPU work, like a detail's parse).
        ValueError for bytes that are no DICOM file."""
        config = self.router.settings.config
        now = datetime.datetime.fromtimestamp(self.router.clock()).astimezone()

        def run() -> list[DestinationTrial]:
            return try_chain(
                chain_of(config), data, source_ae=source_ae, destination_ae=destination_ae,
                root=config.data_dir, now=now,
            )

        return await trio.to_thread.run_sync(run, limiter=detail_limiter())


def _may_send(delivery: bool, snap: NodeStatus) -> bool:
    return may_send(
        delivery=delivery, paused=snap.paused, status=snap.status, in_window=snap.in_window,
        schedule_override=snap.schedule_override,
    )

