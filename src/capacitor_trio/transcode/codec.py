"""Converting one Part-10 file into another transfer syntax: pure, synchronous, for a worker process.

`convert_file(src, dst, target_uid)` reads `src` and writes a complete Part-10 file at `dst`,
fsync'd (the caller hands a temporary path and renames it when this returns). The pixel data is converted one
frame at a time: frames are decoded from the file as they are needed (pydicom's `iter_array` over
the open file, not the whole Pixel Data), encoded (`encoders.py`) and written out, so a large
multi-frame instance is never held whole, decoded or encoded, except where a lossy output's
compression ratio must be known before its header is written (then the compressed frames are
held, a fraction of the decoded size).

What is kept and what changes:
- every element before Pixel Data is kept; elements after it (Data Set Trailing Padding, Digital
  Signatures, which a new encoding invalidates) are not written;
- the Image Pixel module follows the frames: Photometric Interpretation as the decoder and the
  encoder leave it (YBR_FULL_422 from lossy JPEG becomes RGB, RGB compressed as JPEG 2000 becomes
  YBR_RCT / YBR_ICT), Planar Configuration 0 (frames are handled colour-by-pixel);
- a lossy conversion (a lossy target syntax) sets Lossy Image Compression (0028,2110) to "01",
  appends its ratio and method to (0028,2112) and (0028,2114) (PS3.3 C.7.6.1.1.5), and makes a new
  instance: a new SOP Instance UID, Image Type DERIVED, the original in Source Image Sequence;
- decoding a source in a lossy syntax keeps (or sets) Lossy Image Compression "01".

A conversion the data cannot take (a lossy JPEG of 16-bit data, colour in JPEG 12-bit, an
instance without Pixel Data into a compressed syntax, a syntax with no installed codec) raises
`TranscodeError` with a one-line reason, and so does running out of memory (a frame is at most
1 GiB decoded, checked from the header before decoding). OSError (a full disk, an unreadable
file) propagates as it is: it is not the instance's fault.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import _array_common, as_pixel_options, pack_bits
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, generate_uid
from pydicom.valuerep import VR

from capacitor_trio.transcode import encoders
from capacitor_trio.transcode.encoders import FrameSpec

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
NATIVE_OUT = frozenset({IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE})
NATIVE_IN = NATIVE_OUT | {DEFLATED_LE}
# Lossy syntaxes a source may arrive in (decoding them keeps Lossy Image Compression "01").
LOSSY_SOURCES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.203",
    }
)
_MAX_ENCAPSULATED = 2**32 - 1
# One decoded frame at most (a header claiming more is refused before anything is decoded).
MAX_FRAME_BYTES = 1 << 30
# Raw values whose bytes are words of this size: swapped when the byte order changes.
_SWAP_SIZES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


@attrs.frozen
class Converted:
    """The output of one conversion. `lossy` means this conversion lost information (a lossy
    target syntax); the output then is a new instance with its own `sop_instance_uid`."""

    transfer_syntax_uid: str
    size: int
    lossy: bool
    sop_instance_uid: str


class TranscodeError(Exception):
    """This instance cannot be converted to that syntax; the message is a one-line reason."""


def can_decode(uid: str) -> bool:
    """True if pixel data in syntax `uid` can be decoded with the installed codecs."""
    if uid in NATIVE_IN:
        return True
    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


def can_encode(uid: str) -> bool:
    """True if this module can write syntax `uid` with the installed codecs."""
    return uid in NATIVE_OUT or encoders.available(uid)


def can_convert(from_uid: str, to_uid: str) -> bool:
    """True if an instance in `from_uid` can in general be written in `to_uid` (a particular
    instance may still be refused: 16-bit data in a JPEG 8-bit syntax, for example)."""
    return from_uid == to_uid or (can_decode(from_uid) and can_encode(to_uid))


def convert_file(src: Path, dst: Path, target_uid: str) -> Converted:
    """Write `src` in `target_uid` as a complete Part-10 file at `dst`; on failure `dst` is
    removed."""
    try:
        return _convert(Path(src), Path(dst), target_uid)
    except BaseException as exc:
        Path(dst).unlink(missing_ok=True)
        if isinstance(exc, MemoryError):
            raise TranscodeError("the conversion ran out of memory") from None
        if isinstance(exc, TranscodeError | OSError) or not isinstance(exc, Exception):
            raise
        # the libraries' many exception types: one clear reason
        raise TranscodeError(_one_line(exc)) from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def _convert(src: Path, dst: Path, target: str) -> Converted:
    header = dcmread(src, stop_before_pixels=True)
    source = str(header.file_meta.get("TransferSyntaxUID", ""))
    if not source:
        raise TranscodeError("the file has no Transfer Syntax UID in its meta information")
    if source == target:
        shutil.copyfile(src, dst)
        with dst.open("rb+") as f:
            os.fsync(f.fileno())
        return Converted(target, dst.stat().st_size, False, str(header.SOPInstanceUID))
    if not can_decode(source):
        raise TranscodeError(f"no installed codec decodes {_name(source)}")
    if not can_encode(target):
        raise TranscodeError(f"no installed codec encodes {_name(target)}")
    if not _has_pixel_data(src, source):
        if target not in NATIVE_OUT:
            raise TranscodeError(
                f"no Pixel Data to compress: only the uncompressed syntaxes apply, not {_name(target)}"
            )
        return _rewrite_whole(src, dst, source, target)
    return _convert_pixels(src, dst, header, source, target)


def _has_pixel_data(src: Path, source: str) -> bool:
    """Whether the data set has (7FE0,0010) Pixel Data (not Float or Double Float Pixel Data)."""
    if source == DEFLATED_LE:
        return "PixelData" in dcmread(src, defer_size=1024)
    with src.open("rb") as f:
        try:
            _ds, opts = _array_common(f, [])
        except AttributeError:
            return False
    return bool(opts.get("pixel_keyword") == "PixelData")


# ---------------------------------------------------------------- without pixel frames


def _rewrite_whole(src: Path, dst: Path, source: str, target: str) -> Converted:
    """An instance without (7FE0,0010): the whole data set re-encoded (it has no frames)."""
    ds = dcmread(src)
    _write_part10(dst, ds.file_meta, target, source, ds, None)
    return Converted(target, dst.stat().st_size, False, str(ds.SOPInstanceUID))


# ---------------------------------------------------------------- frame by frame


def _frames(src: Path, source: str, raw: bool) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Decoded frames with pydicom's description of each (photometric interpretation after
    decoding), read from the open file one frame at a time."""
    decoder = get_decoder(source)
    if source == DEFLATED_LE:  # deflated: the data set must be inflated whole
        ds = dcmread(src)
        opts = as_pixel_options(ds)
        yield from decoder.iter_array(ds, raw=raw, validate=True, **opts)
        return
    with src.open("rb") as f:
        _ds, opts = _array_common(f, [])
        yield from decoder.iter_array(f, raw=raw, validate=True, **opts)


def _convert_pixels(src: Path, dst: Path, header: Dataset, source: str, target: str) -> Converted:
    declared = int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1))
    if declared * int(header.BitsAllocated) // 8 > MAX_FRAME_BYTES:
        raise TranscodeError(
            f"a frame of {header.Rows} x {header.Columns} x {header.get('SamplesPerPixel', 1)} "
            f"samples of {header.BitsAllocated} bits exceeds the {MAX_FRAME_BYTES >> 20} MiB a "
            "frame may take decoded"
        )
    # Lossless sources are decoded raw (YBR_FULL stays YBR_FULL: converting it to RGB would
    # round); lossy JPEG sources are converted to RGB, as DCMTK's dcmdjpeg does.
    frames = _frames(src, source, raw=source not in LOSSY_SOURCES)
    try:
        first, info = next(frames)
    except StopIteration:
        raise TranscodeError("the Pixel Data holds no frame") from None
    spec = _frame_spec(header, first, info)
    nframes = int(header.get("NumberOfFrames", 1) or 1)
    out = header
    out.file_meta.TransferSyntaxUID = UID(target)
    _set_image_pixel(out, spec)
    if source in LOSSY_SOURCES:
        out.LossyImageCompression = "01"
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in out:  # they describe the source's fragments
            del out[keyword]
    all_frames = _chain(first, frames)
    if target in NATIVE_OUT:
        pixel = _native_writer(all_frames, spec, nframes, target)
        _write_part10(dst, out.file_meta, target, source, out, pixel)
        return Converted(target, dst.stat().st_size, False, str(out.SOPInstanceUID))
    codec = encoders.target(target)
    codec.check(spec)  # refused before anything is written
    out.PhotometricInterpretation = codec.output_photometric(spec)
    encoded = (codec.encode(arr, spec) for arr in all_frames)
    if codec.lossy_method is None:
        pixel = _encapsulated_writer(encoded, nframes)
        _write_part10(dst, out.file_meta, target, source, out, pixel)
        return Converted(target, dst.stat().st_size, False, str(out.SOPInstanceUID))
    held = list(encoded)  # the ratio goes in the header, written before the pixel data
    ratio = spec.frame_bytes * len(held) / max(1, sum(len(b) for b in held))
    _mark_lossy(out, ratio, codec.lossy_method)
    _write_part10(dst, out.file_meta, target, source, out, _encapsulated_writer(held, nframes))
    return Converted(target, dst.stat().st_size, True, str(out.SOPInstanceUID))


def _chain(
    first: np.ndarray, rest: Iterator[tuple[np.ndarray, dict[str, Any]]]
) -> Iterator[np.ndarray]:
    yield first
    for arr, _info in rest:
        yield arr


def _frame_spec(header: Dataset, arr: np.ndarray, info: dict[str, Any]) -> FrameSpec:
    photometric = str(info.get("photometric_interpretation") or header.PhotometricInterpretation)
    return FrameSpec(
        rows=int(header.Rows),
        columns=int(header.Columns),
        samples_per_pixel=int(header.get("SamplesPerPixel", 1)),
        bits_allocated=int(header.BitsAllocated),
        bits_stored=int(header.get("BitsStored", header.BitsAllocated)),
        pixel_representation=int(header.get("PixelRepresentation", 0)),
        photometric=photometric,
    )


def _set_image_pixel(ds: Dataset, spec: FrameSpec) -> None:
    ds.PhotometricInterpretation = spec.photometric
    if spec.samples_per_pixel > 1:
        ds.PlanarConfiguration = 0  # frames are handled colour-by-pixel


def _mark_lossy(ds: Dataset, ratio: float, method: str) -> None:
    """PS3.3 C.7.6.1.1.5: "01", the ratio and method appended to any earlier ones; a new
    instance (new SOP Instance UID, DERIVED, the original in Source Image Sequence)."""
    earlier = ds.get("LossyImageCompression") == "01"
    ratios = _values(ds, "LossyImageCompressionRatio") if earlier else []
    methods = _values(ds, "LossyImageCompressionMethod") if earlier else []
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, f"{ratio:.2f}"]
    ds.LossyImageCompressionMethod = [*methods, method]
    original = Dataset()
    original.ReferencedSOPClassUID = ds.SOPClassUID
    original.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    sources = list(ds.get("SourceImageSequence", []))
    ds.SourceImageSequence = [*sources, original]
    if "ImageType" in ds:
        kinds = list(ds.ImageType) if ds["ImageType"].VM > 1 else [str(ds.ImageType)]
        ds.ImageType = ["DERIVED", *kinds[1:]]
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def _values(ds: Dataset, keyword: str) -> list[str]:
    if keyword not in ds or ds[keyword].VM == 0:
        return []
    value = ds[keyword].value
    items = list(value) if ds[keyword].VM > 1 else [value]
    return [str(v) for v in items]


# ---------------------------------------------------------------- writing


PixelWriter = Any  # Callable[[BinaryIO, bool, bool], None]: writes the Pixel Data element


def _write_part10(
    dst: Path,
    meta: FileMetaDataset,
    target: str,
    source: str,
    body: Dataset,
    pixel: PixelWriter | None,
) -> None:
    """Preamble, meta information, the data set in the target's encoding, then the pixel data."""
    implicit = target == IMPLICIT_LE
    little = target != EXPLICIT_BE
    if (source == EXPLICIT_BE) != (not little):
        _swap_words(body, from_little=source != EXPLICIT_BE)
    meta.TransferSyntaxUID = UID(target)
    if "MediaStorageSOPClassUID" not in meta:
        meta.MediaStorageSOPClassUID = body.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta:
        meta.MediaStorageSOPInstanceUID = body.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID  # the writer of this file
    if "ImplementationVersionName" in meta:
        del meta.ImplementationVersionName
    with dst.open("wb") as raw:
        raw.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(raw), meta, enforce_standard=True)
        fp = DicomFileLike(raw)
        fp.is_implicit_VR = implicit
        fp.is_little_endian = little
        write_dataset(fp, body)
        if pixel is not None:
            pixel(raw, implicit, little)
        raw.flush()
        os.fsync(raw.fileno())  # on disk before the caller renames it into place


def _swap_words(ds: Dataset, *, from_little: bool) -> None:
    """Byte-swap raw OW/OL/OF/OD/OV values (pydicom writes their bytes as they are)."""
    from pydicom.filewriter import correct_ambiguous_vr

    correct_ambiguous_vr(ds, from_little)
    for elem in ds:
        if elem.VR == VR.SQ:
            for item in elem.value:
                _swap_words(item, from_little=from_little)
            continue
        size = _SWAP_SIZES.get(str(elem.VR))
        if size and isinstance(elem.value, bytes | bytearray) and len(elem.value) % size == 0:
            elem.value = np.frombuffer(elem.value, dtype=f"u{size}").byteswap().tobytes()


def _element_header(tag: int, vr: str, length: int, implicit: bool, little: bool) -> bytes:
    order = "<" if little else ">"
    group, elem = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack(f"{order}HHI", group, elem, length)
    return struct.pack(f"{order}HH2sHI", group, elem, vr.encode(), 0, length)


def _native_writer(frames: Iterable[np.ndarray], spec: FrameSpec, nframes: int, target: str):
    """The Pixel Data element in a native syntax, written one frame at a time."""

    def write(f: BinaryIO, implicit: bool, little: bool) -> None:
        if spec.bits_allocated == 1:
            data = pack_bits(np.concatenate([a.ravel() for a in frames]), pad=True)
            f.write(_element_header(0x7FE00010, "OB", len(data), implicit, little))
            f.write(data)
            return
        length = spec.frame_bytes * nframes
        vr = "OB" if spec.bits_allocated <= 8 else "OW"
        f.write(_element_header(0x7FE00010, vr, length + length % 2, implicit, little))
        kind = "i" if spec.pixel_representation else "u"
        dtype = np.dtype(f"{'<' if little else '>'}{kind}{spec.bits_allocated // 8}")
        written = 0
        for arr in frames:
            data = np.ascontiguousarray(arr, dtype=dtype).tobytes()
            f.write(data)
            written += len(data)
        if written != length:
            raise TranscodeError(f"the Pixel Data decoded to {written} bytes, {length} expected")
        if length % 2:
            f.write(b"\x00")

    return write


def _encapsulated_writer(fragments: Iterable[bytes], nframes: int):
    """Encapsulated Pixel Data (PS3.5 A.4): one fragment per frame, and a Basic Offset Table
    holding each frame's offset, filled in once the fragments are written."""

    def write(f: BinaryIO, implicit: bool, little: bool) -> None:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        f.write(struct.pack("<HHI", 0xFFFE, 0xE000, 4 * nframes))
        table_at = f.tell()
        f.write(b"\x00" * (4 * nframes))
        first_at = f.tell()
        offsets: list[int] = []
        for fragment in fragments:
            offsets.append(f.tell() - first_at)
            pad = len(fragment) % 2
            f.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment) + pad))
            f.write(fragment)
            if pad:
                f.write(b"\x00")
        end = f.tell()
        if len(offsets) != nframes:
            raise TranscodeError(f"the Pixel Data held {len(offsets)} frames, {nframes} expected")
        if end - first_at > _MAX_ENCAPSULATED:
            raise TranscodeError("the encoded frames exceed the 4 GiB a Basic Offset Table holds")
        f.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        f.seek(table_at)
        f.write(struct.pack(f"<{nframes}I", *offsets))
        f.seek(0, 2)

    return write
