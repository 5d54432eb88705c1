"""The requestor in a child process: the bytes of outgoing associations on a second core.

Node actors keep everything that is theirs — queue, checkouts, decisions, outcome records — in
the router process; only the work of an association (reading spool files, framing and sending
PDUs, reading responses, the watchdogs) runs in a child interpreter, so that receiving and sending
do not share one interpreter lock. `SenderProcess` is a drop-in `Sender` for node actors:
`send_batch` has the requestor's contract, outcome by outcome, `more()` included.

Between the two processes: the typed messages of `sender_pipe` (SendBatch, TopUp, CancelBatch
to the child; Ready, OutcomeReport, WantMore, BatchDone, ChildLog from it) over the child's
stdin and stdout.

The router writes through one task fed by a queue, so a caller cancelled mid-message never leaves
half a message in the pipe. The memory channels on both sides are unbounded on purpose: their
producers are synchronous (the dispatcher, outcome callbacks, the log handler) and must not
block, and what they carry is bounded by the batches in flight (one outcome per instance, one
answer per WantMore). The child exits when its stdin closes (the router stopped, or was
killed). If the child dies, every batch in flight reports RetryLater for the instances the child
had taken and not seen answered (the others stay unreported: the node releases them), and a new
child is started. A child that exits before saying Ready, or cannot be started at all, leaves
sending in the router process (`requestor.send_batch`) until a later start works.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio
from trio_util import RepeatedEvent

import capacitor_trio
from capacitor_trio.domain.outcomes import Outcome, RetryLater

from . import requestor
from .conversion import Converter
from .requestor import EchoResult, MoreInstances, OutgoingInstance, Peer, SendOptions
from .sender_pipe import (
    BatchDone,
    CancelBatch,
    ChildLog,
    Decoder,
    FromChild,
    OutcomeReport,
    PipeMessage,
    Ready,
    SendBatch,
    ToChild,
    TopUp,
    WantMore,
    write_messages,
)

log = logging.getLogger("capacitor_trio.dicom")

#: a child that dies at once is not restarted more often than this
RESTART_DELAY = 1.0
#: The child's program: an isolated interpreter (``-I``: neither the working directory, nor
#: PYTHONPATH, nor the user's site-packages on ``sys.path``, so that no module lying in the
#: directory the router was started from runs inside it) that imports capacitor_trio from where
#: the router did, first on its path, then runs the worker as ``__main__``.
_BOOTSTRAP = (
    "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
    "runpy.run_module('capacitor_trio.dicom.sender_worker', run_name='__main__', alter_sys=True)"
)


def worker_argv() -> list[str]:
    """The command line of the child: the router's own interpreter, isolated (`_BOOTSTRAP`)."""
    package_root = Path(capacitor_trio.__file__).resolve().parent.parent
    return [sys.executable, "-I", "-c", _BOOTSTRAP, str(package_root)]


#: how long a stopping router waits for the child to abort its associations and exit
STOP_GRACE = 2.0


#: the messages from the child that go to the batch they name
_FOR_A_BATCH = (OutcomeReport, WantMore, BatchDone)


_TRACEBACK = "\nTraceback (most recent call last):"


def _log_from_child(levelno: int, name: str, text: str) -> None:
    """Log a record the child formatted (its message, then any traceback) as the router's own,
    the traceback as the record's exception text: the log shows it on lines of its own
    (indented), the message on one line (logs.escape_controls)."""
    logger = logging.getLogger(name)
    if not logger.isEnabledFor(levelno):
        return
    message, found, rest = text.partition(_TRACEBACK)
    record = logger.makeRecord(name, levelno, "(sender process)", 0, "%s", (message,), None)
    if found:
        record.exc_text = found.lstrip("\n") + rest
    logger.handle(record)


class _ChildDied(Exception):
    pass


@attrs.frozen
class _Died:
    """To a batch waiting for its messages: the child died (never on the pipe)."""


@attrs.define(eq=False)
class _RemoteBatch:
    """A batch the child sends, as the router follows it."""

    bid: int
    on_outcome: Callable[[int, Outcome], None]
    more: MoreInstances | None
    receive: trio.MemoryReceiveChannel[FromChild | _Died]
    #: instances the child has in its list (it says so when it takes a lot of `more()`)
    taken: int = 0
    reported: set[int] = attrs.field(factory=set)
    finished: bool = False
    died: bool = False
    #: the text of a bug the child met
    error: str | None = None

    def report(self, message: FromChild | _Died) -> None:
        if isinstance(message, OutcomeReport) and message.index not in self.reported:
            self.reported.add(message.index)
            self.on_outcome(message.index, message.outcome)

    async def follow(self, more_requests: trio.MemorySendChannel[None]) -> None:
        """Report outcomes and pass on requests for more until the child is done with it."""
        async for message in self.receive:
            if isinstance(message, OutcomeReport):
                self.report(message)
            elif isinstance(message, WantMore):
                self.taken += message.took
                more_requests.send_nowait(None)
            elif isinstance(message, BatchDone):
                self.finished, self.error = True, message.error
                return
            else:  # _Died
                raise _ChildDied

    def drain(self) -> None:
        """Outcomes that arrived before the end are the node's to record."""
        while True:
            try:
                self.report(self.receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    def settle(self) -> None:
        """After the end: the instances a dead child had taken without an answer retry later;
        a bug the child met is raised here."""
        if self.died:
            for index in range(self.taken):
                if index not in self.reported:
                    self.on_outcome(index, RetryLater("sender process died"))
        if self.error is not None:
            raise RuntimeError(f"sender process: {self.error}")


class SenderProcess:
    """A `Sender` whose associations run in a child process; `run` keeps the child going."""

    def __init__(self, *, argv: Sequence[str] | None = None, converter: Converter | None = None) -> None:
        self._argv = list(argv or worker_argv())
        #: conversions on the way out of the batches sent in this process while the child
        #: cannot start (the child converts its own in a thread: dicom/conversion.py)
        self._converter = converter
        self._ids = itertools.count(1)
        self._batches: dict[int, trio.MemorySendChannel[FromChild | _Died]] = {}
        #: messages for the running child; one task writes them, so a cancelled caller can
        #: never leave half a message in the pipe
        self._out: trio.MemorySendChannel[ToChild] | None = None
        #: the child started, or could not be started: waiting batches look again
        self._changed = RepeatedEvent()
        #: the running child's pid (tests kill it)
        self.pid: int | None = None
        self.starts = 0
        #: why the last start failed: batches then run in this process until a start works
        self.start_error: Exception | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the child and keep one running until cancelled (a dead one is replaced)."""
        task_status.started()
        while True:
            await self._serve_one_child()
            await trio.sleep(RESTART_DELAY)

    def _start_failed(self, error: Exception) -> None:
        if self.start_error is None:
            log.error("cannot start the sender process (%s); sending from the router process", error)
        self.start_error = error
        self._changed.set()  # waiting batches go ahead in this process

    async def _serve_one_child(self) -> None:
        """Run one child until it exits; on the way out, fail the batches it had."""
        argv = [*self._argv, logging.getLevelName(logging.getLogger("capacitor_trio").getEffectiveLevel())]
        try:
            proc = await trio.lowlevel.open_process(argv, stdin=-1, stdout=-1)
        except OSError as exc:
            self._start_failed(exc)
            return
        assert proc.stdin is not None and proc.stdout is not None
        ready = False
        out_send, out_receive = trio.open_memory_channel[ToChild](math.inf)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_messages, proc.stdin, out_receive)
                decoder = Decoder()
                while True:
                    data = await proc.stdout.receive_some(1 << 20)
                    if not data:
                        break
                    try:
                        messages = decoder.feed(data)
                    except Exception as exc:  # never from our child; stop it rather than guess
                        log.error("sender process %d: unreadable message (%r); stopping it", proc.pid, exc)
                        break
                    for message in messages:
                        if isinstance(message, Ready):
                            ready = True
                            self.start_error = None
                            self.starts += 1
                            self.pid = proc.pid
                            self._out = out_send
                            self._changed.set()
                            log.info("sender process %d started", proc.pid)
                        else:
                            self._dispatch(message)
                nursery.cancel_scope.cancel()
        finally:
            self._out = None
            self.pid = None
            out_send.close()
            for channel in self._batches.values():
                channel.send_nowait(_Died())
            with trio.CancelScope(shield=True):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await proc.stdin.aclose()  # the child sees EOF: aborts what it sends, exits
                with trio.move_on_after(STOP_GRACE):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                await proc.stdout.aclose()
        if ready:
            log.error("sender process %d exited (%s); batches in flight retry later", proc.pid, proc.returncode)
        else:
            self._start_failed(RuntimeError(f"it exited ({proc.returncode}) before it was ready"))

    def _dispatch(self, message: PipeMessage) -> None:
        if isinstance(message, _FOR_A_BATCH):
            channel = self._batches.get(message.batch)
            if channel is not None:  # else: a batch its caller gave up (cancelled)
                channel.send_nowait(message)
        elif isinstance(message, ChildLog):
            _log_from_child(message.levelno, message.logger, message.message)
        else:
            log.error("sender process: unexpected message %r; ignored", message)

    def _send(self, message: ToChild) -> None:
        if self._out is None:
            raise _ChildDied
        try:
            self._out.send_nowait(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _ChildDied from None

    async def send_batch(
        self,
        peer: Peer,
        instances: Sequence[OutgoingInstance],
        options: SendOptions,
        on_outcome: Callable[[int, Outcome], None],
        *,
        more: MoreInstances | None = None,
    ) -> None:
        """`requestor.send_batch`, run by the child process."""
        while self._out is None:
            if self.start_error is not None:
                await requestor.send_batch(
                    peer, instances, options, on_outcome, more=more, converter=self._converter
                )
                return
            await self._changed.wait()
        bid = next(self._ids)
        send, receive = trio.open_memory_channel[FromChild | _Died](math.inf)
        self._batches[bid] = send
        batch = _RemoteBatch(bid, on_outcome, more, receive)
        try:
            await self._run_remote(batch, SendBatch(bid, peer, list(instances), options, more is not None))
        finally:
            batch.drain()
            del self._batches[bid]
            if not batch.finished:  # cancelled: the child aborts the association
                with contextlib.suppress(_ChildDied):
                    self._send(CancelBatch(bid))
        batch.settle()

    async def _run_remote(self, batch: _RemoteBatch, order: SendBatch) -> None:
        # `more()` runs in its own task, one request at a time, so that outcomes keep coming in
        # while it checks out (or waits for) the next instances
        more_send, more_receive = trio.open_memory_channel[None](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_more, batch, more_receive)
            try:
                self._send(order)
                batch.taken = len(order.instances)
                await batch.follow(more_send)
            except _ChildDied:
                batch.finished = batch.died = True
            finally:
                # a `more()` in progress completes (its instances stay unreported: the node
                # releases them); cancelling it could strand a checkout
                more_send.close()

    async def _serve_more(self, batch: _RemoteBatch, requests: trio.MemoryReceiveChannel[None]) -> None:
        async for _ in requests:
            extra = list(await batch.more()) if batch.more is not None else []
            with contextlib.suppress(_ChildDied):
                self._send(TopUp(batch.bid, extra))

    async def echo(self, peer: Peer, calling_ae: str, *, timeout: float = 10) -> EchoResult:  # noqa: ASYNC109
        """C-ECHO, in this process (rare, and its latency is what the API reports)."""
        return await requestor.echo(peer, calling_ae, timeout=timeout)
