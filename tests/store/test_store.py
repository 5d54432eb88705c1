"""Unit tests of the store API: intake, the delivery path, operator transitions, reads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio.testing

from capacitor_trio.domain.instance import Destination
from capacitor_trio.store import (
    Counts,
    ItemCheckedOut,
    ItemFilter,
    ItemNotFound,
    Store,
    StoreFull,
    TransitionError,
    open_store,
)

from .util import (
    AI,
    ARCHIVE,
    CT,
    MR,
    PACS,
    SR,
    FakeClock,
    commit,
    header,
    incoming_leftovers,
    spool_files,
    write_temp,
)


async def test_commit_stores_one_file_for_many_items(store: Store, clock: FakeClock) -> None:
    temp = write_temp(store, b"x" * 1000)
    assert temp.parent == store.root / "incoming"
    h = header(study="9.1", series="9.1.1", accession="ACC9")
    ids = await store.commit_instance(temp, h, "CT1", [PACS, ARCHIVE, PACS])
    assert len(ids) == 2  # duplicate destination collapses
    assert not temp.exists()
    items = [await store.get_item(i) for i in ids]
    assert items[0].path == items[1].path and items[0].path.read_bytes() == b"x" * 1000
    assert items[0].path.is_relative_to(store.root / "spool")
    assert [i.destination_ae for i in items] == ["PACS", "ARCHIVE"]
    it = items[0]
    assert (it.state, it.checked_out, it.source_ae, it.size_bytes) == ("new", False, "CT1", 1000)
    assert (it.study_instance_uid, it.series_instance_uid, it.accession_number) == (
        "9.1",
        "9.1.1",
        "ACC9",
    )
    assert it.created_at == it.updated_at == clock.now
    assert it.attempt_count == 0 and it.next_attempt_at is None and it.last_error == ""
    # the file goes with the last item
    await store.delivered([ids[0]])
    assert items[0].path.exists()
    await store.delete(ids[1])
    assert not items[0].path.exists()
    assert (await store.counts()).total == 0


async def test_commit_requires_destination(store: Store) -> None:
    temp = write_temp(store)
    with pytest.raises(ValueError):
        await store.commit_instance(temp, header(), "CT1", [])


async def test_commit_state_prepared(store: Store) -> None:
    [i] = await store.commit_instance(write_temp(store), header(), "CT1", [PACS], state="prepared")
    assert (await store.get_item(i)).state == "prepared"


async def test_prepare_ripe_respects_minimum_age(store: Store, clock: FakeClock) -> None:
    [a] = await commit(store)
    clock.advance(10)
    [b] = await commit(store)
    assert await store.prepare_ripe(clock.now, 5) == 1
    assert (await store.get_item(a)).state == "prepared"
    assert (await store.get_item(b)).state == "new"
    assert await store.prepare_ripe(clock.now + 5, 5) == 1


async def test_checkout_fifo_and_eligibility(store: Store, clock: FakeClock) -> None:
    ids = []
    for _ in range(5):
        ids += await commit(store, [PACS, AI])
        clock.advance(1)
    await store.prepare_ripe(clock.now, 0)
    pacs_ids = ids[0::2]
    batch = await store.checkout_batch(PACS, now=clock.now, limit=2)
    assert [i.id for i in batch] == pacs_ids[:2] and all(i.checked_out for i in batch)
    # checked-out items are not eligible again
    batch2 = await store.checkout_batch(PACS, now=clock.now, limit=10)
    assert [i.id for i in batch2] == pacs_ids[2:]
    assert await store.checkout_batch(PACS, now=clock.now, limit=10) == []
    # failure with backoff: eligible again only once next_attempt_at has passed
    await store.fail(pacs_ids[0], "association refused", clock.now + 30)
    it = await store.get_item(pacs_ids[0])
    assert (it.state, it.checked_out, it.attempt_count, it.last_error) == (
        "failed",
        False,
        1,
        "association refused",
    )
    assert await store.checkout_batch(PACS, now=clock.now, limit=10) == []
    assert await store.next_eligible_at(PACS, clock.now) == clock.now + 30
    [again] = await store.checkout_batch(PACS, now=clock.now + 30, limit=10)
    assert again.id == pacs_ids[0]
    # failed without next_attempt_at is parked
    await store.fail(pacs_ids[0], "boom", None)
    assert await store.checkout_batch(PACS, now=clock.now + 1e6, limit=10) == []
    # reject: no automatic retry
    await store.reject(pacs_ids[1], "0xA900")
    it = await store.get_item(pacs_ids[1])
    assert (it.state, it.attempt_count) == ("rejected", 1)
    # release: unchanged state, eligible again
    await store.release(pacs_ids[2:4])
    assert [i.id for i in await store.checkout_batch(PACS, now=clock.now, limit=10)] == pacs_ids[
        2:4
    ]
    c = await store.counts(PACS)
    assert c == Counts(prepared=3, failed=1, rejected=1, checked_out=3, total=5)
    assert await store.release_all_checked_out(AI) == []
    assert len(await store.release_all_checked_out(PACS)) == 3
    assert (await store.counts()).checked_out == 0


async def test_checkout_mixes_failed_and_prepared_fifo(store: Store, clock: FakeClock) -> None:
    [a] = await commit(store)
    clock.advance(1)
    [b] = await commit(store)
    clock.advance(1)
    [c] = await commit(store)
    await store.prepare_ripe(clock.now, 0)
    await store.checkout_batch(PACS, now=clock.now, limit=1)
    await store.fail(a, "x", clock.now)
    assert [i.id for i in await store.checkout_batch(PACS, now=clock.now, limit=10)] == [a, b, c]


async def test_checkout_sop_class_priorities(store: Store, clock: FakeClock) -> None:
    ct = await commit(store, sop_class=CT)
    mr = await commit(store, sop_class=MR)
    sr = await commit(store, sop_class=SR)
    ct2 = await commit(store, sop_class=CT)
    await store.prepare_ripe(clock.now, 0)

    async def order(prios: list[str]) -> list[int]:
        batch = await store.checkout_batch(
            PACS, now=clock.now, limit=10, sop_class_priorities=prios
        )
        await store.release([i.id for i in batch])
        return [i.id for i in batch]

    assert await order([SR, MR]) == sr + mr + ct + ct2  # unlisted last
    assert await order([SR, "default", MR]) == sr + ct + ct2 + mr
    batch = await store.checkout_batch(PACS, now=clock.now, limit=2, sop_class_priorities=[MR])
    assert [i.id for i in batch] == mr + ct


async def test_checkout_by_series(store: Store, clock: FakeClock) -> None:
    a1 = await commit(store, series="S.A")
    b1 = await commit(store, series="S.B")
    a2 = await commit(store, series="S.A")
    b2 = await commit(store, series="S.B")
    a3 = await commit(store, series="S.A")
    await store.prepare_ripe(clock.now, 0)
    batch = await store.checkout_batch(PACS, now=clock.now, limit=10, by_series=True)
    assert [i.id for i in batch] == a1 + a2 + a3
    batch = await store.checkout_batch(PACS, now=clock.now, limit=1, by_series=True)
    assert [i.id for i in batch] == b1
    batch = await store.checkout_batch(PACS, now=clock.now, limit=10, by_series=True)
    assert [i.id for i in batch] == b2


async def test_checkout_of_one_series(store: Store, clock: FakeClock) -> None:
    a1 = await commit(store, series="S.A")
    b1 = await commit(store, series="S.B")
    a2 = await commit(store, series="S.A")
    await store.prepare_ripe(clock.now, 0)
    batch = await store.checkout_batch(PACS, now=clock.now, limit=10, series_uid="S.B")
    assert [i.id for i in batch] == b1
    batch = await store.checkout_batch(
        PACS, now=clock.now, limit=10, by_series=True, series_uid="S.A"
    )
    assert [i.id for i in batch] == a1 + a2


async def test_record_outcomes_in_one_job(store: Store, clock: FakeClock) -> None:
    ids = [(await commit(store, [PACS, AI]))[0] for _ in range(3)]
    ids += await commit(store)
    await store.prepare_ripe(clock.now, 0)
    batch = await store.checkout_batch(PACS, now=clock.now, limit=10)
    assert [i.id for i in batch] == ids
    jobs = store.writer_stats.jobs
    await store.record_outcomes(
        delivered=[ids[0], ids[3]],
        failed=[(ids[1], "refused", clock.now + 30)],
        rejected=[(ids[2], "0xA900"), (999_999, "gone")],  # unknown ids are skipped
    )
    assert store.writer_stats.jobs == jobs + 1
    items = {i.id: i for i in (await store.list_items(ItemFilter(destination="PACS")))[0]}
    assert set(items) == {ids[1], ids[2]}
    assert (items[ids[1]].state, items[ids[1]].attempt_count) == ("failed", 1)
    assert items[ids[1]].next_attempt_at == clock.now + 30 and not items[ids[1]].checked_out
    assert (items[ids[2]].state, items[ids[2]].last_error) == ("rejected", "0xA900")
    # the instance delivered to its only destination is gone; one still queued for AI stays
    files = spool_files(store.root)
    assert len(files) == 3


async def test_checkout_study_quiet(store: Store, clock: FakeClock) -> None:
    old = await commit(store, study="ST.OLD")
    first = await commit(store, study="ST.BUSY")
    clock.advance(60)
    late = await commit(store, study="ST.BUSY")
    await store.prepare_ripe(clock.now, 0)
    # ST.OLD fell quiet first; looking at the oldest item alone, that is all there is
    assert await store.first_quiet_arrival(PACS, 100) == clock.now - 60
    assert await store.first_quiet_arrival(AI, 100) is None
    # a study is held while anything of it arrived after the quiet point
    batch = await store.checkout_batch(
        PACS, now=clock.now, limit=10, study_quiet_before=clock.now - 30
    )
    assert [i.id for i in batch] == old
    batch = await store.checkout_batch(
        PACS, now=clock.now, limit=10, study_quiet_before=clock.now - 30, exempt_studies={"ST.BUSY"}
    )
    assert [i.id for i in batch] == first + late


async def test_operator_transitions(store: Store, clock: FakeClock) -> None:
    [a, b] = await commit(store, [PACS, AI])
    await store.prepare_ripe(clock.now, 0)
    [co] = await store.checkout_batch(PACS, now=clock.now, limit=1)
    assert co.id == a
    for op in (store.move(a, "new"), store.retry(a), store.delete(a)):
        with pytest.raises(ItemCheckedOut):
            await op
    with pytest.raises(ItemNotFound):
        await store.move(999, "new")
    with pytest.raises(ItemNotFound):
        await store.get_item(999)
    with pytest.raises(ItemNotFound):
        await store.fail(999, "x", None)
    with pytest.raises(ValueError):
        await store.move(b, "bogus")
    with pytest.raises(TransitionError):
        await store.retry(b)  # prepared: nothing to retry
    clock.advance(5)
    moved = await store.move(b, "failed")
    assert moved.state == "failed" and moved.next_attempt_at == clock.now
    assert (await store.get_item(b)) == moved
    assert (await store.retry(b)).state == "new"
    assert (await store.get_item(b)).next_attempt_at is None
    await store.move(b, "rejected")
    assert (await store.retry(b)).state == "new"
    await store.move(b, "expired")
    with pytest.raises(TransitionError):
        await store.retry(b)


async def test_bulk_operations_skip_checked_out(store: Store, clock: FakeClock) -> None:
    ids = []
    for n in range(6):
        ids += await commit(store, [PACS], study=f"ST.{n % 2}", modality="MR" if n < 3 else "CT")
    await store.prepare_ripe(clock.now, 0)
    [co] = await store.checkout_batch(PACS, now=clock.now, limit=1)
    assert (
        await store.move_where(ItemFilter(study_uid="ST.0"), "rejected") == 2
    )  # 3 match, 1 checked out
    assert await store.retry_where(ItemFilter(), "rejected") == 2
    assert await store.retry_where(ItemFilter(state="failed"), "rejected") == 0
    with pytest.raises(TransitionError):
        await store.retry_where(ItemFilter(), "new")
    assert await store.move_where(ItemFilter(modality="CT"), "failed") == 3
    assert await store.delete_where(ItemFilter(state="failed")) == 3
    assert await store.delete_where(ItemFilter()) == 2
    assert [i.id for i in (await store.list_items(ItemFilter()))[0]] == [co.id]
    assert len(spool_files(store.root)) == 1


async def test_expire(store: Store, clock: FakeClock) -> None:
    old = await commit(store, [PACS, AI])
    await store.reject(old[1], "refused")
    clock.advance(100)
    young = await commit(store)
    assert await store.expire(clock.now, 50) == 1  # the rejected one is not queued
    assert (await store.get_item(old[0])).state == "expired"
    assert (await store.get_item(old[1])).state == "rejected"
    assert (await store.get_item(young[0])).state == "new"


async def test_list_filters_and_search(store: Store, clock: FakeClock) -> None:
    await commit(
        store, [PACS], source="CTA", study="1.2.840.555", accession="ACC-77", patient_id="P9"
    )
    await commit(store, [AI], source="MR_B", modality="MR", accession="X_1")
    await commit(store, [PACS, Destination("PACS", "QueryRetrieve")], source="CTA", sop="7.7.7")

    async def ids(**kw: object) -> list[int]:
        items, total = await store.list_items(ItemFilter(**kw))  # type: ignore[arg-type]
        assert total == len(items)
        return [i.id for i in items]

    assert await ids() == [1, 2, 3, 4]
    assert await ids(source="CTA") == [1, 3, 4]
    assert await ids(destination="PACS") == [1, 3, 4]
    assert await ids(destination="PACS", role="QueryRetrieve") == [4]
    assert await ids(modality="MR") == [2]
    assert await ids(study_uid="1.2.840.555") == [1]
    assert await ids(search="840.55") == [1]
    assert await ids(search="acc-77") == [1]  # case-insensitive
    assert await ids(search="p9") == [1]
    assert await ids(search="mr_b") == [2]
    assert await ids(search="_") == [2]  # LIKE wildcards are escaped
    assert await ids(search="%") == []
    assert await ids(search="7.7.7") == [3, 4]
    assert await ids(search="ai") == [2]  # destination AE
    page, total = await store.list_items(ItemFilter(), skip=1, limit=2)
    assert [i.id for i in page] == [2, 3] and total == 4
    with pytest.raises(ValueError):
        ItemFilter(state="bogus")


async def test_next_eligible_at(store: Store, clock: FakeClock) -> None:
    assert await store.next_eligible_at(PACS, clock.now) is None
    [a] = await commit(store)
    assert await store.next_eligible_at(PACS, clock.now) is None  # new: not yet prepared
    await store.prepare_ripe(clock.now, 0)
    assert await store.next_eligible_at(PACS, clock.now) == clock.now
    await store.checkout_batch(PACS, now=clock.now, limit=1)
    assert await store.next_eligible_at(PACS, clock.now) is None
    await store.fail(a, "x", clock.now - 5)
    assert await store.next_eligible_at(PACS, clock.now) == clock.now


async def test_paused_flags_persist(tmp_path: Path) -> None:
    async with open_store(tmp_path, durable=False) as store:
        await store.set_paused(PACS, True)
        await store.set_paused(Destination("AI", "QueryRetrieve"), True)
        await store.set_paused(Destination("AI", "QueryRetrieve"), False)
    async with open_store(tmp_path, durable=False) as store:
        assert await store.get_paused() == {("PACS", "Storage")}


async def test_group_commit_shares_transactions_and_never_blocks_loop(tmp_path: Path) -> None:
    gaps: list[float] = []
    async with open_store(tmp_path, durable=True) as store:
        done = trio.Event()

        async def heartbeat() -> None:
            last = trio.current_time()
            while not done.is_set():
                await trio.sleep(0.001)
                now = trio.current_time()
                gaps.append(now - last)
                last = now

        async def committer(n: int) -> None:
            for _ in range(n):
                await commit(store, [PACS, AI], data=b"y" * 20_000)

        async with trio.open_nursery() as outer:
            outer.start_soon(heartbeat)
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(committer, 10)
            done.set()
        stats = store.writer_stats
        assert stats.jobs == 160
        assert stats.groups < 160  # some commits shared a transaction
        assert (await store.counts()).total == 320
    assert max(gaps) < 0.1, max(gaps)


async def test_without_durable_writes_a_commit_runs_on_the_loop_while_the_writer_is_idle(
    tmp_path: Path,
) -> None:
    """No fsync can happen without durable writes, so an idle writer's thread is not woken for
    a new instance's commit; a busy one gets it queued, and a durable store always queues."""
    async with open_store(tmp_path / "plain", durable=False, inline_max_bytes=0) as store:
        for _ in range(3):
            await commit(store, [PACS], data=b"x" * 5000)
        assert store.writer_stats.inline == 3
        writer = store._writer
        writer._running.acquire()  # the thread is busy with a group
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(commit, store, [PACS])
                await trio.testing.wait_all_tasks_blocked()
                assert (await store.counts()).total == 3  # queued behind the busy group
                writer._running.release()
        except BaseException:
            if writer._running.locked():
                writer._running.release()
            raise
        assert store.writer_stats.inline == 3 and (await store.counts()).total == 4
        await store.prepare_ripe(time.time() + 10, 0)  # other jobs always go to the thread
        assert store.writer_stats.inline == 3
    async with open_store(tmp_path / "durable", durable=True, inline_max_bytes=0) as store:
        await commit(store, [PACS], data=b"x" * 5000)
        assert store.writer_stats.inline == 0 and store.writer_stats.jobs == 1


async def test_cancelled_commit_leaves_nothing_half_written(store: Store) -> None:
    temp = write_temp(store)
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.commit_instance(temp, header(), "CT", [PACS])
    assert not temp.exists()
    assert spool_files(store.root) == set()
    assert (await store.counts()).total == 0


async def test_cancel_during_commit_completes_it(store: Store) -> None:
    temp = write_temp(store)
    result: list[int] = []
    with trio.CancelScope() as scope:

        async def cancel_soon() -> None:
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_soon)
            result = await store.commit_instance(temp, header(), "CT", [PACS])
    # either the commit completed (and is fully there) or it left nothing
    files = spool_files(store.root)
    total = (await store.counts()).total
    assert (total, len(files)) in ((1, 1), (0, 0))
    assert not temp.exists()
    if result:
        assert total == 1


async def test_only_changes_a_power_cut_may_undo_skip_the_wal_fsync(tmp_path: Path) -> None:
    """Checkouts, releases and new -> prepared commit with synchronous=NORMAL (no fsync of their
    own: recovery undoes or redoes them); everything else, commits of instances above all, FULL."""
    modes: list[int] = []

    def mode(conn: object) -> None:
        modes.append(conn.execute("PRAGMA synchronous").fetchone()[0])  # type: ignore[attr-defined]

    async with open_store(tmp_path, durable=True) as store:
        await store._write(mode, durable=False)
        await store._write(mode)
        await store._write(mode, durable=False)
        await commit(store, [PACS])  # FULL
        await store.checkout_batch(PACS, now=1e12, limit=10)
    assert modes == [1, 2, 1]  # NORMAL, FULL, NORMAL
    async with open_store(tmp_path / "volatile", durable=False) as store:
        await store._write(mode)
    assert modes[-1] == 0  # durableWrites false: OFF throughout


async def test_writer_keeps_its_savepoint_journals_in_memory(tmp_path: Path) -> None:
    """Every job runs in a SAVEPOINT: its statement journal must not be a temporary file created
    and unlinked per group (a file-system journal round per commit on ext4)."""
    async with open_store(tmp_path, durable=True) as store:
        mode = await store._write(lambda conn: conn.execute("PRAGMA temp_store").fetchone()[0])
        await commit(store, [PACS])
    assert mode == 2  # MEMORY


# -- small instances kept in the index ---------------------------------------------------------


async def test_small_instance_is_kept_in_the_index(inline_store: Store, clock: FakeClock) -> None:
    store = inline_store
    data = b"small" * 100
    temp = write_temp(store, data)
    ids = await store.commit_instance(temp, header(), "CT1", [PACS, ARCHIVE], state="prepared")
    assert not temp.exists() and spool_files(store.root) == set()
    items = [await store.get_item(i) for i in ids]
    assert all(i.inline and i.data is None and i.size_bytes == len(data) for i in items)
    assert await store.read_inline(items[0].instance_id) == data
    # a checkout hands the bytes to the node with the items
    [out] = await store.checkout_batch(PACS, now=clock.now, limit=10)
    assert out.inline and out.data == data and out.id == ids[0]
    # stored once; the bytes go with the last item
    await store.delivered([ids[0]])
    assert await store.read_inline(items[0].instance_id) == data
    await store.delete(ids[1])
    with pytest.raises(ItemNotFound):
        await store.read_inline(items[0].instance_id)
    assert (await store.counts()).total == 0


async def test_size_limit_decides_index_or_file(inline_store: Store, clock: FakeClock) -> None:
    store = inline_store
    limit = store.inline_max_bytes
    [small] = await store.commit_instance(write_temp(store, b"s" * limit), header(), "CT", [PACS])
    [big] = await store.commit_instance(
        write_temp(store, b"b" * (limit + 1)), header(), "CT", [PACS]
    )
    s, b = await store.get_item(small), await store.get_item(big)
    assert s.inline and not b.inline
    assert spool_files(store.root) == {b.path} and b.path.read_bytes() == b"b" * (limit + 1)
    await store.prepare_ripe(clock.now, 0)
    batch = await store.checkout_batch(PACS, now=clock.now, limit=10)
    assert [(i.id, i.data is not None) for i in batch] == [(small, True), (big, False)]


async def test_inline_instances_survive_a_restart(tmp_path: Path) -> None:
    async with open_store(tmp_path, durable=True) as store:
        [a] = await commit(store)
        stray = write_temp(store, b"never committed")
    async with open_store(tmp_path, durable=True) as store:
        r = store.recovery_report
        assert (r.missing, r.orphans, r.incoming_removed) == ((), (), 1)
        item = await store.get_item(a)
        assert item.inline and await store.read_inline(item.instance_id) == b"DICM" * 64
    assert not stray.exists()


async def test_index_of_version_1_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    async with open_store(tmp_path, durable=False, inline_max_bytes=0) as store:
        [a] = await commit(store)
    conn = sqlite3.connect(tmp_path / "index.db")
    with conn:  # what version 1 wrote: no blobs table (nor version 3's columns)
        conn.execute("DROP TABLE blobs")
        for column in ("received_syntax", "sort_key", "added_by", "prepared_copy"):
            conn.execute(f"ALTER TABLE items DROP COLUMN {column}")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()
    async with open_store(tmp_path, durable=False) as store:
        assert (await store.get_item(a)).path.exists()
        [b] = await commit(store)
        assert (await store.get_item(b)).inline


async def test_checkout_bounds_the_bytes_it_hands_out(
    inline_store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capacitor_trio.store import queue as store_module

    monkeypatch.setattr(store_module, "CHECKOUT_INLINE_BYTES", 2500)
    ids = [
        (
            await inline_store.commit_instance(
                write_temp(inline_store, b"x" * 1000), header(), "CT", [PACS], state="prepared"
            )
        )[0]
        for _ in range(5)
    ]
    first = await inline_store.checkout_batch(PACS, now=clock.now, limit=10)
    assert [i.id for i in first] == ids[:2] and all(i.data == b"x" * 1000 for i in first)
    rest = await inline_store.checkout_batch(PACS, now=clock.now, limit=10)
    assert [i.id for i in rest] == ids[2:4]
    # one instance larger than the bound still goes out, alone
    monkeypatch.setattr(store_module, "CHECKOUT_INLINE_BYTES", 10)
    assert [i.id for i in await inline_store.checkout_batch(PACS, now=clock.now, limit=10)] == ids[
        4:
    ]


async def test_get_item_with_data_reads_one_snapshot(inline_store: Store) -> None:
    [a] = await commit(inline_store, data=b"abc" * 10)
    assert (await inline_store.get_item(a)).data is None
    assert (await inline_store.get_item(a, with_data=True)).data == b"abc" * 10


async def test_freed_index_pages_count_as_free_space(tmp_path: Path) -> None:
    from capacitor_trio.store import FileOps

    class Ops(FileOps):
        extra: list[int] = []

        def free_space_percent(self, path: Path, extra_bytes: int = 0) -> float:
            self.extra.append(extra_bytes)
            return super().free_space_percent(path, extra_bytes)

    ops = Ops(durable=False)
    async with open_store(
        tmp_path, durable=False, file_ops=ops, min_free_space_percent=0.001
    ) as store:
        for _ in range(40):
            await commit(store, data=bytes(30_000))
        assert store.index_free_bytes == 0
        await store.delete_where(ItemFilter())
        assert store.index_free_bytes >= 40 * 30_000 * 0.9
        await commit(store)  # admission counts the index's free pages as free space
        assert ops.extra[-1] >= 40 * 30_000 * 0.9


async def test_recovery_marks_an_inline_instance_without_bytes_failed(tmp_path: Path) -> None:
    import sqlite3

    async with open_store(tmp_path, durable=False) as store:
        [a] = await commit(store)
    conn = sqlite3.connect(tmp_path / "index.db")
    with conn:  # a damaged index
        conn.execute("DELETE FROM blobs")
    conn.close()
    async with open_store(tmp_path, durable=False) as store:
        assert len(store.recovery_report.missing) == 1
        item = await store.get_item(a)
        assert item.state == "failed" and item.last_error.startswith("stored bytes missing")
        await store.move(a, "prepared")
        [out] = await store.checkout_batch(PACS, now=time.time(), limit=5)
        assert out.data is None  # the requestor reports it missing (rejected)


async def test_non_durable_outcome_records_never_unlink_files(store: Store, clock: FakeClock) -> None:
    """A record a power cut may undo must not take a spool file with it (the item would come
    back without its file): such files are left in the trash for recovery."""
    [a] = await commit(store, state="prepared")
    path = (await store.get_item(a)).path
    await store.checkout_batch(PACS, now=clock.now, limit=5)
    await store.record_outcomes(delivered=[a], durable=False)
    assert path.exists()
    assert (await store.counts()).total == 0


async def test_commit_of_bytes_received_in_memory(inline_store: Store, clock: FakeClock) -> None:
    store = inline_store
    [a] = await store.commit_instance(None, header(), "CT", [PACS], data=b"m" * 100)
    item = await store.get_item(a, with_data=True)
    assert item.inline and item.data == b"m" * 100 and item.size_bytes == 100
    # bytes too large for the index get a spool file
    big = b"B" * (store.inline_max_bytes + 1)
    [b] = await store.commit_instance(None, header(), "CT", [PACS], data=big)
    item = await store.get_item(b)
    assert not item.inline and item.path.read_bytes() == big
    assert incoming_leftovers(store.root / "incoming") == []
    with pytest.raises(ValueError):
        await store.commit_instance(None, header(), "CT", [PACS])
    with pytest.raises(ValueError):
        await store.commit_instance(write_temp(store), header(), "CT", [PACS], data=b"x")


async def test_a_job_whose_statement_rolled_back_the_group_fails_it_cleanly(store: Store) -> None:
    """SQLite may roll a whole transaction back on its own (SQLITE_FULL inside a statement): the
    group then fails as one (StoreFull for a full disk) and the writer is not left inside a
    transaction, so the next commit works."""
    import sqlite3

    def rolled_back(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(StoreFull):
        await store._write(rolled_back)
    [a] = await commit(store)
    assert (await store.get_item(a)).state == "new"


# -- files made ahead for receptions ------------------------------------------------------------


async def test_receptions_get_files_made_ahead_and_unused_ones_leave_no_trace(tmp_path: Path) -> None:
    from capacitor_trio.store.spares import SPARE_LOW, SPARE_PREFIX

    async with open_store(tmp_path, durable=True) as store:
        first = store.new_incoming_path()  # none ready yet: a fresh name; the maker starts
        assert not first.name.startswith(SPARE_PREFIX)
        await trio.to_thread.run_sync(store._spares.refilled.wait, 10)
        assert len(store._spares) >= SPARE_LOW
        temp = store.new_incoming_path()
        assert temp.name.startswith(SPARE_PREFIX) and temp.exists() and temp.stat().st_size == 0
        temp.write_bytes(b"DICM" * 10000)  # what the acceptor does with it (40 kB: a spool file)
        await store.commit_instance(temp, header(), "CT", [PACS])
        assert not temp.exists() and len(spool_files(store.root)) == 1
        crashed_midway = store.new_incoming_path()
        crashed_midway.write_bytes(b"partial")
    # closing removes the files nobody took; a reception's own file is the reception's business
    assert [p.name for p in (tmp_path / "incoming").iterdir()] == [crashed_midway.name]
    # recovery removes it and reports it; unused made-ahead files are removed but not reported
    (tmp_path / "incoming" / f"{SPARE_PREFIX}left-by-a-kill.part").touch()
    async with open_store(tmp_path, durable=True) as store:
        assert store.recovery_report.incoming_removed == 1
        assert incoming_leftovers(store.root / "incoming") == []
        assert (await store.counts()).total == 1


@pytest.mark.usefixtures("leases")  # (for the reused file)
async def test_a_flush_started_early_is_the_commits_only_one_and_comes_before_the_name(
    tmp_path: Path,
) -> None:
    """The acceptor starts a large file's fsync as its last byte is written (`start_sync`); the
    commit then waits for it instead of a second fsync, and renames the file only after it."""
    from capacitor_trio.store import FileOps

    events: list[tuple[str, str]] = []

    class Ops(FileOps):
        def fsync_file(self, path: Path) -> None:
            super().fsync_file(path)
            events.append(("fsync", path.name))

        def rename(self, src: Path, dst: Path) -> None:
            events.append(("rename", src.name))
            super().rename(src, dst)

        def before_index_commit(self) -> None:
            events.append(("commit", ""))

    async with open_store(tmp_path, durable=True, file_ops=Ops(), inline_max_bytes=1000) as store:
        small = store.new_incoming_path()
        small.write_bytes(b"s" * 1000)
        assert store.start_sync(small, 1000) is None  # kept in the index: no file to flush
        temp = store.new_incoming_path()
        temp.write_bytes(b"L" * 100_000)
        sync = store.start_sync(temp, 100_000)
        assert sync is not None
        [a] = await store.commit_instance(temp, header(), "CT", [PACS], sync=sync)
        assert (await store.get_item(a)).path.read_bytes() == b"L" * 100_000
        mine = [e for e in events if e[1] in (temp.name, "")]
        assert mine[:3] == [("fsync", temp.name), ("rename", temp.name), ("commit", "")]
        assert mine.count(("fsync", temp.name)) == 1
        # delivered, its file is written over where it is: fsync'd before the COMMIT, no rename
        spooled = (await store.get_item(a)).path
        await store.delivered([a])
        assert store._spares.wait_settled(10)
        reused = store.new_incoming_path()
        assert reused == spooled
        reused.write_bytes(b"R" * 90_000)
        del events[:]
        [b] = await store.commit_instance(
            reused, header(), "CT", [PACS], sync=store.start_sync(reused, 90_000)
        )
        assert [e for e in events if e[1] in (reused.name, "")] == [
            ("fsync", reused.name),
            ("commit", ""),
        ]
        assert (await store.get_item(b)).path.read_bytes() == b"R" * 90_000
    async with open_store(tmp_path, durable=False) as store:
        temp = store.new_incoming_path()
        temp.write_bytes(b"L" * 100_000)
        assert store.start_sync(temp, 100_000) is None  # no durable writes: nothing to flush


async def test_a_cache_directory_is_used_by_one_store_at_a_time(tmp_path: Path) -> None:
    """A second store on the same directory (a second router) is refused before it touches
    anything: its recovery would remove the first one's receptions in progress."""
    import os

    from capacitor_trio.store import StoreInUse

    async with open_store(tmp_path, durable=False) as first:
        receiving = first.new_incoming_path()
        receiving.write_bytes(b"half an instance")
        with pytest.raises(StoreInUse, match=f"in use by another capacitor-trio process \\(pid {os.getpid()}\\)"):
            async with open_store(tmp_path, durable=False):
                pass  # pragma: no cover
        assert receiving.read_bytes() == b"half an instance"
        [a] = await commit(first)  # the first store is unaffected
    async with open_store(tmp_path, durable=False) as again:  # free once the first closed
        assert (await again.get_item(a)).state == "new"


async def test_a_failure_after_the_commit_does_not_fail_the_committed_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a group has committed, its callers hear success even if tidying up afterwards
    fails: otherwise a committed instance would be reported failed and its file removed."""
    from capacitor_trio.store import writer as writer_module

    def broken(self: object, ok: object) -> None:
        raise RuntimeError("can't start new thread")

    async with open_store(tmp_path, durable=True) as store:
        monkeypatch.setattr(writer_module.Writer, "_unlink_after", broken)
        temp = store.new_incoming_path()
        temp.write_bytes(b"K" * 50_000)
        [a] = await store.commit_instance(temp, header(), "CT", [PACS])
        assert (await store.get_item(a)).path.read_bytes() == b"K" * 50_000


async def test_the_lock_is_refused_clearly_and_given_back_on_every_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno
    import fcntl
    import os

    from capacitor_trio.store import StoreInUse
    from capacitor_trio.store import connection as store_module
    from capacitor_trio.store import writer as writer_module

    # a holder caught before it wrote its pid: refused all the same, without a pid
    holder = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreInUse, match=r"in use by another capacitor-trio process; one"):
            async with open_store(tmp_path, durable=False):
                pass  # pragma: no cover
    finally:
        os.close(holder)
    # the writer cannot start: nothing stays open, the lock least of all
    with monkeypatch.context() as m:
        m.setattr(writer_module.Writer, "start", lambda self: (_ for _ in ()).throw(RuntimeError("can't start new thread")))
        with pytest.raises(RuntimeError):
            async with open_store(tmp_path, durable=False):
                pass  # pragma: no cover
    async with open_store(tmp_path, durable=False) as store:
        await commit(store)
    # a file system without locks (some NFS mounts): a warning, and the store opens
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(store_module.fcntl, "flock", no_locks)
    async with open_store(tmp_path, durable=False) as store:
        await commit(store)
    assert any("nothing stops a second router" in r.getMessage() for r in caplog.records)
