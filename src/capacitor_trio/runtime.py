"""The router process: one Trio nursery tree.

config -> store -> audit trail -> supervisor (+ node actors, each with its prepare stage) ->
receiver -> DICOM listener -> API. One `Metrics` (metrics.py) is shared by the node actors, the
receiver and the acceptor.
Shutdown: SIGINT/SIGTERM cancel the whole tree at once. Listeners stop accepting, associations
in progress end without answering what was not yet committed, node actors abort their sends
(A-ABORT; the outcomes already reported are recorded and the rest go back to the queue, shielded
with a grace deadline), and the store closes last, after every task that could write has ended. A crash of a
core service (store, receiver, listener, API) takes the process down loudly; only node actors
are restarted in-process.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import attrs
import trio
from trio_util import AsyncValue

from capacitor_trio import gctune
from capacitor_trio.actors.control import Control
from capacitor_trio.actors.node import NodeContext, Sender
from capacitor_trio.actors.receiver import Receiver
from capacitor_trio.actors.service import ServiceFlags
from capacitor_trio.actors.supervisor import Supervisor
from capacitor_trio.audit import AuditTrail
from capacitor_trio.config import Config, Settings
from capacitor_trio.config.models import Node, effective
from capacitor_trio.dicom import requestor
from capacitor_trio.dicom.acceptor import AcceptorConfig
from capacitor_trio.dicom.conversion import PoolConverter
from capacitor_trio.dicom.listener import serve_acceptor
from capacitor_trio.dicom.sender_process import SenderProcess
from capacitor_trio.domain.filters import summary
from capacitor_trio.logs import RingBufferHandler
from capacitor_trio.loopwatch import LoopLag
from capacitor_trio.metrics import Metrics
from capacitor_trio.store import Store, StoreInUse, open_store
from capacitor_trio.transcode.pool import TranscodePool

log = logging.getLogger("capacitor_trio")

#: How often queued items are checked against expiryThreshold.
EXPIRY_INTERVAL = 60.0


def _in_force(value: Settings | AsyncValue[Settings]) -> AsyncValue[Settings]:
    return value if isinstance(value, AsyncValue) else AsyncValue(value)


@attrs.define(eq=False)
class Router:
    """The running router's parts, for the API and for tests."""

    #: the configuration and nodes in force (replaced whole by a node edit or a reload; tasks
    #: may wait on it). Pass Settings or an AsyncValue of them.
    in_force: AsyncValue[Settings] = attrs.field(converter=_in_force)
    store: Store
    supervisor: Supervisor
    receiver: Receiver
    service: ServiceFlags
    clock: Callable[[], float]
    started_at: float
    ring: RingBufferHandler | None = None
    dicom_port: int | None = None
    api_port: int | None = None
    #: held by every change of the configuration in force (a reload, a node edit)
    config_lock: trio.Lock = attrs.field(factory=trio.Lock)
    #: how late the event loop wakes a sleeping task (zeros unless `watch_loop`)
    loop: LoopLag = attrs.field(factory=LoopLag)
    #: the router's counters (metrics.py): the node actors, the receiver and the acceptor write
    #: them; `GET /api/metrics` and `GET /metrics` read them
    metrics: Metrics = attrs.field(factory=Metrics)
    #: the audit trail (audit.py): operator actions through the control port, deliveries
    audit: AuditTrail | None = None

    @property
    def settings(self) -> Settings:
        return self.in_force.value

    @settings.setter
    def settings(self, value: Settings) -> None:
        self.in_force.value = value

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The nodes in force."""
        return self.settings.nodes


async def run_router(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    ring: RingBufferHandler | None = None,
    sender: Sender | None = None,
    settle_gc: bool = False,
    watch_loop: bool = False,
    log_dir: Path | None = None,
    task_status: trio.TaskStatus[Router] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run every service of the router until cancelled; `task_status.started(router)` once all
    listeners serve. `settle_gc`: set the garbage collector for the long run then (`gctune`;
    the daemon does, tests running the router in their own process do not). `watch_loop`:
    measure event-loop stalls (`loopwatch`; the daemon does, tests on virtual time must not).
    `log_dir`: where the audit trail is written (default: `log` in the data directory)."""
    config = settings.config
    for warning in settings.warnings:
        log.warning(warning)
    service = ServiceFlags()
    async with open_store(
        config.cache_path,
        durable=config.durable_writes,
        min_free_space_percent=config.min_free_space,
        cycle_rejected_on_startup=config.cycle_rejected_files_on_startup,
        clock=clock,
    ) as store, trio.open_nursery() as senders:
        audit = AuditTrail(config.data_dir, log_dir or config.data_dir / "log")
        await senders.start(audit.run)  # before everything that records, ended after them
        transcoder, sender = await _start_delivery(senders, config, sender)
        metrics = Metrics()
        # the one owner of the configuration and node set in force: the rest reads them here
        in_force = AsyncValue(settings)
        ctx = NodeContext(
            store=store, sender=sender, config=lambda: in_force.value.config, service=service,
            clock=clock, metrics=metrics, audit=audit, transcoder=transcoder,
        )
        supervisor = Supervisor(
            lambda: in_force.value.nodes, ctx, chaos_every=config.chaos.kill_node_actors_every_seconds
        )
        ctx.resolve_destination = supervisor.storage_destination
        ctx.items_added = supervisor.items_arrived
        receiver = Receiver(
            lambda: in_force.value.config, store, lambda: in_force.value.nodes, service, clock,
            on_prepared=supervisor.wake_all, on_new_items=supervisor.items_arrived, metrics=metrics,
        )
        router = Router(in_force, store, supervisor, receiver, service, clock, clock(), ring, metrics=metrics, audit=audit)
        async with trio.open_nursery() as core:
            await core.start(supervisor.run)
            core.start_soon(_expire_forever, router)
            core.start_soon(warm_transcoder, in_force, transcoder)
            if config.api.enabled:
                from capacitor_trio.api.server import run_api
            if settle_gc:  # before the listeners: no association waits for its collection
                gctune.settle()
            async with trio.open_nursery() as edge:
                if config.scp_port:
                    acceptor = attrs.evolve(
                        _acceptor_config(config, store.inline_max_bytes),
                        on_accepted=metrics.association_accepted,
                    )
                    router.dicom_port = await edge.start(serve_acceptor, acceptor, receiver)
                if config.api.enabled:
                    router.api_port = await edge.start(run_api, router)
                if watch_loop:  # after start-up's one-off costs (gctune.settle, first imports)
                    core.start_soon(router.loop.watch)
                if config.filter_chain.names:  # each node's prepare stage runs it item by item
                    log.info("%s", summary(config.filter_chain))
                log.info(
                    "router ready: %d Storage node(s), spool %s, durable writes %s",
                    len(supervisor.handles), config.cache_path, "on" if config.durable_writes else "off",
                )
                task_status.started(router)


async def _start_delivery(
    nursery: trio.Nursery, config: Config, sender: Sender | None
) -> tuple[TranscodePool, Sender]:
    """The transcode worker processes (one started ahead while a node has a TransferSyntax:
    `warm_transcoder`; prepared copies in a node's syntax, and conversions on the way out of
    sends run in this process) and the sender: `sender` if given, else the sender process
    (`deliveryProcess`) or this process's requestor, both converting through the pool."""
    transcoder = await nursery.start(TranscodePool().run)
    if sender is None:
        local = requestor.LocalSender(PoolConverter(transcoder))
        if config.delivery_process:
            sender = SenderProcess(converter=local.converter)
            await nursery.start(sender.run)
        else:
            sender = local
    return transcoder, sender


def _acceptor_config(config: Config, inline_max_bytes: int) -> AcceptorConfig:
    """The DICOM listener's configuration from config.yml's keys."""
    return AcceptorConfig(
        ae_title=config.my_ae_title,
        port=config.scp_port,
        max_pdu_size=config.max_pdu_size,
        max_clients=config.max_clients_per_server,
        client_timeout=float(config.client_timeout),
        reject_abstract_syntaxes=frozenset(config.reject_abstract_syntaxes),
        # what the store keeps in its index is received in memory, no more
        memory_max_bytes=inline_max_bytes,
    )


def _transcodes(settings: Settings) -> bool:
    """Does a Storage node in force convert into a TransferSyntax (its own or the default)?"""
    return any(effective(n, settings.config).transfer_syntax for n in settings.storage_nodes())


class Warmable(Protocol):
    """What `warm_transcoder` needs of the transcode pool."""

    async def warm(self) -> None: ...


async def warm_transcoder(in_force: AsyncValue[Settings], pool: Warmable) -> None:
    """Start a transcode worker ahead (`TranscodePool.warm`) whenever the settings in force have
    a node with a TransferSyntax: at start-up, and after a reload or node edit that brings one,
    so that its first conversion does not wait for the worker's start and imports. A worker
    that cannot start is logged; its conversions report it in their turn."""
    async for _ in in_force.eventual_values(_transcodes):
        try:
            await pool.warm()
        except Exception as exc:
            log.warning("the transcode worker could not be started ahead: %s", exc)


async def _expire_forever(router: Router) -> None:
    """expiryThreshold, asked of the owners of the items through the control port (each logs
    what it expired)."""
    control = Control(router)
    while True:
        await control.expire(router.settings.config.expiry_threshold)  # a reload may change it
        await trio.sleep(EXPIRY_INTERVAL)


async def _main(settings: Settings, ring: RingBufferHandler, log_dir: Path | None = None) -> int:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            running: AsyncValue[Router | None] = AsyncValue(None)

            async def on_signals() -> None:
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        log.info("received %s, shutting down", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel(reason="signal")
                        return
                    if running.value is None:
                        log.warning("received SIGHUP while starting: nothing to reload yet")
                    else:
                        nursery.start_soon(_reload_logged, running.value)

            nursery.start_soon(on_signals)
            running.value = await nursery.start(
                lambda task_status: run_router(
                    settings, ring=ring, settle_gc=True, watch_loop=True, log_dir=log_dir,
                    task_status=task_status,
                )
            )
    log.info("stopped")
    return 0


async def _reload_logged(router: Router) -> None:
    """SIGHUP: reload; reload_configuration logs the outcome, and a refusal keeps the router up."""
    from capacitor_trio.actors.reload import reload_configuration

    with contextlib.suppress(Exception):
        await reload_configuration(router)


#: the soft descriptor limit asked for when the hard limit is unlimited
FD_LIMIT_WANTED = 65536


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (1024 by default on Linux, where the hard
    limit is often 524288): every association, spool file and API connection holds descriptors,
    and running out of them stops intake. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    return soft


def run_daemon(settings: Settings, *, log_level: str = "INFO", log_dir: Path | None = None) -> int:
    """Run the router until a signal stops it. Logs go to stderr, the API's ring buffer and the
    files in `log_dir` (default: `log` in the data directory; logs.py)."""
    from capacitor_trio.logs import setup_file_logging, setup_logging

    config = settings.config
    ring = RingBufferHandler()
    setup_logging(log_level, ring, suppress_calling_aes=config.suppress_log_ae_titles)
    log_dir = log_dir or config.data_dir / "log"
    try:
        setup_file_logging(
            log_dir,
            suppress_calling_aes=config.suppress_log_ae_titles,
            web_log=not config.suppress_web_log,
        )
    except OSError as exc:
        log.error("cannot start: cannot open the log files: %s", exc)
        return 1
    log.debug("open-file limit: %d", raise_fd_limit())
    try:
        return trio.run(_main, settings, ring, log_dir)
    except (OSError, StoreInUse, BaseExceptionGroup) as exc:  # e.g. the DICOM port is taken
        leaves = list(_leaves(exc))
        if not all(isinstance(e, (OSError, StoreInUse)) for e in leaves):
            raise
        for error in leaves:
            log.error("cannot start: %s", error)
        return 1


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc
