"""Transfer syntax conversion (issue 22).

`codec` is pure and synchronous and runs inside a worker process: it reads one Part-10 file and
writes it in another transfer syntax, frame by frame, with the codecs of well-kept libraries
(pydicom's encoders and decoders with pylibjpeg, pylibjpeg-openjpeg, pylibjpeg-rle and pyjpegls;
python-gdcm for the JPEG processes pydicom cannot encode). `pool` is the Trio side: a bounded set
of worker processes (trio-parallel) in which conversions run off the event loop, cancellable.
"""

from capacitor_trio.transcode.codec import (
    Converted,
    TranscodeError,
    can_convert,
    can_decode,
    can_encode,
    convert_file,
)
from capacitor_trio.transcode.pool import TranscodePool

__all__ = [
    "Converted",
    "TranscodeError",
    "TranscodePool",
    "can_convert",
    "can_decode",
    "can_encode",
    "convert_file",
]
