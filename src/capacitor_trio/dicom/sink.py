"""What the acceptor is configured with and hands over: `AcceptorConfig`, the `InstanceSink`
protocol the router implements (called-AE check, admission, temporary paths, the received
instance), `ReceivedInstance`, and the two exceptions a sink raises to refuse an instance
(`OutOfResources` -> 0xA700, `CannotProcess` -> 0xC000-class).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs

from capacitor_trio.domain.instance import InstanceHeader

from .part10 import HeaderLimits


@attrs.frozen
class AcceptorConfig:
    ae_title: str = "CAPACITOR"
    host: str = "0.0.0.0"
    port: int = 1040
    max_pdu_size: int = 1_048_576
    max_clients: int = 0  # 0 = unlimited; counts associations, not connections
    #: connections reading their A-ASSOCIATE-RQ at once (more wait their turn, unread), and
    #: connections waiting for the peer to close after our last PDU (see listener.py's `_Connections`)
    max_unassociated: int = 64
    #: bytes held, over all the listener's connections, in buffers of PDUs not received whole
    #: yet (0: no limit); a connection whose PDU would take more is aborted (transport.py's
    #: `BufferBudget`). 128 MiB: with the router's own ~90 MB, under the 300 MB that hostile
    #: peers may take (docs/reliability.md), and room for 64 associations mid-PDU at 1 MiB
    max_buffered_bytes: int = 128 << 20
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
    #: called with (calling AE, called AE) as each association is accepted (the metrics)
    on_accepted: Callable[[str, str], None] | None = attrs.field(default=None, eq=False)


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
