"""Trio-native DICOM upper layer: associations, C-ECHO and C-STORE as acceptor and requestor.

See acceptor.py and requestor.py for the theory of operation. pynetdicom supplies the
association PDU codec; the hot path (P-DATA framing, C-STORE/C-ECHO command sets) is hand-written
in pdu.py and dimse.py. Statuses become outcome values here (status.py).
"""

from .acceptor import (
    AcceptorConfig,
    CannotProcess,
    InstanceSink,
    OutOfResources,
    ReceivedInstance,
    handle_association,
)
from .listener import serve_acceptor
from .requestor import EchoResult, OutgoingInstance, Peer, SendOptions, echo, send_batch

__all__ = [
    "AcceptorConfig",
    "CannotProcess",
    "EchoResult",
    "InstanceSink",
    "OutOfResources",
    "OutgoingInstance",
    "Peer",
    "ReceivedInstance",
    "SendOptions",
    "echo",
    "handle_association",
    "send_batch",
    "serve_acceptor",
]
