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
    Ready,
    SendBatch,
    TopUp,
    WantMore,
    write_messages,
)


@attrs.define(eq=False)
class _Batch:
    scope: trio.CancelScope
    more_send: trio.MemorySendChannel[list[OutgoingInstance]]
    more_receive: trio.MemoryReceiveChannel[list[OutgoingInstance]]


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

    async def run_batch(batch: _Batch, order: SendBatch) -> None:
        bid, has_more = order.batch, order.has_more
        asked = False

        def ask(took: int) -> None:
            nonlocal asked
            out_send.send_nowait(WantMore(bid, took))
            asked = True

        def on_outcome(index: int, outcome: Outcome) -> None:
            out_send.send_nowait(OutcomeReport(bid, index, outcome))
            if has_more and not asked and isinstance(outcome, Delivered):
                ask(0)  # the destination takes instances: have the next ones ready in time

        async def more() -> list[OutgoingInstance]:
            # one request ahead: the router checks the next instances out while these are sent,
            # so a round trip between the processes is not paid per instance
            nonlocal asked
            if not asked:
                ask(0)
            extra = await batch.more_receive.receive()
            asked = False
            if extra:
                ask(len(extra))  # took these; the next ones, please
            return extra

        error: str | None = None
        try:
            with batch.scope:
                await requestor.send_batch(
                    order.peer, order.instances, order.options, on_outcome, more=more if has_more else None
                )
        except Exception as exc:  # a bug: the router raises it in the node actor
            logging.getLogger("capacitor_trio.dicom").exception("sender process: batch failed")
            error = repr(exc)
        finally:
            del batches[bid]
        if not batch.scope.cancelled_caught:
            out_send.send_nowait(BatchDone(bid, error))

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
                    if isinstance(message, SendBatch):
                        send, receive = trio.open_memory_channel[list[OutgoingInstance]](math.inf)
                        batch = _Batch(trio.CancelScope(), send, receive)
                        batches[message.batch] = batch
                        work.start_soon(run_batch, batch, message)
                    elif isinstance(message, TopUp) and message.batch in batches:
                        batches[message.batch].more_send.send_nowait(message.instances)
                    elif isinstance(message, CancelBatch) and message.batch in batches:
                        batches[message.batch].scope.cancel()
            # the router is gone: abort what is in flight (the requestor sends A-ABORT) and leave
            for batch in batches.values():
                batch.scope.cancel()
        outer.cancel_scope.cancel()


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
