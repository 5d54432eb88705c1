"""Issue 19 #5: `GET /api/queue/items/{id}` shows a bounded header whatever the file holds.

The detail view parsed the whole stored file and JSON-encoded the result on the loop: a deflate
bomb took 4 GB, a data set of 2 million items 80 s and 92 MB of JSON. It now reads a bounded
copy (up to the pixel data, elements, value sizes, items, nesting, bytes read all capped) in a
worker thread and says what it cut in `tagsTruncated` / `tagsLimits`.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pydicom
import pytest
import trio
from hypothesis import given, settings
from pydicom.dataset import Dataset

from capacitor_trio.api import openapi_source
from capacitor_trio.api import views as views_module
from capacitor_trio.api.views import read_tags
from capacitor_trio.dicom.detail import ShowLimits
from capacitor_trio.dicom.part10 import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    file_meta_bytes,
)
from capacitor_trio.domain.instance import Destination, InstanceHeader
from tests.dicom.test_header_bounds import (
    CT,
    HEADER,
    TAIL,
    UID,
    _el,
    deflate_bomb,
    deflated,
    many_items,
)
from tests.dicom.test_header_walker import _encode, datasets

from .conftest import StartRouter, dead_node
from .test_endpoints import ITEM_FIELDS, data

MiB = 1 << 20


def _old_read_tags(raw: bytes) -> dict[str, Any]:
    """What the detail view showed before it was bounded (pydicom on the whole file)."""
    ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True, force=True)
    views_module._strip_bulk(ds)
    return ds.to_json_dict(suppress_invalid_tags=True)


@settings(max_examples=100, deadline=None)
@given(datasets())
def test_the_bounded_view_shows_what_pydicom_showed(sample: tuple[bytes, str]) -> None:
    data_set, ts = sample
    raw = file_meta_bytes(CT, UID, ts) + data_set
    shown = read_tags(io.BytesIO(raw))
    assert shown.cut_by == ()
    assert shown.json == _old_read_tags(raw)


def test_a_deflated_file_is_shown() -> None:
    raw = file_meta_bytes(CT, UID, DEFLATED_EXPLICIT_VR_LE) + deflated(HEADER + TAIL)
    shown = read_tags(io.BytesIO(raw))
    assert shown.cut_by == ()
    assert shown.json["0020000E"]["Value"] == [UID + ".2"]
    assert shown.json["00100010"]["Value"] == [{"Alphabetic": "DOE^JANE"}]


def _sequence(items: list[bytes]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(i)) + i for i in items)
    return struct.pack("<HH2s2xI", 0x0008, 0x1140, b"SQ", len(body)) + body


def test_each_limit_cuts_and_is_named() -> None:
    ref = _el(0x00081155, b"UI", b"1.2.3\0")
    nested = ref
    for _ in range(6):
        nested = _sequence([nested])
    data_set = (
        HEADER
        + _el(0x00081030, b"LO", b"X" * 64)
        + _el(0x00081080, b"LO", b"Y" * 4000)  # a long text: cut
        + _sequence([ref] * 30)  # 30 items
        + _el(0x00089092, b"SQ", nested[12:])  # nested 7 deep (re-tagged outer sequence)
        + _el(0x00089459, b"FL", b"\0" * 4000)  # a long binary value: left out
        + TAIL
    )
    raw = file_meta_bytes(CT, UID, EXPLICIT_VR_LE) + data_set
    limits = ShowLimits(max_value=256, max_items=10, max_depth=3)
    shown = read_tags(io.BytesIO(raw), limits)
    assert set(shown.cut_by) == {"valueSize", "sequenceItems", "sequenceDepth"}
    assert shown.json["00081080"]["Value"] == ["Y" * 256]
    assert "00089459" not in shown.json
    assert len(shown.json["00081140"]["Value"]) == 10
    assert shown.json["0020000E"]["Value"] == [UID + ".2"]  # what follows is still shown
    few = read_tags(io.BytesIO(raw), ShowLimits(max_elements=3))
    assert few.cut_by == ("elements",) and len(few.json) <= 3


def test_deep_nesting_is_walked_in_bounded_memory() -> None:
    opening = (
        struct.pack("<HH2s2xI", 0x0008, 0x1140, b"SQ", 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ) * 50_000
    raw = file_meta_bytes(CT, UID, EXPLICIT_VR_LE) + HEADER + opening
    shown, peak = _peak_of(read_tags, io.BytesIO(raw))
    assert shown.cut_by == ("sequenceDepth",)
    assert shown.json["00080018"]["Value"] == [UID]
    assert peak < 8 * MiB


def _peak_of(fn: Any, *args: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        return fn(*args), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_deflate_bomb_is_shown_in_bounded_memory() -> None:
    raw = file_meta_bytes(CT, UID, DEFLATED_EXPLICIT_VR_LE) + deflate_bomb(2048 * MiB)
    shown, peak = _peak_of(read_tags, io.BytesIO(raw))
    assert shown.cut_by == ("readBytes",)
    assert peak < 8 * MiB


def _write_many_items(path: Path) -> None:
    """The 64 MB data set of the issue: 2 million items before the rest of the header."""
    with open(path, "wb") as f:
        f.write(file_meta_bytes(CT, UID, EXPLICIT_VR_LE))
        for piece in many_items(2_000_000):
            f.write(piece)


def test_millions_of_items_are_shown_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "items.dcm"
    _write_many_items(path)
    shown, peak = _peak_of(read_tags, path, ShowLimits(max_walked=20_000))
    assert set(shown.cut_by) == {"sequenceItems", "walkedElements"}
    assert shown.json["00080018"]["Value"] == [UID]
    assert len(shown.json["00081140"]["Value"]) == 100
    assert peak < 8 * MiB
    assert len(json.dumps(shown.json)) < 100_000


def test_every_limit_name_is_documented() -> None:
    names = {"elements", "valueSize", "sequenceItems", "sequenceDepth", "readBytes", "walkedElements", "unreadable"}
    assert set(openapi_source.TAG_LIMITS) == names


# -- over HTTP -------------------------------------------------------------------------------------


async def _commit(r: Any, raw: bytes | None, ts: str, path: Path | None = None) -> int:
    temp = r.store.new_incoming_path()
    if path is not None:
        await trio.to_thread.run_sync(path.rename, temp)
    else:
        assert raw is not None
        await trio.to_thread.run_sync(temp.write_bytes, raw)
    header = InstanceHeader(
        sop_class_uid=CT,
        sop_instance_uid=UID,
        transfer_syntax_uid=ts,
        study_instance_uid=UID + ".1",
        series_instance_uid=UID + ".2",
        modality="CT",
        patient_id="PID",
        patient_name="DOE^JANE",
        accession_number="",
    )
    [item_id] = await r.store.commit_instance(temp, header, "MODALITY", [Destination("DEAD", "Storage")])
    return int(item_id)


@pytest.fixture
def parse_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from capacitor_trio.api import app as app_module

    names: list[str] = []
    real = app_module.read_tags

    def recorded(source: Any) -> Any:
        names.append(threading.current_thread().name)
        return real(source)

    monkeypatch.setattr(app_module, "read_tags", recorded)
    return names


async def test_an_ordinary_item_is_shown_whole(start_router: StartRouter, parse_threads: list[str]) -> None:
    r = await start_router((dead_node("DEAD"),))
    [item] = await r.queue(1, dest="DEAD", rows=256)
    detail = data(await r.client.get(f"/api/queue/items/{item}"))
    assert set(detail) >= ITEM_FIELDS | {"tags", "tagsTruncated", "tagsLimits"}
    assert detail["tagsTruncated"] is False and detail["tagsLimits"] == []
    assert detail["tags"]["00100020"]["Value"] == ["PID001"]
    assert parse_threads and threading.main_thread().name not in parse_threads


async def test_the_bomb_item_answers_at_once(start_router: StartRouter, parse_threads: list[str]) -> None:
    r = await start_router((dead_node("DEAD"),))
    raw = file_meta_bytes(CT, UID, DEFLATED_EXPLICIT_VR_LE) + deflate_bomb(2048 * MiB)
    item = await _commit(r, raw, DEFLATED_EXPLICIT_VR_LE)
    detail = data(await r.client.get(f"/api/queue/items/{item}"))
    # nothing before the bomb to show, so not even the SOP Instance UID: no tags, and why
    assert detail["tags"] is None
    assert detail["tagsTruncated"] is True and detail["tagsLimits"] == ["readBytes"]
    assert threading.main_thread().name not in parse_threads


async def test_the_two_million_item_data_set_is_shown_cut(start_router: StartRouter, tmp_path: Path) -> None:
    r = await start_router((dead_node("DEAD"),))
    path = tmp_path / "items.dcm"
    await trio.to_thread.run_sync(_write_many_items, path)
    item = await _commit(r, None, EXPLICIT_VR_LE, path)
    resp = await r.client.get(f"/api/queue/items/{item}")
    detail = data(resp)
    assert detail["tagsTruncated"] is True
    assert set(detail["tagsLimits"]) == {"sequenceItems", "walkedElements"}
    assert detail["tags"]["00080018"]["Value"] == [UID]
    assert len(detail["tags"]["00081140"]["Value"]) == 100
    assert len(resp.content) < 100_000


async def test_an_implicit_vr_item_in_the_index_is_shown(start_router: StartRouter) -> None:
    r = await start_router((dead_node("DEAD"),))
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = UID
    ds.PatientID = "P1"
    body = _encode(ds, True)
    item = await _commit(r, file_meta_bytes(CT, UID, IMPLICIT_VR_LE) + body, IMPLICIT_VR_LE)
    detail = data(await r.client.get(f"/api/queue/items/{item}"))
    assert detail["tags"]["00100020"]["Value"] == ["P1"] and detail["tagsLimits"] == []


async def test_detail_reads_run_at_most_two_at_once(
    start_router: StartRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19 #5: the detail view's read and JSON encoding are CPU-bound Python in worker
    threads; many detail requests at once (the API takes 64 connections) run at most
    `DETAIL_THREADS` of them at once, so that they do not stall the loop for DICOM intake."""
    from capacitor_trio.actors.queries import DETAIL_THREADS
    from capacitor_trio.api import app as app_module

    r = await start_router((dead_node("DEAD"),))
    [item] = await r.queue(1, dest="DEAD")
    lock = threading.Lock()
    running = [0, 0]  # now, most at once

    def counted(fn: Any) -> Any:
        def run(*args: Any) -> Any:
            with lock:
                running[0] += 1
                running[1] = max(running)
            try:
                time.sleep(0.02)  # holds its slot a while, so that others overlap it
                return fn(*args)
            finally:
                with lock:
                    running[0] -= 1

        return run

    monkeypatch.setattr(app_module, "read_tags", counted(app_module.read_tags))
    monkeypatch.setattr(app_module, "ok", counted(app_module.ok))
    statuses: list[int] = []

    async def get() -> None:
        statuses.append((await r.client.get(f"/api/queue/items/{item}")).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(get)
    assert statuses == [200] * 16
    assert running == [0, DETAIL_THREADS]
