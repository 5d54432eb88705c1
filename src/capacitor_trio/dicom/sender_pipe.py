"""The pipe between the router and its sender child (`sender_process`, `sender_worker`).

Typed messages (attrs, frozen), each a length-prefixed pickle, over the child's stdin and stdout:
a private pipe between two copies of this program, nothing else writes to it. A message pickles
as its class and its field values in order, which keeps a message about as small and as quick
to encode as a plain tuple (one goes each way per instance sent).

    router -> child   SendBatch     send these instances to this peer (`has_more`: ask for more)
                      TopUp         the answer to a WantMore: the next instances (none: the end)
                      CancelBatch   pause, shutdown, a killed actor: A-ABORT now
    child -> router   Ready         started: the router sends through it from now
                      OutcomeReport the outcome of one instance (by its index in the batch)
                      WantMore      the next instances, please; `took`: how many of the last
                                    TopUp the child put in its list (it asks one request ahead,
                                    once the destination has taken an instance, so that the
                                    router checks them out while these are sent)
                      BatchDone     `error`: None, or the text of a bug
                      ChildLog      a log record of the child, for the router's log
"""

from __future__ import annotations

import contextlib
import pickle
import struct
from typing import Any

import attrs
import trio

from capacitor_trio.domain.outcomes import Outcome

from .requestor import OutgoingInstance, Peer, SendOptions

_LENGTH = struct.Struct("<I")


class PipeMessage:
    """Pickled as its class and its field values, in order."""

    __slots__ = ()
    __match_args__: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[type[PipeMessage], tuple[Any, ...]]:
        return type(self), tuple([getattr(self, name) for name in self.__match_args__])


@attrs.frozen
class SendBatch(PipeMessage):
    batch: int
    peer: Peer
    instances: list[OutgoingInstance]
    options: SendOptions
    has_more: bool


@attrs.frozen
class TopUp(PipeMessage):
    batch: int
    instances: list[OutgoingInstance]


@attrs.frozen
class CancelBatch(PipeMessage):
    batch: int


@attrs.frozen
class Ready(PipeMessage):
    pass


@attrs.frozen
class OutcomeReport(PipeMessage):
    batch: int
    index: int
    outcome: Outcome


@attrs.frozen
class WantMore(PipeMessage):
    batch: int
    took: int


@attrs.frozen
class BatchDone(PipeMessage):
    batch: int
    error: str | None


@attrs.frozen
class ChildLog(PipeMessage):
    levelno: int
    logger: str
    message: str


ToChild = SendBatch | TopUp | CancelBatch
FromChild = Ready | OutcomeReport | WantMore | BatchDone | ChildLog


def encode(message: PipeMessage) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class Decoder:
    """Messages out of a byte stream, however it is cut."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[PipeMessage]:
        self._buf += data
        out: list[PipeMessage] = []
        pos = 0
        while len(self._buf) - pos >= 4:
            (n,) = _LENGTH.unpack_from(self._buf, pos)
            if len(self._buf) - pos - 4 < n:
                break
            out.append(pickle.loads(self._buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        del self._buf[:pos]
        return out


async def write_messages(stream: trio.abc.SendStream, messages: trio.MemoryReceiveChannel[PipeMessage]) -> None:
    """The one writer of a pipe: everything queued meanwhile goes out in one write."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async for first in messages:
            chunk = [encode(first)]
            while True:
                try:
                    chunk.append(encode(messages.receive_nowait()))
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await stream.send_all(b"".join(chunk))
