"""Negotiation that always finds a way (issue 22): the contexts delivery proposes, the syntax each
instance goes in, conversion on the way out, and the instances there is truly no way for.

Pure decisions first; then the requestor against a peer on in-memory streams (virtual time) that
accepts only Implicit VR Little Endian, and a pynetdicom destination on 127.0.0.1 that does.
"""

from __future__ import annotations

import functools
import io
import os
import threading
from pathlib import Path

import attrs
import pydicom
import pytest
import trio
import trio.testing
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
)

from capacitor_trio.dicom import Peer, SendOptions, conversion, send_batch
from capacitor_trio.dicom import pdu as P
from capacitor_trio.dicom.conversion import ConversionFailed
from capacitor_trio.dicom.negotiation import Accepted, accepted, no_route_reason, propose, route
from capacitor_trio.domain.outcomes import Delivered, Rejected, RetryLater
from tests.helpers.peers import PynetdicomDestination

from .conftest import collect, outgoing, write_corpus
from .test_requestor import AcceptingPeer

PEER = Peer("CAPACITOR", "peer.invalid", 104)
UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


@attrs.frozen
class Made:
    transfer_syntax_uid: str
    sop_instance_uid: str


class UncompressedConverter:
    """A converter between the uncompressed syntaxes only, with pydicom (the transcode package
    does the others); counts its conversions, and can be told to take a while or to fail."""

    def __init__(self, *, seconds: float = 0.0, fail: Exception | None = None) -> None:
        self.seconds, self.fail = seconds, fail
        self.done: list[tuple[str, str]] = []
        self.started = trio.Event()

    def can_convert(self, from_uid: str, to_uid: str) -> bool:
        return from_uid in UNCOMPRESSED and to_uid in UNCOMPRESSED

    async def convert(self, src: Path, dst: Path, target_uid: str) -> Made:
        self.started.set()
        await trio.sleep(self.seconds)
        if self.fail is not None:
            raise self.fail
        ds = pydicom.dcmread(src)
        self.done.append((str(ds.file_meta.TransferSyntaxUID), target_uid))
        ds.file_meta.TransferSyntaxUID = target_uid
        ds.save_as(dst, enforce_file_format=True, implicit_vr=target_uid == ImplicitVRLittleEndian, little_endian=True)
        return Made(target_uid, str(ds.SOPInstanceUID))


# ---- pure decisions ----------------------------------------------------------------------------


def test_each_syntax_alone_then_the_uncompressed_ones_per_class() -> None:
    p = propose([(CTImageStorage, RLELossless), (CTImageStorage, ExplicitVRLittleEndian), (MRImageStorage, JPEG2000Lossless)], 128)
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in p.contexts] == [
        (1, CTImageStorage, (RLELossless,)),
        (3, CTImageStorage, (ExplicitVRLittleEndian,)),
        (5, MRImageStorage, (JPEG2000Lossless,)),
        (7, CTImageStorage, (ImplicitVRLittleEndian,)),  # Explicit LE is proposed alone already
        (9, MRImageStorage, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
    ]
    assert p.overflow == set() and p.fallback == {CTImageStorage, MRImageStorage}


def test_the_fallback_contexts_give_way_to_the_instances_own_ones() -> None:
    pairs = [(f"1.2.3.{i}", RLELossless) for i in range(130)]
    p = propose(pairs, 128)
    assert len(p.contexts) == 128 and all(len(c.transfer_syntaxes) == 1 for c in p.contexts)
    assert p.overflow == set(pairs[128:]) and p.fallback == frozenset()


def _answer(proposal: list[P.ProposedContext], take: dict[int, str]) -> Accepted:
    """The destination accepts context id -> syntax in `take`, refuses the others."""
    results = tuple(
        P.ContextResult(c.context_id, 0, take[c.context_id]) if c.context_id in take
        else P.ContextResult(c.context_id, P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, "")
        for c in proposal
    )
    return accepted(proposal, P.AssociateAccept(results, 16384))


def test_the_order_of_preference() -> None:
    p = propose([(CTImageStorage, JPEG2000Lossless), (CTImageStorage, RLELossless)], 128).contexts
    anything = lambda a, b: True  # noqa: E731
    # its own syntax first
    assert route(CTImageStorage, RLELossless, _answer(p, {1: JPEG2000Lossless, 3: RLELossless, 5: ExplicitVRLittleEndian}), anything).context_id == 3
    # then Explicit VR LE, then Implicit VR LE, as the destination chose from the fallback
    for chosen in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        way = route(CTImageStorage, RLELossless, _answer(p, {1: JPEG2000Lossless, 5: chosen}), anything)
        assert way is not None and (way.context_id, way.transfer_syntax) == (5, chosen)
    # then another lossless syntax the destination accepted for the class
    way = route(CTImageStorage, RLELossless, _answer(p, {1: JPEG2000Lossless}), anything)
    assert way is not None and way.transfer_syntax == JPEG2000Lossless
    # none we can convert into: no way
    assert route(CTImageStorage, RLELossless, _answer(p, {5: ImplicitVRLittleEndian}), lambda a, b: False) is None


def test_a_lossy_syntax_is_never_chosen_for_an_instance() -> None:
    p = propose([(CTImageStorage, JPEGBaseline8Bit), (CTImageStorage, RLELossless)], 128).contexts
    answer = _answer(p, {1: JPEGBaseline8Bit})
    assert route(CTImageStorage, RLELossless, answer, lambda a, b: True) is None
    assert route(CTImageStorage, JPEGBaseline8Bit, answer, lambda a, b: True).context_id == 1  # type: ignore[union-attr]


def test_the_reason_names_what_the_destination_accepted() -> None:
    p = propose([(CTImageStorage, RLELossless)], 128).contexts
    why = no_route_reason(CTImageStorage, RLELossless, _answer(p, {3: ImplicitVRLittleEndian}))
    assert "transfer syntax not supported" in why
    assert "accepted only Implicit VR Little Endian (1.2.840.10008.1.2)" in why
    why = no_route_reason(CTImageStorage, RLELossless, _answer(p, {}))
    assert "accepted no transfer syntax for this SOP class" in why


def test_an_answer_naming_a_syntax_not_proposed_is_a_refusal() -> None:
    p = propose([(CTImageStorage, RLELossless)], 128).contexts
    answer = _answer(p, {1: "", 3: "1.2.840.10008.1.2.4.50"})
    assert answer.by_class == {CTImageStorage: {RLELossless: 1}}  # a lone syntax: that one


# ---- the requestor on in-memory streams ----------------------------------------------------------


@pytest.fixture(autouse=True)
def scratch(tmp_path: Path) -> Path:
    return tmp_path / "outgoing"


async def test_instances_go_in_implicit_le_to_a_destination_that_takes_nothing_else(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery, tmp_path: Path, scratch: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = AcceptingPeer(16384, only=ImplicitVRLittleEndian)
    peer.install(monkeypatch, nursery)
    files = write_corpus(tmp_path / "in", 2)
    inline = attrs.evolve(outgoing(files[1]), path=tmp_path / "not-a-file", data=files[1].read_bytes())
    converter = UncompressedConverter()
    got, cb = collect()
    await send_batch(PEER, [outgoing(files[0]), inline], SendOptions("ROUTER", scratch_dir=str(scratch)), cb, converter=converter)
    converted = Delivered(converted_to=ImplicitVRLittleEndian)  # what the node counts
    assert got == {0: converted, 1: converted}
    assert converter.done == [(ExplicitVRLittleEndian, ImplicitVRLittleEndian)] * 2
    assert os.listdir(scratch) == []  # the converted copies are gone


async def test_no_way_is_rejected_naming_the_syntaxes_accepted(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery, tmp_path: Path, scratch: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An RLE instance for an Implicit-LE-only destination with a converter that cannot decode
    RLE: Rejected, and its lastError says what the destination accepted; the Explicit LE one in
    the same batch goes."""
    peer = AcceptingPeer(16384, only=ImplicitVRLittleEndian)
    peer.install(monkeypatch, nursery)
    rle = write_corpus(tmp_path / "rle", 1, transfer_syntax=RLELossless)[0]
    plain = write_corpus(tmp_path / "plain", 1)[0]
    got, cb = collect()
    await send_batch(PEER, [outgoing(rle), outgoing(plain)], SendOptions("ROUTER", scratch_dir=str(scratch)), cb, converter=UncompressedConverter())
    assert isinstance(got[0], Rejected) and got[1] == Delivered(converted_to=ImplicitVRLittleEndian)
    assert not got[0].unconvertible  # no conversion was tried
    assert "accepted only Implicit VR Little Endian" in got[0].reason and RLELossless in got[0].reason


@pytest.mark.parametrize(
    ("fail", "kind", "words"),
    [
        (ConversionFailed("pixel data cut short"), Rejected, "cannot be converted into it: pixel data cut short"),
        (OSError(28, "No space left on device"), RetryLater, "No space left on device"),
    ],
)
async def test_a_conversion_that_fails(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery, tmp_path: Path, scratch: Path,
    autojump_clock: trio.testing.MockClock, fail: Exception, kind: type, words: str,
) -> None:
    """A conversion that fails for this instance rejects it; one that cannot write its copy
    (disk full) retries it later; the association goes on with the next."""
    AcceptingPeer(16384, only=ImplicitVRLittleEndian).install(monkeypatch, nursery)
    files = write_corpus(tmp_path / "in", 1) + write_corpus(tmp_path / "imp", 1, transfer_syntax=ImplicitVRLittleEndian)
    got, cb = collect()
    await send_batch(
        PEER, [outgoing(f) for f in files], SendOptions("ROUTER", scratch_dir=str(scratch)), cb,
        converter=UncompressedConverter(fail=fail),
    )
    assert isinstance(got[0], kind) and words in got[0].reason, got[0]
    assert getattr(got[0], "unconvertible", False) is (kind is Rejected)  # counted as a failed conversion
    assert got[1] == Delivered()  # already in Implicit VR LE: sent as stored


async def test_the_stall_watchdog_waits_for_a_conversion(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery, tmp_path: Path, scratch: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A conversion longer than the stall threshold (a large multi-frame) is not a stall: the
    association sends nothing meanwhile and goes on afterwards."""
    AcceptingPeer(16384, only=ImplicitVRLittleEndian).install(monkeypatch, nursery)
    got, cb = collect()
    options = SendOptions("ROUTER", stall_threshold=90, scratch_dir=str(scratch))
    await send_batch(PEER, [outgoing(write_corpus(tmp_path / "in", 1)[0])], options, cb, converter=UncompressedConverter(seconds=200))
    assert got == {0: Delivered(converted_to=ImplicitVRLittleEndian)}


async def test_a_send_cancelled_during_a_conversion_aborts_at_once(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery, tmp_path: Path, scratch: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = AcceptingPeer(16384, only=ImplicitVRLittleEndian)
    peer.install(monkeypatch, nursery)
    converter = UncompressedConverter(seconds=1000)
    got, cb = collect()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            inner.start_soon(functools.partial(
                send_batch, PEER, [outgoing(write_corpus(tmp_path / "in", 1)[0])],
                SendOptions("ROUTER", scratch_dir=str(scratch)), cb, converter=converter,
            ))
            await converter.started.wait()
            start = trio.current_time()
            scope.cancel()
    assert trio.current_time() == start and got == {}
    await peer.done.wait()
    assert (P.A_ABORT, 4) in peer.seen
    assert os.listdir(scratch) == []


# ---- the default converter: a worker thread --------------------------------------------------


async def test_the_thread_converter_removes_an_abandoned_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A send cancelled while its conversion runs in the worker thread does not wait for it;
    the copy the thread then finishes is removed, not left in the scratch directory."""
    transcode_package = pytest.importorskip("capacitor_trio.transcode")
    go, finished = threading.Event(), threading.Event()

    class FakeCodec:
        class TranscodeError(Exception):
            pass

        @staticmethod
        def convert_file(src: Path, dst: Path, target: str) -> Made:
            go.wait(10)
            dst.write_bytes(b"converted")
            finished.set()
            return Made(target, "1.2.3")

    monkeypatch.setattr(transcode_package, "codec", FakeCodec, raising=False)
    dst = tmp_path / "copy.part"
    with trio.move_on_after(0.05):
        await conversion.ThreadConverter().convert(tmp_path / "src", dst, ImplicitVRLittleEndian)
    go.set()
    await trio.to_thread.run_sync(finished.wait, 10)
    await trio.sleep(0.01)  # the thread's `finally` runs right after it returns
    assert not dst.exists()


def test_scratch_files_of_dead_processes_are_swept(tmp_path: Path) -> None:
    d = tmp_path / "outgoing"
    d.mkdir()
    dead = d / "999999999-abc.part"
    dead.write_bytes(b"x")
    mine = d / f"{os.getpid()}-def.part"
    mine.write_bytes(b"x")
    with conversion.scratch_file(d) as path:
        assert path.parent == d and not path.exists()
        path.write_bytes(b"y")
    assert not dead.exists() and mine.exists() and not path.exists()


# ---- a real destination ------------------------------------------------------------------------


async def test_a_pynetdicom_destination_taking_only_implicit_le_gets_every_instance(tmp_path: Path, scratch: Path) -> None:
    dest = PynetdicomDestination(syntaxes=[ImplicitVRLittleEndian])
    port = await trio.to_thread.run_sync(dest.start)
    try:
        files = write_corpus(tmp_path / "in", 2) + write_corpus(tmp_path / "imp", 1, transfer_syntax=ImplicitVRLittleEndian)
        got, cb = collect()
        await send_batch(
            Peer("PYDEST", "127.0.0.1", port), [outgoing(f) for f in files],
            SendOptions("ROUTER", scratch_dir=str(scratch)), cb, converter=UncompressedConverter(),
        )
        converted = Delivered(converted_to=ImplicitVRLittleEndian)
        assert got == {0: converted, 1: converted, 2: Delivered()}
        for f in files:
            original = pydicom.dcmread(f)
            uid = str(original.SOPInstanceUID)
            assert dest.syntax_of[uid] == ImplicitVRLittleEndian
            ds = pydicom.dcmread(io.BytesIO(dest.received[uid]), force=True)
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            assert ds.PixelData == original.PixelData and ds.PatientName == original.PatientName
    finally:
        await trio.to_thread.run_sync(dest.stop)


async def test_compressed_instances_are_decoded_for_an_implicit_le_only_destination(tmp_path: Path, scratch: Path) -> None:
    """With the default converter (the transcode package's codecs, in a worker thread): RLE,
    JPEG Lossless and JPEG 2000 Lossless instances reach a pynetdicom destination that takes
    only Implicit VR LE, pixel for pixel."""
    import numpy as np

    from capacitor_trio.transcode import codec

    plain = write_corpus(tmp_path / "plain", 2)
    files = write_corpus(tmp_path / "rle", 1, transfer_syntax=RLELossless)
    for name, uid in (("jpegll", "1.2.840.10008.1.2.4.70"), ("j2k", JPEG2000Lossless)):
        dst = tmp_path / f"{name}.dcm"
        codec.convert_file(plain[0] if name == "jpegll" else plain[1], dst, uid)
        files.append(dst)
    dest = PynetdicomDestination(syntaxes=[ImplicitVRLittleEndian])
    port = await trio.to_thread.run_sync(dest.start)
    try:
        got, cb = collect()
        await send_batch(
            Peer("PYDEST", "127.0.0.1", port), [outgoing(f) for f in files],
            SendOptions("ROUTER", scratch_dir=str(scratch)), cb,
        )
        assert got == {i: Delivered(converted_to=ImplicitVRLittleEndian) for i in range(len(files))}
        for f in files:
            original = pydicom.dcmread(f)
            uid = str(original.SOPInstanceUID)
            assert dest.syntax_of[uid] == ImplicitVRLittleEndian
            ds = pydicom.dcmread(io.BytesIO(dest.received[uid]), force=True)
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            assert np.array_equal(ds.pixel_array, original.pixel_array)
        assert os.listdir(scratch) == []
    finally:
        await trio.to_thread.run_sync(dest.stop)


async def test_the_pool_converter_reports_a_refusal_as_a_failed_conversion(tmp_path: Path) -> None:
    from capacitor_trio.transcode.codec import TranscodeError

    class RefusingPool:
        async def convert(self, src: Path, dst: Path, target_uid: str) -> Made:
            raise TranscodeError("16-bit data in an 8-bit syntax")

    with pytest.raises(ConversionFailed, match="16-bit data"):
        await conversion.PoolConverter(RefusingPool()).convert(tmp_path / "a", tmp_path / "b", JPEGBaseline8Bit)


def test_an_instance_without_room_for_its_fallback_retries_rather_than_being_rejected() -> None:
    """A batch of 128 classes leaves no room for the uncompressed contexts: an instance whose
    own syntax is refused then retries (on a smaller association it has its fallback) instead
    of being rejected for a context that was never proposed."""
    from capacitor_trio.dicom.requestor import OutgoingInstance, _no_way

    pairs = [(f"1.2.3.{i}", RLELossless) for i in range(128)]
    p = propose(pairs, 128)
    answer = _answer(p.contexts, {})
    inst = OutgoingInstance(Path("x"), "1.2.3.5", "1.2.3.5.1", RLELossless)
    assert isinstance(_no_way(inst, p, answer), RetryLater)
    small = propose(pairs[:1], 128)
    first = OutgoingInstance(Path("x"), "1.2.3.0", "1.2.3.0.1", RLELossless)
    assert isinstance(_no_way(first, small, _answer(small.contexts, {})), Rejected)
