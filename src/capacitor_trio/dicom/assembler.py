"""DIMSE message assembly, sans-IO: PDVs in, complete command sets and data set fragments out.

A DIMSE message is a command set, cut into command PDVs (message control header bit 0 set), the
last of which has bit 1 set; when the command's Command Data Set Type (0000,0800) is not 0x0101,
a data set follows on the same presentation context, cut into data PDVs the same way (PS3.8
E.2, PS3.7 6.3.1). `MessageAssembler` follows that, one per association, on both sides: the
acceptor feeds it the requests it reads, the requestor the responses. It does no I/O and keeps
no data set bytes: a data PDV comes back out as it went in (a view of the PDU), for the caller to
write where it will; only a command set split over several PDVs is gathered. A command set is
taken up to `MAX_COMMAND_BYTES` (a C-STORE's command set is a few hundred bytes), so that a
hostile peer streaming an endless command set is cut off there. Any breach of that grammar
raises `AssemblyError`, a `PduError` carrying the A-ABORT reason to answer with.
"""

from __future__ import annotations

from typing import NamedTuple

import attrs

from . import dimse
from . import pdu as P

#: the largest command set taken, in one PDV or gathered from several
MAX_COMMAND_BYTES = 1 << 20


class AssemblyError(P.PduError):
    """PDVs that break the order of a DIMSE message, or a command set that is too large or
    cannot be decoded: the association is aborted with `abort_reason`."""


@attrs.frozen
class CommandSet:
    """A complete, decoded command set; when it announces a data set, data fragments follow."""

    context_id: int
    command: dimse.Command


class DataFragment(NamedTuple):
    """One data PDV of the data set being received: a view of the PDU it came in, valid until
    the next PDU is read. `last`: the data set ends with it. (A named tuple, not an attrs
    class: one is built per data PDV, on the receiving hot path, where it is cheaper.)"""

    context_id: int
    data: memoryview
    last: bool


class MessageAssembler:
    """The state of the DIMSE message being received on one association."""

    def __init__(self, max_command_bytes: int = MAX_COMMAND_BYTES) -> None:
        self.max_command_bytes = max_command_bytes
        #: command fragments so far (None: no command set under way) and their context
        self._command: bytearray | None = None
        self._command_ctx = 0
        #: the context of the data set under way (None: none expected)
        self._data_ctx: int | None = None

    @property
    def idle(self) -> bool:
        """Between messages: no command set or data set under way."""
        return self._command is None and self._data_ctx is None

    def feed(self, ctx: int, mch: int, data: memoryview) -> CommandSet | DataFragment | None:
        """Take one PDV (presentation context, message control header, data). Returns the
        command set it completes, the data fragment it is, or None (a command set goes on)."""
        if mch & 0x01:
            return self._command_fragment(ctx, mch, data)
        if self._data_ctx is None:
            raise AssemblyError("data fragment without a command", P.ABORT_REASON_UNEXPECTED_PDU)
        if ctx != self._data_ctx:
            raise AssemblyError("data fragment on another presentation context")
        last = bool(mch & 0x02)
        if last:
            self._data_ctx = None
        return DataFragment(ctx, data, last)

    def _command_fragment(self, ctx: int, mch: int, data: memoryview) -> CommandSet | None:
        if self._data_ctx is not None:
            raise AssemblyError(
                "command fragment while a data set was expected", P.ABORT_REASON_UNEXPECTED_PDU
            )
        if self._command is None:
            if mch & 0x02 and len(data) <= self.max_command_bytes:
                # the whole command set in one PDV (the usual case): decoded in place
                return self._complete(ctx, data)
            self._command = bytearray()
            self._command_ctx = ctx
        elif ctx != self._command_ctx:
            raise AssemblyError(
                "command fragments on two presentation contexts", P.ABORT_REASON_UNEXPECTED_PDU
            )
        if len(self._command) + len(data) > self.max_command_bytes:
            raise AssemblyError(f"command set larger than {self.max_command_bytes} bytes")
        self._command += data
        if not mch & 0x02:
            return None
        raw, self._command = self._command, None
        return self._complete(ctx, raw)

    def _complete(self, ctx: int, raw: bytearray | memoryview) -> CommandSet:
        try:
            command = dimse.decode_command(raw)
        except dimse.CommandDecodeError as exc:
            raise AssemblyError(f"undecodable command set: {exc}") from exc
        if command.has_data_set:
            self._data_ctx = ctx
        return CommandSet(ctx, command)
