"""Small synthetic images for the transcoding tests, written with numpy + pydicom.

Each kind is a smooth gradient with a little noise (so the codecs have both structure and
entropy to work on), filling the range its Bits Stored and Pixel Representation allow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, generate_uid

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"

# kind: (bits allocated, bits stored, signed, samples, photometric, frames)
KINDS: dict[str, tuple[int, int, int, int, str, int]] = {
    "mono8": (8, 8, 0, 1, "MONOCHROME2", 1),
    "mono12": (16, 12, 0, 1, "MONOCHROME2", 1),
    "mono16": (16, 16, 0, 1, "MONOCHROME2", 1),
    "signed12": (16, 12, 1, 1, "MONOCHROME2", 1),
    "signed16": (16, 16, 1, 1, "MONOCHROME2", 1),
    "rgb8": (8, 8, 0, 3, "RGB", 1),
    "ybr8": (8, 8, 0, 3, "YBR_FULL", 1),
    "multi12": (16, 12, 0, 1, "MONOCHROME2", 4),
    "multirgb": (8, 8, 0, 3, "RGB", 3),
}


def pixels(kind: str, rows: int = 48, columns: int = 64, seed: int = 7) -> np.ndarray:
    """The image's pixel array, shaped (frames?, rows, columns, samples?)."""
    allocated, stored, signed, samples, _pi, frames = KINDS[kind]
    rng = np.random.default_rng(seed)
    lo, hi = (-(2 ** (stored - 1)), 2 ** (stored - 1) - 1) if signed else (0, 2**stored - 1)
    y, x = np.mgrid[0:rows, 0:columns]
    shape = (frames, rows, columns, samples)
    out = np.empty(shape, dtype=np.float64)
    for f in range(frames):
        for s in range(samples):
            base = (x / columns * 0.6 + y / rows * 0.3 + 0.05 * (f + s)) % 1.0
            out[f, :, :, s] = base + rng.normal(0, 0.01, (rows, columns))
    values = np.clip(lo + out * (hi - lo), lo, hi)
    dtype = np.dtype(f"{'i' if signed else 'u'}{allocated // 8}")
    arr = values.round().astype(dtype)
    if samples == 1:
        arr = arr[..., 0]
    return arr[0] if frames == 1 else arr


def make_image(
    directory: Path, kind: str, syntax: str = EXPLICIT_LE, *, planar: int = 0, name: str = ""
) -> Path:
    """Write one image of `kind` in a native `syntax`; returns its path."""
    allocated, stored, signed, samples, photometric, frames = KINDS[kind]
    arr = pixels(kind)
    ds = Dataset()
    ds.SOPClassUID = UID(SECONDARY_CAPTURE if samples == 3 else CT)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Transcode^Test"
    ds.PatientID = "TX1"
    ds.Modality = "OT" if samples == 3 else "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns = arr.shape[-3:-1] if samples == 3 else arr.shape[-2:]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = stored
    ds.HighBit = stored - 1
    ds.PixelRepresentation = signed
    if samples == 3:
        ds.PlanarConfiguration = planar
    if frames > 1:
        ds.NumberOfFrames = frames
    data = arr
    if samples == 3 and planar == 1:
        data = np.moveaxis(arr, -1, -3)  # colour-by-plane
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    little = syntax != EXPLICIT_BE
    ds.PixelData = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<" if little else ">")).tobytes()
    ds["PixelData"].VR = "OB" if allocated <= 8 else "OW"
    path = directory / (name or f"{kind}-{syntax}-{planar}.dcm")
    ds.save_as(path, implicit_vr=syntax == IMPLICIT_LE, little_endian=little, enforce_file_format=True)
    return path


def psnr(original: np.ndarray, decoded: np.ndarray, bits_stored: int) -> float:
    """Peak signal-to-noise ratio in dB, the peak being 2^BitsStored - 1."""
    err = np.mean((original.astype(np.float64) - decoded.astype(np.float64)) ** 2)
    if err == 0:
        return float("inf")
    return float(10 * np.log10((2**bits_stored - 1) ** 2 / err))
