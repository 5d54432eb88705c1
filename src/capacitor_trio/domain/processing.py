"""Whether the router is idle: the decision behind `GET /api/service/processing-status`.

"Idle" means nothing is in flight and nothing would be sent or prepared if the router were left
alone: no item checked out, no send or preparation running, no item ripe for preparing, and no
node that may send now with an item eligible now. A paused node, a node outside its schedule
window, or delivery switched off does not make the router busy, whatever it has queued.

Pure values and decisions; `actors/queries.py` gathers the inputs from their owners.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs


@attrs.frozen
class NodeProcessing:
    """One node actor as the processing status sees it."""

    ae_title: str
    role: str
    paused: bool
    status: str  # running | restarting | failed | stopped
    sends_in_progress: int
    #: the node may send now and has an item eligible now (asked only while nothing else
    #: already makes the router busy: False then means "not asked")
    ready: bool = False


@attrs.frozen
class ProcessingStatus:
    all_paused: bool
    checked_out_items: int
    active_jobs: int
    idle: bool
    nodes: tuple[NodeProcessing, ...]


def may_send(
    *, delivery: bool, paused: bool, status: str, in_window: bool, schedule_override: bool
) -> bool:
    """Whether a node would send now if it had something eligible: delivery (Storage SCU) on,
    the node not paused, its actor running, inside its schedule window or overridden."""
    return delivery and not paused and status == "running" and (in_window or schedule_override)


def processing_status(
    *,
    service_all_paused: bool,
    checked_out: int,
    preparing: int,
    ripe_unprepared: bool,
    nodes: Sequence[NodeProcessing],
) -> ProcessingStatus:
    """The status from its inputs: `checked_out` items in flight, `preparing` preparation
    passes running, `ripe_unprepared` whether an item waits ripe for its node's prepare stage
    (only with prepare on), and every node actor."""
    active = sum(n.sends_in_progress for n in nodes) + preparing
    ready = ripe_unprepared or any(n.ready for n in nodes)
    return ProcessingStatus(
        all_paused=service_all_paused or (bool(nodes) and all(n.paused for n in nodes)),
        checked_out_items=checked_out,
        active_jobs=active,
        idle=active == 0 and checked_out == 0 and not ready,
        nodes=tuple(nodes),
    )
