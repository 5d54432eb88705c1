"""Upper-layer PDUs: P-DATA-TF/PDV framing by hand, association PDUs through pynetdicom's codec.

P-DATA-TF is the hot path and is framed here with `struct` on memoryviews (no copies of the
payload). A-ASSOCIATE-RQ/AC/RJ go through `pynetdicom.pdu` (their items and sub-items are many and
rarely on the hot path); A-RELEASE and A-ABORT are fixed 10-byte PDUs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
from pynetdicom import pdu as _pdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
KNOWN_PDU_TYPES = frozenset(range(1, 8))

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "2.25.182612905469527940438659434737544220421"
IMPLEMENTATION_VERSION = "CAPACITOR_TRIO"

PDU_HEADER = struct.Struct(">BBI")
PDV_HEADER = struct.Struct(">IBB")
_PDU_AND_PDV = struct.Struct(">BBIIBB")

# Presentation context results (PS3.8 9.3.3.2)
PC_ACCEPTANCE = 0
PC_USER_REJECTION = 1
PC_NO_REASON = 2
PC_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
PC_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# A-ASSOCIATE-RJ result/source/reason
RJ_PERMANENT = 1
RJ_TRANSIENT = 2
RJ_SOURCE_USER = 1
RJ_SOURCE_ACSE = 2
RJ_SOURCE_PRESENTATION = 3
RJ_REASON_NO_REASON = 1
RJ_REASON_APP_CONTEXT_NOT_SUPPORTED = 2
RJ_REASON_CALLED_AE_NOT_RECOGNIZED = 7
RJ_REASON_LOCAL_LIMIT_EXCEEDED = 2  # with source 3

# A-ABORT source/reason
ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2
ABORT_REASON_NOT_SPECIFIED = 0
ABORT_REASON_UNRECOGNIZED_PDU = 1
ABORT_REASON_UNEXPECTED_PDU = 2
ABORT_REASON_UNRECOGNIZED_PARAMETER = 4
ABORT_REASON_UNEXPECTED_PARAMETER = 5
ABORT_REASON_INVALID_PARAMETER = 6

RELEASE_RQ_BYTES = PDU_HEADER.pack(A_RELEASE_RQ, 0, 4) + b"\x00" * 4
RELEASE_RP_BYTES = PDU_HEADER.pack(A_RELEASE_RP, 0, 4) + b"\x00" * 4


class PduError(Exception):
    """A PDU that cannot be decoded; `abort_reason` is the A-ABORT reason to answer with."""

    def __init__(self, message: str, abort_reason: int = ABORT_REASON_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.abort_reason = abort_reason


def abort_bytes(source: int = ABORT_SOURCE_USER, reason: int = ABORT_REASON_NOT_SPECIFIED) -> bytes:
    return PDU_HEADER.pack(A_ABORT, 0, 4) + bytes((0, 0, source, reason))


def decode_abort(body: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(source, reason) of an A-ABORT body."""
    if len(body) < 4:
        return (ABORT_SOURCE_PROVIDER, ABORT_REASON_NOT_SPECIFIED)
    return (body[2], body[3])


# ---------------------------------------------------------------------------- P-DATA-TF / PDV


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """Yield (context_id, message_control_header, data) for each PDV of a P-DATA-TF body. A PDV
    with no data is refused unless it is the last fragment of its message (which ends the
    message: one per command or data set, so they cannot pile up)."""
    n = len(body)
    off = 0
    if n == 0:
        raise PduError("P-DATA-TF without PDV items")
    while off < n:
        if off + 6 > n:
            raise PduError("truncated PDV item header")
        length, ctx, mch = PDV_HEADER.unpack_from(body, off)
        if length < 2 or off + 4 + length > n:
            raise PduError(f"PDV item length {length} does not fit the PDU")
        if length == 2 and not mch & 0x02:
            # a fragment with no data that does not end its message carries nothing; allowed,
            # hundreds of thousands of them fit in one PDU, each one a step of work
            raise PduError("PDV item with no data that is not the last fragment")
        yield ctx, mch, body[off + 6 : off + 4 + length]
        off += 4 + length


def p_data_header(context_id: int, mch: int, data_len: int) -> bytes:
    """The 12 bytes that precede `data_len` bytes of a single-PDV P-DATA-TF PDU."""
    return _PDU_AND_PDV.pack(P_DATA_TF, 0, data_len + 6, data_len + 2, context_id, mch)


def encode_command_pdus(context_id: int, command: bytes, max_pdu: int) -> bytes:
    """A command set as one or more P-DATA-TF PDUs (command bit set, last bit on the last)."""
    limit = max_pdu - 6 if max_pdu else len(command)
    if limit <= 0:
        limit = len(command)
    parts = []
    off = 0
    while True:
        chunk = command[off : off + limit]
        off += len(chunk)
        last = off >= len(command)
        parts.append(p_data_header(context_id, 0x03 if last else 0x01, len(chunk)))
        parts.append(chunk)
        if last:
            return b"".join(parts)


# ---------------------------------------------------------------------------- association PDUs


@attrs.frozen
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@attrs.frozen
class AssociateRequest:
    calling_ae: str
    called_ae: str
    application_context: str
    contexts: tuple[ProposedContext, ...]
    max_pdu: int  # 0 = no limit
    implementation_class_uid: str = ""


@attrs.frozen
class ContextResult:
    context_id: int
    result: int
    transfer_syntax: str
    abstract_syntax: str = ""


@attrs.frozen
class AssociateAccept:
    contexts: tuple[ContextResult, ...]
    max_pdu: int


@attrs.frozen
class AssociateReject:
    result: int
    source: int
    reason: int

    @property
    def permanent(self) -> bool:
        return self.result == RJ_PERMANENT

    def describe(self) -> str:
        kind = "permanent" if self.permanent else "transient"
        return f"association rejected ({kind}, source {self.source}, reason {self.reason})"


def _user_info(max_pdu: int) -> list[Any]:
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    iv = ImplementationVersionNameNotification()
    iv.implementation_version_name = IMPLEMENTATION_VERSION
    return [ml, ic, iv]


def _max_length(user_info: _pdu.UserInformationItem | None) -> int:
    if user_info is None:
        return 0
    value = user_info.maximum_length
    return int(value or 0)


def decode_associate_rq(pdu_bytes: bytes) -> AssociateRequest:
    """Decode a whole A-ASSOCIATE-RQ PDU (header included)."""
    try:
        rq = _pdu.A_ASSOCIATE_RQ()
        rq.decode(pdu_bytes)
        contexts = tuple(
            ProposedContext(
                int(pc.context_id or 0),
                str(pc.abstract_syntax or ""),
                tuple(str(ts) for ts in pc.transfer_syntax),
            )
            for pc in rq.presentation_context
        )
        return AssociateRequest(
            calling_ae=str(rq.calling_ae_title).strip(),
            called_ae=str(rq.called_ae_title).strip(),
            application_context=str(rq.application_context_name or ""),
            contexts=contexts,
            max_pdu=_max_length(rq.user_information),
            implementation_class_uid=str(
                (rq.user_information and rq.user_information.implementation_class_uid) or ""
            ),
        )
    except Exception as exc:  # pynetdicom raises many kinds on malformed input
        raise PduError(f"malformed A-ASSOCIATE-RQ: {exc!r}") from exc


#: What an A-ASSOCIATE-RQ may hold (PS3.8 sets no bound). No real peer comes near: a modality
#: proposing every storage class is ~128 contexts of a few transfer syntaxes, 20-60 KB (a
#: pynetdicom AE proposing all 45 syntaxes it knows in each, ~6,000 items, is within them).
#: Each item costs pynetdicom's decoder 5-10 µs.
MAX_ASSOCIATE_RQ = 256 << 10  # bytes of the PDU body
MAX_CONTEXTS = 128  # as many as there are odd context IDs
MAX_TRANSFER_SYNTAXES = 64  # per presentation context
#: items and sub-items of the request together: every context at its cap, and room for the
#: user information (role selection and extended negotiation for each context, and more)
MAX_ASSOCIATE_ITEMS = MAX_CONTEXTS * (MAX_TRANSFER_SYNTAXES + 2) + 512

_PRESENTATION_CONTEXT_ITEM = 0x20
_USER_INFORMATION_ITEM = 0x50
_TRANSFER_SYNTAX_SUB_ITEM = 0x40


def associate_rq_items(body: bytes | bytearray) -> tuple[int, str | None]:
    """(items and sub-items, what exceeds the caps above or None) of an A-ASSOCIATE-RQ body
    (the PDU without its 6-byte header). Walks the item headers only (4 bytes each), and stops
    at the first excess: it costs at most `MAX_ASSOCIATE_ITEMS` steps whatever the request
    holds. A malformed structure is left to the decoder to report."""
    n = len(body)
    off = 68  # protocol version, reserved, called AE, calling AE, reserved
    items = contexts = 0
    while off + 4 <= n:
        kind, length = body[off], int.from_bytes(body[off + 2 : off + 4], "big")
        end = min(off + 4 + length, n)
        items += 1
        if kind == _PRESENTATION_CONTEXT_ITEM:
            contexts += 1
            if contexts > MAX_CONTEXTS:
                return items, f"more than {MAX_CONTEXTS} presentation contexts"
        if kind in (_PRESENTATION_CONTEXT_ITEM, _USER_INFORMATION_ITEM):
            sub = off + (8 if kind == _PRESENTATION_CONTEXT_ITEM else 4)
            syntaxes = 0
            while sub + 4 <= end and items <= MAX_ASSOCIATE_ITEMS:
                items += 1
                if body[sub] == _TRANSFER_SYNTAX_SUB_ITEM:
                    syntaxes += 1
                    if syntaxes > MAX_TRANSFER_SYNTAXES:
                        return items, f"more than {MAX_TRANSFER_SYNTAXES} transfer syntaxes in a context"
                sub += 4 + int.from_bytes(body[sub + 2 : sub + 4], "big")
        if items > MAX_ASSOCIATE_ITEMS:
            return items, f"more than {MAX_ASSOCIATE_ITEMS} items"
        off += 4 + length
    return items, None


def associate_rq_titles(body: bytes | bytearray) -> tuple[str, str]:
    """(calling AE, called AE) of an A-ASSOCIATE-RQ body (at least 68 bytes), read at their
    fixed offsets without decoding the rest; leading and trailing spaces are not significant."""
    called = bytes(body[4:20]).decode("ascii", "replace").strip()
    calling = bytes(body[20:36]).decode("ascii", "replace").strip()
    return calling, called


def check_context_ids(contexts: Sequence[ProposedContext]) -> None:
    """Raise PduError unless every presentation context ID is odd, 1-255 and used once
    (PS3.8 9.3.2.2). pynetdicom decodes any byte there, but refuses to encode such an ID
    into the A-ASSOCIATE-AC, and every proposed context must be answered."""
    seen: set[int] = set()
    for c in contexts:
        if not (1 <= c.context_id <= 255 and c.context_id % 2):
            raise PduError(f"presentation context ID {c.context_id} is not an odd integer 1-255")
        if c.context_id in seen:
            raise PduError(f"presentation context ID {c.context_id} proposed twice")
        seen.add(c.context_id)


def encode_associate_rq(
    calling_ae: str, called_ae: str, contexts: Sequence[ProposedContext], max_pdu: int
) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = APPLICATION_CONTEXT
    prim.calling_ae_title = calling_ae
    prim.called_ae_title = called_ae
    for c in contexts:
        pc = PresentationContext()
        pc.context_id = c.context_id
        pc.abstract_syntax = c.abstract_syntax
        pc.transfer_syntax = list(c.transfer_syntaxes)
        prim.presentation_context_definition_list.append(pc)
    prim.user_information = _user_info(max_pdu)
    return _pdu.A_ASSOCIATE_RQ(prim).encode()


def _encode_associate_ac(
    rq: AssociateRequest, results: Sequence[ContextResult], max_pdu: int
) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = APPLICATION_CONTEXT
    prim.calling_ae_title = rq.calling_ae or "ANY-SCU"
    prim.called_ae_title = rq.called_ae or "ANY-SCP"
    for r in results:
        pc = PresentationContext()
        pc.context_id = r.context_id
        pc.result = r.result
        # A transfer syntax sub-item is always sent; its value is not significant when refused
        pc.transfer_syntax = [r.transfer_syntax or "1.2.840.10008.1.2"]
        prim.presentation_context_definition_results_list.append(pc)
    prim.user_information = _user_info(max_pdu)
    prim.result = 0
    return _pdu.A_ASSOCIATE_AC(prim).encode()


def encode_associate_ac(
    rq: AssociateRequest, results: Sequence[ContextResult], max_pdu: int
) -> bytes:
    """The A-ASSOCIATE-AC answering `rq`. It echoes values of the request (AE titles, context
    IDs) that pynetdicom's encoder validates: one it refuses is the request's fault, a PduError
    (answered with an A-ABORT), not a crash of the association."""
    try:
        return _encode_associate_ac(rq, results, max_pdu)
    except Exception as exc:
        raise PduError(f"cannot answer the A-ASSOCIATE-RQ: {exc!r}") from exc


def decode_associate_ac(pdu_bytes: bytes, proposed: Sequence[ProposedContext]) -> AssociateAccept:
    try:
        ac = _pdu.A_ASSOCIATE_AC()
        ac.decode(pdu_bytes)
        by_id = {c.context_id: c.abstract_syntax for c in proposed}
        results = tuple(
            ContextResult(
                int(pc.context_id or 0),
                int(pc.result if pc.result is not None else PC_NO_REASON),
                str(pc.transfer_syntax or ""),
                by_id.get(int(pc.context_id or 0), ""),
            )
            for pc in ac.presentation_context
        )
        return AssociateAccept(results, _max_length(ac.user_information))
    except Exception as exc:
        raise PduError(f"malformed A-ASSOCIATE-AC: {exc!r}") from exc


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    return PDU_HEADER.pack(A_ASSOCIATE_RJ, 0, 4) + bytes((0, result, source, reason))


def decode_associate_rj(body: bytes | bytearray | memoryview) -> AssociateReject:
    if len(body) < 4:
        return AssociateReject(RJ_PERMANENT, RJ_SOURCE_USER, RJ_REASON_NO_REASON)
    return AssociateReject(body[1], body[2], body[3])
