"""The control port: the one way in for every change an operator asks for.

The API translates HTTP into calls on `Control` and never changes anything itself. Each call
goes to the owner of the fact it changes, which decides and answers:

| fact                                   | owner                          |
|----------------------------------------|--------------------------------|
| an item's state (one, or in bulk)      | its destination's node actor   |
| a node's pause flag, schedule override | its node actor                 |
| a node's settings                      | nodes.yml through `config/`; in force: `Router.in_force`, replaced here once the node's actor approved the edit |
| the node set, the called-AE routes     | a configuration reload (`actors/reload.py`) |
| the service flags                      | `ServiceFlags`                 |

Items of a destination that has no actor (a node removed from nodes.yml, a role without a
queue) are changed here, in the store, since no actor can be sending them.

Every change of the configuration in force (a node edit, a reload) holds `Router.config_lock`;
so does a resume, so that a node never resumes between its actor's approval of an edit and the
edit being in force.

Every change asked here is recorded in the audit trail (audit.py) once done or refused: who
(`audit.OPERATOR`, which the API sets per request), what, which node or items; the caller waits
until its line is written. Reads (a node's status) and expiry (the router's own) are not.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs
import trio

from capacitor_trio.actors.handle import NodeHandle
from capacitor_trio.actors.messages import (
    ApproveEdit,
    BulkCommand,
    Command,
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
from capacitor_trio.actors.reload import ReloadReport, reload_configuration, reload_filters
from capacitor_trio.audit import OPERATOR, OperatorAction
from capacitor_trio.config.load import check_node_set
from capacitor_trio.config.models import Node
from capacitor_trio.config.nodes_file import PlannedEdit, plan_edit
from capacitor_trio.dicom.requestor import EchoResult, Peer
from capacitor_trio.domain.instance import Destination
from capacitor_trio.domain.states import FAILED, REJECTED
from capacitor_trio.store import ItemFilter
from capacitor_trio.store.model import Item

if TYPE_CHECKING:
    from capacitor_trio.actors.supervisor import Supervisor
    from capacitor_trio.runtime import Router

log = logging.getLogger("capacitor_trio.control")

#: How long an echo may take (the contract: "Times out after 10 seconds").
ECHO_TIMEOUT = 10.0
#: How long a bulk action may take in one node actor.
BULK_TIMEOUT = 60.0
#: How long a failed node may take to come back after an operator restart.
RESTART_TIMEOUT = 5.0


@attrs.define
class _Note:
    """What an audited action reports for its audit line."""

    count: int | None = None


def _node_target(node: Node) -> str:
    return f"{node.ae_title} ({node.role})"


def _filter_target(f: ItemFilter) -> str:
    """The filter's criteria, e.g. "state=failed destination=PACS"."""
    return " ".join(f"{k}={v}" for k, v in attrs.asdict(f).items() if v is not None) or "all items"


class WriteFailed(Exception):
    """A file the change needed could not be written; nothing was changed (API: 500)."""


class PartlyDone(Exception):
    """A bulk action changed some items, but some node actors did not answer (API: 503)."""


class Control:
    """Commands for the running router, each answered by the owner of what it changes."""

    def __init__(self, router: Router) -> None:
        self.router = router

    @property
    def _supervisor(self) -> Supervisor:
        return self.router.supervisor

    def handle(self, node: Node) -> NodeHandle | None:
        return self._supervisor.handle(node.ae_title, node.role)

    async def _destinations_without_actor(self, only: str | None = None) -> list[Destination]:
        """Destinations with items but no node actor (a node removed from nodes.yml, a role
        without a queue): their items are changed here, since nothing can be sending them."""
        return [
            d for d in await self.router.store.destinations()
            if self._supervisor.handle(d.ae_title, d.role) is None and only in (None, d.ae_title)
        ]

    def _need_handle(self, node: Node) -> NodeHandle:
        handle = self.handle(node)
        if handle is None:
            raise CommandRefused(f"node {node.ae_title} ({node.role}) has no queue to act on")
        return handle

    # ---- nodes --------------------------------------------------------------------------------

    async def node_command(self, node: Node, command: Command[NodeStatus]) -> NodeStatus:
        """Pause, SetOverride, GetStatus: answered by the node's actor (the changes audited)."""
        if isinstance(command, GetStatus):
            return await self._need_handle(node).call(command)
        on = isinstance(command, SetOverride) and command.on
        action = "pause" if isinstance(command, Pause) else f"override-{'on' if on else 'off'}"
        async with self._audited(action, _node_target(node)):
            return await self._need_handle(node).call(command)

    async def resume(self, node: Node) -> NodeStatus:
        """Resume; a failed node is restarted first (the operator's explicit restart)."""
        async with self._audited("resume", _node_target(node)):
            return await self._resume(node)

    async def _resume(self, node: Node) -> NodeStatus:
        handle = self._need_handle(node)
        if handle.status.value == "failed":
            self._supervisor.restart(handle)
            with trio.move_on_after(RESTART_TIMEOUT):
                await handle.status.wait_value("running")
            if handle.status.value != "running":
                raise NodeUnavailable(f"node {node.ae_title} is {handle.status.value} after restart")
        async with self.router.config_lock:
            status: NodeStatus = await handle.call(Resume())
        return status

    async def echo(self, node: Node) -> EchoResult:
        async with self._audited("echo", _node_target(node)):
            return await self._echo(node)

    async def _echo(self, node: Node) -> EchoResult:
        handle = self.handle(node)
        result: EchoResult | None = None
        if handle is not None:
            result = await handle.call(Echo(timeout=ECHO_TIMEOUT), timeout=ECHO_TIMEOUT + 2)
        else:  # a node without a queue (QueryRetrieve, …): echoed from here
            sender = self._supervisor.ctx.sender
            peer = Peer(node.ae_title, node.host_name, node.port)
            my_ae = self.router.settings.config.my_ae_title
            with trio.move_on_after(ECHO_TIMEOUT + 1):
                result = await sender.echo(peer, my_ae, timeout=ECHO_TIMEOUT)
            if result is None:
                raise NodeUnavailable(f"echo to {node.ae_title} did not finish in time")
        latency = result.latency_ms
        if latency is not None and not math.isfinite(latency):
            latency = None
        return EchoResult(bool(result.success), latency, result.error or None)

    async def edit_node(self, current: Node, changes: dict[str, Any]) -> tuple[Node, NodeStatus | None]:
        """Edit one node (`changes`: Node attribute -> new value, None for blank): nodes.yml is
        first checked as it is on disk (config/nodes_file), then the node's actor approves (it
        refuses unless paused with nothing checked out), then the file is written, and only then
        is the edit put in force; a failed write changes nothing."""
        action = "edit-node " + ",".join(sorted(changes))
        async with self._audited(action, _node_target(current)), self.router.config_lock:
            return await self._edit_node(current, changes)

    async def _edit_node(self, current: Node, changes: dict[str, Any]) -> tuple[Node, NodeStatus | None]:
        config = self.router.settings.config
        path = config.data_dir / "nodes.yml"
        edit = functools.partial(plan_edit, path, current, changes, prefix=config.ae_title_prefix)
        planned = await trio.to_thread.run_sync(edit)
        updated = planned.node
        nodes = list(self.router.nodes)
        index = next(i for i, n in enumerate(nodes) if n.key == current.key)
        nodes[index] = updated
        check_node_set(nodes, "request body", prefix=config.ae_title_prefix, edited=updated)
        # From the actor's new settings to the file, the node set in force and the routes:
        # all of it, even if the caller goes away meanwhile, or the actor and the file disagree.
        with trio.CancelScope(shield=True):
            status = await self._apply_edit(current, planned, tuple(nodes))
        return updated, status

    async def _apply_edit(
        self, current: Node, planned: PlannedEdit, nodes: tuple[Node, ...]
    ) -> NodeStatus | None:
        handle = self.handle(current)
        status: NodeStatus | None = None
        if handle is not None:
            status = await handle.call(ApproveEdit(planned.node))
        try:
            await trio.to_thread.run_sync(planned.write)
        except OSError as exc:
            raise WriteFailed(f"cannot write {planned.path.name}: {exc.strerror}") from None
        self.router.settings = attrs.evolve(self.router.settings, nodes=nodes)
        log.info("node %s: settings updated", planned.node.ae_title)
        if handle is not None:
            self._supervisor.settings_changed(handle.key)
            status = await handle.call(GetStatus())
        return status

    # ---- items --------------------------------------------------------------------------------

    async def item_action(self, item_id: int, action: str, target: str | None = None) -> Item | None:
        """fail, reject, retry, move or delete one item, by the actor that owns it."""
        name = f"item-{action}" + (f" to {target}" if target else "")
        async with self._audited(name, f"item {item_id}", items=(item_id,)):
            return await self._item_action(item_id, action, target)

    async def _item_action(self, item_id: int, action: str, target: str | None) -> Any:
        store = self.router.store
        item = await store.get_item(item_id)
        handle = self._supervisor.handle(item.destination_ae, item.destination_role)
        if handle is not None:
            return await handle.call(ItemCommand(action, item_id, target))
        if action == "delete":
            await store.delete(item_id)
            return None
        if action == "retry":
            return await store.retry(item_id)
        return await store.move(item_id, required_state({"fail": FAILED, "reject": REJECTED}.get(action, target), action))

    async def bulk(self, command: BulkCommand) -> int:
        """`command` in every node actor concerned, and here for destinations without an actor;
        the number of items changed. Raises PartlyDone when an actor did not answer."""
        state = command.target_state or command.from_state
        name = f"bulk-{command.action}" + (f" {state}" if state else "")
        async with self._audited(name, _filter_target(command.filter)) as note:
            note.count = await self._bulk(command)
            return note.count

    async def _bulk(self, command: BulkCommand) -> int:
        f = command.filter
        handles = [h for h in self._supervisor.handles if f.destination in (None, h.ae_title)]
        total = 0
        unavailable: list[str] = []
        for handle in handles:
            try:
                total += int(await handle.call(command, timeout=BULK_TIMEOUT))
            except NodeUnavailable:
                unavailable.append(handle.ae_title)
        total += await self._bulk_without_actor(command)
        if unavailable:
            raise PartlyDone(
                f"changed {total} item(s), but node(s) {', '.join(unavailable)} did not answer; try again"
            )
        return total

    async def _bulk_without_actor(self, command: BulkCommand) -> int:
        store = self.router.store
        f = command.filter
        total = 0
        for dest in await self._destinations_without_actor(f.destination):
            g = attrs.evolve(f, destination=dest.ae_title, role=dest.role)
            if command.action == "move":
                total += await store.move_where(g, required_state(command.target_state, command.action))
            elif command.action == "retry":
                total += await store.retry_where(g, required_state(command.from_state, command.action))
            else:
                total += await store.delete_where(g)
        return total

    async def expire(self, threshold_seconds: float) -> int:
        """expiryThreshold: every node actor expires its own old items; items of destinations
        without an actor are expired here. A node that does not answer is left for next time."""
        total = 0
        for handle in self._supervisor.handles:
            with contextlib.suppress(NodeUnavailable):
                total += int(await handle.call(Expire(threshold_seconds), timeout=BULK_TIMEOUT))
        for dest in await self._destinations_without_actor():
            moved = await self.router.store.expire(self.router.clock(), threshold_seconds, dest)
            if moved:
                log.warning(
                    "%d item(s) for %s (no such node now) older than expiryThreshold (%d s) "
                    "moved to expired", moved, dest.ae_title, threshold_seconds,
                )
            total += moved
        return total

    # ---- service ------------------------------------------------------------------------------

    async def set_service(self, enabled: bool) -> dict[str, bool]:
        async with self._audited("service-resume" if enabled else "service-pause", "service"):
            self.router.service.set_all(enabled)
        return self.router.service.as_dict()

    async def reload(self) -> ReloadReport:
        async with self._audited("reload", "config.yml, nodes.yml"):
            return await reload_configuration(self.router)

    # ---- the audit trail ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _audited(
        self, action: str, target: str, *, items: tuple[int, ...] = ()
    ) -> AsyncIterator[_Note]:
        """Record the action in the audit trail once it is done or refused (who: the API's
        `OPERATOR`); the caller waits until the line is written (audit.py)."""
        note = _Note()
        outcome = "ok"
        try:
            yield note
        except Exception as exc:
            outcome = f"refused: {exc}"
            raise
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            trail = self.router.audit
            if trail is not None:
                event = OperatorAction(OPERATOR.get(), action, target, items, note.count, outcome)
                with trio.CancelScope(shield=True):
                    await trail.record(event, written=True)

    async def reload_filters(self) -> dict[str, Any]:
        """Re-read the filter files; the new chain in force, or a ConfigError and the old one
        stays (actors/reload.py)."""
        return await reload_filters(self.router)

