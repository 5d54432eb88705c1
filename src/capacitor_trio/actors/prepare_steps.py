"""The per-item prepare stage's seam: the steps a node's preparer runs on each ripe item.

A node whose prepare stage has steps (its filter chain, its transcoding) prepares item by item:
for each ripe `new` item the preparer parses the instance once (off the event loop), then runs
the node's steps in order, each given the item's identity (`PrepareSubject`) and the data set as
the earlier steps left it. Each step says what it decided in a `StepResult`:

* ``KEEP``: nothing to change (the item may still get added destinations and a sort key);
* ``CHANGED``: the step changed the data set (in place, or returns a new one in `dataset`):
  the item gets a prepared copy of its own, written in `transfer_syntax` if the step gives one,
  else in the data set's own syntax; the received instance stays as it came for the other
  destinations. A step may instead hand over the finished copy as a file (`file`: a complete
  Part 10 file in `transfer_syntax`, made off the event loop, e.g. by a worker process; a
  converted 300 MB multi-frame is then never read into the router): the store adopts that file
  as it is (store/preparation.py). Such a step must be the last that changes the instance (the
  transcoding step is); a file no plan keeps is removed;
* ``DROP``: the item goes (a route's drop or RemoveOriginal, dropUnfilteredInstances); the
  destinations it added are still added;
* ``RETRY``: the item stays `new` with `message` as its lastError and is prepared again (from
  the received bytes) after a delay; nothing else it decided is applied;
* ``FAIL``: the item becomes `failed` with `message` as its lastError; nothing else applied.

A DROP, RETRY or FAIL ends the item's run: later steps do not see it. `add_destinations` from
every step that ran are gathered (AE titles of other Storage nodes; they get items of their own,
sharing the received instance, which go through their own node's prepare stage); the last
`sort_key` given wins. `decisions` are the per-instance log lines (domain/filtering.py's
`Decision`), logged by the preparer at their level. A step that routes (`routes`: the filter
chain) has its decision recorded in the audit trail once applied: the item kept or dropped, the
destinations it added, the files it saved (`saved_files`) and its attribute changes (`changes`).

Steps run their CPU work (parsing, filters, writing) off the event loop: in a worker thread
under `CPU_LIMITER` (`in_worker`), or in worker processes (transcoding) behind the same `run`.
`combine` folds the results into an `ItemPlan`, the pure part the tests pin down; the preparer
(actors/prepare.py) turns a plan into a store `Preparation` and applies a batch of them in one
transaction.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

import attrs
import trio
from pydicom.dataset import Dataset

from capacitor_trio.config.models import Config, Node, effective
from capacitor_trio.domain.filtering import Decision, TagChange
from capacitor_trio.domain.instance import Destination
from capacitor_trio.limiter import run_var_limiter

if TYPE_CHECKING:
    from capacitor_trio.actors.transcoding import TranscodeContext

T = TypeVar("T")

#: Worker threads the prepare stages of all nodes use at once for CPU work (parsing, filters,
#: writing copies): two cores are shared with receiving and sending, so a few are enough.
CPU_LIMITER_THREADS = 2
#: the prepare stages' limiter of this Trio run
cpu_limiter = run_var_limiter("capacitor_trio_prepare_cpu", CPU_LIMITER_THREADS)


async def in_worker(fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` in a worker thread under the prepare stages' CPU limiter. Not abandoned
    on cancel: the step's work completes, its result is dropped."""
    return await trio.to_thread.run_sync(fn, *args, limiter=cpu_limiter())


class Verdict(enum.Enum):
    """What a step decided for the item (see the module docstring)."""

    KEEP = "keep"
    CHANGED = "changed"
    DROP = "drop"
    RETRY = "retry"
    FAIL = "fail"


#: the verdicts that end an item's run
FINAL = frozenset({Verdict.DROP, Verdict.RETRY, Verdict.FAIL})
#: the lastError of an item whose instance a step changed after another finished its copy
LATE_CHANGE = "a prepare step changed the instance after its copy was finished"


@attrs.frozen
class PrepareSubject:
    """The item a step prepares: its identity, never its bytes (those are the data set)."""

    item_id: int
    destination: Destination
    source_ae: str
    sop_instance_uid: str
    #: the transfer syntax the instance was received in
    received_syntax: str
    #: this item was created by another item's add_destination: the preparer does not follow
    #: the add_destination actions of its own run (no routing loops; docs/behaviour.md)
    added: bool = False
    #: the received instance's spool file, for a step that works on the file (a worker process
    #: converting it); None when its bytes are kept in the index. Never written to: it is
    #: shared with the other destinations' items.
    received_path: Path | None = None


@attrs.frozen
class StepResult:
    """One step's decision for one item."""

    verdict: Verdict = Verdict.KEEP
    #: CHANGED: the new data set when the step did not change the given one in place
    dataset: Dataset | None = attrs.field(default=None, eq=False, repr=False)
    #: CHANGED: the transfer syntax UID the prepared copy is written in (None: the data set's)
    transfer_syntax: str | None = None
    #: CHANGED: the finished copy as a file (its ownership passes with the result; see above)
    file: Path | None = None
    #: AE titles of further Storage nodes that get the instance
    add_destinations: tuple[str, ...] = ()
    #: the item's place in its series' delivery order (smaller first; bytes compare
    #: lexicographically in the index); None: this step says nothing about it
    sort_key: bytes | None = None
    #: RETRY / FAIL: the item's lastError; DROP: why, for the log (no patient data)
    message: str = ""
    decisions: tuple[Decision, ...] = ()
    #: this step routes (the filter chain): its decision goes to the audit trail
    routes: bool = False
    #: the attribute changes the step made, for the audit trail
    changes: tuple[TagChange, ...] = ()
    #: the copies the step saved (save_file), for the audit trail
    saved_files: tuple[str, ...] = ()


class PrepareStep(Protocol):
    """One step of a node's per-item prepare stage (the filter chain, transcoding)."""

    @property
    def name(self) -> str:
        """Short name for log lines and errors ("filters", "transcode")."""
        ...

    async def run(self, subject: PrepareSubject, ds: Dataset) -> StepResult:
        """Decide for one item; CPU work off the event loop (`in_worker`, or a process pool).
        May change `ds` in place (then returns CHANGED). An exception fails the item alone
        (its lastError names the step)."""
        ...


@runtime_checkable
class CpuStep(Protocol):
    """A step whose work is CPU only (no waiting on anything): it can also decide in the worker
    thread that read the item. When every step of a node is one, the preparer reads the
    instance, runs the steps and writes the prepared copy in one worker thread call per item
    (`run_steps_sync`), instead of a hand-over to a thread for each."""

    def run_sync(self, subject: PrepareSubject, ds: Dataset) -> StepResult: ...


@attrs.frozen
class ItemPlan:
    """What the steps decided for one item, folded (`combine`)."""

    verdict: Verdict
    #: CHANGED: the data set of the prepared copy, and the syntax to write it in; or the
    #: finished copy as a file (`file`, in `transfer_syntax`), which the store adopts
    dataset: Dataset | None = attrs.field(default=None, eq=False, repr=False)
    transfer_syntax: str | None = None
    file: Path | None = None
    add_destinations: tuple[str, ...] = ()
    sort_key: bytes | None = None
    message: str = ""
    decisions: tuple[Decision, ...] = ()
    #: a routing step ran (the audit trail records the plan), its changes and saved files
    routed: bool = False
    changes: tuple[TagChange, ...] = ()
    saved_files: tuple[str, ...] = ()


def combine(results: Sequence[StepResult], ds: Dataset, *, follow_adds: bool = True) -> ItemPlan:
    """Fold the results of the steps that ran (in order; the run stops after a final verdict)
    into one plan. `ds` is the data set the first step was given; `follow_adds` False drops
    add_destinations (an item created by add_destination)."""
    changed, current, syntax, file = False, ds, None, None
    adds: list[str] = []
    key: bytes | None = None
    decisions: list[Decision] = []
    routed = False
    changes: list[TagChange] = []
    saved: list[str] = []
    for r in results:
        decisions += r.decisions
        if r.verdict in (Verdict.RETRY, Verdict.FAIL):
            return ItemPlan(r.verdict, message=r.message, decisions=tuple(decisions))
        if follow_adds:
            adds += [a for a in r.add_destinations if a not in adds]
        if r.sort_key is not None:
            key = r.sort_key
        routed, changes, saved = routed or r.routes, changes + list(r.changes), saved + list(r.saved_files)
        if r.verdict is Verdict.DROP:
            return ItemPlan(
                Verdict.DROP, add_destinations=tuple(adds), message=r.message,
                decisions=tuple(decisions), routed=routed, changes=tuple(changes),
                saved_files=tuple(saved),
            )
        if r.verdict is Verdict.CHANGED:
            if file is not None:  # a step order no node has: the finished copy would be stale
                return ItemPlan(Verdict.FAIL, message=LATE_CHANGE, decisions=tuple(decisions))
            changed, file = True, r.file
            current = r.dataset if r.dataset is not None else current
            syntax = r.transfer_syntax or syntax
    return ItemPlan(
        Verdict.CHANGED if changed else Verdict.KEEP,
        dataset=current if changed and file is None else None,
        transfer_syntax=syntax,
        file=file,
        add_destinations=tuple(adds),
        sort_key=key,
        decisions=tuple(decisions),
        routed=routed,
        changes=tuple(changes),
        saved_files=tuple(saved),
    )


async def run_steps(
    steps: Sequence[PrepareStep], subject: PrepareSubject, ds: Dataset
) -> ItemPlan:
    """Run `steps` in order on one item and fold their results. A step that raises fails the
    item with a lastError naming the step (the other items go on)."""
    results: list[StepResult] = []
    current = ds
    try:
        for step in steps:
            try:
                result = await step.run(subject, current)
            except Exception as exc:  # a step's bug or I/O error fails this item, not the node
                result = _failed(step.name, exc)
            current = _record(results, result, current)
            if result.verdict in FINAL:
                break
        plan = combine(results, ds, follow_adds=not subject.added)
    except BaseException:
        await discard(_files(results))
        raise
    await discard(_files(results, plan))
    return plan


def run_steps_sync(steps: Sequence[CpuStep], names: Sequence[str], subject: PrepareSubject, ds: Dataset) -> ItemPlan:
    """`run_steps` for steps that are all `CpuStep`s, in the calling (worker) thread; `names`
    are the steps' names, for the lastError of one that raises."""
    results: list[StepResult] = []
    current = ds
    for step, name in zip(steps, names, strict=True):
        try:
            result = step.run_sync(subject, current)
        except Exception as exc:  # a step's bug fails this item, not the node
            result = _failed(name, exc)
        current = _record(results, result, current)
        if result.verdict in FINAL:
            break
    plan = combine(results, ds, follow_adds=not subject.added)
    remove_files(_files(results, plan))
    return plan


def _files(results: Sequence[StepResult], plan: ItemPlan | None = None) -> list[Path]:
    """The files steps handed over that `plan` does not keep (all of them without a plan)."""
    keep = plan.file if plan is not None else None
    return [r.file for r in results if r.file is not None and r.file != keep]


def remove_files(paths: Sequence[Path]) -> None:
    """Remove handed-over files no one keeps (those gone already are fine)."""
    for path in paths:
        path.unlink(missing_ok=True)


async def discard(paths: Sequence[Path]) -> None:
    """`remove_files` in a worker thread (a large file's unlink takes a while), shielded: it
    also runs on the way out of a cancelled item."""
    if paths:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(remove_files, list(paths))


def _failed(name: str, exc: Exception) -> StepResult:
    return StepResult(Verdict.FAIL, message=f"prepare step {name} failed: {exc}")


def _record(results: list[StepResult], result: StepResult, current: Dataset) -> Dataset:
    """Keep `result`; the data set the next step is given."""
    results.append(result)
    return result.dataset if result.verdict is Verdict.CHANGED and result.dataset is not None else current


def steps_for(
    node: Node,
    config: Config,
    transcoding: TranscodeContext | None = None,
    clock: Callable[[], float] = time.time,
) -> tuple[PrepareStep, ...]:
    """The steps `node`'s prepare stage runs under `config`, in order; empty when none applies
    (then the stage keeps its one-statement fast path: ripe items become prepared in place).
    The filter chain comes first (its tokens' `now` from `clock`, the wall clock the actors are
    given), transcoding after it (with `transcoding`: the router's transcode pool and the node's
    counts; without, none)."""
    from capacitor_trio.actors.filter_step import filter_step  # imports the filters' modules
    from capacitor_trio.actors.transcoding import transcode_step

    steps: list[PrepareStep] = []
    filters = filter_step(config, clock)
    if filters is not None:
        steps.append(filters)
    if transcoding is not None:
        transcode = transcode_step(node, config, transcoding, first=not steps)
        if transcode is not None:
            steps.append(transcode)
    return tuple(steps)


def has_steps(node: Node, config: Config) -> bool:
    """Does `node`'s prepare stage run item by item under `config`? (the receiver then commits
    its items `new` even with minimumAge 0, so that they pass the steps): a filter chain, or a
    TransferSyntax (the node's, else defaultTransferSyntax)."""
    return not config.filter_chain.is_empty or bool(effective(node, config).transfer_syntax)
