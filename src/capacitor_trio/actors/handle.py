"""Handles: how everything outside a node actor talks to it.

A handle outlives the actor incarnations behind it (the supervisor owns the inbox), so the API
can keep one handle per node. `call` sends a command and awaits the single reply under a
deadline; a node that is restarting or failed refuses at once instead of hanging.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

import trio
from trio_util import AsyncValue

from capacitor_trio.actors.messages import Call, Command, NodeUnavailable, Reply
from capacitor_trio.actors.wakeup import Wakeup
from capacitor_trio.config.models import Node
from capacitor_trio.domain.instance import Destination

if TYPE_CHECKING:
    from capacitor_trio.actors.prepare import NodePreparer

R = TypeVar("R")

#: Default time a caller waits for an actor's reply.
REPLY_TIMEOUT = 5.0


#: the node's settings in force, by (AE title, role); None once the node was removed
NodeLookup = Callable[[tuple[str, str]], "Node | None"]


class NodeHandle:
    def __init__(self, node: Node, lookup: NodeLookup | None = None, inbox_size: int = 32) -> None:
        self.key = node.key
        #: the node as last read from the settings in force (what a removed node keeps)
        self._last = node
        self._lookup = lookup
        self.destination = Destination(node.ae_title, node.role)
        self._send, self.inbox = trio.open_memory_channel[Call](inbox_size)
        #: "running", "restarting", "failed" or "stopped"; written only by the supervisor, and
        #: others wait on it (`wait_value`)
        self.status: AsyncValue[str] = AsyncValue("restarting")
        #: set when something may have become deliverable (new items, resume, override...)
        self._wake = Wakeup()
        #: the prepare stage of the actor incarnation serving now (set by the actor)
        self.preparer: NodePreparer | None = None

    @property
    def node(self) -> Node:
        """The node's settings in force, read where they are used: their one owner is the
        router's configuration in force (`Router.in_force`), which a node edit or a reload
        replaces; the handle only looks them up. A node a reload removed keeps the settings it
        was last seen with while its actor stops."""
        if self._lookup is not None:
            found = self._lookup(self.key)
            if found is not None:
                self._last = found
        return self._last

    @property
    def ae_title(self) -> str:
        return self.key[0]

    def wake(self) -> None:
        """Tell the actor to look at its queue again (never blocks)."""
        self._wake.set()

    async def wait_woken(self) -> None:
        await self._wake.wait()

    def items_arrived(self) -> None:
        """New items for this node were committed `new`: its prepare stage looks if it must."""
        if self.preparer is not None:
            self.preparer.arrived()

    def wake_preparer(self) -> None:
        """The prepare stage looks again (service flags, a reload's minimumAge)."""
        if self.preparer is not None:
            self.preparer.wake()

    def clear_wake(self) -> None:
        """Forget earlier wake-ups (the actor is about to look at its queue)."""
        self._wake.clear()

    async def call(self, command: Command[R], *, timeout: float = REPLY_TIMEOUT) -> R:  # noqa: ASYNC109 (a reply deadline is the caller's choice)
        """Send `command`, wait for the reply; raise what the actor raised, or NodeUnavailable."""
        status = self.status.value
        if status != "running":
            raise NodeUnavailable(f"node {self.ae_title} is {status}")
        reply_send, reply_recv = trio.open_memory_channel[Reply](1)
        with trio.move_on_after(timeout) as scope:
            try:
                self._send.send_nowait(Call(command, reply_send))
            except trio.WouldBlock:
                raise NodeUnavailable(f"node {self.ae_title} is busy (inbox full)") from None
            reply = await reply_recv.receive()
        if scope.cancelled_caught:
            raise NodeUnavailable(f"node {self.ae_title} did not answer within {timeout:g} s")
        if reply.error is not None:
            raise reply.error
        # the actor answers each command with its own reply type (actors/node.py)
        return cast(R, reply.value)


def answer(call: Call, value: object = None, error: BaseException | None = None) -> None:
    """Reply to a call; a caller that has gone away is ignored."""
    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        call.reply_to.send_nowait(Reply(value, error))
