"""Receiver: turns each instance the DICOM acceptor received into durable queue items.

It is the acceptor's `InstanceSink`. For each instance it resolves the called AE to its
destination(s) (a Storage node's AeTitle, an alias, or aeTitlePrefix + AeTitle; the filter chain
will plug in at `destinations_for`), commits the file and one item per destination through the
store, and only then lets the acceptor answer success. At most `max_in_flight` commits wait at
once: a slow store slows the senders instead of growing memory (the acceptor's C-STORE waits).

Items are committed `new`, and `on_new_items` tells the destinations' node actors, whose prepare
stage (actors/prepare.py) moves them to prepared once ripe. With `minimumAge: 0` (and `prepare`
on) an instance is ripe on arrival: it is committed prepared and `on_prepared` wakes the nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from capacitor_trio.actors.prepare_steps import has_steps
from capacitor_trio.actors.service import ServiceFlags
from capacitor_trio.config.models import Config, ConfigSource, Node, called_aes, config_source
from capacitor_trio.dicom.acceptor import CannotProcess, OutOfResources, ReceivedInstance
from capacitor_trio.domain.instance import Destination
from capacitor_trio.domain.states import NEW, PREPARED
from capacitor_trio.logs import instance_identity
from capacitor_trio.metrics import Metrics
from capacitor_trio.store import StoreError, StoreFull, StorePort

log = logging.getLogger("capacitor_trio.receiver")


def called_ae_routes(nodes: Sequence[Node], prefix: str) -> dict[str, Destination]:
    """Every called AE title a Storage node answers to -> that node (the config refuses a node
    set in which one called AE would name two)."""
    routes: dict[str, Destination] = {}
    for node in nodes:
        if node.role != "Storage":
            continue
        dest = Destination(node.ae_title, node.role)
        for route in called_aes(node, prefix):
            routes.setdefault(route.called_ae, dest)
    return routes


@attrs.frozen(eq=False)
class _RouteTable:
    """The called-AE table of one node set and configuration."""

    nodes: Sequence[Node]
    config: Config
    routes: dict[str, Destination]
    #: upper-cased called AE -> the title as configured
    folded: dict[str, str]
    #: the destinations whose prepare stage runs item by item (`has_steps`)
    with_steps: frozenset[Destination]

    @classmethod
    def of(cls, nodes: Sequence[Node], config: Config) -> _RouteTable:
        routes = called_ae_routes(nodes, config.ae_title_prefix)
        folded = {title.upper(): title for title in (config.my_ae_title, *routes)}
        with_steps = frozenset(
            Destination(node.ae_title, node.role) for node in nodes if has_steps(node, config)
        )
        return cls(nodes, config, routes, folded, with_steps)

    def destination(self, called_ae: str) -> Destination | None:
        return self.routes.get(called_ae.strip())


class Receiver:
    """`config` and `nodes`: the configuration and node set in force, read from their one owner
    (the runtime's `in_force`) where they are used; the called-AE table is derived from them and
    rebuilt when either is replaced (a node edit, a reload)."""

    def __init__(
        self,
        config: Config | ConfigSource,
        store: StorePort,
        nodes: Callable[[], Sequence[Node]],
        service: ServiceFlags,
        clock: Callable[[], float],
        on_prepared: Callable[[], None] = lambda: None,
        *,
        on_new_items: Callable[[Sequence[Destination]], None] = lambda destinations: None,
        max_in_flight: int = 64,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config_source(config)
        self.store = store
        self._nodes = nodes
        self.service = service
        self.clock = clock
        self._on_prepared = on_prepared
        self._on_new_items = on_new_items
        self._limiter = trio.CapacityLimiter(max_in_flight)
        self._table = _RouteTable.of(self._nodes(), self.config)
        #: the router's counters: instances, bytes, commit latency, admission refusals
        self.metrics = metrics if metrics is not None else Metrics()

    @property
    def config(self) -> Config:
        return self._config()

    @property
    def received(self) -> int:
        """Instances received and committed since start."""
        return self.metrics.received()

    def _routes(self) -> _RouteTable:
        """The called-AE table of the node set and configuration in force."""
        nodes, config = self._nodes(), self.config
        if nodes is not self._table.nodes or config is not self._table.config:
            self._table = _RouteTable.of(nodes, config)
        return self._table

    # ---- InstanceSink ------------------------------------------------------------------------

    def destinations_for(self, called_ae: str) -> list[Destination]:
        dest = self._routes().destination(called_ae)
        return [dest] if dest else []

    def accepts_called_ae(self, called_ae: str) -> bool:
        """Exact match only (DICOM AE titles are case-sensitive)."""
        called = called_ae.strip()
        return called == self.config.my_ae_title or called in self._routes().routes

    def called_ae_hint(self, called_ae: str) -> str | None:
        """The title a refused called AE matches in another case: the operator's hint, since
        modalities are often configured by hand."""
        return self._routes().folded.get(called_ae.strip().upper())

    def new_temp_path(self) -> Path:
        return self.store.new_incoming_path()

    def start_sync(self, path: Path, size: int) -> Any:
        return self.store.start_sync(path, size)

    def check_admission(self) -> None:
        try:
            self.store.check_admission()
        except StoreFull as exc:
            self.metrics.admission_refusals.labels("free_space").inc()
            raise OutOfResources(str(exc)) from exc

    async def instance_received(self, rx: ReceivedInstance) -> None:
        table = self._routes()  # one look at what is in force serves the whole instance
        dest = table.destination(rx.called_ae)
        if dest is None:
            raise CannotProcess(f"no destination node for called AE {rx.called_ae.strip()!r}")
        destinations = [dest]
        # with minimumAge 0 an item is ripe at once: commit it prepared (no preparer round
        # trip), unless the destination's prepare stage has steps (filters, transcoding) to run
        config = table.config
        ripe = config.minimum_age <= 0 and self.service.prepare and dest not in table.with_steps
        counters = self.metrics
        async with self._limiter:
            started = trio.current_time()
            try:
                await self.store.commit_instance(
                    rx.path, rx.header, rx.calling_ae.strip(), destinations, data=rx.data,
                    state=PREPARED if ripe else NEW, sync=rx.sync,
                )
            except StoreFull as exc:
                counters.admission_refusals.labels("free_space").inc()
                log.warning(
                    "refusing %s from %s: %s [%s]", rx.header.sop_instance_uid, rx.calling_ae, exc,
                    instance_identity(config.log_suffix, rx.header),
                )
                raise OutOfResources(str(exc)) from exc
            except StoreError as exc:
                # not acknowledged, so nothing is lost: the sender is told to try again later
                counters.admission_refusals.labels("store_error").inc()
                log.error(
                    "store failed to queue %s from %s: %r [%s]", rx.header.sop_instance_uid, rx.calling_ae,
                    exc, instance_identity(config.log_suffix, rx.header),
                )
                raise OutOfResources(f"store error: {exc}") from exc
            counters.commit_seconds.observe(trio.current_time() - started)
        counters.intake_instances.inc()
        counters.intake_bytes.inc(rx.size_bytes)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "received %s from %s for %s [%s]", rx.header.sop_instance_uid, rx.calling_ae.strip(),
                ", ".join(d.ae_title for d in destinations), instance_identity(config.log_suffix, rx.header),
            )
        if ripe:
            self._on_prepared()
        else:
            self._on_new_items(destinations)
