"""A large multi-frame goes through a node's prepare stage (transcoding into RLE Lossless) without
copies of it in the router's memory: the converted file is handed to the store as it is (issue 22).

Measured in a fresh process that plays the router: a store, the real transcode pool (one worker
process, started ahead) and the node's `NodePreparer` with its transcoding step. The instance
(256 MiB of pixel data, written a frame at a time so the test itself never holds it) is
committed as a reception is; then the process's peak RSS is reset (/proc/self/clear_refs) and
the item is prepared. The router process's peak over its resident size before must stay a small
part of the instance (it held the converted data set, its Part 10 bytes and their copy before:
several times its size); the worker's peak (RUSAGE_CHILDREN, once the pool has stopped) is
reported beside it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

FRAMES = 512
SIZE = 512
FRAME_BYTES = SIZE * SIZE * 2
PIXEL_BYTES = FRAMES * FRAME_BYTES  # 256 MiB

_ROUTER = """
import json, resource, sys, time
from pathlib import Path

import pydicom
import trio

from capacitor_trio.actors.prepare import NodePreparer
from capacitor_trio.actors.service import ServiceFlags
from capacitor_trio.actors.transcoding import ConversionStats, TranscodeStep
from capacitor_trio.config.models import Config
from capacitor_trio.domain.instance import Destination, InstanceHeader
from capacitor_trio.store import open_store
from capacitor_trio.transcode.pool import TranscodePool

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

async def main(root, big, scratch, target):
    pacs = Destination("PACS")
    config = Config(data_dir=root, cache_path=root / "cache", minimum_age=0)
    head = pydicom.dcmread(big, stop_before_pixels=True)
    header = InstanceHeader(str(head.SOPClassUID), str(head.SOPInstanceUID), str(head.file_meta.TransferSyntaxUID))
    async with open_store(root / "cache", durable=True) as store, trio.open_nursery() as nursery:
        pool = await nursery.start(TranscodePool(1).run)
        if hasattr(pool, "warm"):  # (so the script also measures a tree without it)
            await pool.warm()
        temp = store.new_incoming_path()
        big.rename(temp)
        [item_id] = await store.commit_instance(temp, header, "MODALITY", [pacs])
        step = TranscodeStep(target, pool, scratch, ConversionStats(), first=True)
        done = trio.Event()
        preparer = NodePreparer(
            pacs, store, lambda: config, ServiceFlags(), time.time, done.set, steps=lambda: (step,)
        )
        Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
        before = status("VmRSS")
        started = time.perf_counter()
        await nursery.start(preparer.run)
        await done.wait()
        seconds = time.perf_counter() - started
        peak = status("VmHWM")
        item = await store.get_item(item_id)
        nursery.cancel_scope.cancel()
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({
        "before": before, "peak": peak, "worker_peak": worker, "seconds": seconds,
        "state": item.state, "syntax": item.transfer_syntax_uid, "path": str(item.path),
    }))

root, big, target = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
trio.run(main, root, big, root / "transcode", target)
"""


def _write_multi_frame(path: Path) -> None:
    """An uncompressed 16-bit multi-frame of PIXEL_BYTES, written a frame at a time."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = SIZE
    ds.NumberOfFrames = FRAMES
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)  # everything but the pixel data
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rng = np.random.default_rng(3)
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, PIXEL_BYTES))
        for n in range(FRAMES):
            frame = (x + y + 8 * n) % 4096 + rng.integers(0, 16, (SIZE, SIZE))
            f.write(frame.astype("<u2").tobytes())


@pytest.mark.slow
def test_a_256_mib_multi_frame_is_prepared_without_copies_in_memory(
    tmp_path: Path, figures: dict[str, Any]
) -> None:
    big = tmp_path / "big.dcm"
    _write_multi_frame(big)
    run = subprocess.run(
        [sys.executable, "-c", _ROUTER, str(tmp_path), str(big), RLELossless],
        check=True, capture_output=True, text=True, timeout=600,
    )
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert (out["state"], out["syntax"]) == ("prepared", RLELossless)
    copy = pydicom.dcmread(out["path"], stop_before_pixels=True)
    assert copy.file_meta.TransferSyntaxUID == RLELossless and copy.NumberOfFrames == FRAMES
    grown = out["peak"] - out["before"]
    mib = PIXEL_BYTES >> 20
    figures[f"prepare stage, {mib} MiB multi-frame -> RLE: router peak RSS growth"] = f"{grown / 2**20:.1f} MiB"
    figures[f"prepare stage, {mib} MiB multi-frame -> RLE: worker peak RSS"] = f"{out['worker_peak'] / 2**20:.1f} MiB"
    figures[f"prepare stage, {mib} MiB multi-frame -> RLE: seconds"] = f"{out['seconds']:.1f}"
    figures[f"prepare stage, {mib} MiB multi-frame -> RLE: copy"] = f"{Path(out['path']).stat().st_size / 2**20:.1f} MiB"
    assert grown < PIXEL_BYTES / 8  # before: the converted data set, its bytes and their copy
    assert out["worker_peak"] < PIXEL_BYTES / 2  # the codec's process converts frame by frame
