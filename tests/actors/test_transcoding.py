"""The transcoding step of a node's prepare stage (issue 22): a node with a TransferSyntax gets a
prepared copy in it, the received instance and other nodes untouched; what cannot be converted
is sent as received; an interrupted conversion is done again.

The preparer runs on virtual time with the conversion in this process (`InlinePool`); one test
runs tx-codec's real TranscodePool (worker processes) on real time.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import trio
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from capacitor_trio.actors.prepare import NodePreparer
from capacitor_trio.actors.prepare_steps import PrepareSubject, Verdict, has_steps, steps_for
from capacitor_trio.actors.service import ServiceFlags
from capacitor_trio.actors.transcoding import ConversionStats, TranscodeContext, TranscodeStep
from capacitor_trio.api.views import item_json
from capacitor_trio.config.models import Node
from capacitor_trio.domain.instance import Destination
from capacitor_trio.transcode import codec
from capacitor_trio.transcode.pool import TranscodePool
from tests.helpers.datasets import make_dataset, to_part10_bytes

from .fakes import FakeStore
from .test_node import BASE, config


class InlinePool:
    """tx-codec's convert_file on the loop (virtual time stays exact); `hold` makes the next
    conversion wait until cancelled (a router killed mid-conversion)."""

    def __init__(self) -> None:
        self.hold = False
        self.started = trio.Event()
        self.calls = 0

    async def convert(self, src: Path, dst: Path, target_uid: str) -> codec.Converted:
        self.calls += 1
        self.started.set()
        if self.hold:
            self.hold = False
            _write(dst, b"half a copy")
            try:
                await trio.sleep_forever()
            finally:
                os.unlink(dst)  # as the pool leaves no partial file
        await trio.lowlevel.checkpoint()
        return codec.convert_file(src, dst, target_uid)


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


async def _inline(fn: Any, *args: Any) -> Any:
    await trio.lowlevel.checkpoint()
    return fn(*args)


@pytest.fixture(autouse=True)
def _worker_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("capacitor_trio.actors.prepare.in_worker", _inline)
    monkeypatch.setattr("capacitor_trio.actors.transcoding.in_worker", _inline)


def make(tmp_path: Path, pool: Any, syntax: str = "RLELossless") -> tuple[NodePreparer, FakeStore, ConversionStats]:
    clock = lambda: BASE + trio.current_time()  # noqa: E731
    store = FakeStore(clock)
    cfg = config(minimum_age=0)
    node = Node("PACS", transfer_syntax=syntax)
    stats = ConversionStats()
    context = TranscodeContext(pool, tmp_path / "transcode", stats)
    preparer = NodePreparer(
        Destination("PACS"), store, lambda: cfg, ServiceFlags(), clock, lambda: None,
        steps=lambda: steps_for(node, cfg, context),
    )
    return preparer, store, stats


def instance(**kw: Any) -> bytes:
    return to_part10_bytes(make_dataset(rows=16, columns=16, **kw))


async def settle(preparer: NodePreparer) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


async def test_the_node_gets_a_copy_in_its_syntax_and_the_received_instance_stays(
    tmp_path: Path, autojump_clock: Any
) -> None:
    preparer, store, stats = make(tmp_path, InlinePool())
    data = instance()
    mine = store.add(state="new", data=data)
    theirs = store.add("VNA", state="new", data=data)
    await settle(preparer)
    item = store.items[mine.id]
    assert item.state == "prepared" and item.transfer_syntax_uid == RLELossless
    assert item.received_syntax == ExplicitVRLittleEndian
    copy = pydicom.dcmread(io.BytesIO(store.blobs[item.instance_id]))
    assert copy.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(copy.pixel_array, pydicom.dcmread(io.BytesIO(data)).pixel_array)
    assert store.blobs[mine.instance_id] == data  # the received instance as it came
    assert store.items[theirs.id].state == "new" and store.blobs[theirs.instance_id] == data
    assert (stats.conversions, stats.failed) == (1, 0)
    assert os.listdir(tmp_path / "transcode") == []
    view = item_json(item)  # the API's item view: both syntaxes
    assert (view["transferSyntaxUid"], view["receivedTransferSyntaxUid"]) == (RLELossless, ExplicitVRLittleEndian)


async def test_an_instance_already_in_the_syntax_is_not_converted(tmp_path: Path, autojump_clock: Any) -> None:
    pool = InlinePool()
    preparer, store, stats = make(tmp_path, pool, syntax="ExplicitVRLittleEndian")
    item = store.add(state="new", data=instance())
    await settle(preparer)
    assert store.items[item.id].state == "prepared" and store.items[item.id].instance_id == item.instance_id
    assert pool.calls == 0 and stats.conversions == 0


async def test_an_instance_that_cannot_be_converted_is_sent_as_received(
    tmp_path: Path, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """16-bit data cannot go into JPEG baseline (8-bit): the item is prepared with the received
    instance, a WARNING says why, and delivery finds a way for it as for any other."""
    preparer, store, stats = make(tmp_path, InlinePool(), syntax="JPEGProcess1")
    item = store.add(state="new", data=instance())
    with caplog.at_level(logging.WARNING, "capacitor_trio.prepare"):
        await settle(preparer)
    assert store.items[item.id].state == "prepared" and store.items[item.id].instance_id == item.instance_id
    assert (stats.conversions, stats.failed) == (0, 1)
    [line] = [r.getMessage() for r in caplog.records if "cannot be converted" in r.getMessage()]
    assert "node PACS" in line and "1.2.840.10008.1.2.4.50" in line and "sent as received" in line


async def test_a_conversion_interrupted_by_a_kill_is_done_again(tmp_path: Path, autojump_clock: Any) -> None:
    """The actor (and its prepare stage) cancelled mid-conversion: the item is still `new`, no
    copy and no scratch file are left, and the next incarnation converts it."""
    pool = InlinePool()
    pool.hold = True
    preparer, store, stats = make(tmp_path, pool)
    item = store.add(state="new", data=instance())
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        await pool.started.wait()
        nursery.cancel_scope.cancel()
    assert store.items[item.id].state == "new" and store.items[item.id].instance_id == item.instance_id
    assert os.listdir(tmp_path / "transcode") == []
    await settle(preparer)
    assert store.items[item.id].state == "prepared" and store.items[item.id].transfer_syntax_uid == RLELossless
    assert pool.calls == 2 and stats.conversions == 1


async def test_copies_handed_over_before_a_kill_are_removed(tmp_path: Path, autojump_clock: Any) -> None:
    """The first item's converted file is handed over, the second's conversion is under way
    when the actor is cancelled: neither item is prepared, and no file of either is left."""
    pool = InlinePool()
    preparer, store, _ = make(tmp_path, pool)
    first, second = store.add(state="new", data=instance()), store.add(state="new", data=instance())
    convert, second_started = pool.convert, trio.Event()

    async def hold_the_second(src: Path, dst: Path, target_uid: str) -> codec.Converted:
        pool.hold = pool.calls == 1
        if pool.hold:
            second_started.set()
        return await convert(src, dst, target_uid)

    pool.convert = hold_the_second  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(preparer.run)
        await second_started.wait()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert [store.items[i.id].state for i in (first, second)] == ["new", "new"]
    assert os.listdir(tmp_path / "transcode") == []


async def test_converted_files_count_towards_the_bytes_a_batch_makes(
    tmp_path: Path, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copies handed over as files are applied once PREPARE_COPY_BYTES of them are made, like
    copies in memory: a large conversion is sent without waiting for the rest of its batch."""
    monkeypatch.setattr("capacitor_trio.actors.prepare.PREPARE_COPY_BYTES", 1)
    preparer, store, _ = make(tmp_path, InlinePool())
    for _ in range(3):
        store.add(state="new", data=instance())
    batches: list[int] = []
    apply = store.apply_preparations

    async def recording(preparations: Any) -> Any:
        batches.append(len(preparations))
        return await apply(preparations)

    store.apply_preparations = recording  # type: ignore[method-assign]
    await settle(preparer)
    assert batches == [1, 1, 1]
    assert {i.state for i in store.items.values()} == {"prepared"}


def test_a_transfer_syntax_puts_the_node_on_the_per_item_path() -> None:
    """The receiver commits the items of such a node `new` even with minimumAge 0."""
    cfg = config(minimum_age=0)
    assert has_steps(Node("PACS", transfer_syntax="JPEG2000Lossless"), cfg)
    assert has_steps(Node("PACS"), config(minimum_age=0, default_transfer_syntax="RLELossless"))
    assert not has_steps(Node("PACS"), cfg)
    assert steps_for(Node("PACS"), cfg, TranscodeContext(InlinePool(), Path("/nowhere"), ConversionStats())) == ()


async def test_the_real_pool_makes_a_jpeg_2000_lossless_copy(tmp_path: Path) -> None:
    """tx-codec's worker processes, real time: the step hands over the converted file in J2K."""
    ds = pydicom.dcmread(io.BytesIO(to_part10_bytes(make_dataset(rows=64, columns=64))))
    stats = ConversionStats()
    async with trio.open_nursery() as nursery:
        pool = await nursery.start(TranscodePool(1).run)
        step = TranscodeStep(JPEG2000Lossless, pool, tmp_path, stats)
        subject = PrepareSubject(1, Destination("PACS"), "CT", str(ds.SOPInstanceUID), ExplicitVRLittleEndian)
        result = await step.run(subject, ds)
        nursery.cancel_scope.cancel()
    assert result.verdict is Verdict.CHANGED and result.transfer_syntax == JPEG2000Lossless
    assert result.dataset is None and result.file is not None and result.file.parent == tmp_path
    converted = pydicom.dcmread(result.file)
    assert converted.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(converted.pixel_array, ds.pixel_array)
    assert stats.conversions == 1 and stats.seconds > 0


async def test_with_no_step_before_it_a_spool_file_is_converted_as_it_lies(tmp_path: Path) -> None:
    """The first step on a received instance kept in a spool file converts that file: the data
    set the preparer parsed is not written out again (a 300 MB multi-frame is not copied first)."""
    received = tmp_path / "received.dcm"
    received.write_bytes(instance())
    ds = pydicom.dcmread(received, defer_size="256 KB")
    seen: list[Path] = []

    class Recording(InlinePool):
        async def convert(self, src: Path, dst: Path, target_uid: str) -> codec.Converted:
            seen.append(src)
            return await super().convert(src, dst, target_uid)

    stats = ConversionStats()
    subject = PrepareSubject(1, Destination("PACS"), "CT", str(ds.SOPInstanceUID), ExplicitVRLittleEndian, received_path=received)
    for first, expected in ((True, received), (False, None)):
        step = TranscodeStep(RLELossless, Recording(), tmp_path / "scratch", stats, first)
        result = await step.run(subject, ds)
        assert result.verdict is Verdict.CHANGED and result.transfer_syntax == RLELossless
        assert (seen[-1] == received) is (expected is not None)
    assert pydicom.dcmread(received).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # untouched
