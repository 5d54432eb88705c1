#!/usr/bin/env python
"""Transcoding benchmark: our conversions against the C++ tool doing the same conversion on the
same files, in the same run.

Usage:  .venv/bin/python bench/transcode.py [--count 40] [--rounds 2]

Corpus (generated once into bench/.corpus/CT): `count` CT-like images, 512x512, 16 bits allocated,
12 stored (~0.5 MB each, Explicit VR Little Endian): a body ellipse with organs of different
densities and noise, air around it.

For each codec (JPEG 2000 lossless, JPEG lossless SV1, RLE), interleaved in each round:
  ours       convert_file in this process, one file after another (warm: imports and codecs
             loaded, as in a pool worker)
  ours-pool  the same files through TranscodePool with one worker process (what the router
             runs: the call, its arguments and result crossing to the worker and back)
  tool       the C++ tool, one process per file as it is used (gdcmconv --j2k, dcmcjpeg
             (lossless SV1 is its default), dcmcrle), timed from its start to its exit
The table gives conversions/s and input MB/s (median of the rounds) and ours / tool.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
CORPUS = ROOT / ".corpus" / "CT"

CODECS = {
    "J2K lossless": ("1.2.840.10008.1.2.4.90", ["gdcmconv", "--j2k"]),
    "JPEG lossless SV1": ("1.2.840.10008.1.2.4.70", ["dcmcjpeg"]),
    "RLE": ("1.2.840.10008.1.2.5", ["dcmcrle"]),
}


def make_corpus(count: int) -> list[Path]:
    files = sorted(CORPUS.glob("ct*.dcm"))
    if len(files) >= count:
        return files[:count]
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    shutil.rmtree(CORPUS, ignore_errors=True)
    CORPUS.mkdir(parents=True)
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:512, 0:512]
    study, series = generate_uid(), generate_uid()
    for i in range(count):
        body = ((x - 256) / 200) ** 2 + ((y - 260) / 150) ** 2 < 1
        img = np.where(body, 1040.0, 24.0)
        for cx, cy, r, v in ((200, 240, 40, 1100), (320, 250, 50, 980), (256, 330, 25, 2200)):
            img[(x - cx - i % 7) ** 2 + (y - cy) ** 2 < r * r] = v
        img += rng.normal(0, 12, img.shape) * body
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "BENCH", "BENCH^TRANSCODE"
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.clip(img, 0, 4095).astype("<u2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(CORPUS / f"ct{i:04d}.dcm", enforce_file_format=True)
    return sorted(CORPUS.glob("ct*.dcm"))[:count]


def run_ours(files: list[Path], uid: str, out: Path) -> float:
    from capacitor_trio.transcode import convert_file

    t0 = time.perf_counter()
    for i, f in enumerate(files):
        convert_file(f, out / f"{i}.dcm", uid)
    return time.perf_counter() - t0


def run_pool(files: list[Path], uid: str, out: Path) -> float:
    import trio

    from capacitor_trio.transcode import TranscodePool

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            pool = TranscodePool(1)
            await nursery.start(pool.run)
            await pool.convert(files[0], out / "warm.dcm", uid)  # the worker started, warm
            t0 = time.perf_counter()
            for i, f in enumerate(files):
                await pool.convert(f, out / f"{i}.dcm", uid)
            elapsed = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        return elapsed

    return trio.run(main)


def run_tool(files: list[Path], cmd: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        subprocess.run([*cmd, str(f), str(out / f"{i}.dcm")], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    files = make_corpus(args.count)
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    from capacitor_trio.transcode import convert_file

    with tempfile.TemporaryDirectory() as tmp:  # warm up: imports, codecs, page cache
        for uid, _cmd in CODECS.values():
            convert_file(files[0], Path(tmp) / "w.dcm", uid)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, (uid, cmd) in CODECS.items():
            for side, run in (
                ("ours", lambda o, u=uid: run_ours(files, u, o)),
                ("ours-pool", lambda o, u=uid: run_pool(files, u, o)),
                ("tool", lambda o, c=cmd: run_tool(files, c, o)),
            ):
                with tempfile.TemporaryDirectory() as tmp:
                    times.setdefault((name, side), []).append(run(Path(tmp)))
    print(f"{len(files)} files, {megabytes:.1f} MB, {args.rounds} rounds (median)")
    print(f"{'codec':<20} {'side':<10} {'conv/s':>8} {'MB/s':>8} {'/ tool':>7}")
    for name, (_uid, cmd) in CODECS.items():
        tool = statistics.median(times[(name, "tool")])
        for side in ("ours", "ours-pool", "tool"):
            t = statistics.median(times[(name, side)])
            label = side if side != "tool" else cmd[0]
            print(
                f"{name:<20} {label:<10} {len(files) / t:8.1f} {megabytes / t:8.1f} {tool / t:7.2f}"
            )


if __name__ == "__main__":
    main()
