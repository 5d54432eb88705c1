"""The requestor in a child process (`SenderProcess`), against our acceptor on 127.0.0.1.

Real processes and a real socket: the child is started exactly as the router starts it (an
isolated interpreter running `capacitor_trio.dicom.sender_worker`). Waits are on events (the sink's, the child's pidfd), never on
sleeps.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio

from capacitor_trio.dicom.requestor import OutgoingInstance, Peer, SendOptions
from capacitor_trio.dicom.sender_pipe import (
    BatchDone,
    CancelBatch,
    ChildLog,
    Decoder,
    OutcomeReport,
    Ready,
    SendBatch,
    TopUp,
    WantMore,
    encode,
)
from capacitor_trio.dicom.sender_process import SenderProcess
from capacitor_trio.domain.outcomes import Delivered, Outcome, Rejected, RetryLater

from .conftest import RunningAcceptor, assert_same_instance, collect, outgoing, write_corpus


@pytest.fixture
async def sender(nursery: trio.Nursery) -> AsyncIterator[SenderProcess]:
    sp = SenderProcess()
    await nursery.start(sp.run)
    yield sp


def peer(acceptor: RunningAcceptor, ae: str = "CAPACITOR") -> Peer:
    return Peer(ae, "127.0.0.1", acceptor.port)


def holding(acceptor: RunningAcceptor, answered: int = 0) -> tuple[trio.Event, trio.Event]:
    """The sink answers `answered` instances, then stops before answering the next: (reached,
    release)."""
    reached, release = trio.Event(), trio.Event()
    real = acceptor.sink.instance_received
    seen = 0

    async def held(rx: object) -> None:
        nonlocal seen
        seen += 1
        if seen > answered:
            reached.set()
            await release.wait()
        await real(rx)  # type: ignore[arg-type]

    acceptor.sink.instance_received = held  # type: ignore[method-assign]
    return reached, release


async def test_batch_and_top_ups_are_delivered_through_the_child(
    sender: SenderProcess, acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    files = write_corpus(tmp_path / "in", 6)
    insts = [outgoing(f) for f in files]
    # small instances kept in the index travel as bytes
    insts[1] = attrs.evolve(insts[1], path=tmp_path / "not-a-file", data=files[1].read_bytes())
    chunks = [insts[2:4], insts[4:], []]
    asked = 0

    async def more() -> Sequence[OutgoingInstance]:
        nonlocal asked
        asked += 1
        return chunks.pop(0)

    got, cb = collect()
    await sender.send_batch(peer(acceptor), insts[:2], SendOptions("ROUTER"), cb, more=more)  # type: ignore[arg-type]
    assert got == {i: Delivered() for i in range(6)} and asked == 3
    received = acceptor.sink.received
    assert [rx.header.sop_instance_uid for rx in received] == [i.sop_instance_uid for i in insts]
    for f, rx in zip(files, received, strict=True):
        assert_same_instance(f, acceptor.sink.out / f"{rx.header.sop_instance_uid}.dcm")
    assert {rx.calling_ae for rx in received} == {"ROUTER"}


async def test_cancel_aborts_the_association_in_the_child(
    sender: SenderProcess, acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    files = write_corpus(tmp_path / "in", 2)
    reached, release = holding(acceptor)
    got, cb = collect()
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def send() -> None:
            with scope:
                await sender.send_batch(peer(acceptor), [outgoing(f) for f in files], SendOptions("ROUTER"), cb)  # type: ignore[arg-type]

        nursery.start_soon(send)
        await reached.wait()
        pid = sender.pid
        scope.cancel()  # a pause: the caller returns at once, nothing reported
    assert got == {} and scope.cancelled_caught
    release.set()
    # the child lives on and serves the next batch
    got, cb = collect()
    await sender.send_batch(peer(acceptor), [outgoing(files[1])], SendOptions("ROUTER"), cb)  # type: ignore[arg-type]
    assert got == {0: Delivered()} and sender.pid == pid and sender.starts == 1


async def test_a_dead_child_is_retry_later_and_is_replaced(
    sender: SenderProcess, acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    files = write_corpus(tmp_path / "in", 3)
    reached, release = holding(acceptor)
    got, cb = collect()
    async with trio.open_nursery() as nursery:

        async def kill_when_reached() -> None:
            await reached.wait()
            assert sender.pid is not None
            os.kill(sender.pid, signal.SIGKILL)

        nursery.start_soon(kill_when_reached)
        await sender.send_batch(peer(acceptor), [outgoing(f) for f in files], SendOptions("ROUTER"), cb)  # type: ignore[arg-type]
    assert got == {i: RetryLater("sender process died") for i in range(3)}
    release.set()
    got, cb = collect()
    await sender.send_batch(peer(acceptor), [outgoing(files[2])], SendOptions("ROUTER"), cb)  # type: ignore[arg-type]
    assert got == {0: Delivered()} and sender.starts == 2


async def test_each_start_of_the_child_is_logged_at_info(
    acceptor: RunningAcceptor, tmp_path: Path, caplog: pytest.LogCaptureFixture, nursery: trio.Nursery
) -> None:
    # operators see when the router's sending half is up (and bench/e2e.py starts its clock then)
    caplog.set_level(logging.INFO, logger="capacitor_trio")
    sp = SenderProcess()
    await nursery.start(sp.run)
    got, cb = collect()
    await sp.send_batch(peer(acceptor), [outgoing(write_corpus(tmp_path / "in", 1)[0])], SendOptions("ROUTER"), cb)  # type: ignore[arg-type]
    assert got == {0: Delivered()}
    started = [r for r in caplog.records if r.getMessage() == f"sender process {sp.pid} started"]
    assert [r.levelno for r in started] == [logging.INFO]


async def test_the_childs_log_records_reach_the_router_log(
    sender: SenderProcess, acceptor: RunningAcceptor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="capacitor_trio")
    files = write_corpus(tmp_path / "in", 1)
    got, cb = collect()
    await sender.send_batch(peer(acceptor, "NOBODY"), [outgoing(files[0])], SendOptions("ROUTER"), cb)  # type: ignore[arg-type]
    assert isinstance(got[0], Rejected)
    records = [r for r in caplog.records if r.name == "capacitor_trio.dicom"]
    assert any("A-ASSOCIATE-RJ" in r.getMessage() and "NOBODY" in r.getMessage() for r in records)


async def test_the_child_exits_when_the_router_goes(acceptor: RunningAcceptor) -> None:
    """Stopping (or killing: the pipe closes all the same) the router ends the child."""
    sp = SenderProcess()
    async with trio.open_nursery() as nursery:
        await nursery.start(sp.run)
        _, cb = collect()
        await sp.send_batch(peer(acceptor), [], SendOptions("ROUTER"), cb)  # type: ignore[arg-type]  # the child is up
        assert sp.pid is not None
        pidfd = os.pidfd_open(sp.pid)
        nursery.cancel_scope.cancel()
    try:
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(pidfd)  # readable once the child has exited
    finally:
        os.close(pidfd)


def test_messages_survive_any_cut_of_the_byte_stream() -> None:
    messages = [OutcomeReport(1, i, Delivered()) for i in range(3)] + [ChildLog(30, "x", "é" * 70000)]
    stream = b"".join(encode(m) for m in messages)
    for step in (1, 7, 4096, len(stream)):
        decoder = Decoder()
        out: list[object] = []
        for i in range(0, len(stream), step):
            out += decoder.feed(stream[i : i + step])
        assert out == messages


def test_every_pipe_message_round_trips_with_its_type() -> None:
    inst = OutgoingInstance(Path("/spool/1.dcm"), "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", b"x")
    messages = [
        SendBatch(1, Peer("PACS", "127.0.0.1", 104), [inst], SendOptions("ROUTER"), True),
        TopUp(1, [inst]), TopUp(1, []), CancelBatch(1), Ready(), OutcomeReport(1, 0, Rejected("no")),
        WantMore(1, 3), BatchDone(1, None), BatchDone(2, "RuntimeError('bug')"), ChildLog(20, "capacitor_trio", "hi"),
    ]
    out = Decoder().feed(b"".join(encode(m) for m in messages))
    assert out == messages and [type(m) for m in out] == [type(m) for m in messages]
    # pickled as class and field values: no field names on the pipe
    assert b"took" not in encode(WantMore(1, 3))


async def test_batches_go_ahead_in_the_router_if_the_child_cannot_start(
    acceptor: RunningAcceptor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = write_corpus(tmp_path / "in", 2)
    sp = SenderProcess(argv=[str(tmp_path / "no-such-python")])
    async with trio.open_nursery() as nursery:
        await nursery.start(sp.run)
        got, cb = collect()
        await sp.send_batch(peer(acceptor), [outgoing(f) for f in files], SendOptions("ROUTER"), cb)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert got == {0: Delivered(), 1: Delivered()} and sp.starts == 0
    assert isinstance(sp.start_error, OSError)
    assert any("cannot start the sender process" in r.getMessage() for r in caplog.records)


_PARENT = """
import sys, trio
from capacitor_trio.dicom.sender_process import SenderProcess
from capacitor_trio.dicom.requestor import SendOptions

async def main():
    sp = SenderProcess()
    async with trio.open_nursery() as nursery:
        await nursery.start(sp.run)
        await sp.send_batch(None, [], SendOptions("X"), lambda i, o: None)
        print(sp.pid, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_the_child_exits_when_the_router_is_killed() -> None:
    """kill -9 of the router closes the pipe: the child sees the end of its input and exits."""
    import sys

    async with trio.open_nursery() as nursery:
        parent = await nursery.start(
            partial(trio.run_process, [sys.executable, "-c", _PARENT], stdout=-1, check=False)
        )
        line = b""
        while not line.endswith(b"\n"):
            data = await parent.stdout.receive_some(100)
            assert data, "the parent ended before starting its sender"
            line += data
        pidfd = os.pidfd_open(int(line))
        parent.kill()  # SIGKILL: no cleanup in the parent at all
    try:
        with trio.fail_after(10):
            await trio.lowlevel.wait_readable(pidfd)  # readable once the child has exited
    finally:
        os.close(pidfd)


def counting(n: int) -> tuple[dict[int, Outcome], object, trio.Event]:
    """collect(), plus an event set once `n` outcomes are in."""
    got, cb = collect()
    enough = trio.Event()

    def on_outcome(i: int, o: Outcome) -> None:
        cb(i, o)  # type: ignore[operator]
        if len(got) >= n:
            enough.set()

    return got, on_outcome, enough


async def test_outcomes_keep_coming_while_more_waits_and_survive_a_cancel(
    sender: SenderProcess, acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    """The node's more() may linger for arrivals: outcomes of what was sent are reported
    meanwhile, and those already in when a pause cancels the batch are not dropped."""
    files = write_corpus(tmp_path / "in", 3)
    got, cb, enough = counting(3)

    async def more() -> Sequence[OutgoingInstance]:
        await trio.sleep_forever()  # lingering: nothing new arrives
        raise AssertionError

    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def send() -> None:
            with scope:
                await sender.send_batch(peer(acceptor), [outgoing(f) for f in files], SendOptions("ROUTER"), cb, more=more)  # type: ignore[arg-type]

        nursery.start_soon(send)
        await enough.wait()
        scope.cancel()
    assert got == {i: Delivered() for i in range(3)} and len(acceptor.sink.received) == 3


async def test_a_cancel_never_leaves_half_a_message_in_the_pipe(
    sender: SenderProcess, acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    """A batch of many small instances (their bytes in the message: megabytes) cancelled at
    once: the child still reads whole messages, and serves the next batch."""
    files = write_corpus(tmp_path / "in", 2)
    big = [
        attrs.evolve(outgoing(files[0]), path=tmp_path / "x", data=files[0].read_bytes() + bytes(24000))
        for _ in range(300)
    ]
    with trio.CancelScope() as scope:
        scope.cancel()  # cancelled before the message could be written
        await sender.send_batch(peer(acceptor), big, SendOptions("ROUTER"), lambda i, o: None)  # type: ignore[arg-type]
    got, cb = collect()
    await sender.send_batch(peer(acceptor), [outgoing(files[1])], SendOptions("ROUTER"), cb)  # type: ignore[arg-type]
    assert got == {0: Delivered()} and sender.starts == 1


async def test_a_dead_child_fails_only_what_it_had_taken(
    sender: SenderProcess, acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    """Delivered stays delivered; taken and unanswered is RetryLater; checked out for the next
    lot but never taken by the child stays unreported (the node releases it, no attempt)."""
    files = write_corpus(tmp_path / "in", 4)
    reached, release = holding(acceptor, answered=1)  # the second instance gets no answer
    asked = trio.Event()

    async def more() -> Sequence[OutgoingInstance]:
        asked.set()  # asked one ahead, after the first was delivered
        return [outgoing(f) for f in files[2:]]

    got, cb = collect()
    async with trio.open_nursery() as nursery:

        async def kill() -> None:
            await reached.wait()
            await asked.wait()
            assert sender.pid is not None
            os.kill(sender.pid, signal.SIGKILL)

        nursery.start_soon(kill)
        await sender.send_batch(peer(acceptor), [outgoing(f) for f in files[:2]], SendOptions("ROUTER"), cb, more=more)  # type: ignore[arg-type]
    release.set()
    assert got == {0: Delivered(), 1: RetryLater("sender process died")}


async def test_a_child_that_dies_before_it_is_ready_leaves_sending_in_the_router(
    acceptor: RunningAcceptor, tmp_path: Path
) -> None:
    import sys

    files = write_corpus(tmp_path / "in", 1)
    sp = SenderProcess(argv=[sys.executable, "-c", "import sys; sys.exit(3)"])
    async with trio.open_nursery() as nursery:
        await nursery.start(sp.run)
        got, cb = collect()
        await sp.send_batch(peer(acceptor), [outgoing(files[0])], SendOptions("ROUTER"), cb)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert got == {0: Delivered()} and sp.starts == 0
    assert "before it was ready" in str(sp.start_error)


async def test_a_batch_the_child_never_got_is_left_unreported(tmp_path: Path) -> None:
    """The child died between the check and the hand-over: nothing was sent, so nothing is
    RetryLater (which would count an attempt and back the node off); the node releases it."""
    sp = SenderProcess()
    dead_send, dead_receive = trio.open_memory_channel[tuple[object, ...]](1)
    dead_receive.close()
    sp._out = dead_send  # type: ignore[assignment]  # a child that just died
    got, cb = collect()
    files = write_corpus(tmp_path / "in", 2)
    await sp.send_batch(Peer("X", "127.0.0.1", 1), [outgoing(f) for f in files], SendOptions("ROUTER"), cb)
    assert got == {} and sp._batches == {}


async def test_the_child_ignores_modules_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `attrs.py` (or `trio.py`) in the directory the router was started from is not imported
    by the child: it runs isolated, importing capacitor_trio from where the router did."""
    trap = tmp_path / "cwd"
    trap.mkdir()
    marker = tmp_path / "imported"
    for name in ("attrs", "trio", "pickle"):
        (trap / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    monkeypatch.chdir(trap)
    monkeypatch.setenv("PYTHONPATH", str(trap))
    sp = SenderProcess()
    async with trio.open_nursery() as nursery:
        await nursery.start(sp.run)
        await sp.send_batch(None, [], SendOptions("X"), lambda i, o: None)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert sp.start_error is None and sp.starts == 1
    assert not marker.exists(), f"the child imported {marker.read_text()} from the working directory"


def test_a_childs_traceback_stays_readable_and_its_message_one_line() -> None:
    """The child sends its records formatted; in the router's log the message is one escaped
    line (a peer's text in it cannot forge a record) and a traceback keeps its lines, indented."""
    import io

    from capacitor_trio.dicom.sender_process import _log_from_child
    from capacitor_trio.logs import setup_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    setup_logging("INFO", None, stream=out)
    try:
        text = "send failed for 'X\nERROR: forged'\nTraceback (most recent call last):\n  File \"x\"\nValueError: y"
        _log_from_child(logging.ERROR, "capacitor_trio.dicom", text)
        _log_from_child(logging.DEBUG, "capacitor_trio.dicom", "hidden")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert out.getvalue().splitlines() == [
        "ERROR: send failed for 'X\\nERROR: forged'",
        "    Traceback (most recent call last):",
        '      File "x"',
        "    ValueError: y",
    ]
