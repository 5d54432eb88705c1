"""A large multi-frame instance is converted frame by frame: the converting process's peak memory
grows by a small part of the pixel data, not by copies of it. Measured in a fresh process (peak
RSS during the large conversion against the resident size before it, after a warm-up
conversion of a small image)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from capacitor_trio.transcode import convert_file
from tests.transcode.images import make_image

FRAMES = 80
SIZE = 512
PIXEL_BYTES = FRAMES * SIZE * SIZE * 2

_MEASURE = """
import json, sys
from pathlib import Path
from capacitor_trio.transcode import convert_file

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # KiB

small, big, target, out = sys.argv[1:5]
convert_file(Path(small), Path(out + ".warm"), target)
before = status("VmRSS")
convert_file(Path(big), Path(out), target)
print(json.dumps({"before_kb": before, "after_kb": status("VmHWM")}))
"""


def _multi_frame(path: Path) -> Path:
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    frames = np.stack(
        [((x + y + 8 * f) % 4096 + rng.integers(0, 16, (SIZE, SIZE))) for f in range(FRAMES)]
    ).astype("<u2")
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = SIZE
    ds.NumberOfFrames = FRAMES
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = frames.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("memory")
    big = _multi_frame(d / "big.dcm")
    j2k = d / "big-j2k.dcm"
    convert_file(big, j2k, "1.2.840.10008.1.2.4.90")
    return {"native": big, "j2k": j2k, "small": make_image(d, "mono12")}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("native", "1.2.840.10008.1.2.5"),  # RLE
        ("native", "1.2.840.10008.1.2.4.90"),  # J2K lossless
        ("j2k", "1.2.840.10008.1.2.1"),  # decoding
        ("native", "1.2.840.10008.1.2"),  # native to native
    ],
)
def test_peak_memory_is_a_fraction_of_the_pixel_data(
    tmp_path: Path, sources: dict[str, Path], source: str, target: str, figures: dict[str, Any]
) -> None:
    out = tmp_path / "out.dcm"
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(sources["small"]), str(sources[source]), target, str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
    )
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    grown = (rss["after_kb"] - rss["before_kb"]) * 1024
    figures[f"transcode peak RSS growth {source}->{target} ({PIXEL_BYTES >> 20} MiB pixels)"] = (
        f"{grown / 2**20:.1f} MiB"
    )
    assert grown < PIXEL_BYTES / 4
