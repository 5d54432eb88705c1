"""One encoder per compressed target syntax: a decoded frame in, that syntax's codestream out.

pydicom's encoders (RLE with pylibjpeg-rle or its own, JPEG-LS with pyjpegls, JPEG 2000 with
pylibjpeg-openjpeg) where pydicom has one; python-gdcm (IJG libjpeg inside GDCM) for the JPEG
processes pydicom cannot encode (baseline 1, extended 2/4, lossless 14 and 14 SV1).

Each frame is checked against PS3.5 §8.2's encoding profile of its syntax (pydicom's table,
which also holds the JPEG ones) before it is encoded, so 16-bit data for an 8-bit JPEG or colour
for JPEG 12-bit is refused with a reason naming the attribute, not a codec's error.

Quality of the lossy outputs (docs/behaviour.md, "Transcoding"):
- JPEG 2000 (1.2.840.10008.1.2.4.91): irreversible wavelet, one quality layer at 55 dB PSNR
  (OpenJPEG's rate allocation, peak = 2^BitsStored - 1);
- JPEG-LS near-lossless (.4.81): NEAR = 2, every sample within ±2 of the original;
- JPEG baseline (.4.50) and extended (.4.51): IJG quality 90.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.pixels.processing import convert_color_space
from pydicom.uid import UID

RLE = "1.2.840.10008.1.2.5"
JLS_NEAR = "1.2.840.10008.1.2.4.81"
JLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"

J2K_PSNR = 55.0
JLS_NEAR_ERROR = 2
JPEG_QUALITY = 90


@attrs.frozen
class FrameSpec:
    """How one decoded frame is laid out (the Image Pixel module's values for it)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str

    @property
    def frame_bytes(self) -> int:
        bits = self.rows * self.columns * self.samples_per_pixel * self.bits_allocated
        return (bits + 7) // 8


@attrs.frozen
class TargetCodec:
    """Encoding into one compressed syntax. `lossy_method` is the PS3.3 C.7.6.1.1.5.1 defined
    term for (0028,2114), None for a lossless syntax."""

    uid: str
    lossy_method: str | None
    photometric_for: Callable[[str], str]
    encode_frame: Callable[[np.ndarray, FrameSpec, str], bytes]
    needs: tuple[str, ...]

    def input_spec(self, spec: FrameSpec) -> FrameSpec:
        """The frame as it is handed to the encoder: a lossy syntax gets YBR_FULL as RGB (the
        loss is taken anyway, and RGB is what every lossy profile accepts)."""
        if self.lossy_method is not None and spec.photometric == "YBR_FULL":
            return attrs.evolve(spec, photometric="RGB")
        return spec

    def output_photometric(self, spec: FrameSpec) -> str:
        return self.photometric_for(self.input_spec(spec).photometric)

    def check(self, spec: FrameSpec) -> None:
        check_profile(self.uid, self.input_spec(spec), self.output_photometric(spec))

    def encode(self, arr: np.ndarray, spec: FrameSpec) -> bytes:
        wanted = self.input_spec(spec)
        if wanted.photometric != spec.photometric:
            arr = convert_color_space(arr, spec.photometric, wanted.photometric)
        return self.encode_frame(arr, wanted, self.output_photometric(spec))


def check_profile(uid: str, spec: FrameSpec, photometric: str) -> None:
    """Refuse, with the values named, a frame PS3.5 §8.2 does not allow in syntax `uid`."""
    profiles = ENCODING_PROFILES.get(UID(uid))
    if spec.bits_allocated == 1:
        raise ValueError(f"1-bit pixel data cannot be encoded as {UID(uid).name}")
    if not profiles:
        return
    for pi, spp, reprs, allocated, stored in profiles:
        if (
            photometric == pi
            and spec.samples_per_pixel == spp
            and spec.pixel_representation in reprs
            and spec.bits_allocated in allocated
            and spec.bits_stored in stored
        ):
            return
    raise ValueError(
        f"{UID(uid).name} cannot hold this image: Photometric Interpretation {photometric}, "
        f"Samples per Pixel {spec.samples_per_pixel}, Bits Allocated {spec.bits_allocated}, "
        f"Bits Stored {spec.bits_stored}, Pixel Representation {spec.pixel_representation} "
        "(PS3.5 §8.2)"
    )


# ---------------------------------------------------------------- pydicom's encoders


def _pixel_kwargs(spec: FrameSpec, photometric: str) -> dict[str, Any]:
    return {
        "rows": spec.rows,
        "columns": spec.columns,
        "samples_per_pixel": spec.samples_per_pixel,
        "bits_allocated": spec.bits_allocated,
        "bits_stored": spec.bits_stored,
        "pixel_representation": spec.pixel_representation,
        "photometric_interpretation": photometric,
        "planar_configuration": 0,
        "number_of_frames": 1,
    }


def _pydicom_encoder(uid: str, plugin: str, **options: Any):
    def encode(arr: np.ndarray, spec: FrameSpec, photometric: str) -> bytes:
        from pydicom.pixels import get_encoder

        kwargs = _pixel_kwargs(spec, photometric) | options
        # pydicom's validation also checks the values against Bits Stored (and, for signed
        # JPEG-LS near-lossless, that NEAR cannot flip a sign).
        data = get_encoder(uid).encode(arr, validate=True, encoding_plugin=plugin, **kwargs)
        return bytes(data)

    return encode


def _same(photometric: str) -> str:
    return photometric


def _mct(rgb_to: str) -> Callable[[str], str]:
    """JPEG 2000: RGB is compressed with the multiple component transform (better ratio)."""
    return lambda photometric: rgb_to if photometric == "RGB" else photometric


# ---------------------------------------------------------------- GDCM's JPEG


def _gdcm_encoder(uid: str, quality: int | None):
    def encode(arr: np.ndarray, spec: FrameSpec, photometric: str) -> bytes:
        return _gdcm_jpeg(np.ascontiguousarray(arr).tobytes(), spec, uid, quality)

    return encode


def _gdcm_jpeg(src: bytes, spec: FrameSpec, uid: str, quality: int | None) -> bytes:
    """One frame through GDCM's ImageChangeTransferSyntax with its JPEG codec (IJG libjpeg
    8/12/16-bit), the way pydicom's own GDCM plugin encodes RLE."""
    import gdcm

    writer = gdcm.ImageWriter()  # owns the image: keep it alive while the image is used
    image = writer.GetImage()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((spec.columns, spec.rows, 1))
    pi = gdcm.PhotometricInterpretation.GetPIType(spec.photometric)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ImplicitVRLittleEndian))
    # GDCM picks its 8/12/16-bit IJG library by Bits Allocated; lossy JPEG allows only 8 or 12
    # bits of precision, so 12-bit data in 16-bit words is described as 12 allocated (the buffer
    # stays in 16-bit words, which is what the 12-bit library reads).
    allocated = 12 if quality is not None and spec.bits_stored == 12 else spec.bits_allocated
    image.SetPixelFormat(
        gdcm.PixelFormat(
            spec.samples_per_pixel,
            allocated,
            spec.bits_stored,
            spec.bits_stored - 1,
            spec.pixel_representation,
        )
    )
    if spec.samples_per_pixel > 1:
        image.SetPlanarConfiguration(0)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetByteStringValue(src)
    image.SetDataElement(elem)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(uid)))
    codec = gdcm.JPEGCodec()
    codec.SetLossless(quality is None)
    if quality is not None:
        codec.SetQuality(quality)
    change.SetUserCodec(codec)
    change.SetInput(image)
    if not change.Change():
        raise ValueError(f"GDCM could not encode this frame as {UID(uid).name}")
    fragments = change.GetOutput().GetDataElement().GetSequenceOfFragments()
    if fragments is None or fragments.GetNumberOfFragments() != 1:
        raise ValueError(f"GDCM gave no single fragment for {UID(uid).name}")
    buffer = fragments.GetFragment(0).GetByteValue().GetBuffer()
    return bytes(buffer.encode("utf-8", "surrogateescape"))


def _jpeg_lossy_photometric(photometric: str) -> str:
    """GDCM's lossy JPEG stores RGB as YCbCr with the chroma subsampled (components 1, 2, 3,
    2x2 / 1x1 / 1x1): PS3.5 §8.2.1's YBR_FULL_422."""
    return "YBR_FULL_422" if photometric == "RGB" else photometric


# ---------------------------------------------------------------- the table


@functools.cache
def _codecs() -> dict[str, TargetCodec]:
    table = [
        TargetCodec(RLE, None, _same, _rle_encode(), ("numpy",)),
        TargetCodec(
            J2K_LOSSLESS,
            None,
            _mct("YBR_RCT"),
            _pydicom_encoder(J2K_LOSSLESS, "pylibjpeg"),
            ("pylibjpeg", "openjpeg"),
        ),
        TargetCodec(
            J2K,
            "ISO_15444_1",
            _mct("YBR_ICT"),
            _pydicom_encoder(J2K, "pylibjpeg", j2k_psnr=[J2K_PSNR]),
            ("pylibjpeg", "openjpeg"),
        ),
        TargetCodec(
            JLS_NEAR,
            "ISO_14495_1",
            _same,
            _pydicom_encoder(JLS_NEAR, "pyjpegls", jls_error=JLS_NEAR_ERROR),
            ("jpeg_ls",),
        ),
        TargetCodec(JPEG_LOSSLESS, None, _same, _gdcm_encoder(JPEG_LOSSLESS, None), ("gdcm",)),
        TargetCodec(
            JPEG_LOSSLESS_SV1, None, _same, _gdcm_encoder(JPEG_LOSSLESS_SV1, None), ("gdcm",)
        ),
        TargetCodec(
            JPEG_BASELINE,
            "ISO_10918_1",
            _jpeg_lossy_photometric,
            _gdcm_encoder(JPEG_BASELINE, JPEG_QUALITY),
            ("gdcm",),
        ),
        TargetCodec(
            JPEG_EXTENDED,
            "ISO_10918_1",
            _jpeg_lossy_photometric,
            _gdcm_encoder(JPEG_EXTENDED, JPEG_QUALITY),
            ("gdcm",),
        ),
    ]
    return {codec.uid: codec for codec in table}


def _rle_encode():
    plugin = "pylibjpeg" if _installed("pylibjpeg", "rle") else "pydicom"
    return _pydicom_encoder(RLE, plugin)


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def available(uid: str) -> bool:
    codec = _codecs().get(uid)
    return codec is not None and _installed(*codec.needs)


def target(uid: str) -> TargetCodec:
    """The encoder for compressed syntax `uid` (ValueError if there is none)."""
    codec = _codecs().get(uid)
    if codec is None or not _installed(*codec.needs):
        raise ValueError(f"no installed codec encodes {UID(uid).name}")
    return codec
