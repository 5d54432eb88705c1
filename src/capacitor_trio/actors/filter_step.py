"""The filter chain (`filters:` in config.yml) as the first step of a node's prepare stage.

`FilterStep.run` runs `domain.filters.run_chain` on one item in a worker thread (`in_worker`)
and translates its `ChainOutcome` into the seam's `StepResult`: a failure asks for a retry or
fails the item, a removal drops it (its added destinations stand), changed attributes make a
prepared copy, and the sort key becomes bytes the index orders (`domain.prepare.sort_bytes`).
A route's save_file copies are written by `SaveFiles` (temporary file, fsync, rename: a reader
of the target directory never sees half a file).
"""

from __future__ import annotations

import datetime
import io
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import attrs
import pydicom
from pydicom.dataset import Dataset

from capacitor_trio.actors.prepare_steps import PrepareSubject, StepResult, Verdict, in_worker
from capacitor_trio.config.models import Config
from capacitor_trio.domain.anonymize import MemoryPseudonyms, PseudonymStore
from capacitor_trio.domain.filtering import TagChange
from capacitor_trio.domain.filters import ChainContext, ChainOutcome, FilterChain, run_chain
from capacitor_trio.domain.prepare import sort_bytes
from capacitor_trio.domain.sort import SortDirection, SortKey
from capacitor_trio.pseudonyms import CsvPseudonyms


@attrs.frozen
class SaveFiles:
    """A route's save_file: `ds` as a Part 10 file at `target` (a relative one is taken from
    `root`, the directory of the filter files), its directory made if needed, written to a
    temporary name beside it, fsync'd and renamed (an existing file is replaced)."""

    root: Path

    def save_file(self, target: Path, ds: Dataset) -> None:
        target = self.root / Path(target).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            with open(temp, "wb") as f:
                pydicom.dcmwrite(f, ds, enforce_file_format=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise


def key_bytes(key: SortKey | None) -> bytes | None:
    """The index's form of a sort key; None for none or an absent tag (such items go last)."""
    if key is None or key.missing:
        return None
    return sort_bytes(key.value, descending=key.rule.direction is SortDirection.DESC)


def step_result(outcome: ChainOutcome) -> StepResult:
    """The seam's form of what the chain decided for one item."""
    common: dict[str, Any] = dict(
        add_destinations=outcome.add_destinations,
        sort_key=key_bytes(outcome.sort_key),
        decisions=outcome.decisions,
        routes=True,
        changes=outcome.changes,
        saved_files=tuple(str(p) for p in outcome.saved),
    )
    if outcome.failure is not None:
        verdict = Verdict.RETRY if outcome.failure.retry else Verdict.FAIL
        return StepResult(verdict, message=outcome.failure.message, decisions=outcome.decisions)
    if not outcome.keep:
        return StepResult(Verdict.DROP, message="removed by a filter", **common)
    return StepResult(Verdict.CHANGED if outcome.changes else Verdict.KEEP, **common)


@attrs.frozen
class FilterStep:
    """The loaded chain, run per item for the item's destination."""

    chain: FilterChain
    pseudonyms: PseudonymStore | None
    #: the time the chain's tokens (:today:, :timestamp:) read, in the router's zone
    now: Callable[[], datetime.datetime]
    effects: SaveFiles
    name: str = "filters"

    async def run(self, subject: PrepareSubject, ds: Dataset) -> StepResult:
        return await in_worker(self.run_sync, subject, ds)

    def run_sync(self, subject: PrepareSubject, ds: Dataset) -> StepResult:
        """The chain on one item, in the calling thread (CPU, and save_file's writes)."""
        ctx = ChainContext(
            subject.source_ae, subject.destination.ae_title, self.now(), self.pseudonyms,
            added_by_route=subject.added,
        )
        return step_result(run_chain(self.chain, ds, ctx, self.effects))


#: one pseudonym store per directory of mapping files, shared by every node's step (it keeps
#: the mapping files' contents and serialises their appends)
_pseudonyms: dict[Path, CsvPseudonyms] = {}


def chain_of(config: Config) -> FilterChain:
    """The filter chain in force with `config` (config/ loaded it with the configuration)."""
    return config.filter_chain


def filter_step(config: Config, clock: Callable[[], float]) -> FilterStep | None:
    """The step that runs `config`'s filter chain, its `now` read from `clock` (wall seconds) in
    the router's time zone; None when the chain is empty."""
    chain = chain_of(config)
    if chain.is_empty:
        return None
    root = config.data_dir
    if root not in _pseudonyms:
        _pseudonyms[root] = CsvPseudonyms(root)
    zone = ZoneInfo(config.time_zone) if config.time_zone else None
    return FilterStep(
        chain, _pseudonyms[root], lambda: datetime.datetime.fromtimestamp(clock(), zone).astimezone(zone),
        SaveFiles(root),
    )


# ---- trying the chain on a file: `capacitor-trio filter-test` and POST /api/filters/test ------


@attrs.define
class DryRunSaves:
    """save_file in a test: records the targets, writes nothing."""

    root: Path
    targets: list[Path] = attrs.field(factory=list)

    def save_file(self, target: Path, ds: Dataset) -> None:
        self.targets.append(self.root / Path(target).expanduser())


@attrs.frozen
class DestinationTrial:
    """What the chain decided for one destination of a file under test."""

    destination: str
    #: "kept", "changed", "dropped", "retry" or "failed"
    verdict: str
    add_destinations: tuple[str, ...]
    saved_files: tuple[str, ...]
    changes: tuple[TagChange, ...]
    sort_key: str | None
    message: str
    decisions: tuple[str, ...]
    #: the Part 10 bytes the destination would get (None when dropped or not prepared)
    output: bytes | None = attrs.field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "verdict": self.verdict,
            "addDestinations": list(self.add_destinations),
            "savedFiles": list(self.saved_files),
            "changes": [
                {"tag": f"{c.tag >> 16:04X},{c.tag & 0xFFFF:04X}", "keyword": c.keyword,
                 "before": c.before, "after": c.after}
                for c in self.changes
            ],
            "sortKey": self.sort_key,
            "message": self.message,
            "decisions": list(self.decisions),
        }


_VERDICT_WORDS = {
    Verdict.KEEP: "kept", Verdict.CHANGED: "changed", Verdict.DROP: "dropped",
    Verdict.RETRY: "retry", Verdict.FAIL: "failed",
}


def try_chain(
    chain: FilterChain, data: bytes, *, source_ae: str, destination_ae: str, root: Path,
    now: datetime.datetime,
) -> list[DestinationTrial]:
    """Run `chain` on the Part 10 `data` for `destination_ae` as the router would, then for each
    destination it adds (whose items pass the chain for their own destination, the route filter
    left out, as the router prepares them). Nothing is written: save_file targets are reported, and
    anonymize uses a throwaway pseudonym mapping (the pseudonyms shown are not the ones the
    router assigns; its mapping files are left alone). Raises ValueError for bytes pydicom cannot
    read."""
    pseudonyms = MemoryPseudonyms()
    trials = [_trial(chain, data, source_ae, destination_ae, root, now, pseudonyms, follow=True)]
    for added in trials[0].add_destinations:
        if added != destination_ae:
            trials.append(_trial(chain, data, source_ae, added, root, now, pseudonyms, follow=False))
    return trials


def _trial(
    chain: FilterChain, data: bytes, source_ae: str, destination_ae: str, root: Path,
    now: datetime.datetime, pseudonyms: PseudonymStore, *, follow: bool,
) -> DestinationTrial:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise ValueError(f"not a DICOM file pydicom can read: {exc}") from exc
    saves = DryRunSaves(root)
    ctx = ChainContext(source_ae, destination_ae, now, pseudonyms, added_by_route=not follow)
    outcome = run_chain(chain, ds, ctx, saves)
    result = step_result(outcome)
    output = None
    if result.verdict is Verdict.KEEP:
        output = data
    elif result.verdict is Verdict.CHANGED:
        buf = io.BytesIO()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        output = buf.getvalue()
    key = outcome.sort_key
    return DestinationTrial(
        destination=destination_ae,
        verdict=_VERDICT_WORDS[result.verdict],
        add_destinations=result.add_destinations if follow else (),
        saved_files=tuple(str(t) for t in saves.targets),
        changes=outcome.changes if result.verdict in (Verdict.KEEP, Verdict.CHANGED, Verdict.DROP) else (),
        sort_key=None if key is None else ("(tag absent: last)" if key.missing else str(key.value)),
        message=result.message,
        decisions=tuple(d.text for d in outcome.decisions),
        output=output,
    )


def trial_text(trials: list[DestinationTrial]) -> str:
    """The filter-test report for a terminal."""
    lines: list[str] = []
    for t in trials:
        lines.append(f"destination {t.destination}: {t.verdict}" + (f" ({t.message})" if t.message else ""))
        lines += [f"  adds destination {a}" for a in t.add_destinations]
        lines += [f"  would save {s}" for s in t.saved_files]
        for c in t.changes:
            tag = f"({c.tag >> 16:04X},{c.tag & 0xFFFF:04X})"
            name = f"{tag} {c.keyword}".rstrip()
            lines.append(f"  {name}: {_shown(c.before)} -> {_shown(c.after)}")
        if t.sort_key is not None:
            lines.append(f"  sort key {t.sort_key}")
        lines += [f"  log: {d}" for d in t.decisions]
    return "\n".join(lines)


def _shown(value: str | None) -> str:
    return "(absent)" if value is None else repr(value)
