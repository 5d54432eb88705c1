"""C-ECHO as the requestor (`echo`): connect, associate with the Verification context, one
C-ECHO-RQ, its response, release; the API's and the node actors' echo.
"""

from __future__ import annotations

import attrs
import trio

from . import dimse
from . import pdu as P
from .assembler import CommandSet, MessageAssembler
from .association import Peer, _associate, _connect, _Failed, _send_abort
from .part10 import EXPLICIT_VR_LE, IMPLICIT_VR_LE
from .transport import PeerClosed, Transport, read_limit

#: the maximum PDU length `echo` proposes (its replies are a few hundred bytes)
_ECHO_MAX_PDU = 65536


@attrs.frozen
class EchoResult:
    success: bool
    latency_ms: float | None
    error: str | None


async def echo(peer: Peer, calling_ae: str, *, timeout: float = 10.0) -> EchoResult:  # noqa: ASYNC109
    """C-ECHO `peer`; latency covers connect, association, the echo itself and release."""
    start = trio.current_time()
    t: Transport | None = None
    try:
        with trio.fail_after(timeout):
            try:
                t = await _connect(peer, timeout)
                ctx = P.ProposedContext(
                    1, dimse.VERIFICATION_SOP_CLASS, (IMPLICIT_VR_LE, EXPLICIT_VR_LE)
                )
                accept = await _associate(t, peer, calling_ae, [ctx], _ECHO_MAX_PDU, timeout)
                if not any(r.result == P.PC_ACCEPTANCE for r in accept.contexts):
                    await _send_abort(t)
                    return EchoResult(False, None, "verification presentation context refused")
                await t.send_all(
                    P.encode_command_pdus(1, dimse.encode_c_echo_rq(1), accept.max_pdu)
                )
                status: int | None = None
                assembler = MessageAssembler()
                while status is None:
                    pdu_type, body = await t.read_pdu(read_limit(_ECHO_MAX_PDU))
                    if pdu_type != P.P_DATA_TF:
                        return EchoResult(
                            False, None, f"unexpected PDU 0x{pdu_type:02X} in reply to C-ECHO"
                        )
                    with memoryview(body) as mv:
                        for context_id, mch, data in P.iter_pdvs(mv):
                            part = assembler.feed(context_id, mch, data)
                            if isinstance(part, CommandSet):
                                rsp = part.command
                                status = rsp.status if rsp.status is not None else 0xC000
                latency = (trio.current_time() - start) * 1000
                await t.send_all(P.RELEASE_RQ_BYTES)
                with trio.move_on_after(min(timeout, 2.0)):
                    await t.read_pdu(read_limit(_ECHO_MAX_PDU))
                if status != 0:
                    return EchoResult(False, latency, f"C-ECHO status 0x{status:04X}")
                return EchoResult(True, latency, None)
            except _Failed as f:
                if t is not None and f.abort:
                    await _send_abort(t)
                return EchoResult(False, None, getattr(f.outcome, "reason", str(f.outcome)))
            except PeerClosed as exc:
                return EchoResult(False, None, f"echo failed: {exc}")
            except (P.PduError, dimse.CommandDecodeError) as exc:
                if t is not None:
                    await _send_abort(t)
                return EchoResult(False, None, f"echo failed: {exc}")
    except trio.TooSlowError:
        if t is not None:
            await _send_abort(t)
        return EchoResult(False, None, f"no C-ECHO response within {timeout}s")
    finally:
        if t is not None:
            await t.aclose()
