"""Property test: any sequence of transitions keeps the index, the files and a model in agreement.

The store runs on a Trio loop in a helper thread; hypothesis drives it from the test thread with
`trio.from_thread.run`.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from capacitor_trio.domain.instance import Destination
from capacitor_trio.store import (
    STATES,
    ItemCheckedOut,
    ItemFilter,
    Store,
    TransitionError,
    open_store,
)

from .util import FakeClock, header, incoming_leftovers, spool_files, write_temp

DESTS = [Destination("PACS"), Destination("AI"), Destination("PACS", "QueryRetrieve")]
SERIES = ["S1", "S2", "S3"]


class LoopThread:
    """A Trio run in a background thread that sync code can call into."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        self._ready.wait()

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        self._ready.set()
        await self._stop.wait()

    def run(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return trio.from_thread.run(afn, *args, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join()


@attrs.define
class M:
    """The model of one item."""

    state: str
    checked_out: bool
    dest: Destination
    series: str
    created_at: float
    next_attempt_at: float | None = None
    instance: int = 0


LOOP: LoopThread | None = None


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert LOOP is not None
        self.loop = LOOP
        self.dir = Path(tempfile.mkdtemp(prefix="store-sm-"))
        self.clock = FakeClock(1000.0)
        self.items: dict[int, M] = {}
        self.instances = 0
        self.stack: AsyncExitStack | None = None
        self.store: Store
        self._open()

    def _open(self) -> None:
        self.stack = AsyncExitStack()
        self.store = self.loop.run(
            self.stack.enter_async_context, open_store(self.dir, durable=False, clock=self.clock)
        )

    def _close(self) -> None:
        assert self.stack is not None
        self.loop.run(self.stack.aclose)
        self.stack = None

    def teardown(self) -> None:
        if self.stack is not None:
            self._close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def call(self, name: str, *args: Any, **kw: Any) -> Any:
        fn = getattr(self.store, name)

        async def go() -> Any:
            return await fn(*args, **kw)

        return self.loop.run(go)

    def ids(self, pred: Callable[[M], bool]) -> list[int]:
        return sorted(i for i, m in self.items.items() if pred(m))

    def eligible(self, dest: Destination, now: float) -> list[int]:
        ok = [
            i
            for i, m in self.items.items()
            if m.dest == dest
            and not m.checked_out
            and (
                m.state == "prepared"
                or (
                    m.state == "failed"
                    and m.next_attempt_at is not None
                    and m.next_attempt_at <= now
                )
            )
        ]
        return sorted(ok, key=lambda i: (self.items[i].created_at, i))

    @initialize()
    def start(self) -> None:
        pass

    # -- intake and delivery path --------------------------------------------------------------

    @rule(
        dests=st.lists(st.sampled_from(DESTS), min_size=1, max_size=3, unique=True),
        series=st.sampled_from(SERIES),
        state=st.sampled_from(["new", "prepared"]),
        tick=st.sampled_from([0.0, 1.0, 30.0]),
        size=st.sampled_from([100, 40_000]),  # kept in the index / in a spool file
    )
    def commit(
        self, dests: list[Destination], series: str, state: str, tick: float, size: int
    ) -> None:
        self.clock.advance(tick)
        temp = write_temp(self.store, b"d" * size)
        ids = self.call("commit_instance", temp, header(series=series), "MOD", dests, state=state)
        assert len(ids) == len(dests)
        self.instances += 1
        for i, d in zip(ids, dests, strict=True):
            self.items[i] = M(state, False, d, series, self.clock.now, instance=self.instances)

    @rule(age=st.sampled_from([0.0, 10.0, 100.0]))
    def prepare(self, age: float) -> None:
        expect = self.ids(
            lambda m: (
                m.state == "new" and not m.checked_out and m.created_at <= self.clock.now - age
            )
        )
        assert self.call("prepare_ripe", self.clock.now, age) == len(expect)
        for i in expect:
            self.items[i].state = "prepared"

    @rule(
        dest=st.sampled_from(DESTS),
        limit=st.integers(1, 4),
        by_series=st.booleans(),
        ahead=st.sampled_from([0.0, 100.0]),
    )
    def checkout(self, dest: Destination, limit: int, by_series: bool, ahead: float) -> None:
        now = self.clock.now + ahead
        eligible = self.eligible(dest, now)
        got = [
            i.id
            for i in self.call("checkout_batch", dest, now=now, limit=limit, by_series=by_series)
        ]
        if by_series and eligible:
            series = self.items[eligible[0]].series
            eligible = [i for i in eligible if self.items[i].series == series]
        assert got == eligible[:limit]
        for i in got:
            self.items[i].checked_out = True

    @rule(
        dest=st.sampled_from(DESTS),
        outcomes=st.lists(
            st.sampled_from(["delivered", "fail", "fail-park", "reject", "release", "keep"]),
            min_size=1,
            max_size=4,
        ),
    )
    def deliver_round(self, dest: Destination, outcomes: list[str]) -> None:
        """What a node actor does: prepare, check out a batch, settle each item."""
        self.prepare(0.0)
        now = self.clock.now
        expected = self.eligible(dest, now)[: len(outcomes)]
        got = [i.id for i in self.call("checkout_batch", dest, now=now, limit=len(outcomes))]
        assert got == expected
        for i, outcome in zip(got, outcomes, strict=False):
            m = self.items[i]
            if outcome == "delivered":
                self.call("delivered", [i])
                del self.items[i]
            elif outcome == "release":
                self.call("release", [i])
            elif outcome == "reject":
                self.call("reject", i, "refused")
                m.state, m.next_attempt_at = "rejected", None
            elif outcome == "keep":
                m.checked_out = True
            else:
                nxt = None if outcome == "fail-park" else now + 50
                self.call("fail", i, "down", nxt)
                m.state, m.next_attempt_at = "failed", nxt

    @precondition(lambda self: any(m.checked_out for m in self.items.values()))
    @rule(
        data=st.data(),
        outcome=st.sampled_from(["delivered", "fail", "fail-park", "reject", "release"]),
    )
    def finish(self, data: st.DataObject, outcome: str) -> None:
        co = self.ids(lambda m: m.checked_out)
        picked = data.draw(st.lists(st.sampled_from(co), min_size=1, unique=True))
        if outcome == "delivered":
            self.call("delivered", picked)
            for i in picked:
                del self.items[i]
        elif outcome == "release":
            self.call("release", picked)
            for i in picked:
                self.items[i].checked_out = False
        else:
            for i in picked:
                m = self.items[i]
                if outcome == "reject":
                    self.call("reject", i, "refused")
                    m.state, m.next_attempt_at = "rejected", None
                else:
                    nxt = None if outcome == "fail-park" else self.clock.now + 50
                    self.call("fail", i, "down", nxt)
                    m.state, m.next_attempt_at = "failed", nxt
                m.checked_out = False

    # -- operator transitions --------------------------------------------------------------------

    @precondition(lambda self: bool(self.items))
    @rule(
        data=st.data(), op=st.sampled_from(["move", "retry", "delete"]), to=st.sampled_from(STATES)
    )
    def operator(self, data: st.DataObject, op: str, to: str) -> None:
        target = to
        i = data.draw(st.sampled_from(sorted(self.items)))
        m = self.items[i]
        try:
            if op == "move":
                item = self.call("move", i, target)
                assert item.state == target
            elif op == "retry":
                item = self.call("retry", i)
                assert item.state == "new"
            else:
                self.call("delete", i)
        except ItemCheckedOut:
            assert m.checked_out
            return
        except TransitionError:
            assert op == "retry" and m.state not in ("failed", "rejected")
            return
        assert not m.checked_out
        if op == "delete":
            del self.items[i]
        elif op == "retry":
            m.state, m.next_attempt_at = "new", None
        else:
            m.state = target
            m.next_attempt_at = self.clock.now if target == "failed" else None

    @rule(
        state=st.sampled_from([None, *STATES]),
        dest=st.sampled_from([None, *DESTS]),
        op=st.sampled_from(["move", "delete", "retry"]),
        to=st.sampled_from(STATES),
    )
    def bulk(self, state: str | None, dest: Destination | None, op: str, to: str) -> None:
        target = to
        f = ItemFilter(
            state=state,
            destination=dest.ae_title if dest else None,
            role=dest.role if dest else None,
        )

        def match(m: M) -> bool:
            return (
                not m.checked_out
                and (state is None or m.state == state)
                and (dest is None or m.dest == dest)
            )

        if op == "retry":
            src = target if target in ("failed", "rejected") else "failed"
            hit = self.ids(lambda m: match(m) and m.state == src)
            assert self.call("retry_where", f, src) == len(hit)
            for i in hit:
                self.items[i].state, self.items[i].next_attempt_at = "new", None
        elif op == "move":
            hit = self.ids(match)
            assert self.call("move_where", f, target) == len(hit)
            for i in hit:
                self.items[i].state = target
                self.items[i].next_attempt_at = self.clock.now if target == "failed" else None
        else:
            hit = self.ids(match)
            assert self.call("delete_where", f) == len(hit)
            for i in hit:
                del self.items[i]

    @rule(threshold=st.sampled_from([0.0, 20.0, 60.0]))
    def expire(self, threshold: float) -> None:
        now = self.clock.now
        hit = self.ids(
            lambda m: (
                not m.checked_out
                and m.state in ("new", "prepared", "failed")
                and m.created_at < now - threshold
            )
        )
        assert self.call("expire", now, threshold) == len(hit)
        for i in hit:
            self.items[i].state, self.items[i].next_attempt_at = "expired", None

    @rule()
    def restart(self) -> None:
        self._close()
        self._open()
        for m in self.items.values():
            m.checked_out = False

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def index_files_and_model_agree(self) -> None:
        items, total = self.call("list_items", ItemFilter(), limit=10_000)
        assert total == len(self.items)
        assert {
            i.id: (i.state, i.checked_out, Destination(i.destination_ae, i.destination_role))
            for i in items
        } == {i: (m.state, m.checked_out, m.dest) for i, m in self.items.items()}
        # every item points at an existing file or its bytes in the index; every file has an
        # item; one file or one stored copy per instance
        referenced = {i.path for i in items if not i.inline}
        assert all(p.exists() for p in referenced)
        assert spool_files(self.dir) == referenced
        inline = {i.instance_id for i in items if i.inline}
        assert all(self.call("read_inline", iid) == b"d" * 100 for iid in inline)
        assert self.call("_read", lambda c: c.execute("SELECT COUNT(*) FROM blobs").fetchone()[0]) == len(inline)
        assert len(referenced) + len(inline) == len({m.instance for m in self.items.values()})
        assert incoming_leftovers(self.dir / "incoming") == []
        counts = self.call("counts")
        for s in STATES:
            assert getattr(counts, s) == sum(1 for m in self.items.values() if m.state == s)
        assert counts.checked_out == sum(m.checked_out for m in self.items.values())
        assert counts.total == len(self.items)


@pytest.fixture(scope="module")
def loop_thread() -> Any:
    global LOOP
    LOOP = LoopThread()
    yield LOOP
    LOOP.close()
    LOOP = None


def test_store_state_machine(loop_thread: LoopThread) -> None:
    StoreMachine.TestCase.settings = settings(
        max_examples=100,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    StoreMachine.TestCase().runTest()
