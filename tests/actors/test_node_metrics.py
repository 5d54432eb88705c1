"""A node actor's counters (metrics.py) on virtual time: delivered instances and bytes, failures
by outcome and DIMSE status class, one association error per failed association (not one per
instance), and the send duration measured exactly."""

from __future__ import annotations

from typing import Any

import trio

from capacitor_trio.config.models import Node
from capacitor_trio.domain.outcomes import Delivered, Rejected, RetryLater

from .fakes import FakeSender
from .test_node import make_world  # noqa: F401 (fixture)


def sample(w: Any, name: str, **labels: str) -> float | None:
    return w.sup.ctx.metrics.registry.get_sample_value(name, {"node": "PACS", "role": "Storage", **labels})


async def test_node_counters(make_world: Any, autojump_clock: Any) -> None:  # noqa: F811
    refused = RetryLater("cannot connect to 127.0.0.1:104: refused", kind="connect")
    sender = FakeSender(lambda _i: refused, per_instance=0.5)
    w = await make_world((Node("PACS", batch_size=10),), sender=sender, retry_delay_seconds=10)
    for _ in range(3):
        w.store.add()
    w.sup.wake_all()
    await trio.sleep(5)
    assert sample(w, "capacitor_node_association_errors_total", kind="connect") == 1  # one association
    assert sample(w, "capacitor_node_failures_total", outcome="retry_later", status_class="none") == 3
    assert sample(w, "capacitor_node_send_duration_seconds_count") == 1
    assert sample(w, "capacitor_node_send_duration_seconds_sum") == 1.5  # 3 x 0.5 s, virtual time

    answers = iter([Delivered(), Rejected("cannot understand (0xC000)", status_class="cannot_understand"), Delivered()])
    sender.script = lambda _i: next(answers)
    await trio.sleep(60)  # past the backoff
    assert sample(w, "capacitor_node_delivered_instances_total") == 2
    assert sample(w, "capacitor_node_delivered_bytes_total") == 200  # FakeStore items are 100 bytes
    assert sample(w, "capacitor_node_failures_total", outcome="rejected", status_class="cannot_understand") == 1
    assert sample(w, "capacitor_node_association_errors_total", kind="connect") == 1  # none more
    assert sample(w, "capacitor_node_send_duration_seconds_count") == 2


async def test_conversions_on_the_way_out_are_counted_from_the_outcomes(make_world: Any, autojump_clock: Any) -> None:  # noqa: F811
    implicit = "1.2.840.10008.1.2"
    answers = iter([
        Delivered(converted_to=implicit), Delivered(), Delivered(converted_to=implicit),
        Rejected("cannot be converted into it: pixel data cut short", unconvertible=True),
        Rejected("no way", status_class=""),
    ])
    sender = FakeSender(lambda _i: next(answers))
    w = await make_world((Node("PACS", batch_size=10),), sender=sender)
    for _ in range(5):
        w.store.add()
    w.sup.wake_all()
    await trio.sleep(5)
    assert sample(w, "capacitor_node_send_conversions_total", result="converted") == 2
    assert sample(w, "capacitor_node_send_conversions_total", result="failed") == 1
    stats = w.sup.conversions()["PACS"]  # GET /api/metrics' transcoding block
    assert (stats["onSend"], stats["onSendFailed"], stats["conversions"]) == (2, 1, 0)
