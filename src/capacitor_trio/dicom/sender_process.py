"""The requestor in a child process: the bytes of outgoing associations on a second core.

Node actors keep everything that is theirs — queue, checkouts, decisions, outcome records — in
the router process; only the work of an association (reading spool files, framing and sending
PDUs, reading responses, the watchdogs) runs in a child interpreter, so that receiving and sending
do not share one interpreter lock. `SenderProcess` is a drop-in `Sender` for node actors:
`send_batch` has the requestor's contract, outcome by outcome, `more()` included.

Between the two processes: length-prefixed pickles over the child's stdin/stdout (a private
pipe between two copies of this program; nothing else writes to it).

    router -> child   ("batch", id, peer, instances, options, has_more)
                      ("more", id, instances)      the answer to a "more?"
                      ("cancel", id)               pause, shutdown, a killed actor: A-ABORT now
    child -> router   ("outcome", id, index, outcome)
                      ("more?", id)                the next instances, please (asked one
                                                   request ahead: the router checks them out
                                                   while the child sends the previous ones)
                      ("done", id, error)          error: None, or the text of a bug
                      ("log", levelno, logger, message)

The child exits when its stdin closes (the router stopped, or was killed). If the child dies,
every batch in flight reports RetryLater for the instances not yet answered, and the next batch
starts a new child.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import pickle
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

import trio

from capacitor_trio.domain.outcomes import Outcome, RetryLater

from . import requestor
from .requestor import EchoResult, MoreInstances, OutgoingInstance, Peer, SendOptions

log = logging.getLogger("capacitor_trio.dicom")

_LENGTH = struct.Struct("<I")
#: a child that dies at once is not restarted more often than this
RESTART_DELAY = 1.0
#: how long a stopping router waits for the child to abort its associations and exit
STOP_GRACE = 2.0


def encode(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class Decoder:
    """Messages out of a byte stream, however it is cut."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[tuple[Any, ...]]:
        self._buf += data
        out: list[tuple[Any, ...]] = []
        pos = 0
        while len(self._buf) - pos >= 4:
            (n,) = _LENGTH.unpack_from(self._buf, pos)
            if len(self._buf) - pos - 4 < n:
                break
            out.append(pickle.loads(self._buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        del self._buf[:pos]
        return out


class _ChildDied(Exception):
    pass


class SenderProcess:
    """A `Sender` whose associations run in a child process; `run` keeps the child going."""

    def __init__(self, *, argv: Sequence[str] | None = None) -> None:
        self._argv = list(argv or [sys.executable, "-m", "capacitor_trio.dicom.sender_worker"])
        self._ids = itertools.count(1)
        self._batches: dict[int, trio.MemorySendChannel[tuple[Any, ...]]] = {}
        self._stdin: trio.abc.SendStream | None = None
        self._write_lock = trio.Lock()
        self._up = trio.Event()
        #: the running child's pid (tests kill it)
        self.pid: int | None = None
        self.starts = 0
        #: why the last start failed: batches then run in this process until a start works
        self.start_error: OSError | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the child and keep one running until cancelled (a dead one is replaced)."""
        task_status.started()
        while True:
            await self._serve_one_child()
            await trio.sleep(RESTART_DELAY)

    async def _serve_one_child(self) -> None:
        """Run one child until it exits; on the way out, fail the batches it had."""
        argv = [*self._argv, logging.getLevelName(logging.getLogger("capacitor_trio").getEffectiveLevel())]
        try:
            proc = await trio.lowlevel.open_process(argv, stdin=-1, stdout=-1)
        except OSError as exc:
            if self.start_error is None:
                log.error("cannot start the sender process (%s); sending from the router process", exc)
            self.start_error = exc
            self._up.set()  # waiting batches go ahead in this process
            self._up = trio.Event()
            return
        self.start_error = None
        self.starts += 1
        self.pid = proc.pid
        assert proc.stdin is not None and proc.stdout is not None
        self._stdin = proc.stdin
        self._up.set()
        log.debug("sender process %d started", proc.pid)
        try:
            decoder = Decoder()
            while True:
                data = await proc.stdout.receive_some(1 << 20)
                if not data:
                    break
                for message in decoder.feed(data):
                    self._dispatch(message)
            code = await proc.wait()
            log.error("sender process %d exited (%s); batches in flight retry later", proc.pid, code)
        finally:
            self._up = trio.Event()
            self._stdin = None
            self.pid = None
            for channel in self._batches.values():
                channel.send_nowait(("died",))
            with trio.CancelScope(shield=True):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await proc.stdin.aclose()  # the child sees EOF: aborts what it sends, exits
                with trio.move_on_after(STOP_GRACE):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        if message[0] == "log":
            _, levelno, name, text = message
            logging.getLogger(name).log(levelno, "%s", text)
            return
        channel = self._batches.get(message[1])
        if channel is not None:  # else: a batch its caller gave up (cancelled)
            channel.send_nowait(message)

    async def _send(self, message: tuple[Any, ...]) -> None:
        data = encode(message)
        async with self._write_lock:
            if self._stdin is None:
                raise _ChildDied
            try:
                await self._stdin.send_all(data)
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
        while self._stdin is None:
            if self.start_error is not None:
                await requestor.send_batch(peer, instances, options, on_outcome, more=more)
                return
            await self._up.wait()
        bid = next(self._ids)
        send, receive = trio.open_memory_channel[tuple[Any, ...]](math.inf)
        self._batches[bid] = send
        sent = len(instances)
        reported: set[int] = set()
        finished = False
        try:
            try:
                await self._send(("batch", bid, peer, list(instances), options, more is not None))
                async for message in receive:
                    kind = message[0]
                    if kind == "outcome":
                        reported.add(message[2])
                        on_outcome(message[2], message[3])
                    elif kind == "more?":
                        extra = list(await more()) if more is not None else []
                        sent += len(extra)
                        await self._send(("more", bid, extra))
                    elif kind == "done":
                        finished = True
                        if message[2] is not None:
                            raise RuntimeError(f"sender process: {message[2]}")
                        return
                    else:  # "died"
                        raise _ChildDied
            except _ChildDied:
                finished = True
                for index in range(sent):
                    if index not in reported:
                        on_outcome(index, RetryLater("sender process died"))
        finally:
            del self._batches[bid]
            if not finished:  # cancelled: the child aborts the association
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(1.0),
                    contextlib.suppress(_ChildDied),
                ):
                    await self._send(("cancel", bid))

    async def echo(self, peer: Peer, calling_ae: str, *, timeout: float = 10) -> EchoResult:  # noqa: ASYNC109
        """C-ECHO, in this process (rare, and its latency is what the API reports)."""
        return await requestor.echo(peer, calling_ae, timeout=timeout)

