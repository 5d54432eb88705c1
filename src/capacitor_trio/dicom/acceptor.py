"""The acceptor: the router's DICOM listener (C-ECHO and C-STORE SCP) on Trio streams.

Theory of operation. `serve_acceptor` binds, then runs `handle_association` for each connection
in its own task. One association is a loop over PDUs read by `Transport` (1 MiB receives):

- ARTIM bounds the wait for the A-ASSOCIATE-RQ and, after we release or reject, the wait for the
  peer to close; `client_timeout` bounds the wait for each later PDU (an idle association). That
  bound is kept by a watchdog task per association (`idle_watchdog`, `transport.overdue`), not by
  a cancel scope per PDU: entering and leaving a scope with a deadline costs ≈ 20 µs here, two
  per small C-STORE.
- The A-ASSOCIATE-RQ is decoded with pynetdicom's codec. A presentation context ID that is not
  odd (0 included) or is proposed twice -> A-ABORT (invalid PDU parameter value), as is any
  value of the request that the A-ASSOCIATE-AC cannot echo. Unknown called AE -> A-ASSOCIATE-RJ
  (permanent, called-AE-title-not-recognized); over `max_clients` -> A-ASSOCIATE-RJ (transient,
  local-limit-exceeded). An association stops counting towards `max_clients` once it has sent
  its last PDU (A-RELEASE-RP, A-ASSOCIATE-RJ): the wait for the peer to close holds no slot. Every proposed context gets a result: Verification and every storage SOP
  class are accepted (unless in `reject_abstract_syntaxes`) with the first proposed transfer
  syntax we know, compressed ones included — we store the bytes as received.
- A C-STORE's command set is decoded by hand (dimse.py). The sink's admission check runs first
  (OutOfResources -> the dataset is drained and 0xA700 answered, nothing written). Otherwise the
  Part 10 preamble and file meta are built and every data PDV is appended as it arrives: in
  memory while the instance is at most `memory_max_bytes` (32 KiB; handed over as
  `ReceivedInstance.data`), else in a temporary file from `sink.new_temp_path()` (large writes
  in a worker thread, so other associations keep moving).
  The header is read from the first 64 KiB; then `sink.instance_received` is awaited and only
  then the response is sent: 0x0000, 0xA700 (OutOfResources), 0xC0xx (CannotProcess, unparseable
  dataset, command/dataset UID mismatch). A C-STORE whose SOP class differs from its
  presentation context's abstract syntax is stored like any other (Orthanc and pynetdicom's
  listener do not compare the two, and some modalities rely on that), unless it is a class
  negotiation would have refused (in `reject_abstract_syntaxes`, or not a storage class): that
  one is drained, nothing written, and answered 0x0122.
- Whatever ends the association — A-ABORT, a protocol error (we answer A-ABORT), the peer
  vanishing, a timeout, cancellation (we send A-ABORT, shielded and bounded, unless our last
  PDU had gone out) — the temp file of an unfinished instance is removed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio
from pydicom.uid import UID
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from capacitor_trio.domain.instance import InstanceHeader
from capacitor_trio.serving import serve_listeners

from . import dimse
from . import pdu as P
from . import status as S
from .part10 import HeaderError, file_meta_bytes, parse_header, parse_header_file
from .transport import PeerClosed, Transport, overdue, read_limit

log = logging.getLogger("capacitor_trio.dicom")

HEAD_BYTES = 64 * 1024
THREAD_WRITE_THRESHOLD = 256 * 1024
_MAX_ASSOCIATE_RQ = 1 << 20


@attrs.frozen
class AcceptorConfig:
    ae_title: str = "CAPACITOR"
    host: str = "0.0.0.0"
    port: int = 1040
    max_pdu_size: int = 1_048_576
    max_clients: int = 0  # 0 = unlimited
    client_timeout: float = 600.0  # idle association
    artim_timeout: float = 30.0
    reject_abstract_syntaxes: frozenset[str] = frozenset()
    #: an instance up to this size (Part 10 bytes) is received in memory and handed over as
    #: bytes (no temporary file: the store keeps such instances in its index; the router sets
    #: it to the store's `inline_max_bytes`); a larger one is streamed to a temporary file from
    #: the sink's `new_temp_path()` once it outgrows this
    memory_max_bytes: int = 32 * 1024


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


@functools.lru_cache(maxsize=4096)
def _is_storage(abstract_syntax: str) -> bool:
    try:
        return issubclass(uid_to_service_class(abstract_syntax), StorageServiceClass)
    except Exception:
        return False


def _stores(sop_class: str, rejected: frozenset[str]) -> bool:
    """A storage SOP class that `reject_abstract_syntaxes` does not refuse: negotiation accepts
    its context, and a C-STORE of it is stored whatever context it came on."""
    return sop_class not in rejected and _is_storage(sop_class)


@functools.lru_cache(maxsize=1024)
def _is_known_transfer_syntax(uid: str) -> bool:
    try:
        return UID(uid).is_transfer_syntax
    except Exception:
        return False


def negotiate_contexts(
    contexts: tuple[P.ProposedContext, ...], rejected: frozenset[str]
) -> list[P.ContextResult]:
    results = []
    for pc in contexts:
        syntax = pc.abstract_syntax
        if not (
            _stores(syntax, rejected)
            or (syntax == dimse.VERIFICATION_SOP_CLASS and syntax not in rejected)
        ):
            results.append(
                P.ContextResult(
                    pc.context_id, P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, "", pc.abstract_syntax
                )
            )
            continue
        ts = next((t for t in pc.transfer_syntaxes if _is_known_transfer_syntax(t)), None)
        if ts is None:
            results.append(
                P.ContextResult(
                    pc.context_id, P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, "", pc.abstract_syntax
                )
            )
        else:
            results.append(P.ContextResult(pc.context_id, P.PC_ACCEPTANCE, ts, pc.abstract_syntax))
    return results


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
    ) -> None:
        self.t = transport
        self.config = config
        self.sink = sink
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
        self.command_buf: bytearray | None = None
        self.command_ctx = 0
        #: when the PDU being waited for was first waited for (None: not waiting for one), and
        #: the scope of the PDU loop, which `idle_watchdog` cancels after `client_timeout` of it
        self._reading_since: float | None = None
        self._idle_scope: trio.CancelScope | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, busy: bool = False) -> None:
        try:
            await self._run(busy)
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

    async def _run(self, busy: bool) -> None:
        try:
            with trio.move_on_after(self.config.artim_timeout) as cs:
                pdu_type, body = await self.t.read_pdu(_MAX_ASSOCIATE_RQ)
            if cs.cancelled_caught:
                log.info("DICOM association: no A-ASSOCIATE-RQ within ARTIM, closing")
                return
            if pdu_type != P.A_ASSOCIATE_RQ:
                raise _Abort(f"PDU type 0x{pdu_type:02X} before association")
            if not await self._negotiate(body, busy):
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

    async def _negotiate(self, body: bytes | bytearray, busy: bool) -> bool:
        if len(body) < 68:
            raise P.PduError("A-ASSOCIATE-RQ too short")
        rq = P.decode_associate_rq(P.PDU_HEADER.pack(P.A_ASSOCIATE_RQ, 0, len(body)) + bytes(body))
        self.calling_ae, self.called_ae = rq.calling_ae, rq.called_ae
        P.check_context_ids(rq.contexts)
        if not (body[1] & 0x01):
            log.warning("A-ASSOCIATE-RJ to %s: protocol version not supported", rq.calling_ae)
            await self._reject(P.RJ_PERMANENT, P.RJ_SOURCE_ACSE, 2)
            return False
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
        if not self.sink.accepts_called_ae(rq.called_ae):
            log.warning(
                "A-ASSOCIATE-RJ: called AE %r not recognized (calling AE %r)",
                rq.called_ae,
                rq.calling_ae,
            )
            await self._reject(
                P.RJ_PERMANENT, P.RJ_SOURCE_USER, P.RJ_REASON_CALLED_AE_NOT_RECOGNIZED
            )
            return False
        if busy:
            log.warning(
                "A-ASSOCIATE-RJ to %s: too many clients (max %d)",
                rq.calling_ae,
                self.config.max_clients,
            )
            await self._reject(
                P.RJ_TRANSIENT, P.RJ_SOURCE_PRESENTATION, P.RJ_REASON_LOCAL_LIMIT_EXCEEDED
            )
            return False
        results = negotiate_contexts(rq.contexts, self.config.reject_abstract_syntaxes)
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
            if self.incoming is not None or self.command_buf is not None:
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
                if ctx not in self.contexts:
                    raise _Abort(
                        f"PDV on presentation context {ctx} not accepted",
                        P.ABORT_REASON_INVALID_PARAMETER,
                    )
                if mch & 0x01:
                    await self._command_fragment(ctx, mch, data)
                else:
                    await self._data_fragment(ctx, mch, data)

    async def _command_fragment(self, ctx: int, mch: int, data: memoryview) -> None:
        if self.incoming is not None:
            raise _Abort("command fragment while a data set was expected")
        if self.command_buf is None:
            self.command_buf = bytearray()
            self.command_ctx = ctx
        elif ctx != self.command_ctx:
            raise _Abort("command fragments on two presentation contexts")
        self.command_buf += data
        if len(self.command_buf) > 1 << 20:
            raise _Abort("command set too large", P.ABORT_REASON_INVALID_PARAMETER)
        if not mch & 0x02:
            return
        raw, self.command_buf = self.command_buf, None
        try:
            cmd = dimse.decode_command(raw)
        except dimse.CommandDecodeError as exc:
            raise _Abort(
                f"undecodable command set: {exc}", P.ABORT_REASON_INVALID_PARAMETER
            ) from exc
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
        context_syntax = self.contexts[ctx].abstract_syntax
        sop_class = cmd.affected_sop_class_uid or ""  # valid: checked above
        if sop_class != context_syntax and not _stores(
            sop_class, self.config.reject_abstract_syntaxes
        ):
            # a class that negotiation would have refused, sent on a context accepted for
            # another (Orthanc and pynetdicom do not compare the two at all; we do only so far
            # as `reject_abstract_syntaxes` and the storage classes are concerned)
            inc.refusal = (
                S.SOP_CLASS_NOT_SUPPORTED,
                f"SOP class is not accepted here (sent on presentation context {ctx})",
            )
            log.warning(
                "C-STORE from %s refused: SOP class %s sent on presentation context %d (%s)",
                self.calling_ae,
                sop_class,
                ctx,
                context_syntax,
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

    async def _data_fragment(self, ctx: int, mch: int, data: memoryview) -> None:
        inc = self.incoming
        if inc is None:
            raise _Abort("data fragment without a command")
        if ctx != inc.context_id:
            raise _Abort(
                "data fragment on another presentation context", P.ABORT_REASON_INVALID_PARAMETER
            )
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
        if mch & 0x02:
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
            header = parse_header(bytes(inc.head), inc.transfer_syntax, complete=complete)
            if header is None:
                if inc.path is None:  # pragma: no cover - in memory means complete
                    raise HeaderError("data set too short")
                header = parse_header_file(inc.path, inc.transfer_syntax)
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
        self.command_buf = None
        if inc is None:
            return
        if inc.fd is not None:
            with contextlib.suppress(OSError):
                os.close(inc.fd)
            inc.fd = None
        _unlink(inc.path)
        inc.path = None
        inc.mem = None


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
) -> None:
    """Serve one association on `stream` until it ends; never raises for peer misbehaviour.
    `on_over` is called as our last PDU goes out (release, reject), before the wait for the
    peer to close."""
    transport = Transport(stream)
    association = _Association(transport, config, sink, on_over)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(association.idle_watchdog)
            await association.run(busy=busy)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # the watchdog raises nothing: an error of the association comes out as itself, as it
        # did before the watchdog (callers catch the plain type)
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        await transport.aclose()


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
    active = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal active
        busy = bool(config.max_clients) and active >= config.max_clients
        active += 1
        counted = True

        def over() -> None:
            # released or rejected: the slot is free while we wait for the peer to close (a
            # modality that opens its next association at once is not refused for it)
            nonlocal active, counted
            if counted:
                counted = False
                active -= 1

        try:
            await handle_association(stream, config, sink, busy=busy, on_over=over)
        except Exception:
            log.exception("DICOM association handler failed")
        finally:
            over()

    async with trio.open_nursery() as nursery:
        # our accept loop: an EMFILE is one log line per burst, not a traceback per attempt
        await nursery.start(functools.partial(serve_listeners, handler, listeners, name="DICOM", logger=log))
        task_status.started(port)
