"""The requestor: C-STORE and C-ECHO SCU on Trio, used by node actors and the API's echo.

Theory of operation. `send_batch` opens one association for a batch, proposing one presentation
context per (SOP class, stored transfer syntax) pair, and for each SOP class one more with the
uncompressed syntaxes (negotiation.py's `propose`). Each instance goes in its stored syntax when
the destination accepted it, else in the best accepted syntax we can convert it into
(negotiation.py's `route`: Explicit VR Little Endian, then Implicit VR Little Endian, then another
lossless one), converted just before it is sent (conversion.py); an instance with no such syntax
is Rejected, naming the syntaxes the destination accepted. Each C-STORE streams the spool file's
dataset bytes (everything after the file meta) in P-DATA-TF PDUs sized to the peer's maximum
(ours when it has none; one below `MIN_PEER_PDU` fails the association), with the command set
in front of the first fragment so a small instance is one `send`. Exactly
one task reads from the peer (`_reader`, its PDVs through a `MessageAssembler`, as the acceptor's,
with the same cap on a command set): responses are matched by message ID, an A-ABORT or a
broken connection fails the association at once, so no response can be lost in a race.

Three watchdogs end an association with an A-ABORT and a RetryLater for every instance not yet
reported: the DIMSE timeout (no response after the request went out), the stall detector (no
bytes either way for `stall_threshold` seconds) and the line-speed check (while sending data, the
average rate over a window falls below half of `minimum_line_speed_kbps`).

Cancellation from outside (pause, shutdown, a killed actor) sends an A-ABORT under a short
shielded deadline and lets Cancelled propagate; unreported instances stay unreported. When the
association ends in the middle of sending a PDU (a watchdog or a cancel while the peer's window
was full), no A-ABORT can follow (the peer would read it as the rest of that PDU): the connection
is closed instead (`Transport.cut`), which the peer sees as a network failure.

The rooms next door: association.py (connect, A-ASSOCIATE-RQ and its answer, A-ABORT; `Peer`),
negotiation.py (the contexts proposed, the route of each instance), conversion.py (converting an
instance on the way out), source.py (an instance's stored bytes, read at offsets),
verification.py (`echo`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import attrs
import trio

from capacitor_trio.domain.outcomes import Delivered, Outcome, Rejected, RetryLater

from . import dimse
from . import pdu as P
from .assembler import CommandSet, MessageAssembler
from .association import Peer, _associate, _connect, _Failed, _send_abort
from .conversion import ConversionFailed, Converter, ThreadConverter, scratch_file
from .negotiation import Accepted, Proposal, Route, accepted, no_route_reason, propose, route
from .part10 import HeaderError
from .source import _Source
from .status import store_status_outcome
from .transport import PeerClosed, Transport, overdue, read_limit
from .verification import EchoResult, echo

log = logging.getLogger("capacitor_trio.dicom")

LINE_SPEED_WINDOW = 10.0
DEFAULT_FRAGMENT = 1 << 20
MAX_FRAGMENT = 4 << 20
#: the smallest maximum PDU length of a peer we send to (0, "no maximum", aside). A P-DATA-TF
#: needs 7 bytes to carry one byte of data; DCMTK, dicom-rs and most toolkits refuse to be set
#: below 4096, so a peer that advertises less than this is misconfigured or hostile, and each
#: image would be cut into thousands of PDUs
MIN_PEER_PDU = 1024
_MAX_CONTEXTS = 128


@attrs.frozen
class SendOptions:
    calling_ae: str
    priority: int = 0  # DIMSE: 0 medium, 1 high, 2 low
    connect_timeout: float = 30.0
    dimse_timeout: float = 60.0
    stall_threshold: float = 90.0  # 0 = off
    minimum_line_speed_kbps: float = 0.0  # 0 = off
    max_pdu_size: int = 1_048_576
    #: where copies converted on the way out are written ("": the system's temporary directory)
    scratch_dir: str = ""


def _path_text(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


@attrs.frozen
class OutgoingInstance:
    #: the spool file, as a string: it crosses the pipe to the sender child with every
    #: instance, and a string is quicker to pickle and unpickle than a Path
    path: str = attrs.field(converter=_path_text)
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    #: the Part 10 bytes, when the instance is not in a file (a small one kept in the index);
    #: `path` then only names it in messages
    data: bytes | None = attrs.field(default=None, repr=False)


#: `send_batch(..., more=)`: instances to send next on the same association (none: release it).
MoreInstances = Callable[[], Awaitable[Sequence[OutgoingInstance]]]


class _Session:
    def __init__(
        self,
        peer: Peer,
        instances: Sequence[OutgoingInstance],
        options: SendOptions,
        on_outcome: Callable[[int, Outcome], None],
        more: MoreInstances | None = None,
        converter: Converter | None = None,
    ) -> None:
        self.peer = peer
        self.converter = converter or ThreadConverter()
        #: an instance is being converted: the stall watchdog does not count that time
        self.converting = False
        self.instances = list(instances)
        self.more = more
        self.options = options
        self.on_outcome = on_outcome
        self.reported: set[int] = set()
        self.t: Transport | None = None
        self.failure: _Failed | None = None
        self.scope: trio.CancelScope | None = None
        self.released = trio.Event()
        self.send_seconds = 0.0
        self.send_bytes = 0
        self.send_started: float | None = None
        self.send_started_bytes = 0
        self.message_id = 0
        #: when the wait for the current C-STORE-RSP began (None: none awaited): the DIMSE
        #: timeout is kept by `_response_watchdog`, not by a cancel scope per C-STORE
        self.response_since: float | None = None
        #: where `_reader` hands the responses to `_store`
        self.responses: trio.MemoryReceiveChannel[dimse.Command] | None = None

    def report(self, index: int, outcome: Outcome) -> None:
        if index not in self.reported:
            self.reported.add(index)
            self.on_outcome(index, outcome)

    def fail(self, failure: _Failed) -> None:
        if self.failure is None:
            self.failure = failure
        if self.scope is not None:
            self.scope.cancel()

    def fail_rest(self, outcome: Outcome) -> None:
        for i in range(len(self.instances)):
            self.report(i, outcome)

    async def run(self) -> None:
        pairs: list[tuple[str, str]] = []
        for inst in self.instances:
            key = (inst.sop_class_uid, inst.transfer_syntax_uid)
            if key not in pairs:
                pairs.append(key)
        proposal = propose(pairs, _MAX_CONTEXTS)
        try:
            try:
                self.t = await _connect(self.peer, self.options.connect_timeout)
                accept = await _associate(
                    self.t,
                    self.peer,
                    self.options.calling_ae,
                    proposal.contexts,
                    self.options.max_pdu_size,
                    self.options.connect_timeout,
                )
                await self._session(accept, proposal)
            except _Failed as f:
                self.failure = self.failure or f
            except PeerClosed as exc:
                self.failure = self.failure or _Failed(
                    RetryLater(f"connection lost: {exc}", kind="connection_lost"), abort=False
                )
            if self.failure is not None:
                log.warning(
                    "send to %s (%s:%s) failed: %s",
                    self.peer.ae_title,
                    self.peer.host,
                    self.peer.port,
                    self.failure,
                )
                if self.t is not None and self.failure.abort:
                    await _send_abort(self.t)
                self.fail_rest(self.failure.outcome)
        except BaseException:
            # cancelled from outside (or a bug): abort the association, let it propagate
            if self.t is not None:
                await _send_abort(self.t)
            raise
        finally:
            if self.t is not None:
                await self.t.aclose()

    async def _session(self, accept: P.AssociateAccept, proposal: Proposal) -> None:
        assert self.t is not None
        answer = accepted(proposal.contexts, accept)
        fragment = _fragment_size(accept.max_pdu, self.options.max_pdu_size)
        send_rsp, recv_rsp = trio.open_memory_channel[dimse.Command](4)
        self.responses = recv_rsp
        async with trio.open_nursery() as nursery:
            self.scope = nursery.cancel_scope
            nursery.start_soon(self._reader, send_rsp)
            nursery.start_soon(self._response_watchdog)
            if self.options.stall_threshold > 0:
                nursery.start_soon(self._stall_watchdog)
            if self.options.minimum_line_speed_kbps > 0:
                nursery.start_soon(self._line_speed_watchdog)
            try:
                await self._send_all_items(proposal, answer, fragment, recv_rsp)
            except _Failed as f:
                self.fail(f)
            except PeerClosed as exc:
                self.fail(_Failed(RetryLater(f"connection lost: {exc}", kind="connection_lost"), abort=False))
            nursery.cancel_scope.cancel()

    async def _send_all_items(
        self,
        proposal: Proposal,
        answer: Accepted,
        fragment: int,
        recv_rsp: trio.MemoryReceiveChannel[dimse.Command],
    ) -> None:
        assert self.t is not None
        # the (class, syntax) pairs some context proposed: their instances are sent here (or
        # reported); a top-up instance of another pair waits for an association that proposes it
        own = {(pc.abstract_syntax, ts) for pc in proposal.contexts for ts in pc.transfer_syntaxes}
        own |= proposal.overflow
        index = 0
        topping_up = self.more is not None
        while True:
            if index == len(self.instances):
                if not topping_up:
                    break
                assert self.more is not None
                extra = list(await self.more())
                if not extra:
                    break
                # every instance joins the list, so that outcome indices stay the caller's; one
                # whose (class, syntax) this association did not propose is skipped below,
                # unreported (the caller gives it back to its queue), and no more are asked for
                # after these
                if any((i.sop_class_uid, i.transfer_syntax_uid) not in own for i in extra):
                    topping_up = False
                self.instances.extend(extra)
            inst = self.instances[index]
            if inst.data is not None:  # held for this send only: let the bytes go afterwards
                self.instances[index] = attrs.evolve(inst, data=None)
            index += 1
            pair = (inst.sop_class_uid, inst.transfer_syntax_uid)
            if pair not in own:
                continue  # never proposed on this association (a top-up): left unreported
            way = None
            if pair not in proposal.overflow:
                way = route(*pair, answer, self.converter.can_convert)
            if way is None:
                self.report(index - 1, _no_way(inst, proposal, answer))
                continue
            outcome = await self._store(inst, way, fragment, recv_rsp)
            self.report(index - 1, outcome)
        # A-RELEASE
        try:
            await self.t.send_all(P.RELEASE_RQ_BYTES)
        except PeerClosed:
            pass
        else:
            with trio.move_on_after(self.options.dimse_timeout):
                await self.released.wait()

    async def _store(
        self,
        inst: OutgoingInstance,
        way: Route,
        fragment: int,
        recv_rsp: trio.MemoryReceiveChannel[dimse.Command],
    ) -> Outcome:
        if way.transfer_syntax == inst.transfer_syntax_uid:
            return await self._store_as_is(inst, way.context_id, fragment, recv_rsp)
        scratch = Path(self.options.scratch_dir or Path(tempfile.gettempdir()) / "capacitor-trio-outgoing")
        with contextlib.ExitStack() as stack:
            try:
                converted = await self._convert(inst, way.transfer_syntax, scratch, stack)
            except FileNotFoundError as exc:
                return Rejected(f"spool file missing: {inst.path}: {exc.strerror or exc}")
            except OSError as exc:  # disk full, EIO…: perhaps not for ever
                return RetryLater(f"cannot convert {inst.path} for this destination: {exc.strerror or exc}")
            except ConversionFailed as exc:
                return Rejected(
                    f"the destination accepted {inst.sop_class_uid} only in {way.transfer_syntax}, "
                    f"and this instance ({inst.transfer_syntax_uid}) cannot be converted into it: {exc}",
                    unconvertible=True,
                )
            outcome = await self._store_as_is(converted, way.context_id, fragment, recv_rsp)
            if isinstance(outcome, Delivered):  # the node counts its conversions on the way out
                outcome = attrs.evolve(outcome, converted_to=converted.transfer_syntax_uid)
            return outcome
        raise AssertionError("unreachable")  # pragma: no cover

    async def _convert(
        self, inst: OutgoingInstance, target: str, scratch: Path, stack: contextlib.ExitStack
    ) -> OutgoingInstance:
        """`inst` converted into `target`, in a scratch file that `stack` removes. The
        association sends nothing meanwhile: the stall watchdog waits for the conversion."""
        src = Path(inst.path)
        if inst.data is not None:  # a small instance kept in the index: converted from a file
            src = stack.enter_context(scratch_file(scratch))
            src.write_bytes(inst.data)
        dst = stack.enter_context(scratch_file(scratch))
        self.converting = True
        try:
            done = await self.converter.convert(src, dst, target)
        finally:
            self.converting = False
            if self.t is not None:
                self.t.last_activity = trio.current_time()
        log.info(
            "converted %s from %s to %s for %s, which accepts no other syntax we can send it in",
            inst.sop_instance_uid, inst.transfer_syntax_uid, target, self.peer.ae_title,
        )
        return OutgoingInstance(dst, inst.sop_class_uid, done.sop_instance_uid, done.transfer_syntax_uid)

    async def _store_as_is(
        self,
        inst: OutgoingInstance,
        ctx: int,
        fragment: int,
        recv_rsp: trio.MemoryReceiveChannel[dimse.Command],
    ) -> Outcome:
        assert self.t is not None
        self.message_id = self.message_id % 65535 + 1
        msg_id = self.message_id
        cmd = P.encode_command_pdus(
            ctx,
            dimse.encode_c_store_rq(
                msg_id, inst.sop_class_uid, inst.sop_instance_uid, self.options.priority
            ),
            fragment,
        )
        try:
            src = _Source(inst)
        except FileNotFoundError as exc:
            return Rejected(f"spool file missing: {inst.path}: {exc.strerror or exc}")
        except OSError as exc:  # EIO, EMFILE…: perhaps not for ever
            return RetryLater(f"cannot open spool file {inst.path}: {exc.strerror or exc}")
        try:
            refused = await self._send_data_set(inst, src, ctx, fragment, cmd)
        finally:
            src.close()
        if refused is not None:
            return refused
        return await self._response(msg_id, recv_rsp)

    async def _send_data_set(
        self, inst: OutgoingInstance, src: _Source, ctx: int, fragment: int, cmd: bytes
    ) -> Outcome | None:
        """Send the command `cmd` in front of the data set's first fragment, then the rest; an
        outcome when the spool file is refused before anything is sent, else None."""
        try:
            try:
                offset, size = await src.dataset_span()
            except (HeaderError, ValueError) as exc:
                return Rejected(f"unreadable spool file {inst.path}: {exc}")
            except OSError as exc:
                return RetryLater(f"cannot read spool file {inst.path}: {exc.strerror or exc}")
            remaining = size - offset
            if remaining <= 0:
                return Rejected(f"spool file {inst.path} has no data set")
            prefix: bytes = cmd
            max_data = fragment - 6
            while remaining > 0:
                n = min(max_data, remaining)
                remaining -= n
                head = len(prefix)
                buf = bytearray(head + 12 + n)
                buf[:head] = prefix
                buf[head : head + 12] = P.p_data_header(ctx, 0x00 if remaining else 0x02, n)
                with memoryview(buf) as mv:
                    await src.read_into(mv[head + 12 :], offset)
                offset += n
                await self._timed_send(buf)
                prefix = b""
        except HeaderError as exc:
            raise _Failed(RetryLater(f"spool file changed while sending: {exc}")) from None
        except OSError as exc:
            # part of the data set is on the wire already: this association cannot go on
            raise _Failed(RetryLater(f"cannot read spool file {inst.path}: {exc.strerror or exc}")) from None
        return None

    async def _response(
        self, msg_id: int, recv_rsp: trio.MemoryReceiveChannel[dimse.Command]
    ) -> Outcome:
        """The outcome the C-STORE-RSP to `msg_id` says (`_response_watchdog` bounds the wait)."""
        self.response_since = trio.current_time()
        try:
            while True:
                rsp = await recv_rsp.receive()
                if (
                    rsp.command_field == dimse.C_STORE_RSP
                    and rsp.message_id_being_responded_to == msg_id
                ):
                    return store_status_outcome(
                        rsp.status if rsp.status is not None else 0xC000, rsp.error_comment
                    )
                log.warning(
                    "ignoring unexpected response 0x%04X to message %s from %s",
                    rsp.command_field,
                    rsp.message_id_being_responded_to,
                    self.peer.ae_title,
                )
        finally:
            self.response_since = None

    async def _reader(self, send_rsp: trio.MemorySendChannel[dimse.Command]) -> None:
        assert self.t is not None
        assembler = MessageAssembler()
        limit = read_limit(self.options.max_pdu_size)
        try:
            while True:
                pdu_type, body = await self.t.read_pdu(limit)
                if pdu_type == P.P_DATA_TF:
                    with memoryview(body) as mv:
                        for ctx, mch, data in P.iter_pdvs(mv):
                            part = assembler.feed(ctx, mch, data)
                            # a data set (none belongs to a C-STORE-RSP) is passed over
                            if isinstance(part, CommandSet):
                                await send_rsp.send(part.command)
                elif pdu_type == P.A_RELEASE_RP:
                    self.released.set()
                    return
                elif pdu_type == P.A_ABORT:
                    source, reason = P.decode_abort(body)
                    self.fail(
                        _Failed(
                            RetryLater(
                                f"association aborted by peer (source {source}, reason {reason})",
                                kind="aborted",
                            ),
                            abort=False,
                        )
                    )
                    return
                else:
                    raise P.PduError(f"unexpected PDU 0x{pdu_type:02X}")
        except PeerClosed as exc:
            self.fail(_Failed(RetryLater(f"connection lost: {exc}", kind="connection_lost"), abort=False))
        except (P.PduError, dimse.CommandDecodeError) as exc:
            self.fail(_Failed(RetryLater(f"protocol error from peer: {exc}", kind="protocol")))

    async def _response_watchdog(self) -> None:
        """Fail the association once a C-STORE-RSP is `dimse_timeout` seconds overdue, counted
        from the end of its request (exactly then: see `overdue`)."""
        timeout = self.options.dimse_timeout
        while True:
            await overdue(lambda: self.response_since, timeout)
            assert self.responses is not None
            if self.responses.statistics().tasks_waiting_receive:
                self.fail(_Failed(RetryLater(f"no C-STORE response within {timeout}s", kind="timeout")))
                return
            # the reader has just handed the response over, in this same scheduler pass:
            # `_store` takes it (as a cancel scope around its wait let such a response
            # through); look again once it has run
            await trio.lowlevel.checkpoint()

    async def _stall_watchdog(self) -> None:
        assert self.t is not None
        transport, threshold = self.t, self.options.stall_threshold
        await overdue(lambda: None if self.converting else transport.last_activity, threshold)
        self.fail(_Failed(RetryLater(f"stalled: no bytes either way for {threshold}s", kind="stalled")))

    def _sending_totals(self) -> tuple[float, int]:
        """(seconds spent in sends, bytes sent in them) since the last line-speed check."""
        assert self.t is not None
        seconds, sent = self.send_seconds, self.send_bytes
        if self.send_started is not None:
            seconds += trio.current_time() - self.send_started
            sent += self.t.bytes_sent - self.send_started_bytes
        return seconds, sent

    async def _timed_send(self, data: bytearray) -> None:
        """send_all, accounting the time spent blocked in it for the line-speed check."""
        assert self.t is not None
        self.send_started = trio.current_time()
        self.send_started_bytes = self.t.bytes_sent
        try:
            await self.t.send_all(data)
        finally:
            self.send_seconds += trio.current_time() - self.send_started
            self.send_bytes += self.t.bytes_sent - self.send_started_bytes
            self.send_started = None

    async def _line_speed_watchdog(self) -> None:
        """Abort when, over LINE_SPEED_WINDOW seconds spent sending data, the average rate is
        below half the configured minimum. Time spent waiting for responses does not count."""
        floor = self.options.minimum_line_speed_kbps * 1024 / 2
        while True:
            await trio.sleep(LINE_SPEED_WINDOW / 4)
            seconds, sent = self._sending_totals()
            if seconds < LINE_SPEED_WINDOW:
                continue
            rate = sent / seconds
            if rate < floor:
                self.fail(
                    _Failed(
                        RetryLater(
                            f"line speed {rate / 1024:.1f} KB/s below minimum "
                            f"{self.options.minimum_line_speed_kbps} KB/s",
                            kind="stalled",
                        )
                    )
                )
                return
            # start a new window
            self.send_seconds -= seconds
            self.send_bytes -= sent


def _no_way(inst: OutgoingInstance, proposal: Proposal, answer: Accepted) -> Outcome:
    """The outcome of an instance that has no accepted context it can go on: RetryLater when
    contexts it would have had did not fit in this association, else Rejected, naming what
    the destination accepted for its class."""
    pair = (inst.sop_class_uid, inst.transfer_syntax_uid)
    if pair in proposal.overflow or inst.sop_class_uid not in proposal.fallback:
        return RetryLater("too many presentation contexts in one batch")
    return Rejected(no_route_reason(*pair, answer))


def _fragment_size(peer_max: int, our_max: int) -> int:
    """The P-DATA-TF length (its variable field) to send in, within the peer's maximum and ours.
    A peer maximum of 0 means "no maximum" (PS3.8 D.1): ours then, at most DEFAULT_FRAGMENT. One
    below MIN_PEER_PDU fails the association (RetryLater, after an A-ABORT): 6 or less leaves no
    room for data at all, and cutting the data set into empty fragments never ended."""
    ours = min(MAX_FRAGMENT, our_max)
    if not peer_max:
        return min(DEFAULT_FRAGMENT, ours)
    if peer_max < MIN_PEER_PDU:
        raise _Failed(
            RetryLater(
                f"peer's maximum PDU length {peer_max} is below the {MIN_PEER_PDU} bytes "
                "we send in at the least"
            )
        )
    return min(peer_max, ours)


async def send_batch(
    peer: Peer,
    instances: Sequence[OutgoingInstance],
    options: SendOptions,
    on_outcome: Callable[[int, Outcome], None],
    *,
    more: MoreInstances | None = None,
    converter: Converter | None = None,
) -> None:
    """Send `instances` over one association; `on_outcome(index, outcome)` as each is known.
    An instance the destination accepts only in another syntax is converted by `converter`
    (default: `ThreadConverter`, a worker thread of this process).

    `more`, if given, is awaited each time every instance so far has been answered; the
    instances it returns are sent on the same association, their indices following on from the
    earlier ones. It ends the association by returning nothing. Returned instances whose
    (SOP class, transfer syntax) has no accepted context here are not sent and not reported,
    and the association is released after the others (the caller sends them on a new one).

    Never raises for network or peer errors (they become outcomes); cancellation propagates
    after an A-ABORT.
    """
    if not instances:
        return
    await _Session(peer, instances, options, on_outcome, more, converter).run()


@attrs.frozen
class LocalSender:
    """A node actor's `Sender` in this process (`deliveryProcess: false`): `send_batch`, with
    conversions on the way out done by `converter`."""

    converter: Converter

    async def send_batch(
        self,
        peer: Peer,
        instances: Sequence[OutgoingInstance],
        options: SendOptions,
        on_outcome: Callable[[int, Outcome], None],
        *,
        more: MoreInstances | None = None,
    ) -> None:
        await send_batch(peer, instances, options, on_outcome, more=more, converter=self.converter)

    async def echo(self, peer: Peer, calling_ae: str, *, timeout: float = 10) -> EchoResult:  # noqa: ASYNC109
        return await echo(peer, calling_ae, timeout=timeout)


__all__ = [
    "Delivered",
    "EchoResult",
    "LocalSender",
    "MoreInstances",
    "OutgoingInstance",
    "Peer",
    "Rejected",
    "RetryLater",
    "SendOptions",
    "echo",
    "send_batch",
]
