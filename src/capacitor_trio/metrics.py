"""The router's counters: one `Metrics` object per running router, written where the facts
happen, read by both `GET /api/metrics` (the contract's JSON) and `GET /metrics` (Prometheus).

Who writes what:

| series                                  | written by                                          |
|-----------------------------------------|-----------------------------------------------------|
| delivered instances and bytes, failures by outcome and DIMSE status class, conversions on the way out | the node actor as it records outcomes (`actors/sending.py`) |
| association errors by kind, send duration | the node actor, once per association it opened     |
| intake associations                     | the DICOM acceptor, once per association it accepts |
| intake instances and bytes, commit latency, admission refusals | the receiver (`actors/receiver.py`) |

What lives elsewhere is read at scrape time, never copied here: items by state, checked out and
the oldest waiting item's age (the store's read-only queries), paused, in window and actor
restarts (the supervisor's snapshots), free space (the store). `/metrics` collects those into a
`Snapshot` first (the only awaits of a scrape), then renders the registry and the snapshot in one
synchronous pass (`render`): a scrape writes nothing.

The registry is private (`CollectorRegistry`), not prometheus_client's global one: tests and
several routers in one process each have their own. It carries the library's process, platform
and garbage-collector collectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import attrs
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from capacitor_trio.domain.outcomes import Outcome, Rejected, RetryLater, SendConversion

#: the content type of the text exposition format
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: send duration (one association: connect, negotiate, stores, release), seconds
SEND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: commit latency of one received instance (the store's durable commit), seconds
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

NODE_LABELS = ("node", "role")


@attrs.frozen
class NodeMetrics:
    """One node's children of the per-node series (looked up once, not per event)."""

    delivered: Counter
    delivered_bytes: Counter
    send_seconds: Histogram
    node: str
    role: str
    metrics: Metrics

    def failure(self, outcome: Outcome) -> None:
        """Count a failed instance: by outcome (retry_later, rejected) and DIMSE status class
        ("none" when no C-STORE response refused it: the association failed, a spool file...)."""
        if isinstance(outcome, Rejected):
            name = "rejected"
        elif isinstance(outcome, RetryLater):
            name = "retry_later"
        else:
            return
        status_class = outcome.status_class or "none"
        self.metrics.failures.labels(self.node, self.role, name, status_class).inc()

    def association_error(self, kind: str) -> None:
        self.metrics.association_errors.labels(self.node, self.role, kind).inc()

    def send_conversion(self, result: SendConversion) -> None:
        """Count an instance converted on the way out, by result (`send_conversion`)."""
        self.metrics.send_conversions.labels(self.node, self.role, result).inc()


@attrs.frozen
class NodeFigures:
    """What a scrape reads of one node from its owners (store counts, supervisor snapshot)."""

    node: str
    role: str
    by_state: dict[str, int]
    checked_out: int
    #: seconds since the oldest item waiting for delivery was received (0: none waits)
    oldest_waiting_age: float
    paused: bool
    in_window: bool
    restarts: int


@attrs.frozen
class Snapshot:
    """The facts a scrape reads from their owners, taken before rendering."""

    nodes: tuple[NodeFigures, ...] = ()
    #: free space of the data directory's file system, percent (with what the store reuses)
    free_space_percent: float | None = None
    #: minFreeSpace in force, percent (for alert rules: free space near it)
    min_free_space_percent: float | None = None


class _Source(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class Metrics:
    """The router's counters in one private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.delivered = Counter(
            "capacitor_node_delivered_instances", "Instances the destination stored (outcome recorded)",
            NODE_LABELS, registry=r,
        )
        self.delivered_bytes = Counter(
            "capacitor_node_delivered_bytes", "Bytes of the instances delivered (stored size)",
            NODE_LABELS, registry=r,
        )
        self.failures = Counter(
            "capacitor_node_failures",
            "Instances whose send failed, by outcome (retry_later, rejected) and DIMSE status class",
            (*NODE_LABELS, "outcome", "status_class"), registry=r,
        )
        self.send_conversions = Counter(
            "capacitor_node_send_conversions",
            "Instances converted on the way out into a syntax the destination accepts, by result "
            "(converted: delivered so; failed: rejected, the conversion failed)",
            (*NODE_LABELS, "result"), registry=r,
        )
        self.association_errors = Counter(
            "capacitor_node_association_errors", "Associations to the destination that failed, by kind",
            (*NODE_LABELS, "kind"), registry=r,
        )
        self.send_seconds = Histogram(
            "capacitor_node_send_duration_seconds",
            "Duration of one association to the destination (connect to release or failure)",
            NODE_LABELS, buckets=SEND_BUCKETS, registry=r,
        )
        self.intake_associations = Counter(
            "capacitor_intake_associations", "DICOM associations accepted", registry=r
        )
        self.intake_instances = Counter(
            "capacitor_intake_instances", "Instances received and committed", registry=r
        )
        self.intake_bytes = Counter(
            "capacitor_intake_bytes", "Bytes of the instances received and committed", registry=r
        )
        self.commit_seconds = Histogram(
            "capacitor_intake_commit_duration_seconds",
            "Time from a received instance's hand-over to its durable commit",
            buckets=COMMIT_BUCKETS, registry=r,
        )
        self.admission_refusals = Counter(
            "capacitor_intake_admission_refusals",
            "Instances or associations refused for the store (free_space, store_error)",
            ("reason",), registry=r,
        )
        self._nodes: dict[tuple[str, str], NodeMetrics] = {}

    def node(self, ae_title: str, role: str) -> NodeMetrics:
        """The node's series (made on first use)."""
        key = (ae_title, role)
        found = self._nodes.get(key)
        if found is None:
            found = self._nodes[key] = NodeMetrics(
                self.delivered.labels(ae_title, role),
                self.delivered_bytes.labels(ae_title, role),
                self.send_seconds.labels(ae_title, role),
                ae_title, role, self,
            )
        return found

    def association_accepted(self, calling_ae: str, called_ae: str) -> None:
        self.intake_associations.inc()

    # ---- reads ------------------------------------------------------------------------------

    def received(self) -> int:
        """Instances received and committed since start (the contract's `received`)."""
        return int(_total(self.intake_instances))

    def render(self, snapshot: Snapshot) -> bytes:
        """The text exposition of the registry and `snapshot`, in one synchronous pass."""
        return generate_latest(_Joined((self.registry, _SnapshotCollector(snapshot))))


def _total(counter: Counter) -> float:
    """The sum of a counter's `_total` samples over its children."""
    return sum(
        s.value for family in counter.collect() for s in family.samples if s.name.endswith("_total")
    )


@attrs.frozen
class _Joined:
    """What `generate_latest` renders: several collectors as one."""

    sources: tuple[_Source, ...]

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.collect()


@attrs.frozen
class _SnapshotCollector:
    """The gauges that live in the store and the actors, from a snapshot taken for this scrape."""

    snapshot: Snapshot

    def collect(self) -> Iterator[Metric]:
        nodes = self.snapshot.nodes
        items = GaugeMetricFamily("capacitor_node_items", "Queue items by state", labels=(*NODE_LABELS, "state"))
        checked = _gauge("capacitor_node_checked_out", "Items checked out for a send")
        oldest = _gauge(
            "capacitor_node_oldest_waiting_age_seconds",
            "Age of the oldest item waiting for delivery (new, prepared or failed; 0 when none)",
        )
        paused = _gauge("capacitor_node_paused", "1 when the node is paused")
        window = _gauge("capacitor_node_in_window", "1 when the node's ProcessSchedule lets it send now")
        restarts = CounterMetricFamily(
            "capacitor_node_actor_restarts", "Restarts of the node's actor since start", labels=NODE_LABELS
        )
        for n in nodes:
            labels = [n.node, n.role]
            for state, count in n.by_state.items():
                items.add_metric([*labels, state], count)
            checked.add_metric(labels, n.checked_out)
            oldest.add_metric(labels, n.oldest_waiting_age)
            paused.add_metric(labels, 1.0 if n.paused else 0.0)
            window.add_metric(labels, 1.0 if n.in_window else 0.0)
            restarts.add_metric(labels, n.restarts)
        yield from (items, checked, oldest, paused, window, restarts)
        if self.snapshot.free_space_percent is not None:
            yield GaugeMetricFamily(
                "capacitor_intake_free_space_percent",
                "Free space of the data directory's file system, percent (minFreeSpace refuses below)",
                value=self.snapshot.free_space_percent,
            )
        if self.snapshot.min_free_space_percent is not None:
            yield GaugeMetricFamily(
                "capacitor_intake_min_free_space_percent",
                "minFreeSpace in force: instances are refused below this free space, percent",
                value=self.snapshot.min_free_space_percent,
            )


def _gauge(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=NODE_LABELS)
