"""Presentation-context negotiation: which proposed contexts the acceptor accepts, and why the
others are refused.

Verification and every SOP class that may be stored are accepted (`refusal`: any class, private
and unknown ones included, unless in `reject_abstract_syntaxes`, a non-storage service pynetdicom
knows, or no SOP class at all) with the first proposed transfer syntax we know, compressed ones
included — we store the bytes as received. The same rule decides whether a C-STORE is stored
whatever context it came on. The refused contexts and why are logged, one line per association
(`log_refused`). The A-ASSOCIATE-RQ's items are decoded here too (`decode_associate_rq`: on the
loop up to `DECODE_ON_LOOP_ITEMS`, beyond in a worker thread, one at a time).
"""

from __future__ import annotations

import functools
import logging

import attrs
import trio
from pydicom.uid import UID
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from capacitor_trio.limiter import run_var_limiter

from . import dimse
from . import pdu as P

log = logging.getLogger("capacitor_trio.dicom")

#: an A-ASSOCIATE-RQ of up to this many items and sub-items (≈ 5 ms of pynetdicom's decoder;
#: a request of a few dozen contexts) is decoded on the event loop, a larger one in a worker
#: thread
DECODE_ON_LOOP_ITEMS = 512

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
    if not valid_uid(sop_class):
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


def refusal(sop_class: str, rejected: frozenset[str]) -> str | None:
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
    Verification and every class `refusal` lets through are accepted, with the first proposed
    transfer syntax we know (compressed ones included: we store the bytes as received)."""
    results: list[P.ContextResult] = []
    refused: list[Refused] = []
    for pc in contexts:
        syntax = pc.abstract_syntax
        if syntax == dimse.VERIFICATION_SOP_CLASS and syntax not in rejected:
            why = None
        else:
            why = refusal(syntax, rejected)
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


def log_refused(calling_ae: str, called_ae: str, total: int, refused: list[Refused]) -> None:
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
    if not valid_uid(uid):
        return f"{r.context.context_id} {uid[:80]!a} ({r.reason})"
    name = UID(uid).name
    named = f"{uid} {name}" if name != uid else uid
    if r.reason == NO_TRANSFER_SYNTAX:
        proposed = ", ".join(ascii(t[:80]) for t in r.context.transfer_syntaxes[:4])
        return f"{r.context.context_id} {named} ({r.reason}: {proposed})"
    return f"{r.context.context_id} {named} ({r.reason})"


_decode_limiter = run_var_limiter("capacitor_trio_associate_rq_decoder", 1)


async def decode_associate_rq(body: bytes | bytearray, items: int) -> P.AssociateRequest:
    """Decode an A-ASSOCIATE-RQ body of `items` items, within the caps. Up to
    `DECODE_ON_LOOP_ITEMS` on the event loop (a few ms at most); a larger one (up to 8,960
    items, tens of ms) in a worker thread, one at a time whatever the number of connections:
    many such requests at once queue for the thread instead of taking turns on the loop."""
    raw = P.PDU_HEADER.pack(P.A_ASSOCIATE_RQ, 0, len(body)) + bytes(body)
    if items <= DECODE_ON_LOOP_ITEMS:
        return P.decode_associate_rq(raw)
    return await trio.to_thread.run_sync(P.decode_associate_rq, raw, limiter=_decode_limiter())


_UID_CHARS = frozenset("0123456789.")


def valid_uid(uid: str | None) -> bool:
    return bool(uid) and len(uid) <= 64 and set(uid) <= _UID_CHARS  # type: ignore[arg-type]
