"""Synthetic DICOM instances for tests: made with pydicom, small and deterministic."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)


def make_dataset(
    *,
    rows: int = 64,
    columns: int = 64,
    sop_class_uid: str = CTImageStorage,
    sop_instance_uid: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "CT",
    patient_id: str = "PID001",
    patient_name: str = "DOE^JANE",
    accession: str = "ACC001",
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
) -> Dataset:
    """A CT-like image dataset with file meta, ready for `to_part10_bytes`."""
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.AccessionNumber = accession
    ds.StudyDate = "20261128"
    ds.InstanceNumber = seed + 1
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    pixels = bytes((i * 7 + seed) & 0xFF for i in range(rows * columns * 2))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if transfer_syntax == RLELossless:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        import numpy as np  # optional: only the RLE path needs it

        arr = np.frombuffer(pixels, dtype="<u2").reshape(rows, columns)
        ds.PixelData = arr.tobytes()
        ds.compress(RLELossless, arr, encoding_plugin="pydicom")
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = pixels
    return ds


def to_part10_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian, little_endian=True)
    return buf.getvalue()


def write_dataset(path: Path, ds: Dataset) -> Path:
    path.write_bytes(to_part10_bytes(ds))
    return path


def read_dataset(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def write_corpus(
    directory: Path,
    n: int,
    *,
    transfer_syntax: str = pydicom.uid.ExplicitVRLittleEndian,
    rows: int = 64,
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = make_dataset(rows=rows, columns=rows, transfer_syntax=transfer_syntax, seed=i)
        paths.append(write_dataset(directory / f"img{i:04d}.dcm", ds))
    return paths


CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage (private)
MADE_UP = "1.2.3.4.5.6"  # a SOP class no list knows


def vendor_instances(directory: Path) -> list[Path]:
    """A Siemens CSA Non-Image object (no pixel data; a 100 KB private CSA element, so that it
    is received in a temporary file) and a small image of a made-up class (received in memory)."""
    directory.mkdir(parents=True, exist_ok=True)
    csa = make_dataset(sop_class_uid=CSA_NON_IMAGE, modality="MR", rows=8, columns=8)
    for keyword in (
        "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
        "BitsStored", "HighBit", "PixelRepresentation", "PixelData",
    ):
        delattr(csa, keyword)
    block = csa.private_block(0x0029, "SIEMENS CSA NON-IMAGE", create=True)
    block.add_new(0x08, "CS", "SPEC NUM 4")
    block.add_new(0x10, "OB", bytes(range(256)) * 400)
    made_up = make_dataset(sop_class_uid=MADE_UP, rows=16, columns=16)
    return [write_dataset(directory / "csa.dcm", csa), write_dataset(directory / "x.dcm", made_up)]
