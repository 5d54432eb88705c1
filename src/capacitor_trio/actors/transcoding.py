"""The transcoding step of a node's prepare stage (issue 22): a node with a TransferSyntax (its
own, else `defaultTransferSyntax`) gets a prepared copy of each instance in that syntax.

The step runs after the filter chain (actors/prepare_steps.py, `steps_for`). It writes the data
set as the earlier steps left it to a scratch file (a worker thread; with no step before it, a
received instance in a spool file is converted from there), converts it in the router's
transcode worker processes (transcode/pool.py: bounded, cancellable; receiving never waits for
them), and hands the converted file over as it is (`StepResult.file`: the step is the last that
changes the instance): the store adopts it as the item's prepared copy (fsync'd, renamed into
the spool) in the same transaction that marks the item prepared, so a large multi-frame is never
read into the router, whole or in copies (the codec converts it a frame at a time). Until then
the item stays `new`: a copy in progress when the router is killed is made again on restart, no
half-made copy can be sent, and the scratch files of a process that no longer runs are removed
(dicom/conversion.py's `scratch_file`).
The received instance stays as it came; the node's other items, and other nodes, are untouched.

An instance that cannot be converted into the node's syntax (no codec decodes its syntax, or
the codec refuses this image: 16-bit data for an 8-bit JPEG syntax, say) is prepared as
received, with a WARNING naming the instance, the syntaxes and the reason: delivery then finds
a way as for any instance (docs/behaviour.md, "Transfer syntaxes"), so an instance is never
held back by a setting meant to save bandwidth. Each node's conversions, failures and their
time are counted (`ConversionStats`, shown by `GET /api/metrics`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import attrs
from pydicom.dataset import Dataset

from capacitor_trio.actors.prepare_steps import PrepareSubject, StepResult, Verdict, in_worker
from capacitor_trio.config.models import Config, Node, effective
from capacitor_trio.dicom.conversion import Transcoder, scratch_file
from capacitor_trio.domain.outcomes import SendConversion

log = logging.getLogger("capacitor_trio.prepare")


@attrs.define
class ConversionStats:
    """One node's conversions since the router started (kept across actor restarts): its
    prepared copies' (this step), and those on the way out (counted from the send outcomes the
    node records, actors/sending.py)."""

    conversions: int = 0
    #: instances that could not be converted (prepared as received)
    failed: int = 0
    #: seconds the conversions took, end to end (the data set written out if needed, converted)
    seconds: float = 0.0
    #: instances delivered converted on the way out (the destination accepted none of the
    #: syntaxes they were stored in)
    on_send: int = 0
    #: instances rejected because their conversion on the way out failed
    on_send_failed: int = 0

    def as_json(self) -> dict[str, float | int]:
        return {
            "conversions": self.conversions, "failed": self.failed, "seconds": round(self.seconds, 3),
            "onSend": self.on_send, "onSendFailed": self.on_send_failed,
        }

    def count_on_send(self, result: SendConversion) -> None:
        """Count a conversion on the way out that a recorded send outcome reports."""
        if result == "converted":
            self.on_send += 1
        elif result == "failed":
            self.on_send_failed += 1


@attrs.define(eq=False)
class TranscodeStep:
    """`PrepareStep`: the prepared copy in `target` (a transfer syntax UID)."""

    target: str
    transcoder: Transcoder
    scratch_dir: Path
    stats: ConversionStats
    #: no step runs before this one: the data set is the received instance, so a spool file is
    #: converted as it lies (not written out again first)
    first: bool = False
    name: str = "transcode"

    async def run(self, subject: PrepareSubject, ds: Dataset) -> StepResult:
        from capacitor_trio.transcode import codec

        source = str(ds.file_meta.get("TransferSyntaxUID", subject.received_syntax))
        if source == self.target:
            return StepResult()
        if not codec.can_convert(source, self.target):
            return self._as_received(subject, source, "no installed codec converts between them")
        started = time.perf_counter()
        with scratch_file(self.scratch_dir) as src, scratch_file(self.scratch_dir) as dst:
            if self.first and subject.received_path is not None:
                src = subject.received_path
            else:
                await in_worker(_write, ds, src)
            try:
                done = await self.transcoder.convert(src, dst, self.target)
            except codec.TranscodeError as exc:
                return self._as_received(subject, source, str(exc))
            # handed over: a name the scratch context leaves alone, still swept after a crash
            handed = dst.with_name(f"{dst.stem}-copy.part")
            os.rename(dst, handed)
        self.stats.conversions += 1
        self.stats.seconds += time.perf_counter() - started
        return StepResult(Verdict.CHANGED, file=handed, transfer_syntax=done.transfer_syntax_uid)

    def _as_received(self, subject: PrepareSubject, source: str, why: str) -> StepResult:
        self.stats.failed += 1
        log.warning(
            "node %s: %s cannot be converted from %s into %s (%s); it is sent as received",
            subject.destination.ae_title, subject.sop_instance_uid, source, self.target, why,
        )
        return StepResult()


@attrs.frozen
class TranscodeContext:
    """What a node's transcoding step needs from the router: its transcode pool, where scratch
    files go, and the node's counts."""

    transcoder: Transcoder
    scratch_dir: Path
    stats: ConversionStats


def transcode_step(
    node: Node, config: Config, context: TranscodeContext, *, first: bool = False
) -> TranscodeStep | None:
    """The node's transcoding step under `config`: None when its TransferSyntax (its own, else
    defaultTransferSyntax) is blank (instances keep the syntax they arrived in). `first`: no
    step runs before it."""
    target = effective(node, config).transfer_syntax
    if not target:
        return None
    return TranscodeStep(target, context.transcoder, context.scratch_dir, context.stats, first)


def _write(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)
