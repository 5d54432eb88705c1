"""Requestor failure modes on in-memory streams with virtual time; status mapping."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from capacitor_trio.dicom import (
    AcceptorConfig,
    Peer,
    SendOptions,
    association,
    dimse,
    handle_association,
    requestor,
    send_batch,
    source,
)
from capacitor_trio.dicom import pdu as P
from capacitor_trio.dicom.status import store_status_outcome
from capacitor_trio.dicom.transport import PeerClosed, Transport
from capacitor_trio.domain.outcomes import Delivered, Rejected, RetryLater

from .conftest import DirSink, assert_same_instance, collect, outgoing, write_corpus

PEER = Peer("CAPACITOR", "peer.invalid", 104)


class WrappedStream(trio.abc.Stream):
    """Passes everything to `inner`; subclasses change how it sends."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class SlowStream(WrappedStream):
    """Wraps a stream: sends at `rate` bytes per virtual second."""

    def __init__(self, inner: trio.abc.Stream, rate: int) -> None:
        super().__init__(inner)
        self.rate = rate

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for off in range(0, len(view), 1024):
            await trio.sleep(min(1024, len(view) - off) / self.rate)
            await self.inner.send_all(view[off : off + 1024])


@pytest.fixture(autouse=True)
def no_thread_hops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Virtual time jumps while a worker thread runs; keep file I/O on the loop in these tests."""
    from capacitor_trio.dicom import receive

    monkeypatch.setattr(source, "THREAD_READ_THRESHOLD", 1 << 40)
    monkeypatch.setattr(receive, "THREAD_WRITE_THRESHOLD", 1 << 40)


@pytest.fixture
def fake_network(monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery, tmp_path: Path):
    """Connections go to `serve(stream)`, by default our own acceptor with a DirSink."""

    class Net:
        sink = DirSink(tmp_path / "peer")
        config = AcceptorConfig(artim_timeout=30, client_timeout=3600)
        rate: int | None = None
        peer_stream: trio.abc.Stream | None = None
        peer_done = trio.Event()

        async def serve(self, stream: trio.abc.Stream) -> None:
            try:
                await handle_association(stream, self.config, self.sink)
            finally:
                self.peer_done.set()

    net = Net()

    async def open_stream(host: str, port: int) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        net.peer_stream = theirs
        nursery.start_soon(net.serve, theirs)
        return SlowStream(ours, net.rate) if net.rate else ours

    monkeypatch.setattr(association, "_open_stream", open_stream)
    return net


async def test_batch_delivered(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    files = write_corpus(tmp_path / "in", 3)
    got, cb = collect()
    await send_batch(PEER, [outgoing(f) for f in files], SendOptions("ROUTER"), cb)
    assert got == {0: Delivered(), 1: Delivered(), 2: Delivered()}
    assert len(fake_network.sink.received) == 3


async def test_instance_held_in_memory_is_sent_like_its_file(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A small instance the store keeps in its index reaches the requestor as bytes, not a
    path: the peer receives the same data set as from the file."""
    files = write_corpus(tmp_path / "in", 3)
    insts = [
        attrs.evolve(outgoing(f), path=tmp_path / "not-a-file", data=f.read_bytes())
        for f in files
    ]
    got, cb = collect()
    await send_batch(PEER, insts, SendOptions("ROUTER"), cb)
    assert got == {0: Delivered(), 1: Delivered(), 2: Delivered()}
    received = fake_network.sink.received
    assert [rx.header.sop_instance_uid for rx in received] == [i.sop_instance_uid for i in insts]
    for f, rx in zip(files, received, strict=True):
        assert_same_instance(f, fake_network.sink.out / f"{rx.header.sop_instance_uid}.dcm")


def _mr_image(tmp_path: Path) -> Path:
    from tests.helpers.datasets import make_dataset, write_dataset

    return write_dataset(tmp_path / "mr.dcm", make_dataset(sop_class_uid="1.2.840.10008.5.1.4.1.1.4", modality="MR"))


async def test_more_tops_up_the_same_association(
    fake_network,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[str] = []
    open_stream = association._open_stream

    async def counting(host: str, port: int) -> trio.abc.Stream:
        opened.append(host)
        return await open_stream(host, port)

    monkeypatch.setattr(association, "_open_stream", counting)
    files = write_corpus(tmp_path / "in", 5)
    other = [_mr_image(tmp_path)]  # a SOP class the association proposed nothing for
    queue = [[outgoing(files[1]), outgoing(files[2])], [outgoing(files[3])]]
    queue.append([outgoing(files[4]), outgoing(other[0])])  # no context for the last
    asked: list[int] = []
    got, cb = collect()

    async def more() -> list[requestor.OutgoingInstance]:
        asked.append(len(got))  # everything sent so far was answered
        return queue.pop(0) if queue else []

    await send_batch(PEER, [outgoing(files[0])], SendOptions("ROUTER"), cb, more=more)
    assert asked == [1, 3, 4]  # the association ended after the instance it had no context for
    assert got == {i: Delivered() for i in range(5)}  # index 5 (MR) left unreported
    assert len(fake_network.sink.received) == 5
    assert len(opened) == 1


async def test_top_up_outcomes_stay_aligned_with_the_callers_instances(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A top-up instance the association has no context for sits *between* two that fit: it is
    left unreported, and the outcomes of the others land on their own indices."""
    files = write_corpus(tmp_path / "in", 3)
    sent = [outgoing(files[0])]
    queue = [[outgoing(files[1]), outgoing(_mr_image(tmp_path)), outgoing(files[2])]]
    got, cb = collect()

    async def more() -> list[requestor.OutgoingInstance]:
        batch = queue.pop(0) if queue else []
        sent.extend(batch)
        return batch

    await send_batch(PEER, [sent[0]], SendOptions("ROUTER"), cb, more=more)
    assert got == {0: Delivered(), 1: Delivered(), 3: Delivered()}  # 2 (MR) unreported
    received = {r.header.sop_instance_uid for r in fake_network.sink.received}
    assert received == {sent[i].sop_instance_uid for i in got}
    assert sent[2].sop_instance_uid not in received


async def test_unreadable_file_meta_fails_that_instance_only(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error before any of the instance's bytes went out (its file meta): RetryLater for
    it, and the association goes on with the next."""
    files = write_corpus(tmp_path / "in", 3)
    real = source._Source.read_into

    async def eio(self: source._Source, view: memoryview, offset: int) -> None:
        if str(self.path) == str(files[1]) and offset == 0:
            raise OSError(5, "Input/output error")
        await real(self, view, offset)

    monkeypatch.setattr(source._Source, "read_into", eio)
    got, cb = collect()
    await send_batch(PEER, [outgoing(f) for f in files], SendOptions("ROUTER"), cb)
    assert got[0] == Delivered() and got[2] == Delivered()
    assert isinstance(got[1], RetryLater) and "Input/output error" in got[1].reason


async def test_unreadable_spool_file_is_an_outcome_not_a_crash(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_corpus(tmp_path / "in", 3)
    real = source._Source.read_into

    async def eio(self: source._Source, view: memoryview, offset: int) -> None:
        if str(self.path) == str(files[1]) and offset > 0:  # the data set, after its meta
            raise OSError(5, "Input/output error")
        await real(self, view, offset)

    monkeypatch.setattr(source._Source, "read_into", eio)
    got, cb = collect()
    await send_batch(PEER, [outgoing(f) for f in files], SendOptions("ROUTER"), cb)
    assert got[0] == Delivered()
    assert isinstance(got[1], RetryLater) and "Input/output error" in got[1].reason
    assert isinstance(got[2], RetryLater)  # the association had to end mid-message
    missing = outgoing(files[0])
    files[0].unlink()
    got, cb = collect()
    await send_batch(PEER, [missing, outgoing(files[2])], SendOptions("ROUTER"), cb)
    assert isinstance(got[0], Rejected) and "missing" in got[0].reason and got[1] == Delivered()


@pytest.mark.parametrize("refusal", [BlockingIOError(11, "cold"), OSError(95, "not supported")])
async def test_spool_bytes_not_in_the_page_cache_are_read_in_a_worker_thread(
    fake_network, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: OSError
) -> None:
    """A spool file just received is read on the loop (RWF_NOWAIT, from the page cache); a cold
    one (EAGAIN), or a file system without RWF_NOWAIT (EOPNOTSUPP), is read in a thread.
    (Real clock: a worker thread would let an autojump clock fire the stall detector.)"""
    import os
    import threading

    if source._nowait is None:
        pytest.skip("no RWF_NOWAIT on this platform")
    files = write_corpus(tmp_path / "in", 2, rows=512)  # fragments past THREAD_READ_THRESHOLD
    real = os.preadv
    plain_reads: list[bool] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags:
            raise refusal
        plain_reads.append(threading.current_thread() is threading.main_thread())
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(source, "_nowait", source._nowait)  # restored afterwards
    got, cb = collect()
    await send_batch(PEER, [outgoing(f) for f in files], SendOptions("ROUTER"), cb)
    assert got == {0: Delivered(), 1: Delivered()}
    assert plain_reads
    if refusal.errno == 95:  # EOPNOTSUPP: not tried again; reads as before (threads for large ones)
        assert source._nowait is None
    else:  # a cold file: every read of the data set off the loop
        assert not any(plain_reads) and source._nowait is not None


@pytest.mark.parametrize("where", ["open", "write"])
async def test_a_write_error_in_the_acceptor_answers_out_of_resources(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    from capacitor_trio.dicom import receive

    fake_network.config = attrs.evolve(fake_network.config, memory_max_bytes=0)  # files
    files = write_corpus(tmp_path / "in", 3)
    calls = 0
    real = receive._write_fd

    def failing(fd: int, data: bytes | memoryview) -> None:
        nonlocal calls
        calls += 1
        if (where == "open" and calls == 1) or (where == "write" and calls == 2):
            raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(receive, "_write_fd", failing)
    got, cb = collect()
    await send_batch(PEER, [outgoing(f) for f in files], SendOptions("ROUTER"), cb)
    assert isinstance(got[0], RetryLater) and "No space left" in got[0].reason  # 0xA700
    assert got[1] == Delivered() and got[2] == Delivered()  # the association went on
    assert len(fake_network.sink.received) == 2
    assert not fake_network.sink.leftovers()


async def _timed_batch(tmp_path: Path, n: int, **options: float) -> tuple[dict[int, Any], float]:
    """Send `n` new instances in one batch (no stall detector): (outcomes, seconds taken)."""
    files = write_corpus(tmp_path / "in", n)
    got, cb = collect()
    start = trio.current_time()
    await send_batch(
        PEER, [outgoing(f) for f in files], SendOptions("ROUTER", stall_threshold=0, **options), cb
    )
    return got, trio.current_time() - start


async def test_dimse_timeout_runs_per_response(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # each response comes 50 s after its request: within a 60 s timeout every time, although
    # the batch takes 150 s
    real = fake_network.sink.instance_received

    async def slow(rx: object) -> None:
        await trio.sleep(50)
        await real(rx)

    fake_network.sink.instance_received = slow
    got, took = await _timed_batch(tmp_path, 3, dimse_timeout=60)
    assert got == {i: Delivered() for i in range(3)}
    assert took == pytest.approx(150)


@pytest.mark.parametrize("handed_over", [False, True])
async def test_the_response_watchdog_fails_only_a_wait_still_in_progress(
    autojump_clock: trio.testing.MockClock, handed_over: bool
) -> None:
    # at the deadline: `_store` still waiting for its response -> the association fails then;
    # the response handed to `_store` in that same pass -> `_store` takes it, no failure
    s = requestor._Session(PEER, [], SendOptions("ROUTER", dimse_timeout=60), lambda i, o: None)
    _send, s.responses = trio.open_memory_channel[object](4)  # type: ignore[assignment]
    start = trio.current_time()
    s.response_since = start
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s._response_watchdog)
        if handed_over:
            await trio.sleep(60)
            s.response_since = None  # what `_store` does with the response in hand
        else:
            nursery.start_soon(s.responses.receive)  # type: ignore[union-attr]
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    if handed_over:
        assert s.failure is None
    else:
        assert s.failure is not None and "no C-STORE response within 60" in str(s.failure.outcome)


async def test_dimse_timeout(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fake_network.sink.hold = trio.Event()  # the peer never answers
    got, took = await _timed_batch(tmp_path, 2, dimse_timeout=60)
    assert took == pytest.approx(60)
    assert all(isinstance(o, RetryLater) for o in got.values()) and len(got) == 2
    assert "no C-STORE response within 60" in got[0].reason
    fake_network.sink.hold.set()  # the acceptor answers only after its sink returns
    await fake_network.peer_done.wait()  # we aborted; the acceptor ended and cleaned up
    assert fake_network.sink.leftovers() == []


async def test_stall_detector(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fake_network.sink.hold = trio.Event()
    files = write_corpus(tmp_path / "in", 1)
    got, cb = collect()
    start = trio.current_time()
    await send_batch(
        PEER,
        [outgoing(f) for f in files],
        SendOptions("ROUTER", dimse_timeout=300, stall_threshold=90),
        cb,
    )
    assert trio.current_time() - start == pytest.approx(90)
    assert "stalled" in got[0].reason


async def test_connect_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def never(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(association, "_open_stream", never)
    got, cb = collect()
    start = trio.current_time()
    await send_batch(
        PEER,
        [outgoing(f) for f in write_corpus(tmp_path / "in", 2)],
        SendOptions("ROUTER", connect_timeout=30),
        cb,
    )
    assert trio.current_time() - start == pytest.approx(30)
    assert (
        all(isinstance(o, RetryLater) and "timed out" in o.reason for o in got.values())
        and len(got) == 2
    )


async def test_minimum_line_speed(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fake_network.rate = 10 * 1024  # 10 KB/s
    files = write_corpus(tmp_path / "in", 1, rows=512)
    got, cb = collect()
    start = trio.current_time()
    await send_batch(
        PEER,
        [outgoing(f) for f in files],
        SendOptions("ROUTER", minimum_line_speed_kbps=100, stall_threshold=0),
        cb,
    )
    assert isinstance(got[0], RetryLater) and "line speed" in got[0].reason
    assert trio.current_time() - start < 25  # well before the 50 s the transfer would take
    await fake_network.peer_done.wait()
    assert fake_network.sink.leftovers() == []


async def test_fast_enough_line_passes(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fake_network.rate = 200 * 1024
    got, cb = collect()
    files = write_corpus(tmp_path / "in", 1, rows=512)
    await send_batch(
        PEER, [outgoing(f) for f in files], SendOptions("ROUTER", minimum_line_speed_kbps=100), cb
    )
    assert got == {0: Delivered()}


async def test_cancellation_aborts_and_leaves_unreported(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    files = write_corpus(tmp_path / "in", 3)
    got: dict[int, object] = {}
    release = trio.Event()

    def on_outcome(i: int, o: object) -> None:
        got[i] = o
        fake_network.sink.hold = release  # hold the second instance forever

    with trio.move_on_after(100) as cs:
        await send_batch(
            PEER,
            [outgoing(f) for f in files],
            SendOptions("ROUTER", dimse_timeout=1000, stall_threshold=0),
            on_outcome,
        )
    assert cs.cancelled_caught
    assert got == {0: Delivered()}
    release.set()
    await fake_network.peer_done.wait()
    assert fake_network.sink.leftovers() == []


async def test_peer_abort_mid_batch(
    monkeypatch: pytest.MonkeyPatch,
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def open_stream(host: str, port: int) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()

        async def peer() -> None:
            t = Transport(theirs)
            kind, body = await t.read_pdu()
            rq = P.decode_associate_rq(P.PDU_HEADER.pack(kind, 0, len(body)) + bytes(body))
            results = [
                P.ContextResult(c.context_id, 0, c.transfer_syntaxes[0]) for c in rq.contexts
            ]
            await t.send_all(P.encode_associate_ac(rq, results, 16384))
            await t.read_pdu()
            await t.send_all(P.abort_bytes(2, 0))

        nursery.start_soon(peer)
        return ours

    monkeypatch.setattr(association, "_open_stream", open_stream)
    got, cb = collect()
    await send_batch(
        PEER, [outgoing(f) for f in write_corpus(tmp_path / "in", 3)], SendOptions("ROUTER"), cb
    )
    assert len(got) == 3 and all(
        isinstance(o, RetryLater) and "aborted" in o.reason for o in got.values()
    )


class AcceptingPeer:
    """A fake peer on an in-memory stream: accepts every context advertising `max_pdu`, answers
    each C-STORE with `status` (success), records (PDU type, body length) of what it reads, the
    A-ASSOCIATE-RQ as received and every command set, and hangs up after `give_up` PDUs (so a
    sender that never stops makes a test fail, not hang). It sends `after_accept` right after
    its A-ASSOCIATE-AC."""

    def __init__(
        self, max_pdu: int, give_up: int = 1000, after_accept: bytes = b"", status: int = 0,
        only: str | None = None,
    ) -> None:
        self.max_pdu, self.give_up, self.after_accept = max_pdu, give_up, after_accept
        self.status = status
        #: accept only contexts proposing this transfer syntax (in it); None: every context
        self.only = only
        self.seen: list[tuple[int, int]] = []
        self.associate_rq = b""
        self.commands: list[bytes] = []
        self.done = trio.Event()  # the peer has closed its end

    async def serve(self, stream: trio.abc.Stream) -> None:
        t = Transport(stream)
        kind, body = await t.read_pdu()
        self.associate_rq = P.PDU_HEADER.pack(kind, 0, len(body)) + bytes(body)
        rq = P.decode_associate_rq(self.associate_rq)
        results = [self.answer(c) for c in rq.contexts]
        await t.send_all(P.encode_associate_ac(rq, results, self.max_pdu) + self.after_accept)
        command = bytearray()
        with contextlib.suppress(PeerClosed):
            while len(self.seen) < self.give_up:
                kind, body = await t.read_pdu()
                self.seen.append((kind, len(body)))
                if kind == P.A_RELEASE_RQ:
                    await t.send_all(P.RELEASE_RP_BYTES)
                if kind != P.P_DATA_TF:
                    break
                for ctx, mch, data in P.iter_pdvs(memoryview(body)):
                    if mch & 0x01:
                        command += data
                        if mch & 0x02:
                            self.commands.append(bytes(command))
                            cmd, command = dimse.decode_command(command), bytearray()
                    elif mch & 0x02:
                        rsp = dimse.encode_c_store_rsp(
                            cmd.message_id or 0,
                            cmd.affected_sop_class_uid or "",
                            cmd.affected_sop_instance_uid or "",
                            self.status,
                        )
                        await t.send_all(P.encode_command_pdus(ctx, rsp, 16384))
        await t.aclose()
        self.done.set()

    def answer(self, c: P.ProposedContext) -> P.ContextResult:
        if self.only is None:
            return P.ContextResult(c.context_id, 0, c.transfer_syntaxes[0])
        if self.only in c.transfer_syntaxes:
            return P.ContextResult(c.context_id, 0, self.only)
        return P.ContextResult(c.context_id, P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, "")

    def install(self, monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery) -> None:
        async def open_stream(host: str, port: int) -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(self.serve, theirs)
            return ours

        monkeypatch.setattr(association, "_open_stream", open_stream)



async def send_two_at_once(
    peer: AcceptingPeer, monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery, tmp_path: Path
) -> dict[int, Any]:
    """Send two small instances to `peer`: their outcomes, which came with no time spent."""
    peer.install(monkeypatch, nursery)
    got, cb = collect()
    start = trio.current_time()
    await send_batch(
        PEER, [outgoing(f) for f in write_corpus(tmp_path / "in", 2)], SendOptions("ROUTER"), cb
    )
    assert trio.current_time() == start
    return got


@pytest.mark.parametrize("peer_max", [1, 6, 1023])
async def test_a_peer_maximum_pdu_too_small_for_data_ends_the_send_at_once(
    monkeypatch: pytest.MonkeyPatch,
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    peer_max: int,
) -> None:
    """A maximum PDU length of 6 or less leaves no room for data (the data set used to be cut
    into empty fragments for ever); one below MIN_PEER_PDU is refused as well: A-ABORT before any
    P-DATA, RetryLater for every instance, no time spent."""
    peer = AcceptingPeer(peer_max)
    got = await send_two_at_once(peer, monkeypatch, nursery, tmp_path)
    assert len(got) == 2 and all(
        isinstance(o, RetryLater) and f"maximum PDU length {peer_max} " in o.reason
        for o in got.values()
    )
    assert peer.seen == [(P.A_ABORT, 4)]


@pytest.mark.parametrize(("peer_max", "largest"), [(0, 16384), (1024, 1024)])
async def test_fragments_follow_the_peer_maximum_pdu_and_ours_when_it_has_none(
    monkeypatch: pytest.MonkeyPatch,
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    peer_max: int,
    largest: int,
) -> None:
    """A peer maximum of 0 means "no maximum" (PS3.8 D.1): PDUs are sized to our own."""
    peer = AcceptingPeer(peer_max)
    peer.install(monkeypatch, nursery)
    got, cb = collect()
    files = write_corpus(tmp_path / "in", 2, rows=128)
    await send_batch(
        PEER, [outgoing(f) for f in files], SendOptions("ROUTER", max_pdu_size=16384), cb
    )
    assert got == {0: Delivered(), 1: Delivered()}
    data_pdus = [n for kind, n in peer.seen if kind == P.P_DATA_TF]
    assert max(data_pdus) == largest
    assert peer.seen[-1] == (P.A_RELEASE_RQ, 4)


@pytest.mark.parametrize("priority", [0, 1, 2])
async def test_calling_ae_and_priority_on_the_wire(
    monkeypatch: pytest.MonkeyPatch,
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    priority: int,
) -> None:
    """The calling AE of SendOptions (the source's AE title when the node impersonates) is the
    calling AE title field of the A-ASSOCIATE-RQ, and its priority (a node's Priority, passed
    through: DIMSE's 0 medium, 1 high, 2 low) the Priority (0000,0700) of every C-STORE-RQ, as
    a peer reads them (the command sets decoded by pynetdicom, not by our codec)."""
    from io import BytesIO

    from pynetdicom.dsutils import decode

    peer = AcceptingPeer(16384)
    peer.install(monkeypatch, nursery)
    items = [outgoing(f) for f in write_corpus(tmp_path / "in", 2)]
    got, cb = collect()
    await send_batch(PEER, items, SendOptions("IMPERSONATED", priority=priority), cb)
    assert got == {0: Delivered(), 1: Delivered()}
    assert peer.associate_rq[10:26] == b"CAPACITOR       "  # called AE title
    assert peer.associate_rq[26:42] == b"IMPERSONATED    "  # calling AE title
    commands = [decode(BytesIO(c), True, True) for c in peer.commands]
    assert [(c.CommandField, c.Priority, c.AffectedSOPInstanceUID) for c in commands] == [
        (0x0001, priority, i.sop_instance_uid) for i in items
    ]


class StallingStream(WrappedStream):
    """Wraps our end of a stream: its `stall_at`-th send_all (from 1) sends nothing and never
    returns, as on a connection with no room left at a PDU boundary; with `for_good`, neither do
    the sends after it, else they go through."""

    def __init__(self, inner: trio.abc.Stream, stall_at: int, *, for_good: bool) -> None:
        super().__init__(inner)
        self.stall_at, self.for_good = stall_at, for_good
        self.sends = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends += 1
        if self.sends == self.stall_at or (self.for_good and self.sends > self.stall_at):
            await trio.sleep_forever()
        await self.inner.send_all(data)


@pytest.mark.parametrize("abort_blocked", [False, True], ids=["abort sent", "abort blocked"])
async def test_cancelling_a_send_mid_data_set_aborts_and_returns_promptly(
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    abort_blocked: bool,
) -> None:
    """The caller cancels send_batch while a data set is half sent (its fourth send blocks:
    the command and two data fragments are out): the peer reads an A-ABORT next (service user,
    no reason) and then the close, and the call returns at the cancel. When the A-ABORT cannot
    go out either, the call gives up on it after ABORT_GRACE and closes. Nothing is reported."""
    peer = AcceptingPeer(16384)
    stalled: list[StallingStream] = []

    async def open_stream(host: str, port: int) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(peer.serve, theirs)
        stalled.append(StallingStream(ours, 4, for_good=abort_blocked))
        return stalled[-1]

    monkeypatch.setattr(association, "_open_stream", open_stream)
    files = write_corpus(tmp_path / "in", 1, rows=256)  # 128 KiB: 9 fragments of 16 KiB
    got, cb = collect()
    with trio.move_on_after(5) as cs:
        await send_batch(PEER, [outgoing(f) for f in files], SendOptions("ROUTER"), cb)
    assert cs.cancelled_caught
    assert trio.current_time() == 5.0 + (association.ABORT_GRACE if abort_blocked else 0.0)
    assert stalled[0].sends == 5  # the A-ABORT was attempted either way
    await peer.done.wait()
    assert trio.current_time() == 5.0 + (association.ABORT_GRACE if abort_blocked else 0.0)
    assert got == {}
    # the command, then two full data fragments (of 9); then the A-ABORT, or only the close
    assert [kind for kind, _ in peer.seen] == [P.P_DATA_TF] * 3 + [P.A_ABORT] * (not abort_blocked)
    assert [n for _, n in peer.seen[1:3]] == [16384, 16384] and len(peer.commands) == 1


@pytest.mark.parametrize("answers", ["nothing", "the association only"])
async def test_echo_to_a_silent_peer_fails_at_its_timeout(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    answers: str,
) -> None:
    """A peer that takes the connection but never answers the A-ASSOCIATE-RQ (or, once
    associated, the C-ECHO-RQ): echo(timeout=1.5) returns a failed result at exactly 1.5 s, and
    the peer reads an A-ABORT."""
    seen: list[int] = []
    done = trio.Event()

    async def silent_peer(stream: trio.abc.Stream) -> None:
        t = Transport(stream)
        with contextlib.suppress(PeerClosed):
            while True:
                kind, body = await t.read_pdu()
                seen.append(kind)
                if kind == P.A_ASSOCIATE_RQ and answers == "the association only":
                    rq = P.decode_associate_rq(P.PDU_HEADER.pack(kind, 0, len(body)) + body)
                    results = [
                        P.ContextResult(c.context_id, 0, c.transfer_syntaxes[0])
                        for c in rq.contexts
                    ]
                    await t.send_all(P.encode_associate_ac(rq, results, 16384))
        done.set()

    async def open_stream(host: str, port: int) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(silent_peer, theirs)
        return ours

    monkeypatch.setattr(association, "_open_stream", open_stream)
    start = trio.current_time()
    result = await requestor.echo(PEER, "ROUTER", timeout=1.5)
    assert trio.current_time() - start == 1.5
    assert (result.success, result.latency_ms) == (False, None)
    # (the whole echo's deadline and the negotiation's are the same moment: either may say so)
    timed_out = {"no C-ECHO response within 1.5s"}
    if answers == "nothing":
        timed_out.add("association negotiation timed out")
    assert result.error in timed_out
    await done.wait()
    expected = [P.A_ASSOCIATE_RQ] + [P.P_DATA_TF] * (answers != "nothing") + [P.A_ABORT]
    assert seen == expected


#: a P-DATA-TF header whose length field claims 100 MB (no body follows)
HUGE_PDU_HEADER = P.PDU_HEADER.pack(P.P_DATA_TF, 0, 100_000_000)


async def test_a_pdu_longer_than_our_maximum_aborts_the_send(
    monkeypatch: pytest.MonkeyPatch,
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A PDU length far beyond the maximum we advertised is a protocol error, not a buffer of
    that size to fill: A-ABORT and RetryLater at once (it used to wait for the bytes until the
    DIMSE timeout)."""
    peer = AcceptingPeer(16384, after_accept=HUGE_PDU_HEADER)
    got = await send_two_at_once(peer, monkeypatch, nursery, tmp_path)
    assert len(got) == 2 and all(
        isinstance(o, RetryLater) and "protocol error" in o.reason and "exceeds" in o.reason
        for o in got.values()
    )
    assert peer.seen[-1] == (P.A_ABORT, 4)


async def test_an_echo_reply_longer_than_our_maximum_aborts_the_echo(
    monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    peer = AcceptingPeer(16384, after_accept=HUGE_PDU_HEADER)
    peer.install(monkeypatch, nursery)
    start = trio.current_time()
    result = await requestor.echo(PEER, "ROUTER", timeout=10)
    assert trio.current_time() == start
    assert not result.success and "exceeds" in (result.error or "")
    assert peer.seen[-1] == (P.A_ABORT, 4)


@pytest.mark.parametrize("result", [2, 1], ids=["transient", "permanent"])
async def test_association_reject(
    result: int,
    monkeypatch: pytest.MonkeyPatch,
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A transient reject is retried; a permanent one rejects the items, marked as refused with
    the association (the node then backs off)."""
    async def open_stream(host: str, port: int) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()

        async def peer() -> None:
            t = Transport(theirs)
            await t.read_pdu()
            await t.send_all(P.encode_associate_rj(result, 3, 1))
            with contextlib.suppress(PeerClosed):
                await t.read_pdu()

        nursery.start_soon(peer)
        return ours

    monkeypatch.setattr(association, "_open_stream", open_stream)
    got, cb = collect()
    await send_batch(
        PEER, [outgoing(f) for f in write_corpus(tmp_path / "in", 2)], SendOptions("ROUTER"), cb
    )
    if result == 2:
        assert all(isinstance(o, RetryLater) and "transient" in o.reason for o in got.values())
    else:
        assert all(isinstance(o, Rejected) and o.association for o in got.values())
        assert len(got) == 2


async def test_rejected_context_for_sop_class(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    import attrs

    fake_network.config = attrs.evolve(
        fake_network.config, reject_abstract_syntaxes=frozenset({"1.2.840.10008.5.1.4.1.1.4"})
    )
    from tests.helpers.datasets import make_dataset, write_dataset

    mr = write_dataset(
        tmp_path / "mr.dcm", make_dataset(sop_class_uid="1.2.840.10008.5.1.4.1.1.4", modality="MR")
    )
    ct = write_corpus(tmp_path / "in", 1)[0]
    got, cb = collect()
    await send_batch(PEER, [outgoing(mr), outgoing(ct)], SendOptions("ROUTER"), cb)
    assert isinstance(got[0], Rejected) and "abstract syntax not supported" in got[0].reason
    assert got[1] == Delivered()


async def test_missing_spool_file_is_rejected(
    fake_network, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    f = write_corpus(tmp_path / "in", 2)
    items = [outgoing(p) for p in f]
    f[0].unlink()
    got, cb = collect()
    await send_batch(PEER, items, SendOptions("ROUTER"), cb)
    assert isinstance(got[0], Rejected) and got[1] == Delivered()


async def test_empty_batch_does_nothing() -> None:
    await send_batch(
        PEER, [], SendOptions("ROUTER"), lambda i, o: pytest.fail("no outcome expected")
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (0x0000, Delivered),
        (0xB000, Delivered),
        (0xB006, Delivered),
        (0xB007, Delivered),
        (0x0001, Delivered),
        (0x0107, Delivered),
        (0x0116, Delivered),
        (0xA700, RetryLater),
        (0xA7FF, RetryLater),
        (0x0213, RetryLater),
        (0xA900, Rejected),
        (0xC000, Rejected),
        (0xC211, Rejected),
        (0x0122, Rejected),
        (0x0211, Rejected),
    ],
)
def test_status_mapping(status: int, kind: type) -> None:
    """Warnings (0xB000, 0xB006, 0xB007 and PS3.7's 0x0001, 0x0107, 0x0116) mean the instance
    was stored; 0x0213 (resource limitation) is a failure, but one worth retrying."""
    outcome = store_status_outcome(status)
    assert isinstance(outcome, kind)
    if status in (0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116):
        assert f"0x{status:04X}" in outcome.warning



WARNINGS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
    0x0001: "requested optional attributes are not supported",
    0x0107: "attribute list error",
    0x0116: "attribute value out of range",
    0xB123: "",  # another 0xBxxx: a warning too, with no name of its own
}


def _status_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "capacitor_trio.dicom"]


@pytest.mark.parametrize("status", list(WARNINGS), ids=[f"0x{s:04X}" for s in WARNINGS])
def test_a_warning_status_is_delivered_with_a_warning_line_naming_it(
    caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """store_status_outcome (status.py) is where a C-STORE warning is logged: one WARNING line
    with the status in hex, its meaning and the peer's error comment; the outcome is Delivered
    and carries the same text."""
    caplog.set_level(logging.WARNING, logger="capacitor_trio.dicom")
    outcome = store_status_outcome(status, "Patient Name coerced")
    [line] = _status_lines(caplog)
    assert line.levelno == logging.WARNING
    assert line.getMessage() == f"C-STORE {outcome.warning}"
    assert isinstance(outcome, Delivered)
    assert outcome.warning.startswith(f"warning 0x{status:04X}")
    assert WARNINGS[status] in outcome.warning and "(Patient Name coerced)" in outcome.warning


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0x0213, 0xA900, 0xC000, 0x0122, 0xFE00])
def test_success_and_failure_statuses_log_no_warning_there(
    caplog: pytest.LogCaptureFixture, status: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="capacitor_trio.dicom")
    store_status_outcome(status, "comment")
    assert _status_lines(caplog) == []


async def test_a_warning_from_the_destination_is_delivered_and_logged(
    monkeypatch: pytest.MonkeyPatch,
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through a send: a peer answering 0x0107 to each C-STORE -> Delivered with the warning,
    and one WARNING line per instance."""
    caplog.set_level(logging.WARNING, logger="capacitor_trio.dicom")
    peer = AcceptingPeer(16384, status=0x0107)
    peer.install(monkeypatch, nursery)
    got, cb = collect()
    await send_batch(
        PEER, [outgoing(f) for f in write_corpus(tmp_path / "in", 2)], SendOptions("ROUTER"), cb
    )
    warning = "warning 0x0107: attribute list error"
    assert got == {0: Delivered(warning=warning), 1: Delivered(warning=warning)}
    assert [(r.levelno, r.getMessage()) for r in _status_lines(caplog)] == [
        (logging.WARNING, f"C-STORE {warning}")
    ] * 2


_ = (CTImageStorage, ExplicitVRLittleEndian)


class EndlessCommandPeer:
    """A hostile destination on a lockstep stream (each send returns once the requestor has read
    it): accepts the association, then sends command fragments that never end (16 KiB each, the
    last bit never set) while another task records what it reads. It gives up after `give_up`
    bytes, so that a requestor without a cap makes the test fail rather than hang."""

    def __init__(self, give_up: int = 4 << 20) -> None:
        self.give_up = give_up
        self.sent = 0  # command bytes the requestor has taken
        self.seen: list[int] = []  # PDU types read from the requestor

    async def serve(self, stream: trio.abc.Stream) -> None:
        t = Transport(stream)
        kind, body = await t.read_pdu()
        rq = P.decode_associate_rq(P.PDU_HEADER.pack(kind, 0, len(body)) + bytes(body))
        results = [P.ContextResult(c.context_id, 0, c.transfer_syntaxes[0]) for c in rq.contexts]
        await t.send_all(P.encode_associate_ac(rq, results, 16384))
        fragment = P.p_data_header(1, 0x01, 16384) + b"\0" * 16384
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, t)
            with contextlib.suppress(PeerClosed):
                while self.sent < self.give_up:
                    await t.send_all(fragment)
                    self.sent += 16384
                await trio.sleep_forever()

    async def _read(self, t: Transport) -> None:
        with contextlib.suppress(PeerClosed):
            while True:
                kind, _ = await t.read_pdu()
                self.seen.append(kind)

    def answer(self, c: P.ProposedContext) -> P.ContextResult:
        if self.only is None:
            return P.ContextResult(c.context_id, 0, c.transfer_syntaxes[0])
        if self.only in c.transfer_syntaxes:
            return P.ContextResult(c.context_id, 0, self.only)
        return P.ContextResult(c.context_id, P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, "")

    def install(self, monkeypatch: pytest.MonkeyPatch, nursery: trio.Nursery) -> None:
        async def open_stream(host: str, port: int) -> trio.abc.Stream:
            ours, theirs = trio.testing.lockstep_stream_pair()
            nursery.start_soon(self.serve, theirs)
            return ours

        monkeypatch.setattr(association, "_open_stream", open_stream)


@pytest.mark.parametrize("service", ["C-STORE", "C-ECHO"])
async def test_an_endless_command_set_from_the_destination_is_cut_off_at_the_cap(
    monkeypatch: pytest.MonkeyPatch,
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    service: str,
) -> None:
    """A destination that streams a command set without end is read up to the assembler's cap
    (1 MiB, as the acceptor's) and no further: A-ABORT and a protocol error at once (the
    requestor used to gather it without bound, copying it whole for each fragment)."""
    from capacitor_trio.dicom.assembler import MAX_COMMAND_BYTES

    peer = EndlessCommandPeer()
    peer.install(monkeypatch, nursery)
    start = trio.current_time()
    if service == "C-STORE":
        got, cb = collect()
        await send_batch(
            PEER, [outgoing(f) for f in write_corpus(tmp_path / "in", 2)], SendOptions("ROUTER"), cb
        )
        reasons = [getattr(o, "reason", "") for o in got.values()]
        assert len(got) == 2 and all(isinstance(o, RetryLater) for o in got.values())
    else:
        result = await requestor.echo(PEER, "ROUTER", timeout=10)
        assert not result.success
        reasons = [result.error or ""]
    assert all(f"command set larger than {MAX_COMMAND_BYTES} bytes" in r for r in reasons), reasons
    assert trio.current_time() == start
    assert MAX_COMMAND_BYTES <= peer.sent <= MAX_COMMAND_BYTES + 2 * 16384
    assert peer.seen[-1] == P.A_ABORT
