"""Hostile DICOM peers on raw sockets, for the hostile-peers soak (issue 19): the bytes of each
attack (a deflate bomb, a data set of millions of sequence items, an oversized A-ASSOCIATE-RQ,
P-DATA of empty PDVs) and a small association driver that sends them and reads the answer.

Large payloads are generated as they are sent (iterators of chunks), so the test stays small
whatever the router is made to hold.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator

import trio
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from capacitor_trio.dicom import dimse
from capacitor_trio.dicom import pdu as P
from capacitor_trio.dicom.transport import PeerClosed, Transport
from tests.helpers.datasets import make_dataset

DEFLATED = "1.2.840.10008.1.2.1.99"
MIB = 1 << 20
_TAG_VR_LONG = struct.Struct("<HH2sHI")  # tag, VR, reserved, 32-bit length (OB, SQ, UN, ...)
_ITEM = struct.Struct("<HHI")


def raw_elements(ds: Dataset) -> bytes:
    """`ds` encoded as Explicit VR Little Endian data set bytes (no preamble, no file meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def header_elements(patient: str) -> tuple[str, bytes]:
    """(SOP Instance UID, the encoded elements from (0008,0010) on) of a small CT instance: what a
    hostile data set puts after its payload, so that the header is found only past it."""
    ds = make_dataset(rows=2, columns=2, sop_class_uid=CTImageStorage, patient_id=patient)
    for tag in [e.tag for e in ds if e.tag < 0x00080010]:
        del ds[tag]
    return str(ds.SOPInstanceUID), raw_elements(ds)


def deflate_bomb(inflated: int, suffix: bytes) -> Iterator[bytes]:
    """A raw deflate stream (Deflated Explicit VR Little Endian) of an OB element (0008,0001) of
    `inflated` zero bytes followed by `suffix`: about 1 KB on the wire per MiB inflated. Each
    MiB of zeros is compressed once; after a full flush the compressor starts afresh, so the
    same bytes stand for every further MiB."""
    length = inflated - inflated % 2
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    yield c.compress(_TAG_VR_LONG.pack(0x0008, 0x0001, b"OB", 0, length)) + c.flush(zlib.Z_FULL_FLUSH)
    block = bytes(MIB)
    whole, rest = divmod(length, MIB)
    assert whole >= 2, "a bomb of at least 2 MiB"
    chunk = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    if again != chunk:  # pragma: no cover - zlib's way
        raise AssertionError("zlib does not repeat itself after a full flush")
    yield chunk
    yield again
    for _ in range(whole - 2):
        yield chunk
    yield c.compress(bytes(rest)) + c.compress(suffix) + c.flush()


def many_items(n: int, suffix: bytes) -> Iterator[bytes]:
    """A data set whose first element is a sequence (0008,0006) of undefined length holding `n`
    items of undefined length of one 8-byte LO element each (32 bytes an item), then `suffix`."""
    yield _TAG_VR_LONG.pack(0x0008, 0x0006, b"SQ", 0, 0xFFFFFFFF)
    item = (
        _ITEM.pack(0xFFFE, 0xE000, 0xFFFFFFFF)
        + struct.pack("<HH2sH", 0x0008, 0x0104, b"LO", 8) + b"HOSTILE "
        + _ITEM.pack(0xFFFE, 0xE00D, 0)
    )
    per_chunk = 32768
    for start in range(0, n, per_chunk):
        yield item * min(per_chunk, n - start)
    yield _ITEM.pack(0xFFFE, 0xE0DD, 0)
    yield suffix


def big_associate_rq(called: str, contexts: int = 20, syntaxes: int = 2700) -> bytes:
    """An A-ASSOCIATE-RQ of `contexts` CT Image Storage contexts, each proposing `syntaxes`
    bogus 14-character transfer syntaxes (about 950 KB for the defaults), encoded by hand."""

    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value

    bogus = b"".join(item(0x40, f"1.2.3.45.{10000 + j}".encode()) for j in range(syntaxes))
    body = bytearray(struct.pack(">HH", 1, 0))
    body += called.encode().ljust(16) + b"HOSTILE".ljust(16) + bytes(32)
    body += item(0x10, P.APPLICATION_CONTEXT.encode())
    for i in range(contexts):
        abstract = item(0x30, CTImageStorage.encode())
        body += item(0x20, bytes((2 * i + 1, 0, 0, 0)) + abstract + bogus)
    body += item(0x50, item(0x51, struct.pack(">I", 16384)))
    return P.PDU_HEADER.pack(P.A_ASSOCIATE_RQ, 0, len(body)) + bytes(body)


def data_pdu(ctx: int, data: bytes | bytearray, last: bool) -> bytes:
    return P.p_data_header(ctx, 0x02 if last else 0x00, len(data)) + data


def empty_pdvs_pdu(ctx: int, n: int) -> bytes:
    """One P-DATA-TF PDU of `n` data PDVs that carry no data (6 bytes each)."""
    pdv = P.PDV_HEADER.pack(2, ctx, 0x00)
    return P.PDU_HEADER.pack(P.P_DATA_TF, 0, 6 * n) + pdv * n


def pdus(ctx: int, chunks: Iterable[bytes], size: int = 65536) -> Iterator[bytes]:
    """Data PDUs of at most `size` bytes of data from `chunks`; the last one carries the last bit."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while len(buf) > size:
            yield data_pdu(ctx, buf[:size], last=False)
            del buf[:size]
    yield data_pdu(ctx, buf, last=True)


class Refused(Exception):
    """The router did not accept the association: what it answered instead."""


async def associate(
    port: int, called: str, transfer_syntax: str = ExplicitVRLittleEndian, max_pdu: int = 16384
) -> Transport:
    """An association with one CT Image Storage context (ID 1), or Refused."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    t = Transport(stream)
    try:
        ctx = P.ProposedContext(1, CTImageStorage, (transfer_syntax,))
        await t.send_all(P.encode_associate_rq("HOSTILE", called, [ctx], max_pdu))
        pdu_type, _body = await t.read_pdu()
    except P.PduError as exc:
        await t.aclose()
        raise Refused(f"protocol error: {exc}") from exc
    except BaseException:
        await t.aclose()
        raise
    if pdu_type != P.A_ASSOCIATE_AC:
        await t.aclose()
        raise Refused(f"PDU type 0x{pdu_type:02X}")
    return t


async def store_command(t: Transport, uid: str) -> None:
    await t.send_all(P.encode_command_pdus(1, dimse.encode_c_store_rq(1, CTImageStorage, uid, 0), 16384))


async def answer(t: Transport) -> str:
    """What the router says next: 'status 0xNNNN' for a C-STORE response, 'A-ABORT', 'closed'."""
    command = bytearray()
    try:
        while True:
            pdu_type, body = await t.read_pdu()
            if pdu_type == P.A_ABORT:
                return "A-ABORT"
            if pdu_type != P.P_DATA_TF:
                return f"PDU type 0x{pdu_type:02X}"
            off = 0
            while off + 6 <= len(body):
                length, _ctx, mch = P.PDV_HEADER.unpack_from(body, off)
                command += body[off + 6 : off + 4 + length]
                off += 4 + length
                if mch & 0x03 == 0x03:
                    status = dimse.decode_command(command).status
                    return f"status 0x{status or 0:04X}"
    except PeerClosed:
        return "closed"
    except P.PduError as exc:
        return f"protocol error ({exc})"


async def store(t: Transport, uid: str, chunks: Iterable[bytes]) -> str:
    """A C-STORE of the data set in `chunks` on context 1; the router's answer (see `answer`).
    A router that answers or closes while the data set is still going out stops the sending."""
    try:
        await store_command(t, uid)
        for pdu in pdus(1, chunks):
            await t.send_all(pdu)
    except PeerClosed:
        pass
    return await answer(t)
