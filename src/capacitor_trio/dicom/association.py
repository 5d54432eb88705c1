"""Opening and ending an association as the requestor (the SCU side, for `send_batch` and
`echo`): connect within a deadline, send the A-ASSOCIATE-RQ and read its answer, A-ABORT under a
short shielded deadline. A failure is a `_Failed` carrying the outcome for the instances not yet
reported, and whether an A-ABORT must follow.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import attrs
import trio

from capacitor_trio.domain.outcomes import Outcome, Rejected, RetryLater

from . import pdu as P
from .transport import PeerClosed, Transport

log = logging.getLogger("capacitor_trio.dicom")

#: how long an A-ABORT may take to go out (shielded: also when cancelled)
ABORT_GRACE = 1.0


@attrs.frozen
class Peer:
    ae_title: str
    host: str
    port: int


class _Failed(Exception):
    def __init__(self, outcome: Outcome, *, abort: bool = True) -> None:
        super().__init__(getattr(outcome, "reason", str(outcome)))
        self.outcome = outcome
        self.abort = abort


async def _open_stream(host: str, port: int) -> trio.abc.Stream:
    """Open the transport to a peer (tests substitute in-memory streams here)."""
    return await trio.open_tcp_stream(host, port)


async def _connect(peer: Peer, seconds: float) -> Transport:
    try:
        with trio.fail_after(seconds):
            stream = await _open_stream(peer.host, peer.port)
    except trio.TooSlowError:
        raise _Failed(
            RetryLater(f"connect to {peer.host}:{peer.port} timed out", kind="connect"), abort=False
        ) from None
    except OSError as exc:
        raise _Failed(
            RetryLater(f"cannot connect to {peer.host}:{peer.port}: {exc.strerror or exc}", kind="connect"),
            abort=False,
        ) from None
    return Transport(stream)


async def _associate(
    t: Transport,
    peer: Peer,
    calling_ae: str,
    contexts: Sequence[P.ProposedContext],
    max_pdu: int,
    seconds: float,
) -> P.AssociateAccept:
    try:
        with trio.fail_after(seconds):
            await t.send_all(P.encode_associate_rq(calling_ae, peer.ae_title, contexts, max_pdu))
            pdu_type, body = await t.read_pdu(1 << 20)
    except trio.TooSlowError:
        raise _Failed(RetryLater("association negotiation timed out", kind="timeout")) from None
    except PeerClosed as exc:
        raise _Failed(
            RetryLater(f"connection closed during association: {exc}", kind="connection_lost"), abort=False
        ) from None
    except P.PduError as exc:
        raise _Failed(RetryLater(f"protocol error from peer: {exc}", kind="protocol")) from None
    if pdu_type == P.A_ASSOCIATE_AC:
        try:
            return P.decode_associate_ac(
                P.PDU_HEADER.pack(pdu_type, 0, len(body)) + bytes(body), contexts
            )
        except P.PduError as exc:
            raise _Failed(RetryLater(str(exc), kind="protocol")) from None
    if pdu_type == P.A_ASSOCIATE_RJ:
        rj = P.decode_associate_rj(body)
        log.warning("%s by %s (%s:%s)", rj.describe(), peer.ae_title, peer.host, peer.port)
        outcome: Outcome = (
            Rejected(rj.describe(), association=True, kind="rejected")
            if rj.permanent
            else RetryLater(rj.describe(), kind="rejected")
        )
        raise _Failed(outcome, abort=False)
    if pdu_type == P.A_ABORT:
        raise _Failed(RetryLater("association aborted by peer during negotiation", kind="aborted"), abort=False)
    raise _Failed(RetryLater(f"unexpected PDU 0x{pdu_type:02X} during negotiation", kind="protocol"))


async def _send_abort(t: Transport) -> None:
    with trio.move_on_after(ABORT_GRACE) as cs:
        cs.shield = True
        with contextlib.suppress(PeerClosed):
            await t.send_all(P.abort_bytes(P.ABORT_SOURCE_USER, P.ABORT_REASON_NOT_SPECIFIED))
