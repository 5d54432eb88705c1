"""Commands the API (and tests) send to node actors, the replies, and the status snapshot."""

from __future__ import annotations

from typing import Generic, TypeVar

import attrs
import trio

from capacitor_trio.config.models import Node
from capacitor_trio.dicom.verification import EchoResult
from capacitor_trio.store.model import Counts, Item, ItemFilter

#: what a command's reply carries
R_co = TypeVar("R_co", covariant=True)


class NodeUnavailable(Exception):
    """The node actor is restarting, has failed, or did not answer in time (API: 503)."""


class CommandRefused(Exception):
    """The actor refused the command in its current state (API: 409)."""


def required_state(state: str | None, action: str) -> str:
    """The state an item or bulk command names; one that needs a state and names none is
    refused."""
    if state is None:
        raise CommandRefused(f"{action} needs a state")
    return state


class Command(Generic[R_co]):
    """A command to a node actor whose reply value is an `R_co` (what `NodeHandle.call`
    returns)."""

    __slots__ = ()


@attrs.frozen
class Reply:
    value: object = None
    error: BaseException | None = None


@attrs.frozen
class Call:
    """A command with the channel its single reply goes to."""

    command: Command[object]
    reply_to: trio.MemorySendChannel[Reply]


# ---- node commands ---------------------------------------------------------------------------


@attrs.frozen
class GetStatus(Command["NodeStatus"]):
    pass


@attrs.frozen
class Pause(Command["NodeStatus"]):
    pass


@attrs.frozen
class Resume(Command["NodeStatus"]):
    pass


@attrs.frozen
class SetOverride(Command["NodeStatus"]):
    on: bool


@attrs.frozen
class Echo(Command[EchoResult]):
    timeout: float = 10.0


@attrs.frozen
class ApproveEdit(Command["NodeStatus"]):
    """May the node's settings be replaced by `node` now? The actor answers (its status), or
    refuses unless the node is paused with nothing checked out; the control port then puts the
    edit in force (it owns the settings in force) and keeps a resume waiting until it has."""

    node: Node


@attrs.frozen
class ItemCommand(Command[Item | None]):
    """An operator action on one item the node owns: fail, reject, retry, move, delete; the
    reply is the item after it (None after delete)."""

    action: str
    item_id: int
    target_state: str | None = None


@attrs.frozen
class BulkCommand(Command[int]):
    """An operator action on every item of this node matching a filter: move, retry, delete.

    The actor narrows `filter` to its own destination."""

    action: str
    filter: ItemFilter
    target_state: str | None = None
    from_state: str | None = None


@attrs.frozen
class Expire(Command[int]):
    """Move this node's queued items (new, prepared, failed) received more than
    `threshold_seconds` ago to expired (`expiryThreshold`); the answer is how many."""

    threshold_seconds: float


# ---- status ----------------------------------------------------------------------------------


@attrs.frozen
class NodeStatus:
    """Everything the API shows about a node, as one frozen snapshot."""

    ae_title: str
    role: str
    status: str  # running | restarting | failed
    activity: str  # idle | sending | waiting-schedule | backing-off | paused | service-paused | ...
    paused: bool
    schedule_override: bool
    in_window: bool
    last_error: str
    last_delivered_at: float | None
    restarts: int
    queue: Counts = attrs.field(factory=Counts)
    sends_in_progress: int = 0
    #: instances delivered per second over the last minute
    send_rate: float = 0.0
    #: when the oldest item waiting to be delivered (new, prepared, failed) arrived (wall time)
    oldest_waiting_at: float | None = None
