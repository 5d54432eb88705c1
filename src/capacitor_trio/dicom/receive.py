"""Receiving one C-STORE's data set on an association: the acceptor's `_Association` inherits
these steps (`_Receiver`), so that each data fragment costs one method call on the association.

For a C-STORE the sink's admission check runs first (OutOfResources -> the data set is drained and
0xA700 answered, nothing written). Otherwise the Part 10 preamble and file meta are built and
every data fragment is appended as it arrives: in memory while the instance is at most
`memory_max_bytes` (handed over as `ReceivedInstance.data`), else in a temporary file from
`sink.new_temp_path()` (writes of `THREAD_WRITE_THRESHOLD` or more in a worker thread). The
header is read from the first `HEAD_BYTES` on the loop, else walked within `header_limits`
(walk.py); then `sink.instance_received` is awaited and only then the C-STORE-RSP is sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import trio

from . import dimse
from . import pdu as P
from . import status as S
from .assembler import DataFragment
from .negotiation import refusal, valid_uid
from .part10 import HeaderError, HeaderLimitExceeded, file_meta_bytes, parse_header_fast
from .sink import AcceptorConfig, CannotProcess, InstanceSink, OutOfResources, ReceivedInstance
from .transport import Transport
from .walk import read_header_off_loop

log = logging.getLogger("capacitor_trio.dicom")

HEAD_BYTES = 64 * 1024
THREAD_WRITE_THRESHOLD = 256 * 1024


class _Abort(Exception):
    """End the association with an A-ABORT (reason as given); raised by the association
    (acceptor.py) and by its C-STORE steps here."""

    def __init__(self, message: str, reason: int = P.ABORT_REASON_UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


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


class _Receiver:
    """The C-STORE steps of an association (mixed into `_Association`, which sets these)."""

    t: Transport
    config: AcceptorConfig
    sink: InstanceSink
    calling_ae: str
    called_ae: str
    contexts: dict[int, P.ContextResult]
    max_pdu_peer: int
    incoming: _Incoming | None

    def _start_store(self, cmd: dimse.Command, ctx: int) -> None:
        inc = _Incoming(cmd, ctx, self.contexts[ctx].transfer_syntax)
        self.incoming = inc
        if not (
            valid_uid(cmd.affected_sop_class_uid) and valid_uid(cmd.affected_sop_instance_uid)
        ):
            inc.refusal = (S.STATUS_UNPARSEABLE, "invalid SOP UID in the command")
            log.warning("C-STORE from %s refused: invalid SOP UID in the command", self.calling_ae)
            return
        sop_class = cmd.affected_sop_class_uid or ""  # valid: checked above
        why = refusal(sop_class, self.config.reject_abstract_syntaxes)
        if why is not None:
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
                why,
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
        _drop_file(inc)
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
                header = await read_header_off_loop(
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
        _drop_file(inc)
        inc.mem = None


def _drop_file(inc: _Incoming) -> None:
    """Close and remove the temporary file a data set was being written to, if any."""
    if inc.fd is not None:
        with contextlib.suppress(OSError):
            os.close(inc.fd)
        inc.fd = None
    _unlink(inc.path)
    inc.path = None


def _write_fd(fd: int, data: bytes | bytearray | memoryview) -> None:
    with memoryview(data) as mv:
        off = 0
        n = len(mv)
        while off < n:
            off += os.write(fd, mv[off:])
