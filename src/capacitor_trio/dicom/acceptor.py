"""The acceptor: the router's DICOM listener (C-ECHO and C-STORE SCP) on Trio streams.

Theory of operation. `serve_acceptor` (listener.py: the accept loop and the bounds on
connections) runs `handle_association` for each connection in its own task. One association is a
loop over PDUs read by `Transport` (1 MiB receives). The rooms next door: negotiation.py (which
contexts are accepted, the refusal rule and its log line), sink.py (the configuration and what is
handed over), receive.py (one C-STORE's data set), part10.py and walk.py (the file meta, the
header walk).

- ARTIM bounds the wait for the A-ASSOCIATE-RQ and, after we release or reject, the wait for the
  peer to close; `client_timeout` bounds the wait for each later PDU (an idle association). That
  bound is kept by a watchdog task per association (`idle_watchdog`, `transport.overdue`), not by
  a cancel scope per PDU: entering and leaving a scope with a deadline costs ≈ 20 µs here, two
  per small C-STORE.
- The A-ASSOCIATE-RQ (at most `P.MAX_ASSOCIATE_RQ` bytes, else A-ABORT before its body is
  read) is checked from its fixed part first: protocol version, then the called AE (unknown ->
  A-ASSOCIATE-RJ permanent, called-AE-title-not-recognized). Its items are then counted
  against `P.MAX_CONTEXTS`, `P.MAX_TRANSFER_SYNTAXES` and `P.MAX_ASSOCIATE_ITEMS` (over ->
  A-ASSOCIATE-RJ permanent, local-limit-exceeded), and only then decoded with pynetdicom's
  codec (5-10 µs per item: in a worker thread, one at a time, beyond negotiation.py's `DECODE_ON_LOOP_ITEMS`).
  A presentation context ID that is not odd (0 included) or is proposed twice -> A-ABORT
  (invalid PDU parameter value), as is any value of the request that the A-ASSOCIATE-AC
  cannot echo; over `max_clients` -> A-ASSOCIATE-RJ (transient, local-limit-exceeded). Every
  proposed context gets a result (`negotiate_contexts`, negotiation.py).
- Work per PDU is bounded: a PDV with no data that is not a last fragment -> A-ABORT, and every
  PDV counts `PDV_COST` towards the transport's yield budget, so a PDU of tiny PDVs lets the
  other tasks run every 1024 of them.
- PDVs go through a `MessageAssembler` (assembler.py: the order of a DIMSE message, command
  sets gathered up to its cap and decoded by hand in dimse.py). A C-STORE's data set is received
  by the steps `_Association` inherits from receive.py (`_Receiver`: in memory or a temporary
  file, the header, the hand-over to the sink, then the response: 0x0000, 0xA700
  (OutOfResources), 0xC0xx (CannotProcess, unparseable dataset, header out of bounds,
  command/dataset UID mismatch)). A C-STORE is stored whatever presentation context it came on
  (Orthanc and pynetdicom's listener do not compare its SOP class with the context's abstract
  syntax, and some modalities rely on that), unless its class is one negotiation refuses (the
  same rule, `refusal`; Verification too, which is not stored): that one is drained, nothing
  written, and answered 0x0122.
- Whatever ends the association — A-ABORT, a protocol error (we answer A-ABORT), the peer
  vanishing, a timeout, cancellation (we send A-ABORT, shielded and bounded, unless our last
  PDU had gone out) — the temp file of an unfinished instance is removed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import trio

from capacitor_trio.logs import CALLING_AE

from . import dimse
from . import pdu as P
from . import status as S
from .assembler import DataFragment, MessageAssembler
from .negotiation import (
    decode_associate_rq,
    log_refused,
    negotiate_contexts,
)
from .receive import _Abort, _Incoming, _Receiver

# what the acceptor hands over, importable from here as from sink.py
from .sink import AcceptorConfig, InstanceSink
from .sink import CannotProcess as CannotProcess
from .sink import OutOfResources as OutOfResources
from .sink import ReceivedInstance as ReceivedInstance
from .transport import BufferBudget, OverBudget, PeerClosed, Transport, overdue, read_limit

log = logging.getLogger("capacitor_trio.dicom")

#: what acting on one PDV counts towards the transport's yield budget (`Transport.spend`):
#: a task yields at least once per 1024 PDVs, however small they are
PDV_COST = 4096


class _Association(_Receiver):
    def __init__(
        self,
        transport: Transport,
        config: AcceptorConfig,
        sink: InstanceSink,
        on_over: Callable[[], None] | None = None,
        admit: Callable[[], bool] = lambda: True,
    ) -> None:
        self.t = transport
        self.config = config
        self.sink = sink
        #: asked once the request is acceptable: may it take an association slot (False: all
        #: `max_clients` are taken, the request is refused as transient)
        self._admit = admit
        #: called as our last PDU (A-RELEASE-RP, A-ASSOCIATE-RJ) goes out: what is left is the
        #: wait for the peer to close, which must not hold a `max_clients` slot
        self._on_over = on_over
        #: our last PDU (A-RELEASE-RP, A-ASSOCIATE-RJ) has gone out: nothing is left to abort
        self._over = False
        self.calling_ae = ""
        self.called_ae = ""
        self.contexts: dict[int, P.ContextResult] = {}
        self.max_pdu_peer = 0
        self.incoming: _Incoming | None = None
        #: the DIMSE message being read: command sets gathered, data fragments in order
        self.assembler = MessageAssembler()
        #: when the PDU being waited for was first waited for (None: not waiting for one), and
        #: the scope of the PDU loop, which `idle_watchdog` cancels after `client_timeout` of it
        self._reading_since: float | None = None
        self._idle_scope: trio.CancelScope | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._discard_incoming()

    async def _send_abort(self, reason: int, source: int = P.ABORT_SOURCE_PROVIDER) -> None:
        with trio.move_on_after(min(self.config.artim_timeout, 5.0)) as cs:
            cs.shield = True
            with contextlib.suppress(PeerClosed):
                await self.t.send_all(P.abort_bytes(source, reason))

    async def _last_pdu(self, data: bytes) -> None:
        """Send our last PDU, then wait (ARTIM) for the peer to close the transport. The slot is
        given back first, so a peer that connects again as soon as it reads the PDU finds it."""
        self._over = True
        if self._on_over is not None:
            self._on_over()
        await self.t.send_all(data)
        with trio.move_on_after(self.config.artim_timeout):
            await self.t.wait_closed()

    async def _run(self) -> None:
        try:
            with trio.move_on_after(self.config.artim_timeout) as cs:
                pdu_type, body = await self.t.read_pdu(P.MAX_ASSOCIATE_RQ)
            if cs.cancelled_caught:
                log.info("DICOM association: no A-ASSOCIATE-RQ within ARTIM, closing")
                return
            if pdu_type != P.A_ASSOCIATE_RQ:
                raise _Abort(f"PDU type 0x{pdu_type:02X} before association")
            if not await self._negotiate(body):
                return
            await self._serve()
        except PeerClosed:
            if self.incoming is not None:
                log.warning(
                    "DICOM association from %s closed by peer mid-dataset; partial file removed",
                    self.calling_ae or "?",
                )
        except OverBudget as exc:  # logged by the budget, once per burst
            log.debug("DICOM association from %s: aborting: %s", self.calling_ae or "?", exc)
            await self._send_abort(exc.abort_reason)
        except P.PduError as exc:
            log.warning(
                "DICOM association from %s: protocol error: %s", self.calling_ae or "?", exc
            )
            await self._send_abort(exc.abort_reason)
        except _Abort as exc:
            log.warning("DICOM association from %s: aborting: %s", self.calling_ae or "?", exc)
            await self._send_abort(exc.reason)
        except trio.Cancelled:
            # router shutdown: an A-ABORT tells the peer at once that what it has not seen
            # answered must be sent again (a bare close looks like a network fault)
            if not self._over:
                await self._send_abort(P.ABORT_REASON_NOT_SPECIFIED, P.ABORT_SOURCE_USER)
            raise

    async def _reject(self, result: int, source: int, reason: int) -> None:
        await self._last_pdu(P.encode_associate_rj(result, source, reason))

    async def _negotiate(self, body: bytes | bytearray) -> bool:
        """Answer the A-ASSOCIATE-RQ `body`; True when accepted. What the fixed part of the
        request says (protocol version, called AE) is checked before its items are decoded,
        and the items are counted against the caps (`P.associate_rq_items`) before they are:
        a request the router would refuse costs no more than reading it."""
        items = await self._check_fixed_part(body)
        if items is None:
            return False
        rq = await decode_associate_rq(body, items)
        self.calling_ae, self.called_ae = rq.calling_ae, rq.called_ae
        P.check_context_ids(rq.contexts)
        if not await self._check_request(rq):
            return False
        await self._accept(rq)
        return True

    async def _check_fixed_part(self, body: bytes | bytearray) -> int | None:
        """The request's item count, or None once it has been rejected for its protocol
        version, its called AE or its number of items."""
        if len(body) < 68:
            raise P.PduError("A-ASSOCIATE-RQ too short")
        self.calling_ae, self.called_ae = P.associate_rq_titles(body)
        CALLING_AE.set(self.calling_ae.strip())  # suppressLogAeTitles mutes this task's lines
        if not (body[1] & 0x01):
            log.warning("A-ASSOCIATE-RJ to %s: protocol version not supported", self.calling_ae)
            await self._reject(P.RJ_PERMANENT, P.RJ_SOURCE_ACSE, 2)
            return None
        if not self.sink.accepts_called_ae(self.called_ae):
            near = self.sink.called_ae_hint(self.called_ae)
            log.warning(
                "A-ASSOCIATE-RJ: called AE %r not recognized (calling AE %r)%s",
                self.called_ae,
                self.calling_ae,
                f"; AE titles are case-sensitive: did you mean {near}?" if near else "",
            )
            await self._reject(
                P.RJ_PERMANENT, P.RJ_SOURCE_USER, P.RJ_REASON_CALLED_AE_NOT_RECOGNIZED
            )
            return None
        items, excess = P.associate_rq_items(body)
        if excess is not None:
            log.warning("A-ASSOCIATE-RJ to %s: the request has %s", self.calling_ae, excess)
            await self._reject(
                P.RJ_PERMANENT, P.RJ_SOURCE_PRESENTATION, P.RJ_REASON_LOCAL_LIMIT_EXCEEDED
            )
            return None
        return items

    async def _check_request(self, rq: P.AssociateRequest) -> bool:
        """True when the decoded request may be accepted; else it has been rejected (an
        application context we do not speak, or every `max_clients` slot taken)."""
        if rq.application_context != P.APPLICATION_CONTEXT:
            log.warning(
                "A-ASSOCIATE-RJ to %s: application context %r not supported",
                rq.calling_ae,
                rq.application_context,
            )
            await self._reject(
                P.RJ_PERMANENT, P.RJ_SOURCE_USER, P.RJ_REASON_APP_CONTEXT_NOT_SUPPORTED
            )
            return False
        if not self._admit():
            log.warning(
                "A-ASSOCIATE-RJ to %s: too many clients (max %d)",
                rq.calling_ae,
                self.config.max_clients,
            )
            await self._reject(
                P.RJ_TRANSIENT, P.RJ_SOURCE_PRESENTATION, P.RJ_REASON_LOCAL_LIMIT_EXCEEDED
            )
            return False
        return True

    async def _accept(self, rq: P.AssociateRequest) -> None:
        """Answer every proposed context, log the refused ones, send the A-ASSOCIATE-AC."""
        results, refused = negotiate_contexts(rq.contexts, self.config.reject_abstract_syntaxes)
        log_refused(rq.calling_ae, rq.called_ae, len(results), refused)
        self.contexts = {r.context_id: r for r in results if r.result == P.PC_ACCEPTANCE}
        self.max_pdu_peer = rq.max_pdu
        await self.t.send_all(P.encode_associate_ac(rq, results, self.config.max_pdu_size))
        if self.config.on_accepted is not None:
            self.config.on_accepted(rq.calling_ae, rq.called_ae)
        log.debug(
            "DICOM association %s -> %s accepted (%d of %d contexts)",
            rq.calling_ae,
            rq.called_ae,
            len(self.contexts),
            len(results),
        )

    async def idle_watchdog(self) -> None:
        """Cancel the PDU loop once a PDU has been waited for `client_timeout` seconds (exactly
        then: see `overdue`)."""
        fired: float | None = None  # the wait already cancelled (its PDU may come just in time)

        def waiting() -> float | None:
            return None if self._reading_since == fired else self._reading_since

        while True:
            fired = await overdue(waiting, self.config.client_timeout)
            assert self._idle_scope is not None
            self._idle_scope.cancel()

    async def _serve(self) -> None:
        while True:
            with trio.CancelScope() as self._idle_scope:
                late = await self._serve_pdus()
            if self._idle_scope.cancelled_caught:
                log.warning(
                    "DICOM association from %s idle for %ss, aborting",
                    self.calling_ae,
                    self.config.client_timeout,
                )
                await self._send_abort(P.ABORT_REASON_NOT_SPECIFIED)
                return
            if late is None or await self._handle_pdu(*late):
                return

    async def _serve_pdus(self) -> tuple[int, bytes | bytearray] | None:
        """The PDU loop, in `_idle_scope`. Returns None when the association ended, or a PDU whose
        read completed although the watchdog had cancelled the scope meanwhile (it arrived as
        the timeout fell due): `_serve` handles that one outside the cancelled scope, as a
        cancel scope per read let such a PDU through, and starts the loop again."""
        limit = read_limit(self.config.max_pdu_size)
        assert self._idle_scope is not None
        while True:
            # only this wait is bounded by client_timeout (idle_watchdog cancels it)
            self._reading_since = trio.current_time()
            try:
                pdu_type, body = await self.t.read_pdu(limit)
            finally:
                self._reading_since = None
            if self._idle_scope.cancel_called:
                return pdu_type, body
            if await self._handle_pdu(pdu_type, body):
                return None

    async def _handle_pdu(self, pdu_type: int, body: bytes | bytearray) -> bool:
        """Act on one PDU of an established association; True when the association is over."""
        if pdu_type == P.P_DATA_TF:
            await self._p_data(body)
            return False
        if pdu_type == P.A_RELEASE_RQ:
            if self.incoming is not None or not self.assembler.idle:
                raise _Abort("A-RELEASE-RQ in the middle of a message")
            await self._last_pdu(P.RELEASE_RP_BYTES)
            return True
        if pdu_type == P.A_ABORT:
            source, reason = P.decode_abort(body)
            log.info(
                "DICOM association from %s aborted by peer (source %d, reason %d)",
                self.calling_ae,
                source,
                reason,
            )
            return True
        raise _Abort(f"unexpected PDU type 0x{pdu_type:02X} during association")

    # ------------------------------------------------------------------ P-DATA

    async def _p_data(self, body: bytes | bytearray) -> None:
        with memoryview(body) as mv:
            for ctx, mch, data in P.iter_pdvs(mv):
                await self.t.spend(PDV_COST)
                if ctx not in self.contexts:
                    raise _Abort(
                        f"PDV on presentation context {ctx} not accepted",
                        P.ABORT_REASON_INVALID_PARAMETER,
                    )
                part = self.assembler.feed(ctx, mch, data)
                if isinstance(part, DataFragment):
                    await self._data_fragment(part)
                elif part is not None:
                    await self._command(part.context_id, part.command)

    async def _command(self, ctx: int, cmd: dimse.Command) -> None:
        if cmd.command_field == dimse.C_ECHO_RQ and cmd.message_id is not None:
            rsp = dimse.encode_c_echo_rsp(
                cmd.message_id,
                S.SUCCESS,
                cmd.affected_sop_class_uid or dimse.VERIFICATION_SOP_CLASS,
            )
            await self.t.send_all(P.encode_command_pdus(ctx, rsp, self.max_pdu_peer))
            return
        if (
            cmd.command_field == dimse.C_STORE_RQ
            and cmd.message_id is not None
            and cmd.has_data_set
            and cmd.affected_sop_class_uid
            and cmd.affected_sop_instance_uid
        ):
            self._start_store(cmd, ctx)
            return
        raise _Abort(
            f"unsupported command 0x{cmd.command_field:04X}", P.ABORT_REASON_UNRECOGNIZED_PARAMETER
        )

async def handle_association(
    stream: trio.abc.Stream,
    config: AcceptorConfig,
    sink: InstanceSink,
    *,
    busy: bool = False,
    on_over: Callable[[], None] | None = None,
    admit: Callable[[], bool] | None = None,
    budget: BufferBudget | None = None,
) -> None:
    """Serve one association on `stream` until it ends; never raises for peer misbehaviour.
    `admit` is asked once the request is acceptable whether it may take an association slot
    (`busy`: never); `on_over` is called as our last PDU goes out (release, reject), before the
    wait for the peer to close; `budget`: the listener's, for the buffers of PDUs not whole yet."""
    transport = Transport(stream, budget=budget)
    if admit is None:
        admit = (lambda: False) if busy else (lambda: True)
    association = _Association(transport, config, sink, on_over, admit)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(association.idle_watchdog)
            await association.run()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # the watchdog raises nothing: an error of the association comes out as itself, as it
        # did before the watchdog (callers catch the plain type)
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        await transport.aclose()
