"""The acceptor: the router's DICOM listener (C-ECHO and C-STORE SCP) on Trio streams.

Theory of operation. `serve_acceptor` binds, then runs `handle_association` for each connection
in its own task. One association is a loop over PDUs read by `Transport` (1 MiB receives):

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
  codec (5-10 µs per item: in a worker thread, one at a time, beyond `DECODE_ON_LOOP_ITEMS`).
  A presentation context ID that is not odd (0 included) or is proposed twice -> A-ABORT
  (invalid PDU parameter value), as is any value of the request that the A-ASSOCIATE-AC
  cannot echo; over `max_clients` -> A-ASSOCIATE-RJ (transient, local-limit-exceeded). Every
  proposed context gets a result: Verification and every SOP class that may be stored are
  accepted (`_refusal`: any class, private and unknown ones included, unless in
  `reject_abstract_syntaxes`, a non-storage service pynetdicom knows, or no SOP class at all)
  with the first proposed transfer syntax we know, compressed ones included — we store the
  bytes as received. The refused contexts and why are logged, one line per association.
- `max_clients` counts associations only (`_Connections`): from acceptance until our last PDU
  (A-RELEASE-RP, A-ASSOCIATE-RJ). At most `max_unassociated` connections read their
  A-ASSOCIATE-RQ at once; the others wait their turn unread, and a reader that has not had
  its request answered `STALE_AFTER` after it started gives its place to the first of them.
- Work per PDU is bounded: a PDV with no data that is not a last fragment -> A-ABORT, and every
  PDV counts `PDV_COST` towards the transport's yield budget, so a PDU of tiny PDVs lets the
  other tasks run every 1024 of them.
- PDVs go through a `MessageAssembler` (assembler.py: the order of a DIMSE message, command
  sets gathered up to its cap and decoded by hand in dimse.py). For a C-STORE the sink's
  admission check runs first (OutOfResources -> the dataset is drained and 0xA700 answered,
  nothing written). Otherwise the
  Part 10 preamble and file meta are built and every data PDV is appended as it arrives: in
  memory while the instance is at most `memory_max_bytes` (32 KiB; handed over as
  `ReceivedInstance.data`), else in a temporary file from `sink.new_temp_path()` (large writes
  in a worker thread, so other associations keep moving).
  The header is read from the first 64 KiB on the loop (a small element walker); what that does
  not settle, the whole data set walked forward in a worker thread within `header_limits`
  (bytes read or inflated, elements passed, nesting), so a deflate bomb or millions of items
  cost bounded memory and time; a header not reached within them is answered 0xC212. Then
  `sink.instance_received` is awaited and only then the response is sent: 0x0000, 0xA700
  (OutOfResources), 0xC0xx (CannotProcess, unparseable dataset, header out of bounds,
  command/dataset UID mismatch). A C-STORE is stored whatever presentation context it came on
  (Orthanc and pynetdicom's listener do not compare its SOP class with the context's abstract
  syntax, and some modalities rely on that), unless its class is one negotiation refuses (the
  same rule, `_refusal`; Verification too, which is not stored): that one is drained, nothing
  written, and answered 0x0122.
- Whatever ends the association — A-ABORT, a protocol error (we answer A-ABORT), the peer
  vanishing, a timeout, cancellation (we send A-ABORT, shielded and bounded, unless our last
  PDU had gone out) — the temp file of an unfinished instance is removed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio
from pydicom.uid import UID
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from capacitor_trio.domain.instance import InstanceHeader
from capacitor_trio.serving import serve_listeners

from . import dimse
from . import pdu as P
from . import status as S
from .assembler import DataFragment, MessageAssembler
from .part10 import (
    DEFLATED_EXPLICIT_VR_LE,
    HeaderError,
    HeaderLimitExceeded,
    HeaderLimits,
    file_meta_bytes,
    parse_header_fast,
    read_header,
)
from .transport import PeerClosed, Transport, overdue, read_limit

log = logging.getLogger("capacitor_trio.dicom")

HEAD_BYTES = 64 * 1024
THREAD_WRITE_THRESHOLD = 256 * 1024
#: an A-ASSOCIATE-RQ of up to this many items and sub-items (≈ 5 ms of pynetdicom's decoder;
#: a request of a few dozen contexts) is decoded on the event loop, a larger one in a worker
#: thread
DECODE_ON_LOOP_ITEMS = 512
#: what acting on one PDV counts towards the transport's yield budget (`Transport.spend`):
#: a task yields at least once per 1024 PDVs, however small they are
PDV_COST = 4096


@attrs.frozen
class AcceptorConfig:
    ae_title: str = "CAPACITOR"
    host: str = "0.0.0.0"
    port: int = 1040
    max_pdu_size: int = 1_048_576
    max_clients: int = 0  # 0 = unlimited; counts associations, not connections
    #: connections reading their A-ASSOCIATE-RQ at once (more wait their turn, unread), and
    #: connections waiting for the peer to close after our last PDU (see `_Connections`)
    max_unassociated: int = 64
    client_timeout: float = 600.0  # idle association
    artim_timeout: float = 30.0
    reject_abstract_syntaxes: frozenset[str] = frozenset()
    #: an instance up to this size (Part 10 bytes) is received in memory and handed over as
    #: bytes (no temporary file: the store keeps such instances in its index; the router sets
    #: it to the store's `inline_max_bytes`); a larger one is streamed to a temporary file from
    #: the sink's `new_temp_path()` once it outgrows this
    memory_max_bytes: int = 32 * 1024
    #: how far a data set is walked for its header when its first 64 KiB do not settle it
    header_limits: HeaderLimits = attrs.field(factory=HeaderLimits)


@attrs.frozen
class ReceivedInstance:
    calling_ae: str
    called_ae: str
    #: the complete Part 10 file, temporary (the sink moves it); None when `data` holds it
    path: Path | None
    header: InstanceHeader
    size_bytes: int
    #: the complete Part 10 bytes of an instance received in memory
    data: bytes | None = attrs.field(default=None, repr=False)
    #: what the sink's `start_sync(path, size)` returned for the file (its flush, under way)
    sync: Any = attrs.field(default=None, repr=False, eq=False)

    def save_as(self, dest: Path) -> None:
        """Put the instance at `dest` (rename the temporary file, or write the bytes). Blocking."""
        if self.data is not None:
            with open(dest, "wb") as f:
                f.write(self.data)
        else:
            assert self.path is not None
            os.rename(self.path, dest)


class OutOfResources(Exception):
    """Raised by the sink: answered with C-STORE status 0xA700."""


class CannotProcess(Exception):
    """Raised by the sink: answered with a 0xC000-class failure status."""


class InstanceSink(Protocol):
    def accepts_called_ae(self, called_ae: str) -> bool: ...

    def called_ae_hint(self, called_ae: str) -> str | None:
        """For a refused called AE: the title it resembles, for the reject's log line."""
        ...

    def new_temp_path(self) -> Path: ...

    def check_admission(self) -> None: ...

    def start_sync(self, path: Path, size: int) -> Any:
        """The temporary file at `path` is complete (`size` bytes): start making it durable, if
        the sink will; what this returns goes back in `ReceivedInstance.sync`. Called as soon as
        the last fragment is written, so that the flush overlaps the header's parsing and the
        hand-over to the sink."""
        ...

    async def instance_received(self, rx: ReceivedInstance) -> None: ...


class _Abort(Exception):
    """End the association with an A-ABORT (reason as given)."""

    def __init__(self, message: str, reason: int = P.ABORT_REASON_UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


#: why a presentation context or a C-STORE is refused (the log line names it)
REFUSED_BY_CONFIG = "rejectAbstractSyntaxes"
NOT_PROVIDED = "non-storage service not provided"
NO_TRANSFER_SYNTAX = "no supported transfer syntax"


@functools.lru_cache(maxsize=4096)
def _not_storage(sop_class: str) -> str | None:
    """Why `sop_class` is not one a router stores, whatever the configuration; None when it is.
    A router stores what it is sent: any SOP class is taken for a storage class (private and
    vendor ones included: Siemens CSA Non-Image, Philips private classes…) unless it is not a
    valid UID, is a service pynetdicom lists that is not storage (Query/Retrieve, worklist,
    storage commitment, print, Verification…), or is a DICOM UID that names no SOP class (a
    transfer syntax, a well-known instance…)."""
    if not _valid_uid(sop_class):
        return "not a valid UID"
    try:
        service = uid_to_service_class(sop_class)
    except Exception:  # pragma: no cover - pynetdicom's lookup is a dict walk
        service = ServiceClass
    if service is not ServiceClass and not issubclass(service, StorageServiceClass):
        return NOT_PROVIDED
    kind = UID(sop_class).type  # "" for a UID pydicom does not know (a private one)
    if kind and kind != "SOP Class":
        return f"not a SOP class ({kind})"
    return None


def _refusal(sop_class: str, rejected: frozenset[str]) -> str | None:
    """Why a C-STORE of `sop_class` is not stored here; None when it is. The one rule of both
    negotiation (a context for the class is accepted when this is None) and the C-STORE check
    (an instance of the class is stored whatever context it came on when this is None)."""
    if sop_class in rejected:
        return REFUSED_BY_CONFIG
    return _not_storage(sop_class)


@functools.lru_cache(maxsize=1024)
def _is_known_transfer_syntax(uid: str) -> bool:
    try:
        return UID(uid).is_transfer_syntax
    except Exception:
        return False


@attrs.frozen
class Refused:
    """A presentation context negotiation refused, and why."""

    context: P.ProposedContext
    reason: str


def negotiate_contexts(
    contexts: tuple[P.ProposedContext, ...], rejected: frozenset[str]
) -> tuple[list[P.ContextResult], list[Refused]]:
    """A result for every proposed context, and the refused ones with their reasons.
    Verification and every class `_refusal` lets through are accepted, with the first proposed
    transfer syntax we know (compressed ones included: we store the bytes as received)."""
    results: list[P.ContextResult] = []
    refused: list[Refused] = []
    for pc in contexts:
        syntax = pc.abstract_syntax
        if syntax == dimse.VERIFICATION_SOP_CLASS and syntax not in rejected:
            why = None
        else:
            why = _refusal(syntax, rejected)
        ts = next((t for t in pc.transfer_syntaxes if _is_known_transfer_syntax(t)), None)
        if why is None and ts is not None:
            results.append(P.ContextResult(pc.context_id, P.PC_ACCEPTANCE, ts, syntax))
            continue
        result = P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED
        if why is None:
            why, result = NO_TRANSFER_SYNTAX, P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED
        results.append(P.ContextResult(pc.context_id, result, "", syntax))
        refused.append(Refused(pc, why))
    return results, refused


#: refused contexts named in one log line at the most
_REFUSED_LOGGED = 16


def _log_refused(calling_ae: str, called_ae: str, total: int, refused: list[Refused]) -> None:
    """One line per association naming the refused contexts and why: a warning when one could
    have carried instances (refused by configuration, no transfer syntax, not a valid UID),
    info when each is a service we do not provide (a modality proposing Query/Retrieve…)."""
    if not refused:
        return
    routine = all(r.reason == NOT_PROVIDED or r.reason.startswith("not a SOP") for r in refused)
    shown = "; ".join(_describe(r) for r in refused[:_REFUSED_LOGGED])
    if len(refused) > _REFUSED_LOGGED:
        shown += f"; and {len(refused) - _REFUSED_LOGGED} more"
    log.log(
        logging.INFO if routine else logging.WARNING,
        "DICOM association %s -> %s: %d of %d presentation contexts refused: %s",
        calling_ae,
        called_ae,
        len(refused),
        total,
        shown,
    )


def _describe(r: Refused) -> str:
    uid = r.context.abstract_syntax
    if not _valid_uid(uid):
        return f"{r.context.context_id} {uid[:80]!a} ({r.reason})"
    name = UID(uid).name
    named = f"{uid} {name}" if name != uid else uid
    if r.reason == NO_TRANSFER_SYNTAX:
        proposed = ", ".join(ascii(t[:80]) for t in r.context.transfer_syntaxes[:4])
        return f"{r.context.context_id} {named} ({r.reason}: {proposed})"
    return f"{r.context.context_id} {named} ({r.reason})"


_DECODE_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(
    "capacitor_trio_associate_rq_decoder"
)


async def _decode_associate_rq(body: bytes | bytearray, items: int) -> P.AssociateRequest:
    """Decode an A-ASSOCIATE-RQ body of `items` items, within the caps. Up to
    `DECODE_ON_LOOP_ITEMS` on the event loop (a few ms at most); a larger one (up to 8,960
    items, tens of ms) in a worker thread, one at a time whatever the number of connections:
    many such requests at once queue for the thread instead of taking turns on the loop."""
    raw = P.PDU_HEADER.pack(P.A_ASSOCIATE_RQ, 0, len(body)) + bytes(body)
    if items <= DECODE_ON_LOOP_ITEMS:
        return P.decode_associate_rq(raw)
    try:
        limiter = _DECODE_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(1)
        _DECODE_LIMITER.set(limiter)
    return await trio.to_thread.run_sync(P.decode_associate_rq, raw, limiter=limiter)


def _unlink(path: Path | None) -> None:
    if path is None:
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        log.exception("could not remove %s", path)


class _Incoming:
    """One C-STORE being received."""

    def __init__(self, command: dimse.Command, context_id: int, transfer_syntax: str) -> None:
        self.command = command
        self.context_id = context_id
        self.transfer_syntax = transfer_syntax
        self.fd: int | None = None
        self.path: Path | None = None
        #: the Part 10 bytes so far, while the instance is small enough to stay in memory
        self.mem: bytearray | None = None
        self.refusal: tuple[int, str] | None = None
        self.head = bytearray()
        self.size = 0
        self.meta_len = 0
        #: the sink's `start_sync` of the complete file
        self.sync: Any = None


class _Association:
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
        if len(body) < 68:
            raise P.PduError("A-ASSOCIATE-RQ too short")
        self.calling_ae, self.called_ae = P.associate_rq_titles(body)
        if not (body[1] & 0x01):
            log.warning("A-ASSOCIATE-RJ to %s: protocol version not supported", self.calling_ae)
            await self._reject(P.RJ_PERMANENT, P.RJ_SOURCE_ACSE, 2)
            return False
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
            return False
        items, excess = P.associate_rq_items(body)
        if excess is not None:
            log.warning("A-ASSOCIATE-RJ to %s: the request has %s", self.calling_ae, excess)
            await self._reject(
                P.RJ_PERMANENT, P.RJ_SOURCE_PRESENTATION, P.RJ_REASON_LOCAL_LIMIT_EXCEEDED
            )
            return False
        rq = await _decode_associate_rq(body, items)
        self.calling_ae, self.called_ae = rq.calling_ae, rq.called_ae
        P.check_context_ids(rq.contexts)
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
        results, refused = negotiate_contexts(rq.contexts, self.config.reject_abstract_syntaxes)
        _log_refused(rq.calling_ae, rq.called_ae, len(results), refused)
        self.contexts = {r.context_id: r for r in results if r.result == P.PC_ACCEPTANCE}
        self.max_pdu_peer = rq.max_pdu
        await self.t.send_all(P.encode_associate_ac(rq, results, self.config.max_pdu_size))
        log.debug(
            "DICOM association %s -> %s accepted (%d of %d contexts)",
            rq.calling_ae,
            rq.called_ae,
            len(self.contexts),
            len(results),
        )
        return True

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

    def _start_store(self, cmd: dimse.Command, ctx: int) -> None:
        inc = _Incoming(cmd, ctx, self.contexts[ctx].transfer_syntax)
        self.incoming = inc
        if not (
            _valid_uid(cmd.affected_sop_class_uid) and _valid_uid(cmd.affected_sop_instance_uid)
        ):
            inc.refusal = (S.STATUS_UNPARSEABLE, "invalid SOP UID in the command")
            log.warning("C-STORE from %s refused: invalid SOP UID in the command", self.calling_ae)
            return
        sop_class = cmd.affected_sop_class_uid or ""  # valid: checked above
        refusal = _refusal(sop_class, self.config.reject_abstract_syntaxes)
        if refusal is not None:
            # negotiation's rule, whatever context it came on: a class negotiation would have
            # refused, sent on a context accepted for another (Orthanc and pynetdicom do not
            # compare the two at all, and some modalities rely on that), is not stored
            inc.refusal = (
                S.SOP_CLASS_NOT_SUPPORTED,
                f"SOP class is not accepted here (sent on presentation context {ctx})",
            )
            log.warning(
                "C-STORE from %s refused: SOP class %s (%s) sent on presentation context %d (%s)",
                self.calling_ae,
                sop_class,
                refusal,
                ctx,
                self.contexts[ctx].abstract_syntax,
            )
            return
        try:
            self.sink.check_admission()
        except OutOfResources as exc:
            inc.refusal = (S.OUT_OF_RESOURCES, str(exc) or "out of resources")
            log.warning("C-STORE from %s refused: out of resources: %s", self.calling_ae, exc)
            return
        meta = file_meta_bytes(
            cmd.affected_sop_class_uid or "",
            cmd.affected_sop_instance_uid or "",
            inc.transfer_syntax,
            self.calling_ae,
        )
        inc.size = inc.meta_len = len(meta)
        if len(meta) <= self.config.memory_max_bytes:
            inc.mem = bytearray(meta)
        else:
            self._spill(inc, meta)

    def _spill(self, inc: _Incoming, data: bytes | bytearray | memoryview) -> None:
        """Continue the instance in a temporary file, starting with `data` (what was received so
        far); on a write error the instance is refused at its end."""
        inc.mem = None
        inc.path = self.sink.new_temp_path()
        try:
            # no O_TRUNC: the path is new, an empty file made ahead or a reused one (truncating
            # an existing file makes ext4 write it out at close, on the loop: auto_da_alloc);
            # the end of the data set cuts what a reused file held beyond it
            # the owner's only (patient data), and never through a symbolic link
            inc.fd = os.open(inc.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            _write_fd(inc.fd, data)
        except OSError as exc:
            self._write_failed(inc, exc)

    def _write_failed(self, inc: _Incoming, exc: OSError) -> None:
        """The temporary file cannot be written (ENOSPC, EIO…): drop it, keep reading the data
        set, and answer 0xA700 (Out of Resources) at its end."""
        log.warning("C-STORE from %s refused: cannot write %s: %s", self.calling_ae, inc.path, exc)
        if inc.fd is not None:
            with contextlib.suppress(OSError):
                os.close(inc.fd)
            inc.fd = None
        _unlink(inc.path)
        inc.path = None
        inc.refusal = (S.OUT_OF_RESOURCES, f"cannot store the data set: {exc.strerror or exc}")

    async def _data_fragment(self, fragment: DataFragment) -> None:
        inc = self.incoming
        if inc is None:  # the data set of a command that has none here (a C-ECHO's)
            raise _Abort("data fragment without a C-STORE")
        data = fragment.data
        if len(inc.head) < HEAD_BYTES:
            inc.head += data[: HEAD_BYTES - len(inc.head)]
        if inc.mem is not None:
            if len(inc.mem) + len(data) <= self.config.memory_max_bytes:
                inc.mem += data
                inc.size += len(data)
            else:  # outgrew memory: what it holds (a small write) to a temporary file
                self._spill(inc, inc.mem)
        if inc.fd is not None:
            try:
                if len(data) >= THREAD_WRITE_THRESHOLD:
                    await trio.to_thread.run_sync(_write_fd, inc.fd, data)
                else:
                    _write_fd(inc.fd, data)
            except OSError as exc:
                self._write_failed(inc, exc)
            else:
                inc.size += len(data)
        if fragment.last:
            await self._finish_store()

    async def _finish_store(self) -> None:
        inc = self.incoming
        assert inc is not None
        cmd = inc.command
        status, comment = S.SUCCESS, ""
        if inc.fd is not None:
            try:  # a reused file (spares.py) may hold more than was written to it
                os.ftruncate(inc.fd, inc.size)
            except OSError as exc:
                self._write_failed(inc, exc)
            else:
                assert inc.path is not None
                inc.sync = self.sink.start_sync(inc.path, inc.size)
        if inc.refusal is not None:
            status, comment = inc.refusal
            self._discard_incoming()
        else:
            if inc.fd is not None:
                os.close(inc.fd)
                inc.fd = None
            status, comment = await self._deliver(inc)
            if status != S.SUCCESS:
                _unlink(inc.path)
            inc.path = None
            inc.mem = None
            self.incoming = None
        rsp = dimse.encode_c_store_rsp(
            cmd.message_id or 0,
            cmd.affected_sop_class_uid or "",
            cmd.affected_sop_instance_uid or "",
            status,
            comment or None,
        )
        await self.t.send_all(P.encode_command_pdus(inc.context_id, rsp, self.max_pdu_peer))

    async def _deliver(self, inc: _Incoming) -> tuple[int, str]:
        cmd = inc.command
        assert inc.path is not None or inc.mem is not None
        complete = inc.size - inc.meta_len <= len(inc.head)
        try:
            header = parse_header_fast(bytes(inc.head), inc.transfer_syntax, complete=complete)
            if header is None:  # the whole data set, walked within the limits off the loop
                source = inc.path if inc.mem is None else bytes(inc.mem[inc.meta_len :])
                assert source is not None
                header = await _read_header(
                    source, inc.size - inc.meta_len, inc.transfer_syntax, self.config.header_limits
                )
        except HeaderLimitExceeded as exc:
            log.warning("C-STORE from %s refused (0xC212): %s", self.calling_ae, exc)
            return S.STATUS_HEADER_OUT_OF_BOUNDS, "header not found within bounds"
        except HeaderError as exc:
            log.warning("C-STORE from %s: unparseable data set: %s", self.calling_ae, exc)
            return S.STATUS_UNPARSEABLE, "unparseable data set"
        if (
            header.sop_instance_uid != cmd.affected_sop_instance_uid
            or header.sop_class_uid != cmd.affected_sop_class_uid
        ):
            log.warning(
                "C-STORE from %s: command UIDs (%s, %s) do not match the data set (%s, %s)",
                self.calling_ae,
                cmd.affected_sop_class_uid,
                cmd.affected_sop_instance_uid,
                header.sop_class_uid,
                header.sop_instance_uid,
            )
            return S.STATUS_UID_MISMATCH, "SOP UIDs of command and data set differ"
        rx = ReceivedInstance(
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            path=inc.path,
            header=header,
            size_bytes=inc.size,
            data=bytes(inc.mem) if inc.mem is not None else None,
            sync=inc.sync,
        )
        try:
            await self.sink.instance_received(rx)
        except OutOfResources as exc:
            log.warning("C-STORE from %s: out of resources: %s", self.calling_ae, exc)
            return S.OUT_OF_RESOURCES, str(exc) or "out of resources"
        except CannotProcess as exc:
            log.warning("C-STORE from %s: cannot process: %s", self.calling_ae, exc)
            return S.STATUS_CANNOT_PROCESS, str(exc) or "cannot process"
        except BaseException:
            _unlink(inc.path)
            inc.path = None
            raise
        return S.SUCCESS, ""

    def _discard_incoming(self) -> None:
        inc = self.incoming
        self.incoming = None
        if inc is None:
            return
        if inc.fd is not None:
            with contextlib.suppress(OSError):
                os.close(inc.fd)
            inc.fd = None
        _unlink(inc.path)
        inc.path = None
        inc.mem = None


#: header walks that run at once in worker threads (each holds at most a few hundred KiB)
_HEADER_THREADS = 2
_header_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("header_limiter")
#: a data set up to this size (not deflated) is walked on the loop: even read by pydicom, a few
#: hundred elements at most (≈ 25 ms), less than a worker thread's hand-over for most
ON_LOOP_BYTES = 4096


async def _read_header(
    source: Path | bytes, size: int, transfer_syntax: str, limits: HeaderLimits
) -> InstanceHeader:
    """`read_header` of a data set of `size` bytes: on the loop when it is small, else in a
    worker thread (at most `_HEADER_THREADS` at once), since up to its limits it is costly."""
    if size <= ON_LOOP_BYTES and transfer_syntax != DEFLATED_EXPLICIT_VR_LE:
        return read_header(source, transfer_syntax, limits)
    try:
        limiter = _header_limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(_HEADER_THREADS)
        _header_limiter.set(limiter)
    return await trio.to_thread.run_sync(
        read_header, source, transfer_syntax, limits, limiter=limiter
    )


_UID_CHARS = frozenset("0123456789.")


def _valid_uid(uid: str | None) -> bool:
    return bool(uid) and len(uid) <= 64 and set(uid) <= _UID_CHARS  # type: ignore[arg-type]


def _write_fd(fd: int, data: bytes | bytearray | memoryview) -> None:
    with memoryview(data) as mv:
        off = 0
        n = len(mv)
        while off < n:
            off += os.write(fd, mv[off:])


async def handle_association(
    stream: trio.abc.Stream,
    config: AcceptorConfig,
    sink: InstanceSink,
    *,
    busy: bool = False,
    on_over: Callable[[], None] | None = None,
    admit: Callable[[], bool] | None = None,
) -> None:
    """Serve one association on `stream` until it ends; never raises for peer misbehaviour.
    `admit` is asked once the request is acceptable whether it may take an association slot
    (`busy`: never); `on_over` is called as our last PDU goes out (release, reject), before the
    wait for the peer to close."""
    transport = Transport(stream)
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


#: a connection reading its A-ASSOCIATE-RQ that has not had it answered after this many
#: seconds (a real peer sends it as soon as it has connected) gives its place to a connection
#: waiting for one
STALE_AFTER = 2.0
#: connections waiting for a place among those reading their request, per place; beyond that
#: a new connection is closed at once
QUEUE_FACTOR = 16


class _Connections:
    """The listener's connections, in four groups.

    - An association, from the acceptance of its request until its last PDU goes out, counts
      against `max_clients`.
    - At most `max_unassociated` connections read their A-ASSOCIATE-RQ at once (ARTIM bounds
      each); that bounds what requests not yet answered can hold (256 KiB each).
    - Further connections wait their turn, unread, first come first served (ARTIM bounds the
      wait; at most `QUEUE_FACTOR` per place, a new one beyond is closed at once). A reader
      whose request has not been answered `STALE_AFTER` after it started gives its place to
      the first of them (it is closed: an A-ABORT, then the close). A burst of modalities is
      served in turn, and idle sockets cannot keep one out, however many are opened.
    - A connection whose last PDU (A-ASSOCIATE-RJ, A-RELEASE-RP) has gone out, while the peer
      closes (ARTIM bounds it): at most `max_unassociated`, the oldest closed for a new one (it
      has its answer already)."""

    def __init__(self, max_clients: int, max_unassociated: int) -> None:
        self.max_clients = max_clients
        self.max_readers = max(1, max_unassociated)
        self.associations = 0
        #: connections reading their request, oldest first: cancel scope -> start
        self._readers: dict[trio.CancelScope, float] = {}
        #: connections whose last PDU went out, oldest first
        self._closing: dict[trio.CancelScope, None] = {}
        self._turns = trio.lowlevel.ParkingLot()  # the connections waiting for a place
        self._queued = 0
        self._handed = 0  # places handed to waiting connections that have not taken them yet
        self._crowded = False  # a close for crowding has been logged (once per burst)

    async def reading_turn(self, scope: trio.CancelScope) -> bool:
        """Wait for a place among the connections reading their request, and take it; False
        (at once) when too many wait already."""
        if self._queued >= QUEUE_FACTOR * self.max_readers:
            self._crowd("too many connections waiting for their turn; closing new ones")
            return False
        self._queued += 1
        try:
            if self._turns or len(self._readers) + self._handed >= self.max_readers:
                await self._wait_turn()
        finally:
            self._queued -= 1
        self._readers[scope] = trio.current_time()
        return True

    async def _wait_turn(self) -> None:
        while True:
            if len(self._readers) + self._handed < self.max_readers:
                return  # a place came free while this one was not parked (after a timeout)
            since = next(iter(self._readers.values()), None)
            deadline = math.inf if since is None else since + STALE_AFTER
            if trio.current_time() >= deadline:  # the oldest reader is stale: take its place
                oldest = next(iter(self._readers))
                del self._readers[oldest]
                oldest.cancel()
                self._crowd("closing connections that have not sent their request in time")
                return
            with trio.move_on_at(deadline) as waited:
                await self._turns.park()
            if not waited.cancelled_caught:  # a place was handed over
                self._handed -= 1
                return

    def _crowd(self, what: str) -> None:
        if not self._crowded:
            self._crowded = True
            log.warning(
                "DICOM: %d connections reading their A-ASSOCIATE-RQ, %d waiting: %s (logged "
                "once until it eases)",
                len(self._readers),
                self._queued,
                what,
            )

    def _stop_reading(self, scope: trio.CancelScope) -> None:
        if self._readers.pop(scope, None) is None:
            return
        if self._turns:
            self._turns.unpark()
            self._handed += 1
        elif len(self._readers) < self.max_readers // 2:
            self._crowded = False

    def admit(self, scope: trio.CancelScope) -> bool:
        """Move the connection to the associations, if one is free."""
        if self.max_clients and self.associations >= self.max_clients:
            return False
        self._stop_reading(scope)
        self.associations += 1
        return True

    def over(self, scope: trio.CancelScope, associated: bool) -> None:
        """Its last PDU went out: among the closing ones while the peer closes."""
        if associated:
            self.associations -= 1
        self._stop_reading(scope)
        if len(self._closing) >= self.max_readers:
            oldest = next(iter(self._closing))
            del self._closing[oldest]
            oldest.cancel()
        self._closing[scope] = None

    def leave(self, scope: trio.CancelScope, associated: bool) -> None:
        if associated:
            self.associations -= 1
        self._stop_reading(scope)
        self._closing.pop(scope, None)


async def serve_acceptor(
    config: AcceptorConfig,
    sink: InstanceSink,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on config.host:config.port and serve associations until cancelled."""
    host = None if config.host in ("", "0.0.0.0", "*") else config.host
    listeners = await trio.open_tcp_listeners(config.port, host=host, backlog=128)
    port = listeners[0].socket.getsockname()[1]
    log.info("DICOM listening on %s:%s as %s", config.host, port, config.ae_title)
    connections = _Connections(config.max_clients, config.max_unassociated)

    async def handler(stream: trio.SocketStream) -> None:
        associated = False

        def admit() -> bool:
            nonlocal associated
            associated = connections.admit(scope)
            return associated

        def over() -> None:
            # released or rejected: the slot is free while we wait for the peer to close (a
            # modality that opens its next association at once is not refused for it)
            nonlocal associated
            connections.over(scope, associated)
            associated = False

        with trio.CancelScope() as scope:
            try:
                turn = False
                with trio.move_on_after(config.artim_timeout):  # the wait for a turn
                    turn = await connections.reading_turn(scope)
                if turn:
                    await handle_association(stream, config, sink, admit=admit, on_over=over)
                else:
                    await trio.aclose_forcefully(stream)  # closed unread
            except Exception:
                log.exception("DICOM association handler failed")
            finally:
                connections.leave(scope, associated)
        if scope.cancelled_caught:
            log.debug("DICOM connection closed to make room for a new one")

    async with trio.open_nursery() as nursery:
        # our accept loop: an EMFILE is one log line per burst, not a traceback per attempt
        await nursery.start(functools.partial(serve_listeners, handler, listeners, name="DICOM", logger=log))
        task_status.started(port)
