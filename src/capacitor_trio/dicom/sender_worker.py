"""The child process of `sender_process.SenderProcess`: runs `requestor.send_batch` for the router.

    python -m capacitor_trio.dicom.sender_worker [LOG_LEVEL]

Reads batches from stdin, writes outcomes to stdout (the messages are in `sender_pipe`), and
forwards its log records to the router, which logs them as its own. Exits when stdin closes,
aborting the associations in progress.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys

import attrs
import trio

from capacitor_trio import gctune
from capacitor_trio.domain.outcomes import Delivered, Outcome

from . import requestor
from .requestor import OutgoingInstance
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
    TopUp,
    WantMore,
    write_messages,
)


@attrs.define(eq=False)
class _Batch:
    """One batch the router asked this child to send."""

    order: SendBatch
    out: trio.MemorySendChannel[FromChild]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: the router's TopUps, in order
    top_up_send: trio.MemorySendChannel[list[OutgoingInstance]] = attrs.field(init=False)
    top_up_receive: trio.MemoryReceiveChannel[list[OutgoingInstance]] = attrs.field(init=False)
    #: a WantMore is out and not answered yet
    asked: bool = False

    def __attrs_post_init__(self) -> None:
        self.top_up_send, self.top_up_receive = trio.open_memory_channel[list[OutgoingInstance]](math.inf)

    async def run(self, batches: dict[int, _Batch]) -> None:
        """Send the batch; tell the router it is done (unless it cancelled it)."""
        order = self.order
        error: str | None = None
        try:
            with self.scope:
                await requestor.send_batch(
                    order.peer, order.instances, order.options, self._on_outcome,
                    more=self._more if order.has_more else None,
                )
        except Exception as exc:  # a bug: the router raises it in the node actor
            logging.getLogger("capacitor_trio.dicom").exception("sender process: batch failed")
            error = repr(exc)
        finally:
            del batches[order.batch]
        if not self.scope.cancelled_caught:
            self.out.send_nowait(BatchDone(order.batch, error))

    def _ask(self, took: int) -> None:
        self.out.send_nowait(WantMore(self.order.batch, took))
        self.asked = True

    def _on_outcome(self, index: int, outcome: Outcome) -> None:
        self.out.send_nowait(OutcomeReport(self.order.batch, index, outcome))
        if self.order.has_more and not self.asked and isinstance(outcome, Delivered):
            self._ask(0)  # the destination takes instances: have the next ones ready in time

    async def _more(self) -> list[OutgoingInstance]:
        # one request ahead: the router checks the next instances out while these are sent, so
        # a round trip between the processes is not paid per instance
        if not self.asked:
            self._ask(0)
        extra = await self.top_up_receive.receive()
        self.asked = False
        if extra:
            self._ask(len(extra))  # took these; the next ones, please
        return extra


class _Forward(logging.Handler):
    def __init__(self, out: trio.MemorySendChannel[FromChild]) -> None:
        super().__init__()
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._out.send_nowait(ChildLog(record.levelno, record.name, self.format(record)))


async def serve(stdin: trio.abc.ReceiveStream, stdout: trio.abc.SendStream) -> None:
    out_send, out_receive = trio.open_memory_channel[FromChild](math.inf)
    handler = _Forward(out_send)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(handler)
    batches: dict[int, _Batch] = {}
    out_send.send_nowait(Ready())
    async with trio.open_nursery() as outer:
        outer.start_soon(write_messages, stdout, out_receive)
        async with trio.open_nursery() as work:
            decoder = Decoder()
            while True:
                data = await stdin.receive_some(1 << 20)
                if not data:
                    break
                for message in decoder.feed(data):
                    _obey(message, batches, out_send, work)
            # the router is gone: abort what is in flight (the requestor sends A-ABORT) and leave
            for batch in batches.values():
                batch.scope.cancel()
        outer.cancel_scope.cancel()


def _obey(
    message: PipeMessage, batches: dict[int, _Batch], out: trio.MemorySendChannel[FromChild], work: trio.Nursery
) -> None:
    if isinstance(message, SendBatch):
        batch = batches[message.batch] = _Batch(message, out)
        work.start_soon(batch.run, batches)
    elif isinstance(message, TopUp) and message.batch in batches:
        batches[message.batch].top_up_send.send_nowait(message.instances)
    elif isinstance(message, CancelBatch) and message.batch in batches:
        batches[message.batch].scope.cancel()


async def _main() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    os.dup2(2, 1)  # a stray print() goes to stderr, not into the protocol
    gctune.settle()
    await serve(stdin, stdout)


def main() -> None:
    level = sys.argv[1] if len(sys.argv) > 1 else "INFO"
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main)


if __name__ == "__main__":
    main()
