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
from collections.abc import Callable

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


# ---------------------------------------------------------------------------------------------
# The requestor's side: what delivery proposes, and which accepted context carries an instance

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
#: proposed for every SOP class of a batch after its instances' own syntaxes, in one context, in
#: this order of preference: any destination takes one of them (PS3.5 makes Implicit VR Little
#: Endian the default every implementation supports)
UNCOMPRESSED = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
#: syntaxes an instance may be converted into on the way out besides UNCOMPRESSED, when the
#: destination accepted one for its class (another instance's): lossless ones only. Lossy output
#: is made only where a node's TransferSyntax asks for it, never chosen by a destination.
LOSSLESS = frozenset({
    IMPLICIT_VR_LE, EXPLICIT_VR_LE,
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, process 14
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, process 14 SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
})


@attrs.frozen
class Proposal:
    """The presentation contexts a delivery proposes (`propose`)."""

    contexts: list[P.ProposedContext]
    #: (SOP class, syntax) pairs left without a context: more than the limit
    overflow: set[tuple[str, str]]
    #: SOP classes with a context of UNCOMPRESSED syntaxes besides their own ones (all, unless
    #: the limit left no room)
    fallback: frozenset[str]


def propose(pairs: list[tuple[str, str]], limit: int) -> Proposal:
    """The presentation contexts that deliver `pairs` (SOP class, the instance's syntax). Each
    pair has a context of its own syntax alone, in the order given, so the destination says yes
    or no to exactly that syntax; then, while there is room (`limit` contexts), each SOP class
    one context proposing the UNCOMPRESSED syntaxes its own contexts do not already propose, in
    their order of preference."""
    own = pairs[:limit]
    contexts = [P.ProposedContext(2 * i + 1, sc, (ts,)) for i, (sc, ts) in enumerate(own)]
    classes: dict[str, set[str]] = {}
    for sc, ts in own:
        classes.setdefault(sc, set()).add(ts)
    fallback = set()
    for sc, syntaxes in classes.items():
        rest = tuple(ts for ts in UNCOMPRESSED if ts not in syntaxes)
        if not rest:
            fallback.add(sc)
        elif len(contexts) < limit:
            contexts.append(P.ProposedContext(2 * len(contexts) + 1, sc, rest))
            fallback.add(sc)
    return Proposal(contexts, set(pairs[limit:]), frozenset(fallback))


_WHY = {
    P.PC_USER_REJECTION: "user rejection",
    P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED: "abstract syntax not supported",
    P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED: "transfer syntax not supported",
}


@attrs.frozen
class Accepted:
    """What a destination answered to `propose`'s contexts."""

    #: SOP class -> {accepted transfer syntax: context ID}, in the order proposed
    by_class: dict[str, dict[str, int]]
    #: (SOP class, syntax) proposed alone and refused -> why
    refused: dict[tuple[str, str], str]


def accepted(proposed: list[P.ProposedContext], accept: P.AssociateAccept) -> Accepted:
    """Sort the destination's answers. The syntax of an accepted context is the one its answer
    names, when we proposed it there; a context of one syntax is that syntax whatever the answer
    says (some peers leave it blank); an answer naming a syntax we did not propose in a context
    of several is taken as a refusal."""
    results = {r.context_id: r for r in accept.contexts}
    by_class: dict[str, dict[str, int]] = {}
    refused: dict[tuple[str, str], str] = {}
    for pc in proposed:
        r = results.get(pc.context_id)
        ts: str | None = None
        if r is not None and r.result == P.PC_ACCEPTANCE:
            if r.transfer_syntax in pc.transfer_syntaxes:
                ts = r.transfer_syntax
            elif len(pc.transfer_syntaxes) == 1:
                ts = pc.transfer_syntaxes[0]
        if ts is not None:
            by_class.setdefault(pc.abstract_syntax, {}).setdefault(ts, pc.context_id)
        elif len(pc.transfer_syntaxes) == 1:
            why = _WHY.get(r.result if r is not None else -1, "no reason given")
            if r is not None and r.result == P.PC_ACCEPTANCE:
                why = f"accepted with a transfer syntax not proposed ({r.transfer_syntax[:64]!a})"
            refused[(pc.abstract_syntax, pc.transfer_syntaxes[0])] = why
    return Accepted(by_class, refused)


@attrs.frozen
class Route:
    """How one instance goes: on `context_id`, in `transfer_syntax` (converted into it when that
    is not the syntax it is stored in)."""

    context_id: int
    transfer_syntax: str


def preference(stored: str, offered: dict[str, int]) -> list[str]:
    """The accepted syntaxes an instance stored in `stored` may go in, best first: its own (sent
    as stored), then the UNCOMPRESSED ones in their order, then other lossless ones the
    destination accepted for its class, in the order proposed."""
    order = [stored] if stored in offered else []
    order += [ts for ts in UNCOMPRESSED if ts in offered and ts != stored]
    order += [ts for ts in offered if ts in LOSSLESS and ts not in order]
    return order


def route(
    sop_class: str, stored: str, answer: Accepted, can_convert: Callable[[str, str], bool]
) -> Route | None:
    """The context and syntax an instance of `sop_class` stored in `stored` goes in: the first
    of `preference` that is its own syntax or one we can convert it into; None when there is
    none."""
    offered = answer.by_class.get(sop_class, {})
    if stored in offered:  # its own syntax comes first: nearly every instance
        return Route(offered[stored], stored)
    for ts in preference(stored, offered):
        if ts == stored or can_convert(stored, ts):
            return Route(offered[ts], ts)
    return None


def no_route_reason(sop_class: str, stored: str, answer: Accepted) -> str:
    """The lastError of an instance `route` found no way for: the syntaxes the destination
    accepted for its class (or that it accepted none), and why it refused the instance's own."""
    offered = list(answer.by_class.get(sop_class, {}))
    own = answer.refused.get((sop_class, stored), "not proposed")
    if not offered:
        return f"presentation context for {sop_class} / {stored} refused: {own}; the destination accepted no transfer syntax for this SOP class"
    names = ", ".join(_ts_name(ts) for ts in offered)
    return (
        f"presentation context for {sop_class} / {stored} refused: {own}; the destination accepted "
        f"only {names} for this SOP class, and this instance cannot be converted into any of them"
    )


def _ts_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid
