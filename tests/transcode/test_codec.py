"""Every syntax of Capacitor's table (capacitor-behaviour.md §1.10) on 8-bit, 12/16-bit, signed,
colour and multi-frame images: converted by us, then decoded by a second implementation (DCMTK's
dcmdjpeg / dcmdrle / dcmdjpls / dcmconv, GDCM's gdcmconv for JPEG 2000) and by us again.
Lossless syntaxes must give back the very pixels; lossy ones stay within the stated tolerance and
carry the lossy attributes and a new SOP Instance UID."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.pixels.processing import convert_color_space

from capacitor_trio.config.models import TRANSFER_SYNTAX_NAMES
from capacitor_trio.transcode import TranscodeError, can_convert, can_encode, convert_file
from capacitor_trio.transcode.encoders import J2K_PSNR, JLS_NEAR_ERROR
from tests.transcode.images import (
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    KINDS,
    make_image,
    pixels,
    psnr,
)

pytestmark = pytest.mark.dcmtk

NAMES = sorted(n for n in TRANSFER_SYNTAX_NAMES if n != "JPEGLossless")  # an alias of 14 SV1
LOSSY = {
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
}
NATIVE = {IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE}
# Least PSNR (dB) for the lossy syntaxes (JPEG-LS is held to its NEAR bound instead).
MIN_PSNR = {
    # OpenJPEG aims at 55 dB per component; RGB through the irreversible colour transform
    # and back loses a little more in rounding.
    "1.2.840.10008.1.2.4.91": J2K_PSNR - 8,
    # colour is stored as YCbCr with 2x2 chroma subsampling: sharp colour edges lose most
    "1.2.840.10008.1.2.4.50": 32.0,
    "1.2.840.10008.1.2.4.51": 35.0,
}


def refused(kind: str, uid: str) -> bool:
    """What PS3.5 §8.2 does not allow (and the refusal we expect)."""
    allocated, stored, signed, samples, _pi, _frames = KINDS[kind]
    if uid == "1.2.840.10008.1.2.4.50":
        return allocated != 8 or bool(signed)
    if uid == "1.2.840.10008.1.2.4.51":
        return samples != 1 or bool(signed) or stored not in (8, 12)
    if uid == "1.2.840.10008.1.2.4.81":
        return bool(signed)  # the images reach the range's ends: NEAR could flip a sign
    return False


def second_decode(path: Path, uid: str, tmp: Path) -> Path:
    """Decode `path` to Explicit VR Little Endian with another implementation."""
    out = tmp / "second.dcm"
    if uid in NATIVE:
        cmd = ["dcmconv", "+te", str(path), str(out)]
    elif uid == "1.2.840.10008.1.2.5":
        cmd = ["dcmdrle", str(path), str(out)]
    elif uid in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"):
        cmd = ["dcmdjpls", str(path), str(out)]
    elif uid in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"):
        if shutil.which("gdcmconv") is None:
            pytest.skip("gdcmconv (Debian libgdcm-tools) is not installed")
        cmd = ["gdcmconv", "--raw", str(path), str(out)]
    elif uid in ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"):
        # +cn: lossless data is compared as stored (DCMTK would turn YBR_FULL into RGB)
        cmd = ["dcmdjpeg", "+cn", str(path), str(out)]
    else:
        cmd = ["dcmdjpeg", str(path), str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return out


def expected_pixels(kind: str, uid: str) -> np.ndarray:
    original = pixels(kind)
    if KINDS[kind][4] == "YBR_FULL" and uid in LOSSY:
        return convert_color_space(original, "YBR_FULL", "RGB")  # lossy output is RGB
    return original


def compare(kind: str, uid: str, path: Path) -> None:
    want = expected_pixels(kind, uid)
    got = pixel_array(path, raw=True)
    photometric = dcmread(path, stop_before_pixels=True).PhotometricInterpretation
    if photometric == "YBR_FULL" and KINDS[kind][4] == "RGB":
        got = convert_color_space(got, "YBR_FULL", "RGB")
    assert got.shape == want.shape
    if uid not in LOSSY:
        np.testing.assert_array_equal(got.astype(np.int64), want.astype(np.int64))
    elif uid == "1.2.840.10008.1.2.4.81":
        diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
        assert int(diff.max()) <= JLS_NEAR_ERROR
    else:
        stored = KINDS[kind][1]
        assert psnr(want, got, stored) >= MIN_PSNR[uid]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", NAMES)
def test_round_trip(tmp_path: Path, kind: str, name: str) -> None:
    uid = TRANSFER_SYNTAX_NAMES[name]
    assert can_encode(uid), f"no codec installed for {name}"
    src = make_image(tmp_path, kind)
    dst = tmp_path / "out.dcm"
    if refused(kind, uid):
        with pytest.raises(TranscodeError, match=r"cannot hold|range|Bits"):
            convert_file(src, dst, uid)
        return
    result = convert_file(src, dst, uid)
    out = dcmread(dst)
    original = dcmread(src, stop_before_pixels=True)
    assert out.file_meta.TransferSyntaxUID == uid
    assert result.transfer_syntax_uid == uid and result.size == dst.stat().st_size
    assert result.lossy == (uid in LOSSY)
    assert result.sop_instance_uid == out.SOPInstanceUID == out.file_meta.MediaStorageSOPInstanceUID
    if uid in LOSSY:
        assert out.SOPInstanceUID != original.SOPInstanceUID
        assert out.LossyImageCompression == "01"
        assert float(out.LossyImageCompressionRatio) > 1.0
        assert out.LossyImageCompressionMethod == LOSSY[uid]
        assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
        assert out.ImageType[0] == "DERIVED"
    else:
        assert out.SOPInstanceUID == original.SOPInstanceUID
        assert "LossyImageCompression" not in out
    compare(kind, uid, second_decode(dst, uid, tmp_path))
    back = tmp_path / "back.dcm"
    convert_file(dst, back, EXPLICIT_LE)
    compare(kind, uid, back)


@pytest.mark.parametrize("planar", [0, 1])
@pytest.mark.parametrize("source", [IMPLICIT_LE, EXPLICIT_BE])
def test_native_sources(tmp_path: Path, source: str, planar: int) -> None:
    """Implicit VR and big endian sources, colour-by-plane too, into JPEG 2000 and back."""
    for kind in ("mono12", "rgb8"):
        src = make_image(tmp_path, kind, source, planar=planar)
        dst = tmp_path / f"{kind}.j2k.dcm"
        convert_file(src, dst, "1.2.840.10008.1.2.4.90")
        back = tmp_path / f"{kind}.back.dcm"
        convert_file(dst, back, source)
        assert dcmread(back).file_meta.TransferSyntaxUID == source
        np.testing.assert_array_equal(pixel_array(back, raw=True), pixels(kind))


def test_multi_frame_has_basic_offset_table(tmp_path: Path) -> None:
    src = make_image(tmp_path, "multi12")
    dst = tmp_path / "rle.dcm"
    convert_file(src, dst, "1.2.840.10008.1.2.5")
    data = dcmread(dst).PixelData
    tag, length = struct.unpack("<II", data[:8])
    assert tag == 0xE000FFFE and length == 4 * 4
    offsets = struct.unpack("<4I", data[8:24])
    first = 24
    assert offsets[0] == 0
    for offset in offsets:
        assert struct.unpack("<I", data[first + offset : first + offset + 4])[0] == 0xE000FFFE


def test_lossy_twice_appends_ratio_and_method(tmp_path: Path) -> None:
    src = make_image(tmp_path, "mono8")
    once = tmp_path / "once.dcm"
    twice = tmp_path / "twice.dcm"
    convert_file(src, once, "1.2.840.10008.1.2.4.50")
    convert_file(once, twice, "1.2.840.10008.1.2.4.91")
    ds = dcmread(twice)
    assert list(ds.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_15444_1"]
    assert len(ds.LossyImageCompressionRatio) == 2
    assert len(ds.SourceImageSequence) == 2


def test_decoding_a_lossy_source_keeps_it_marked_lossy(tmp_path: Path) -> None:
    src = make_image(tmp_path, "mono8")
    jpeg = tmp_path / "jpeg.dcm"
    convert_file(src, jpeg, "1.2.840.10008.1.2.4.50")
    ds = dcmread(jpeg)
    del ds.LossyImageCompression  # a sender that did not set it
    ds.save_as(jpeg)
    native = tmp_path / "native.dcm"
    result = convert_file(jpeg, native, EXPLICIT_LE)
    assert not result.lossy
    assert dcmread(native).LossyImageCompression == "01"


def test_no_pixel_data(tmp_path: Path) -> None:
    src = make_image(tmp_path, "mono8")
    ds = dcmread(src)
    del ds.PixelData
    ds.save_as(src)
    with pytest.raises(TranscodeError, match="no Pixel Data"):
        convert_file(src, tmp_path / "x.dcm", "1.2.840.10008.1.2.4.90")
    result = convert_file(src, tmp_path / "y.dcm", IMPLICIT_LE)
    assert result.transfer_syntax_uid == IMPLICIT_LE
    assert dcmread(tmp_path / "y.dcm").PatientID == "TX1"


def test_not_dicom_is_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "junk.dcm"
    src.write_bytes(b"not dicom at all" * 10)
    with pytest.raises(TranscodeError) as info:
        convert_file(src, tmp_path / "x.dcm", EXPLICIT_LE)
    assert "\n" not in str(info.value)


def test_unknown_syntax_cannot_convert() -> None:
    assert not can_convert(EXPLICIT_LE, "1.2.3.4")
    assert can_convert("1.2.3.4", "1.2.3.4")
    assert can_convert("1.2.840.10008.1.2.4.70", IMPLICIT_LE)


@pytest.mark.parametrize(
    ("kind", "tool", "lossless"),
    [
        ("mono12", ["dcmcjpeg", "+el", "+sv", "6"], True),  # process 14, predictor 6
        ("signed16", ["dcmcjpeg"], True),  # lossless SV1, DCMTK's default
        ("rgb8", ["dcmcjpeg", "+eb"], False),  # baseline: YBR_FULL_422
        ("multi12", ["dcmcrle"], True),
        ("rgb8", ["dcmcrle"], True),
        ("mono16", ["dcmcjpls"], True),  # JPEG-LS lossless (decoded, not produced, by us)
        ("mono12", ["gdcmconv", "--j2k"], True),
    ],
)
def test_sources_compressed_by_other_tools(
    tmp_path: Path, kind: str, tool: list[str], lossless: bool
) -> None:
    """Instances another implementation compressed decode through us to the same pixels (lossy:
    close, and RGB with Lossy Image Compression kept)."""
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} is not installed")
    src = make_image(tmp_path, kind)
    compressed = tmp_path / "theirs.dcm"
    subprocess.run([*tool, str(src), str(compressed)], check=True, capture_output=True, timeout=60)
    for target in (EXPLICIT_LE, "1.2.840.10008.1.2.4.90"):
        out = tmp_path / f"ours-{target}.dcm"
        convert_file(compressed, out, target)
        back = tmp_path / "back.dcm"
        convert_file(out, back, EXPLICIT_LE)
        got = pixel_array(back, raw=True)
        if lossless:
            np.testing.assert_array_equal(got, pixels(kind))
        else:
            assert dcmread(back).PhotometricInterpretation == "RGB"
            assert dcmread(back).LossyImageCompression == "01"
            assert psnr(pixels(kind), got, 8) >= 30.0


def test_deflated_source(tmp_path: Path) -> None:
    src = make_image(tmp_path, "rgb8")
    ds = dcmread(src)
    deflated = tmp_path / "deflated.dcm"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    ds.save_as(deflated)
    out = tmp_path / "rle.dcm"
    convert_file(deflated, out, "1.2.840.10008.1.2.5")
    back = tmp_path / "back.dcm"
    convert_file(out, back, IMPLICIT_LE)
    np.testing.assert_array_equal(pixel_array(back, raw=True), pixels("rgb8"))


def test_a_syntax_without_decoder_is_refused_with_its_name(tmp_path: Path) -> None:
    src = make_image(tmp_path, "mono8")
    ds = dcmread(src)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder installed
    ds.PixelData = encapsulate([b"\x00\x00"])
    ds.save_as(src)
    with pytest.raises(TranscodeError, match="no installed codec decodes MPEG2"):
        convert_file(src, tmp_path / "x.dcm", EXPLICIT_LE)
    assert not (tmp_path / "x.dcm").exists()


def test_a_frame_too_large_is_refused_before_decoding(tmp_path: Path) -> None:
    """A header claiming 65535 x 65535 x 3 samples (12 GiB a frame) over a few bytes of JPEG."""
    src = make_image(tmp_path, "rgb8")
    ds = dcmread(src)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    ds.Rows = ds.Columns = 65535
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds.save_as(src)
    with pytest.raises(TranscodeError, match="exceeds the 1024 MiB"):
        convert_file(src, tmp_path / "x.dcm", EXPLICIT_LE)
