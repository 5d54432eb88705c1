"""The real Sender: node actors deliver through the Trio-native DICOM requestor."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from capacitor_trio.dicom import requestor
from capacitor_trio.dicom.requestor import EchoResult, OutgoingInstance, Peer, SendOptions
from capacitor_trio.domain.outcomes import Outcome


class DicomSender:
    async def send_batch(
        self,
        peer: Peer,
        instances: Sequence[OutgoingInstance],
        options: SendOptions,
        on_outcome: Callable[[int, Outcome], None],
    ) -> None:
        await requestor.send_batch(peer, instances, options, on_outcome)

    async def echo(self, peer: Peer, calling_ae: str, *, timeout: float = 10) -> EchoResult:  # noqa: ASYNC109
        return await requestor.echo(peer, calling_ae, timeout=timeout)
