"""Protocol edge cases on in-memory streams with virtual time (autojump_clock)."""

from __future__ import annotations

import functools
import logging
import select
import struct
import tempfile
import threading
import tracemalloc
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from capacitor_trio.dicom import (
    AcceptorConfig,
    CannotProcess,
    OutOfResources,
    acceptor,
    dimse,
    handle_association,
    listener,
)
from capacitor_trio.dicom import pdu as P
from capacitor_trio.dicom.assembler import MAX_COMMAND_BYTES, DataFragment
from capacitor_trio.dicom.transport import GROW_BYTES, BufferBudget, PeerClosed, Transport
from tests.helpers.datasets import make_dataset, to_part10_bytes

from .conftest import DirSink

CONFIG = AcceptorConfig(artim_timeout=30, client_timeout=600, max_pdu_size=65536)
CT = str(CTImageStorage)
MR = str(MRImageStorage)
VERIFICATION = dimse.VERIFICATION_SOP_CLASS
EXPLICIT = str(ExplicitVRLittleEndian)


def associate_rq(
    called: str = "CAPACITOR", contexts: tuple[tuple[int, str, str], ...] = ((1, CT, EXPLICIT),)
) -> bytes:
    return P.encode_associate_rq(
        "MODALITY", called, [P.ProposedContext(c, a, (t,)) for c, a, t in contexts], 16384
    )


def dataset_bytes(sop_class: str = CT) -> tuple[str, bytes]:
    ds = make_dataset(rows=32, columns=32, sop_class_uid=sop_class)
    raw = to_part10_bytes(ds)
    return str(ds.SOPInstanceUID), raw[144 + struct.unpack_from("<I", raw, 140)[0] :]


def store_pdus(
    sop_instance: str,
    data: bytes,
    *,
    ctx: int = 1,
    msg_id: int = 1,
    fragment: int = 4096,
    sop_class: str = CT,
) -> list[bytes]:
    cmd = dimse.encode_c_store_rq(msg_id, sop_class, sop_instance)
    out = [P.encode_command_pdus(ctx, cmd, 16384)]
    for off in range(0, len(data), fragment):
        chunk = data[off : off + fragment]
        last = off + fragment >= len(data)
        out.append(P.p_data_header(ctx, 0x02 if last else 0x00, len(chunk)) + chunk)
    return out


class Harness:
    def __init__(
        self, tmp: Path, config: AcceptorConfig = CONFIG, budget: BufferBudget | None = None
    ) -> None:
        self.sink = DirSink(tmp)
        self.config = config
        self.budget = budget
        self.client_stream, self.server_stream = trio.testing.memory_stream_pair()
        self.client = Transport(self.client_stream)
        self.done = trio.Event()
        self.finished_at: float | None = None

    async def serve(self) -> None:
        try:
            await handle_association(self.server_stream, self.config, self.sink, budget=self.budget)
        finally:
            self.finished_at = trio.current_time()
            self.done.set()

    async def send(self, data: bytes) -> None:
        await self.client.send_all(data)

    async def read(self) -> tuple[int, bytes]:
        t, body = await self.client.read_pdu()
        return t, bytes(body)

    async def associate(self, **kw: object) -> P.AssociateAccept:
        await self.send(associate_rq(**kw))  # type: ignore[arg-type]
        t, body = await self.read()
        assert t == P.A_ASSOCIATE_AC
        return P.decode_associate_ac(P.PDU_HEADER.pack(t, 0, len(body)) + body, [])

    async def read_command(self) -> dimse.Command:
        t, body = await self.read()
        assert t == P.P_DATA_TF, t
        ((_, mch, data),) = list(P.iter_pdvs(memoryview(body)))
        assert mch == 0x03
        return dimse.decode_command(bytes(data))

    async def expect_abort(self) -> None:
        t, _ = await self.read()
        assert t == P.A_ABORT
        await self.expect_closed()

    async def expect_closed(self) -> None:
        with pytest.raises(PeerClosed):
            await self.client.read_pdu()
        await self.done.wait()


@pytest.fixture
async def h(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> Harness:
    harness = Harness(tmp_path)
    nursery.start_soon(harness.serve)
    return harness


async def test_store_and_release(h: Harness, autojump_clock: trio.testing.MockClock) -> None:
    uid, data = dataset_bytes()
    await h.associate()
    for pdu in store_pdus(uid, data):
        await h.send(pdu)
    rsp = await h.read_command()
    assert (rsp.command_field, rsp.status, rsp.message_id_being_responded_to) == (
        dimse.C_STORE_RSP,
        0,
        1,
    )
    assert rsp.affected_sop_instance_uid == uid
    await h.send(P.RELEASE_RQ_BYTES)
    t, _ = await h.read()
    assert t == P.A_RELEASE_RP
    await h.client_stream.aclose()
    await h.done.wait()
    assert len(h.sink.received) == 1 and h.sink.leftovers() == []
    assert (h.sink.out / f"{uid}.dcm").read_bytes().endswith(data)


@pytest.mark.parametrize("memory_max", [0, 1500, 1 << 20])
async def test_store_in_memory_in_a_file_or_spilled_midway(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, memory_max: int
) -> None:
    """Small instances are received in memory and handed over as bytes; one that outgrows the
    limit midway continues in a temporary file; either way the same bytes arrive."""
    h = Harness(tmp_path, attrs.evolve(CONFIG, memory_max_bytes=memory_max))
    nursery.start_soon(h.serve)
    uid, data = dataset_bytes()
    await h.associate()
    pdus = store_pdus(uid, data, fragment=700)
    for pdu in pdus[:-1]:
        await h.send(pdu)
    await trio.testing.wait_all_tasks_blocked()
    assert len(h.sink.leftovers()) == (0 if memory_max > len(data) else 1)
    await h.send(pdus[-1])
    rsp = await h.read_command()
    assert rsp.status == 0
    [rx] = h.sink.received
    assert (rx.data is not None) == (memory_max > len(data))
    assert (rx.path is None) == (rx.data is not None)
    assert rx.size_bytes == len((h.sink.out / f"{uid}.dcm").read_bytes())
    assert (h.sink.out / f"{uid}.dcm").read_bytes().endswith(data)
    assert h.sink.leftovers() == []
    # a file's flush is started once it is complete, and what started it goes to the sink
    if rx.path is None:
        assert h.sink.syncs == [] and rx.sync is None
    else:
        assert h.sink.syncs == [(rx.path, rx.size_bytes, rx.size_bytes)]
        assert rx.sync == ("sync", 1)


async def test_artim_fires_without_associate_rq(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    await h.expect_closed()
    assert h.finished_at == pytest.approx(start + 30.0)


async def test_linger_after_release_is_bounded_by_artim(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    await h.associate()
    await h.send(P.RELEASE_RQ_BYTES)
    t, _ = await h.read()
    assert t == P.A_RELEASE_RP
    start = trio.current_time()
    await h.done.wait()  # we never close: the acceptor gives up after ARTIM
    assert h.finished_at == pytest.approx(start + 30.0)


async def test_idle_association_aborted_at_client_timeout(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    await h.associate()
    start = trio.current_time()
    await h.expect_abort()
    assert h.finished_at == pytest.approx(start + 600.0)


async def test_client_timeout_counts_only_the_waits_for_the_peer(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    # a store slower than clientTimeout is not idleness (the peer waits for our response); the
    # timeout runs from each wait for the next PDU, and a PDU just in time restarts it
    real = h.sink.instance_received

    async def slow(rx: object) -> None:
        await trio.sleep(700)
        await real(rx)  # type: ignore[arg-type]

    h.sink.instance_received = slow  # type: ignore[method-assign]
    uid, data = dataset_bytes()
    await h.associate()
    for pdu in store_pdus(uid, data):
        await h.send(pdu)
    assert (await h.read_command()).status == 0
    await trio.sleep(599)
    await h.send(P.encode_command_pdus(1, dimse.encode_c_echo_rq(2), 16384))
    assert (await h.read_command()).command_field == dimse.C_ECHO_RSP
    answered = trio.current_time()
    await h.expect_abort()
    assert h.finished_at == pytest.approx(answered + 600.0)
    assert [r.header.sop_instance_uid for r in h.sink.received] == [uid]


async def test_a_pdu_that_completes_as_the_idle_timeout_fires_is_still_handled(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the watchdog cancels the PDU loop in the same scheduler pass in which the loop's read
    # completes: the PDU is handled as a whole (never cut off at its first checkpoint), and the
    # idle timeout keeps working for the waits after it
    class Racing(acceptor._Association):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            read, raced = self.t.read_pdu, False

            async def read_pdu(max_length: int = 0) -> tuple[int, bytes | bytearray]:
                nonlocal raced
                got = await read(max_length)
                if got[0] == P.P_DATA_TF and not raced:
                    raced = True
                    assert self._idle_scope is not None
                    self._idle_scope.cancel()
                return got

            self.t.read_pdu = read_pdu  # type: ignore[method-assign]

    monkeypatch.setattr(acceptor, "_Association", Racing)
    h = Harness(tmp_path)
    nursery.start_soon(h.serve)
    uid, data = dataset_bytes()
    await h.associate()
    for pdu in store_pdus(uid, data):
        await h.send(pdu)
    assert (await h.read_command()).status == 0
    answered = trio.current_time()
    await h.expect_abort()
    assert h.finished_at == pytest.approx(answered + 600.0)
    assert [r.header.sop_instance_uid for r in h.sink.received] == [uid]


@pytest.mark.parametrize("in_memory", [False, True])
async def test_idle_mid_dataset_removes_partial_file(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, in_memory: bool
) -> None:
    h = Harness(tmp_path, attrs.evolve(CONFIG, memory_max_bytes=1 << 20 if in_memory else 0))
    nursery.start_soon(h.serve)
    uid, data = dataset_bytes()
    await h.associate()
    pdus = store_pdus(uid, data, fragment=1024)
    for pdu in pdus[:3]:
        await h.send(pdu)
    await trio.testing.wait_all_tasks_blocked()
    # the partial file exists while receiving (unless the instance is small enough for memory)
    assert len(h.sink.leftovers()) == (0 if in_memory else 1)
    await h.expect_abort()
    assert h.sink.leftovers() == [] and h.sink.received == []


@pytest.mark.parametrize(
    "pdu_type", [P.P_DATA_TF, P.A_RELEASE_RQ, P.A_ASSOCIATE_AC, P.A_RELEASE_RP]
)
async def test_wrong_pdu_before_association(
    h: Harness, autojump_clock: trio.testing.MockClock, pdu_type: int
) -> None:
    await h.send(P.PDU_HEADER.pack(pdu_type, 0, 4) + b"\x00" * 4)
    await h.expect_abort()


@pytest.mark.parametrize("when", ["before", "after"])
async def test_unknown_pdu_type(
    h: Harness, autojump_clock: trio.testing.MockClock, when: str
) -> None:
    if when == "after":
        await h.associate()
    await h.send(P.PDU_HEADER.pack(0x09, 0, 2) + b"\x00\x00")
    t, body = await h.read()
    assert t == P.A_ABORT and body[3] == P.ABORT_REASON_UNRECOGNIZED_PDU


async def test_oversized_pdu(h: Harness, autojump_clock: trio.testing.MockClock) -> None:
    await h.associate()
    await h.send(P.PDU_HEADER.pack(P.P_DATA_TF, 0, 10_000_000))
    await h.expect_abort()


async def test_truncated_pdu_then_close(h: Harness, autojump_clock: trio.testing.MockClock) -> None:
    uid, data = dataset_bytes()
    await h.associate()
    pdus = store_pdus(uid, data, fragment=1024)
    for pdu in pdus[:2]:
        await h.send(pdu)
    await h.send(pdus[2][:100])  # a PDU cut short, then the peer vanishes
    await h.client_stream.aclose()
    await h.done.wait()
    assert h.sink.leftovers() == [] and h.sink.received == []


async def test_wrong_pdv_length(h: Harness, autojump_clock: trio.testing.MockClock) -> None:
    await h.associate()
    body = struct.pack(">IBB", 5000, 1, 0x03) + b"\x00" * 10
    await h.send(P.PDU_HEADER.pack(P.P_DATA_TF, 0, len(body)) + body)
    await h.expect_abort()


async def test_wrong_associate_rq_length(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    rq = associate_rq()
    await h.send(rq[:2] + struct.pack(">I", 20) + rq[6:26])
    await h.expect_abort()


async def test_abort_mid_dataset_leaves_nothing(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    uid, data = dataset_bytes()
    await h.associate()
    for pdu in store_pdus(uid, data, fragment=1024)[:3]:
        await h.send(pdu)
    await h.send(P.abort_bytes())
    await h.done.wait()
    assert h.sink.leftovers() == [] and h.sink.received == []


async def test_data_on_unaccepted_context(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    uid, data = dataset_bytes()
    await h.associate()
    await h.send(store_pdus(uid, data, ctx=3)[0])
    await h.expect_abort()


async def test_data_without_command(h: Harness, autojump_clock: trio.testing.MockClock) -> None:
    await h.associate()
    await h.send(P.p_data_header(1, 0x02, 4) + b"\x00" * 4)
    await h.expect_abort()


async def test_an_endless_command_set_is_cut_off_at_the_cap(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """Command fragments that never end are gathered up to the assembler's cap and no further:
    A-ABORT (invalid PDU parameter value) as the fragment that passes it arrives."""
    await h.associate()
    fragment = P.p_data_header(1, 0x01, 16000) + b"\x00" * 16000
    for _ in range(MAX_COMMAND_BYTES // 16000 + 1):
        await h.send(fragment)
    t, body = await h.read()
    assert (t, P.decode_abort(body)) == (
        P.A_ABORT,
        (P.ABORT_SOURCE_PROVIDER, P.ABORT_REASON_INVALID_PARAMETER),
    )
    await h.expect_closed()


async def test_unknown_called_ae(h: Harness, autojump_clock: trio.testing.MockClock) -> None:
    await h.send(associate_rq(called="NOBODY"))
    t, body = await h.read()
    assert t == P.A_ASSOCIATE_RJ
    assert P.decode_associate_rj(body) == P.AssociateReject(1, 1, 7)


def with_protocol_version(rq: bytes, version: int) -> bytes:
    """`rq` with its protocol-version field (the two bytes after the PDU header) set."""
    return rq[:6] + struct.pack(">H", version) + rq[8:]


def with_application_context(rq: bytes, uid: str) -> bytes:
    """`rq` with its application context item (the first item, at offset 74) naming `uid`, the
    item and PDU lengths adjusted (our encoder, like pynetdicom's, always writes the DICOM one)."""
    assert rq[74] == 0x10
    end = 74 + 4 + struct.unpack_from(">H", rq, 76)[0]
    body = rq[6:74] + struct.pack(">BxH", 0x10, len(uid)) + uid.encode() + rq[end:]
    return P.PDU_HEADER.pack(P.A_ASSOCIATE_RQ, 0, len(body)) + body


#: (reserved, result, source, reason) of the A-ASSOCIATE-RJ bodies `_negotiate` sends
RJ_PROTOCOL_VERSION = bytes((0, P.RJ_PERMANENT, P.RJ_SOURCE_ACSE, 2))
RJ_APPLICATION_CONTEXT = bytes((0, P.RJ_PERMANENT, P.RJ_SOURCE_USER, 2))
RJ_CALLED_AE = bytes((0, P.RJ_PERMANENT, P.RJ_SOURCE_USER, P.RJ_REASON_CALLED_AE_NOT_RECOGNIZED))


@pytest.mark.parametrize(
    ("rq", "answer"),
    [
        (with_protocol_version(associate_rq(), 0x0002), RJ_PROTOCOL_VERSION),
        (with_protocol_version(associate_rq(), 0x0000), RJ_PROTOCOL_VERSION),
        (with_protocol_version(associate_rq(), 0x8000), RJ_PROTOCOL_VERSION),
        (with_protocol_version(associate_rq(), 0x0003), None),  # bit 0 set: version 1 spoken
        (with_application_context(associate_rq(), "1.2.840.10008.3.1.1.2"), RJ_APPLICATION_CONTEXT),
        (with_application_context(associate_rq(), "1.2.3.4"), RJ_APPLICATION_CONTEXT),
        (with_application_context(associate_rq(), P.APPLICATION_CONTEXT), None),
    ],
    ids=[
        "version 2",
        "version 0",
        "version 0x8000",
        "version 3 accepted",
        "context ...3.1.1.2",
        "context 1.2.3.4",
        "context rebuilt accepted",
    ],
)
async def test_protocol_version_and_application_context_rejects(
    h: Harness, autojump_clock: trio.testing.MockClock, rq: bytes, answer: bytes | None
) -> None:
    """PS3.8 9.3.2: a protocol version without bit 0 (version 1) -> A-ASSOCIATE-RJ permanent,
    source ACSE (2), reason 2 (protocol version not supported); an application context name
    other than DICOM's -> permanent, source service user (1), reason 2 (application context
    name not supported). The exact bytes on the wire, A-ASSOCIATE-RJ header included."""
    await h.send(rq)
    t, body = await h.read()
    if answer is None:
        assert t == P.A_ASSOCIATE_AC
        return
    assert P.PDU_HEADER.pack(t, 0, len(body)) + body == b"\x03\x00\x00\x00\x00\x04" + answer
    assert h.sink.received == []
    await h.client_stream.aclose()
    await h.done.wait()


@pytest.mark.parametrize(
    ("rq", "answer"),
    [
        (with_protocol_version(associate_rq(), 0x0002), RJ_PROTOCOL_VERSION),
        (with_application_context(associate_rq(), "1.2.3.4"), RJ_APPLICATION_CONTEXT),
        (associate_rq(called="NOBODY"), RJ_CALLED_AE),
    ],
    ids=["protocol version", "application context", "called AE"],
)
async def test_artim_closes_the_connection_after_a_reject_the_peer_does_not_close(
    h: Harness, autojump_clock: trio.testing.MockClock, rq: bytes, answer: bytes
) -> None:
    """After its A-ASSOCIATE-RJ the acceptor waits ARTIM (30 s here), counted from the reject,
    for the peer to close; a peer that never does is cut off then."""
    await trio.sleep(10)  # the A-ASSOCIATE-RQ comes well within its own ARTIM
    await h.send(rq)
    t, body = await h.read()
    assert (t, body) == (P.A_ASSOCIATE_RJ, answer)
    rejected = trio.current_time()
    assert rejected == 10.0
    with trio.fail_after(1000):  # not closed at all: fail in virtual time, not at pytest-timeout
        await h.expect_closed()  # we never close our end
    assert h.finished_at == trio.current_time() == rejected + 30.0


async def test_contexts_negotiated(h: Harness, autojump_clock: trio.testing.MockClock) -> None:
    ac = await h.associate(
        contexts=(
            (1, CT, EXPLICIT),
            (3, "1.2.840.10008.1.1", "1.2.840.10008.1.2"),
            (5, "1.2.840.10008.5.1.4.1.2.1.1", EXPLICIT),  # C-FIND: not ours
            (7, CT, "1.2.3.4.5"),  # unknown transfer syntax
            (9, CT, "1.2.840.10008.1.2.4.50"),  # JPEG baseline: stored as received
        )
    )
    assert [(r.context_id, r.result) for r in ac.contexts] == [
        (1, 0),
        (3, 0),
        (5, 3),
        (7, 4),
        (9, 0),
    ]
    assert ac.max_pdu == CONFIG.max_pdu_size
    await h.send(P.encode_command_pdus(3, dimse.encode_c_echo_rq(9), 16384))
    rsp = await h.read_command()
    assert (rsp.command_field, rsp.message_id_being_responded_to, rsp.status) == (
        dimse.C_ECHO_RSP,
        9,
        0,
    )


async def test_reject_abstract_syntaxes(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path, AcceptorConfig(reject_abstract_syntaxes=frozenset({CT})))
    nursery.start_soon(h.serve)
    ac = await h.associate(contexts=((1, CT, EXPLICIT),))
    assert ac.contexts[0].result == P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED


CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage (private)
MADE_UP = "1.2.3.4.5.6"
FIND = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Q/R FIND


async def test_private_and_unknown_storage_classes_are_accepted_and_stored(
    h: Harness, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A router stores what it is sent: a SOP class pynetdicom does not know (a vendor's private
    class, a made-up UID) is negotiated like any storage class and its instances stored."""
    ac = await h.associate(contexts=((1, CSA_NON_IMAGE, EXPLICIT), (3, MADE_UP, EXPLICIT)))
    assert [r.result for r in ac.contexts] == [P.PC_ACCEPTANCE, P.PC_ACCEPTANCE]
    stored = []
    for msg_id, (ctx, sop_class) in enumerate(((1, CSA_NON_IMAGE), (3, MADE_UP)), 1):
        uid, data = dataset_bytes(sop_class)
        for pdu in store_pdus(uid, data, ctx=ctx, msg_id=msg_id, sop_class=sop_class):
            await h.send(pdu)
        assert (await h.read_command()).status == 0
        stored.append((sop_class, uid))
    assert [(rx.header.sop_class_uid, rx.header.sop_instance_uid) for rx in h.sink.received] == (
        stored
    )
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


# pydicom warns about the invalid UID as it decodes it (and goes on); the tests make warnings errors
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
async def test_refused_contexts_are_logged_once_with_their_reasons(
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every refused presentation context is named, with why, in one log line per association:
    a warning when it could have carried instances, info when each is a service not provided."""
    caplog.set_level(logging.INFO, logger="capacitor_trio")
    h = Harness(tmp_path, attrs.evolve(CONFIG, reject_abstract_syntaxes=frozenset({MADE_UP})))
    nursery.start_soon(h.serve)
    refused = {
        3: (FIND, EXPLICIT, "non-storage service not provided"),
        5: ("1.2.840.10008.5.1.4.1.2.2.2", EXPLICIT, "non-storage service not provided"),  # MOVE
        7: ("1.2.840.10008.5.1.4.31", EXPLICIT, "non-storage service not provided"),  # worklist
        9: ("1.2.840.10008.1.20.1", EXPLICIT, "non-storage service not provided"),  # commitment
        11: ("1.2.840.10008.5.1.1.9", EXPLICIT, "non-storage service not provided"),  # print
        13: (EXPLICIT, EXPLICIT, "not a SOP class (Transfer Syntax)"),
        15: (MADE_UP, EXPLICIT, "rejectAbstractSyntaxes"),
        17: (CSA_NON_IMAGE, "1.2.3.4.5", "no supported transfer syntax: '1.2.3.4.5'"),
        19: ("1.2.9999.3", EXPLICIT, "not a valid UID"),  # sent as 1.2.xyz*.3
    }
    contexts = ((1, CSA_NON_IMAGE, EXPLICIT), *((c, a, t) for c, (a, t, _) in refused.items()))
    rq = associate_rq(contexts=contexts)
    await h.send(rq.replace(b"1.2.9999.3", b"1.2.xyz*.3"))  # our encoder refuses to write it
    t, body = await h.read()
    assert t == P.A_ASSOCIATE_AC
    ac = P.decode_associate_ac(P.PDU_HEADER.pack(t, 0, len(body)) + body, [])
    results = {r.context_id: r.result for r in ac.contexts}
    assert results[1] == P.PC_ACCEPTANCE
    assert results[17] == P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED
    assert all(results[c] == P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED for c in refused if c != 17)
    (line,) = [r for r in caplog.records if "presentation contexts refused" in r.getMessage()]
    assert line.levelno == logging.WARNING
    message = line.getMessage()
    assert message.startswith("DICOM association MODALITY -> CAPACITOR: 9 of 10 presentation")
    for ctx, (uid, _, reason) in refused.items():
        shown = "'1.2.xyz*.3'" if ctx == 19 else uid
        assert f"{ctx} {shown}" in message and f"({reason})" in message, (ctx, message)
    assert "Patient Root Query/Retrieve Information Model - FIND" in message
    # a routine refusal (a service not provided, nothing else) is an info line
    caplog.clear()
    h2 = Harness(tmp_path / "2")
    nursery.start_soon(h2.serve)
    await h2.associate(contexts=((1, CT, EXPLICIT), (3, FIND, EXPLICIT)))
    (line,) = [r for r in caplog.records if "presentation contexts refused" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert line.getMessage().endswith(
        "1 of 2 presentation contexts refused: 3 1.2.840.10008.5.1.4.1.2.1.1 "
        "Patient Root Query/Retrieve Information Model - FIND (non-storage service not provided)"
    )


def with_context_ids(rq: bytes, *ids: int) -> bytes:
    """`rq` with its presentation context items' IDs replaced by `ids`, in order (our encoder,
    like pynetdicom's, refuses to write an invalid one)."""
    raw = bytearray(rq)
    pos, todo = 74, list(ids)
    while pos < len(raw):
        item_type, length = raw[pos], struct.unpack_from(">H", raw, pos + 2)[0]
        if item_type == 0x20:
            raw[pos + 4] = todo.pop(0)
        pos += 4 + length
    assert not todo
    return bytes(raw)


@pytest.mark.parametrize("ids", [(2,), (0,), (1, 1), (1, 3, 1)])
async def test_invalid_or_repeated_context_id_is_aborted(
    h: Harness, autojump_clock: trio.testing.MockClock, ids: tuple[int, ...]
) -> None:
    """A context ID must be odd and unique (PS3.8 9.3.2.2); one that is not is an invalid PDU
    parameter: A-ABORT (service provider, reason 6) and the connection closed, no crash."""
    contexts = tuple((2 * i + 1, CT, EXPLICIT) for i in range(len(ids)))
    await h.send(with_context_ids(associate_rq(contexts=contexts), *ids))
    t, body = await h.read()
    assert t == P.A_ABORT
    assert P.decode_abort(body) == (P.ABORT_SOURCE_PROVIDER, P.ABORT_REASON_INVALID_PARAMETER)
    await h.expect_closed()


def test_an_associate_ac_the_encoder_refuses_is_a_pdu_error() -> None:
    rq = P.decode_associate_rq(with_context_ids(associate_rq(), 2))
    with pytest.raises(P.PduError, match="context_id"):
        P.encode_associate_ac(rq, [P.ContextResult(2, P.PC_ACCEPTANCE, EXPLICIT)], 16384)


@pytest.mark.parametrize(
    ("sop_class", "ctx", "status"),
    [
        (MR, 1, 0x0122),
        (VERIFICATION, 1, 0x0122),
        (VERIFICATION, 3, 0x0122),
        (FIND, 1, 0x0122),
        (CT, 3, 0x0000),
        (CSA_NON_IMAGE, 1, 0x0000),
        (MADE_UP, 3, 0x0000),
    ],
    ids=[
        "refused MR on the CT context",
        "Verification on the CT context",
        "Verification on its own context",
        "Q/R FIND on the CT context",
        "CT on Verification",
        "a private class on the CT context",
        "a made-up class on Verification",
    ],
)
async def test_a_store_on_a_context_of_another_abstract_syntax(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    sop_class: str,
    ctx: int,
    status: int,
) -> None:
    """A C-STORE whose SOP class is not its presentation context's abstract syntax is stored
    like any other (as Orthanc and pynetdicom's listener do: some modalities rely on it), private
    and unknown classes too, unless negotiation would have refused its class (in
    `reject_abstract_syntaxes`, a non-storage service: Verification even on its own context):
    then the data set is drained, nothing written, 0x0122 answered; the association goes on."""
    config = attrs.evolve(CONFIG, reject_abstract_syntaxes=frozenset({MR}), memory_max_bytes=0)
    h = Harness(tmp_path, config)
    nursery.start_soon(h.serve)
    ac = await h.associate(contexts=((1, CT, EXPLICIT), (3, VERIFICATION, EXPLICIT)))
    assert [r.result for r in ac.contexts] == [P.PC_ACCEPTANCE, P.PC_ACCEPTANCE]
    temp_paths: list[Path] = []
    new_temp_path = h.sink.new_temp_path

    def recorded_temp_path() -> Path:
        temp_paths.append(new_temp_path())
        return temp_paths[-1]

    h.sink.new_temp_path = recorded_temp_path  # type: ignore[method-assign]
    first, data = dataset_bytes(sop_class)
    for pdu in store_pdus(first, data, ctx=ctx, sop_class=sop_class, fragment=1024):
        await h.send(pdu)
    rsp = await h.read_command()
    assert (rsp.status, rsp.affected_sop_instance_uid) == (status, first)
    stored = [first] if status == 0 else []
    if not stored:
        assert temp_paths == [] and h.sink.received == [] and h.sink.leftovers() == []
    uid, data = dataset_bytes()
    for pdu in store_pdus(uid, data, msg_id=2):
        await h.send(pdu)
    assert (await h.read_command()).status == 0
    assert [rx.header.sop_instance_uid for rx in h.sink.received] == [*stored, uid]


async def test_busy_is_transient_reject(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    h = Harness(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: handle_association(h.server_stream, CONFIG, h.sink, busy=True))
        await h.send(associate_rq())
        t, body = await h.read()
        assert t == P.A_ASSOCIATE_RJ and P.decode_associate_rj(body) == P.AssociateReject(2, 3, 2)
        await h.client_stream.aclose()


async def test_max_clients_counts_associations_until_their_last_pdu(tmp_path: Path) -> None:
    """`max_clients` 1 on real sockets: a second association is refused while the first is
    open; once the first is released (A-RELEASE-RP read, its TCP connection left open) or a
    refused one has its A-ASSOCIATE-RJ, neither holds the slot, so a modality that associates
    again at once is not refused while the router waits for the old connection to close."""
    sink = DirSink(tmp_path)
    config = AcceptorConfig(host="127.0.0.1", port=0, max_clients=1, artim_timeout=30)

    async def connect(port: int) -> tuple[Transport, int, bytes]:
        t = Transport(await trio.open_tcp_stream("127.0.0.1", port))
        await t.send_all(associate_rq())
        pdu_type, body = await t.read_pdu()
        return t, pdu_type, bytes(body)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(listener.serve_acceptor, config, sink)
        first, t1, _ = await connect(port)
        refused, t2, body = await connect(port)
        assert t1 == P.A_ASSOCIATE_AC
        assert t2 == P.A_ASSOCIATE_RJ and P.decode_associate_rj(body) == P.AssociateReject(2, 3, 2)
        await first.send_all(P.RELEASE_RQ_BYTES)
        assert (await first.read_pdu())[0] == P.A_RELEASE_RP
        # `first` and `refused` stay connected: the slot is free all the same
        second, t3, _ = await connect(port)
        assert t3 == P.A_ASSOCIATE_AC
        third, t4, _ = await connect(port)
        assert t4 == P.A_ASSOCIATE_RJ  # and still one at a time
        for t in (first, refused, second, third):
            await t.aclose()
        nursery.cancel_scope.cancel()


async def open_association(port: int) -> tuple[Transport, int, bytes]:
    """A TCP connection to the acceptor that sends an A-ASSOCIATE-RQ: (it, answer type, body)."""
    t = Transport(await trio.open_tcp_stream("127.0.0.1", port))
    await t.send_all(associate_rq())
    pdu_type, body = await t.read_pdu()
    return t, pdu_type, bytes(body)


async def test_bare_connections_take_no_association_slot(tmp_path: Path) -> None:
    """issue 19 #4: with `max_clients` 1, two TCP connections that never send an A-ASSOCIATE-RQ
    do not keep a modality out (they counted as clients until ARTIM closed them); associations
    alone count, so a second one is still refused while the first is open."""
    sink = DirSink(tmp_path)
    config = AcceptorConfig(host="127.0.0.1", port=0, max_clients=1, artim_timeout=30)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(listener.serve_acceptor, config, sink)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        first, t1, _ = await open_association(port)
        assert t1 == P.A_ASSOCIATE_AC
        second, t2, body = await open_association(port)
        assert t2 == P.A_ASSOCIATE_RJ and P.decode_associate_rj(body) == P.AssociateReject(2, 3, 2)
        for s in (*idle, first.stream, second.stream):
            await s.aclose()
        nursery.cancel_scope.cancel()


async def test_a_stale_connection_gives_its_place_to_a_waiting_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 19 #4: with `max_unassociated` connections reading their A-ASSOCIATE-RQ, a new
    one waits for a place; a reader whose request has not come `STALE_AFTER` (0 here) after
    it started gives its place up (an A-ABORT, then the close): idle sockets cannot fill the
    listener, and a modality is served."""
    monkeypatch.setattr(listener, "STALE_AFTER", 0.0)
    sink = DirSink(tmp_path)
    config = AcceptorConfig(host="127.0.0.1", port=0, max_unassociated=2, artim_timeout=30)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(listener.serve_acceptor, config, sink)
        idle = [Transport(await trio.open_tcp_stream("127.0.0.1", port)) for _ in range(3)]
        with trio.fail_after(10):
            assert (await idle[0].read_pdu())[0] == P.A_ABORT
            with pytest.raises(PeerClosed):
                await idle[0].read_pdu()
            modality, t, _ = await open_association(port)  # closes idle[1]
            assert t == P.A_ASSOCIATE_AC
            assert (await idle[1].read_pdu())[0] == P.A_ABORT
        for c in (*idle, modality):
            await c.aclose()
        nursery.cancel_scope.cancel()


def nothing_received(t: Transport) -> bool:
    """Neither a PDU nor the close has reached `t` (its socket is not readable)."""
    readable, _, _ = select.select([t.stream.socket.fileno()], [], [], 0)  # type: ignore[attr-defined]
    return not readable


async def test_a_burst_of_connections_is_served_in_turn(tmp_path: Path) -> None:
    """Twenty modalities connect at once, their requests coming only once all are connected:
    with places for two readers at a time, the others wait their turn (not closed for being
    many), and every one is accepted."""
    sink = DirSink(tmp_path)
    config = AcceptorConfig(host="127.0.0.1", port=0, max_unassociated=2, artim_timeout=30)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(listener.serve_acceptor, config, sink)
        burst = [Transport(await trio.open_tcp_stream("127.0.0.1", port)) for _ in range(20)]
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert all(nothing_received(c) for c in burst)
        for c in burst:
            await c.send_all(associate_rq())
        with trio.fail_after(10):
            assert [(await c.read_pdu())[0] for c in burst] == [P.A_ASSOCIATE_AC] * 20
        for c in burst:
            await c.aclose()
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_queue_are_closed_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One place for a reader, two waiting per place: a fourth connection is closed at once
    (no A-ABORT: nothing was read from it), the first three stay."""
    monkeypatch.setattr(listener, "QUEUE_FACTOR", 2)
    sink = DirSink(tmp_path)
    config = AcceptorConfig(host="127.0.0.1", port=0, max_unassociated=1, artim_timeout=30)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(listener.serve_acceptor, config, sink)
        conns = [Transport(await trio.open_tcp_stream("127.0.0.1", port)) for _ in range(4)]
        with trio.fail_after(10):
            with pytest.raises(PeerClosed):
                await conns[3].read_pdu()
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert all(nothing_received(c) for c in conns[:3])
        for c in conns:
            await c.aclose()
        nursery.cancel_scope.cancel()


async def test_reading_turns_are_first_come_first_served_and_stale_readers_give_way(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`_Connections` in virtual time, one place: b and then d wait; a associates at once, so
    its place goes to b (not to d, nor to a newcomer); b sends nothing, and STALE_AFTER (2 s)
    later d takes its place (b's connection is closed)."""
    connections = listener._Connections(max_clients=0, max_unassociated=1)
    a, b, d = trio.CancelScope(), trio.CancelScope(), trio.CancelScope()
    turns: list[tuple[str, float]] = []

    async def wait(scope: trio.CancelScope, name: str) -> None:
        assert await connections.reading_turn(scope)
        turns.append((name, trio.current_time()))

    assert await connections.reading_turn(a)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, b, "b")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait, d, "d")
        await trio.testing.wait_all_tasks_blocked()
        assert connections.admit(a)
    assert turns == [("b", 0.0), ("d", listener.STALE_AFTER)]
    assert b.cancel_called and not a.cancel_called and not d.cancel_called
    assert connections.associations == 1


async def test_claimed_lengths_hold_no_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 19 #2: 150 connections, each sending a PDU header that claims 250,000 bytes and
    1,000 of them, hold what they sent in 64 KiB buffers, 64 connections at a time (the
    others wait unread), not 150 x 250,000 bytes; a modality is served meanwhile, once the
    readers ahead of it have had `STALE_AFTER` (0.05 s here)."""
    monkeypatch.setattr(listener, "STALE_AFTER", 0.05)
    sink = DirSink(tmp_path)
    config = AcceptorConfig(host="127.0.0.1", port=0, artim_timeout=30)
    claim = P.PDU_HEADER.pack(P.A_ASSOCIATE_RQ, 0, 250_000) + bytes(1000)
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(listener.serve_acceptor, config, sink)
            await trio.testing.wait_all_tasks_blocked(0.05)
            base = tracemalloc.get_traced_memory()[0]
            hostile = []
            for _ in range(150):
                hostile.append(s := await trio.open_tcp_stream("127.0.0.1", port))
                await s.send_all(claim)
            modality, t, _ = await open_association(port)
            assert t == P.A_ASSOCIATE_AC
            await trio.testing.wait_all_tasks_blocked(0.05)
            held = tracemalloc.get_traced_memory()[0] - base
            assert held < 8 << 20  # 37.5 MB when the length field sized the buffers
            for s in hostile:
                await s.aclose()
            await modality.aclose()
            nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()


async def test_admission_refused_writes_nothing(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    h.sink.admission_error = OutOfResources("disk full")
    uid, data = dataset_bytes()
    await h.associate()
    news: list[Path] = []
    h.sink.new_temp_path = lambda: news.append(Path("x")) or Path("x")  # type: ignore[method-assign]
    for pdu in store_pdus(uid, data):
        await h.send(pdu)
    rsp = await h.read_command()
    assert rsp.status == 0xA700 and news == []


@pytest.mark.parametrize(
    ("error", "status"), [(OutOfResources("full"), 0xA700), (CannotProcess("bad"), 0xC001)]
)
async def test_sink_errors_remove_file(
    h: Harness, autojump_clock: trio.testing.MockClock, error: Exception, status: int
) -> None:
    h.sink.receive_error = error
    uid, data = dataset_bytes()
    await h.associate()
    for pdu in store_pdus(uid, data):
        await h.send(pdu)
    rsp = await h.read_command()
    assert rsp.status == status
    assert h.sink.leftovers() == []


async def test_a_file_that_cannot_be_cut_to_size_is_refused(
    nursery: trio.Nursery,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cutting the temporary file to the received length (a reused file may hold more) is part
    of writing it: when that fails the instance is refused with 0xA700 and its file removed."""
    import errno
    import os

    def broken(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", broken)
    h = Harness(tmp_path, attrs.evolve(CONFIG, memory_max_bytes=0))  # every instance in a file
    nursery.start_soon(h.serve)
    uid, data = dataset_bytes()
    await h.associate()
    for pdu in store_pdus(uid, data):
        await h.send(pdu)
    rsp = await h.read_command()
    assert rsp.status == 0xA700 and "Input/output error" in (rsp.error_comment or "")
    assert h.sink.leftovers() == [] and h.sink.received == []


async def test_uid_mismatch_and_garbage(h: Harness, autojump_clock: trio.testing.MockClock) -> None:
    uid, data = dataset_bytes()
    await h.associate()
    for pdu in store_pdus("1.2.3.999", data):
        await h.send(pdu)
    assert (await h.read_command()).status == 0xC211
    for pdu in store_pdus(uid, b"\xff" * 64, msg_id=2):
        await h.send(pdu)
    assert (await h.read_command()).status == 0xC210
    assert h.sink.leftovers() == [] and h.sink.received == []


async def test_response_waits_for_durable_queue(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    h.sink.hold = trio.Event()
    uid, data = dataset_bytes()
    await h.associate()
    for pdu in store_pdus(uid, data):
        await h.send(pdu)
    await trio.testing.wait_all_tasks_blocked()
    assert h.client._buf == bytearray()  # nothing answered yet
    with trio.move_on_after(1):
        await h.client.read_pdu()
        pytest.fail("response before the sink committed")
    h.sink.hold.set()
    assert (await h.read_command()).status == 0


@pytest.mark.parametrize("mid_dataset", [False, True])
async def test_cancellation_aborts_the_association_and_removes_partial_file(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, mid_dataset: bool
) -> None:
    """Router shutdown with an association open: the peer reads an A-ABORT (service user), then
    the close, not a bare close; the temporary file of an unfinished instance is removed."""
    h = Harness(tmp_path, attrs.evolve(CONFIG, memory_max_bytes=0))  # a temporary file
    uid, data = dataset_bytes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.serve)
        await h.associate()
        if mid_dataset:
            for pdu in store_pdus(uid, data, fragment=1024)[:3]:
                await h.send(pdu)
        await trio.testing.wait_all_tasks_blocked()
        assert len(h.sink.leftovers()) == mid_dataset
        nursery.cancel_scope.cancel()
    t, body = await h.read()
    assert t == P.A_ABORT
    assert P.decode_abort(body) == (P.ABORT_SOURCE_USER, P.ABORT_REASON_NOT_SPECIFIED)
    await h.expect_closed()
    assert h.sink.leftovers() == []


async def test_cancellation_after_release_only_closes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Once the A-RELEASE-RP has gone out there is no association left to abort."""
    h = Harness(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.serve)
        await h.associate()
        await h.send(P.RELEASE_RQ_BYTES)
        assert (await h.read())[0] == P.A_RELEASE_RP
        nursery.cancel_scope.cancel()  # while the acceptor waits (ARTIM) for us to close
    await h.expect_closed()


# ---------------------------------------------------------------------------- hostile peers


def raw_associate_rq(
    contexts: list[tuple[int, str, list[str]]], called: str = "CAPACITOR", user_items: int = 0
) -> bytes:
    """An A-ASSOCIATE-RQ built item by item (our encoder, like pynetdicom's, refuses what a
    hostile peer sends: context IDs over 255, more syntaxes than an item length can hold)."""

    def item(kind: int, payload: bytes) -> bytes:
        return struct.pack(">BxH", kind, len(payload)) + payload

    pcs = b"".join(
        item(0x20, bytes((cid, 0, 0, 0)) + item(0x30, a.encode()) + b"".join(
            item(0x40, t.encode()) for t in ts
        ))
        for cid, a, ts in contexts
    )
    body = (
        struct.pack(">HH", 1, 0)
        + called.encode().ljust(16)
        + b"MODALITY".ljust(16)
        + bytes(32)
        + item(0x10, P.APPLICATION_CONTEXT.encode())
        + pcs
        + item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x55, b"") * user_items)
    )
    return P.PDU_HEADER.pack(P.A_ASSOCIATE_RQ, 0, len(body)) + body


def bogus_syntaxes(n: int) -> list[str]:
    return [f"1.2.3.{i}" for i in range(n)]


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(size, on the event loop's thread) of each A-ASSOCIATE-RQ decoded (pynetdicom's codec:
    5-10 µs per item)."""
    sizes: list[tuple[int, bool]] = []
    real = P.decode_associate_rq

    def spy(pdu_bytes: bytes) -> P.AssociateRequest:
        sizes.append((len(pdu_bytes), threading.current_thread() is threading.main_thread()))
        return real(pdu_bytes)

    monkeypatch.setattr(P, "decode_associate_rq", spy)
    return sizes


async def test_the_called_ae_is_checked_before_the_request_is_decoded(
    h: Harness, autojump_clock: trio.testing.MockClock, decoded: list[tuple[int, bool]]
) -> None:
    """issue 19 #3: an A-ASSOCIATE-RQ to an unknown called AE is refused from its fixed part
    (the called AE is at a fixed offset); its items, however many, are not decoded."""
    rq = raw_associate_rq([(2 * i + 1, CT, bogus_syntaxes(60)) for i in range(60)], "NOBODY")
    await h.send(rq)
    t, body = await h.read()
    assert (t, body) == (P.A_ASSOCIATE_RJ, RJ_CALLED_AE)
    assert decoded == []


RJ_LOCAL_LIMIT = bytes(
    (0, P.RJ_PERMANENT, P.RJ_SOURCE_PRESENTATION, P.RJ_REASON_LOCAL_LIMIT_EXCEEDED)
)


@pytest.mark.parametrize(
    ("contexts", "user_items"),
    [
        ([(1, CT, bogus_syntaxes(P.MAX_TRANSFER_SYNTAXES + 1))], 0),
        ([((2 * i + 1) % 256, CT, [EXPLICIT]) for i in range(P.MAX_CONTEXTS + 1)], 0),
        ([(1, CT, [EXPLICIT])], P.MAX_ASSOCIATE_ITEMS),
    ],
    ids=["syntaxes in a context", "contexts", "items"],
)
async def test_a_request_over_the_caps_is_refused_undecoded(
    h: Harness,
    autojump_clock: trio.testing.MockClock,
    decoded: list[tuple[int, bool]],
    contexts: list[tuple[int, str, list[str]]],
    user_items: int,
) -> None:
    """issue 19 #3: more transfer syntaxes in a context, more contexts, or more items in all
    than any real peer proposes: A-ASSOCIATE-RJ (permanent, service provider, local limit
    exceeded) after counting the item headers, nothing decoded."""
    await h.send(raw_associate_rq(contexts, user_items=user_items))
    t, body = await h.read()
    assert (t, body) == (P.A_ASSOCIATE_RJ, RJ_LOCAL_LIMIT)
    assert decoded == []


async def test_the_reported_950_kb_request_is_not_even_read(
    h: Harness, autojump_clock: trio.testing.MockClock, decoded: list[tuple[int, bool]]
) -> None:
    """issue 19 #3: 20 contexts of 2,700 bogus transfer syntaxes (≈ 600 KB here) exceed the
    size cap: A-ABORT on the PDU header, before its body is read."""
    rq = raw_associate_rq([(2 * i + 1, CT, bogus_syntaxes(2700)) for i in range(20)])
    assert len(rq) > P.MAX_ASSOCIATE_RQ
    await h.send(rq[:6])
    await h.expect_abort()
    assert decoded == []


async def test_a_request_at_the_caps_is_served(
    h: Harness, autojump_clock: trio.testing.MockClock, decoded: list[tuple[int, bool]]
) -> None:
    """128 contexts (every odd ID) of six transfer syntaxes, one of 64: within the caps, and
    decoded in a worker thread (over 512 items); a small request is decoded on the loop."""
    six = [EXPLICIT, *(f"1.2.840.10008.1.2{s}" for s in ("", ".2", ".4.50", ".4.70", ".4.90"))]
    contexts = [(2 * i + 1, CT, six) for i in range(P.MAX_CONTEXTS)]
    contexts[0] = (1, CT, [*bogus_syntaxes(P.MAX_TRANSFER_SYNTAXES - 1), EXPLICIT])
    rq = raw_associate_rq(contexts)
    assert P.associate_rq_items(rq[6:]) == (128 * 8 + 64 - 6 + 3, None)
    await h.send(rq)
    t, body = await h.read()
    assert t == P.A_ASSOCIATE_AC
    ac = P.decode_associate_ac(P.PDU_HEADER.pack(t, 0, len(body)) + body, [])
    assert len(ac.contexts) == P.MAX_CONTEXTS
    assert all(r.result == P.PC_ACCEPTANCE for r in ac.contexts)
    assert decoded == [(len(rq), False)]


async def test_a_small_request_is_decoded_on_the_loop(
    h: Harness, autojump_clock: trio.testing.MockClock, decoded: list[tuple[int, bool]]
) -> None:
    await h.associate()
    assert decoded == [(len(associate_rq()), True)]


async def test_a_claimed_p_data_length_holds_no_memory_until_client_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """issue 19 #2: after association, a P-DATA-TF header claiming 2 MiB (the most a 1 MiB
    `maxPduSize` reads) and 1,000 bytes of it hold a 64 KiB buffer, not 2 MiB, for the
    `clientTimeout` until the association is aborted."""
    h = Harness(tmp_path, attrs.evolve(CONFIG, max_pdu_size=1 << 20))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.serve)
        await h.associate()
        await trio.testing.wait_all_tasks_blocked()
        tracemalloc.start()
        try:
            await h.send(P.PDU_HEADER.pack(P.P_DATA_TF, 0, 2 << 20) + bytes(1000))
            await trio.testing.wait_all_tasks_blocked()
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert held < 128 << 10  # 2 MiB when the length field sized the buffer
        start = trio.current_time()
        await h.expect_abort()
        assert trio.current_time() - start == pytest.approx(CONFIG.client_timeout)


#: a P-DATA-TF body (CONFIG's read limit, 128 KiB) and its PDU but the last byte
HELD_BODY = 128 << 10
HELD_PDU = P.PDU_HEADER.pack(P.P_DATA_TF, 0, HELD_BODY) + bytes(HELD_BODY - 1)
#: what its buffer is charged to the budget (its first 64 KiB are not)
HELD = HELD_BODY - GROW_BYTES


async def test_pdus_held_short_of_their_last_byte_are_bounded_listener_wide(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """issue 19 #2: with `max_clients` 0 (unlimited), associations that each send a P-DATA-TF
    but its last byte would hold their buffers for `clientTimeout`, as many as connect; the
    listener's budget (here two such PDUs) aborts the one that asks for more, logs it once,
    and what was charged is released as the others close."""
    budget = BufferBudget(2 * HELD + HELD // 2)
    peers = [Harness(tmp_path / str(i), budget=budget) for i in range(5)]
    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(peer.serve)
            await peer.associate()
        for peer in peers[:2]:
            await peer.send(HELD_PDU)
            await trio.testing.wait_all_tasks_blocked()
        assert budget.held == 2 * HELD
        for peer in peers[2:4]:
            await peer.send(HELD_PDU)
            await peer.expect_abort()  # at once, not after clientTimeout
        assert budget.held == 2 * HELD and budget.refused == 2
        # a PDU of up to 64 KiB (storescu's are 16 KiB) is not charged: never refused for it
        await peers[4].send(P.PDU_HEADER.pack(P.P_DATA_TF, 0, GROW_BYTES) + bytes(GROW_BYTES - 1))
        await trio.testing.wait_all_tasks_blocked()
        assert not peers[4].done.is_set() and budget.refused == 2
        await peers[4].client_stream.aclose()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "PDUs not received whole" in warnings[0].getMessage()
        for peer in peers[:2]:
            await peer.client_stream.aclose()
            await peer.done.wait()
        assert budget.held == 0


async def test_the_listener_charges_its_connections_to_one_budget(tmp_path: Path) -> None:
    """issue 19 #2 on real sockets: three associations sending a P-DATA-TF but its last byte
    at once, a budget for two: one is aborted, the others hold theirs until they close."""
    sink = DirSink(tmp_path)
    config = attrs.evolve(
        CONFIG, host="127.0.0.1", port=0, max_buffered_bytes=2 * HELD + HELD // 2
    )
    budget = BufferBudget(config.max_buffered_bytes)
    answers: list[int] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(listener.serve_acceptor, config, sink, budget=budget)
        )
        peers = [(await open_association(port))[0] for _ in range(3)]
        async with trio.open_nursery() as readers:
            readers.cancel_scope.deadline = trio.current_time() + 20  # a guard: never reached

            async def hold(t: Transport) -> None:
                await t.send_all(HELD_PDU)
                answers.append((await t.read_pdu())[0])  # only the one aborted answers
                readers.cancel_scope.cancel()

            for t in peers:
                readers.start_soon(hold, t)
        assert answers == [P.A_ABORT] and budget.held == 2 * HELD
        for t in peers:
            await t.aclose()
        nursery.cancel_scope.cancel()
    assert budget.held == 0


async def test_empty_pdvs_are_refused(h: Harness, autojump_clock: trio.testing.MockClock) -> None:
    """issue 19 #3: a PDV with no data that does not end its message carries nothing, and a
    PDU holds hundreds of thousands of them: A-ABORT, nothing stored."""
    uid, data = dataset_bytes()
    await h.associate()
    command, *rest = store_pdus(uid, data, fragment=len(data))
    await h.send(command)
    empties = struct.pack(">IBB", 2, 1, 0x00) * 1000
    await h.send(P.PDU_HEADER.pack(P.P_DATA_TF, 0, len(empties)) + empties)
    for pdu in rest:
        await h.send(pdu)
    await h.expect_abort()
    assert h.sink.received == [] and h.sink.leftovers() == []


async def test_an_empty_last_fragment_ends_the_data_set(
    h: Harness, autojump_clock: trio.testing.MockClock
) -> None:
    """A data set whose last PDV has no data (its bytes all came before) is stored."""
    uid, data = dataset_bytes()
    await h.associate()
    command = store_pdus(uid, data)[0]
    await h.send(command)
    await h.send(P.p_data_header(1, 0x00, len(data)) + data)
    await h.send(P.p_data_header(1, 0x02, 0))
    assert (await h.read_command()).status == 0
    assert [rx.header.sop_instance_uid for rx in h.sink.received] == [uid]


async def test_many_small_pdvs_let_other_tasks_run(
    h: Harness, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 19 #3: a data set in one-byte PDVs, all in one PDU, is stored, and the other
    tasks get a turn at least every 1024 PDVs (each counts PDV_COST towards the transport's
    yield budget), not once per PDU."""
    handled = 0
    real = acceptor._Association._data_fragment

    async def counting(self: acceptor._Association, fragment: DataFragment) -> None:
        nonlocal handled
        handled += 1
        await real(self, fragment)

    monkeypatch.setattr(acceptor._Association, "_data_fragment", counting)
    ds = make_dataset(rows=64, columns=64, sop_class_uid=CT)
    raw = to_part10_bytes(ds)
    uid, data = str(ds.SOPInstanceUID), raw[144 + struct.unpack_from("<I", raw, 140)[0] :]
    await h.associate()
    await h.send(store_pdus(uid, data)[0])
    pdvs = b"".join(
        struct.pack(">IBB", 3, 1, 0x02 if i == len(data) - 1 else 0x00) + data[i : i + 1]
        for i in range(len(data))
    )
    longest = 0

    async def observe() -> None:
        nonlocal longest
        seen = 0
        while True:
            await trio.lowlevel.checkpoint()
            longest, seen = max(longest, handled - seen), handled

    async with trio.open_nursery() as nursery:
        nursery.start_soon(observe)
        await h.send(P.PDU_HEADER.pack(P.P_DATA_TF, 0, len(pdvs)) + pdvs)
        assert (await h.read_command()).status == 0
        nursery.cancel_scope.cancel()
    assert handled == len(data) > 8000
    # Trio runs each batch of runnable tasks in either order: between two turns of the
    # observer the association may have had two
    assert longest <= 2 * 1024


# ---------------------------------------------------------------------------- fuzz


def _valid_stream() -> bytes:
    uid, data = dataset_bytes()
    return associate_rq() + b"".join(store_pdus(uid, data, fragment=700)) + P.RELEASE_RQ_BYTES


VALID = _valid_stream()
#: where VALID holds the ID of its (one) presentation context
CONTEXT_ID_AT = next(
    i
    for i, (a, b) in enumerate(zip(VALID, with_context_ids(associate_rq(), 2), strict=False))
    if a != b
)


async def _fuzz_once(raw: bytes, tmp: Path, memory_max: int) -> tuple[list[int], int]:
    """(PDU types answered, temporary files made) for the session `raw`; asserts that none of
    those files is left behind."""
    config = AcceptorConfig(
        artim_timeout=5, client_timeout=10, max_pdu_size=65536, memory_max_bytes=memory_max
    )
    h = Harness(tmp, config)
    answers: list[int] = []
    temp_files = 0
    new_temp_path = h.sink.new_temp_path

    def counted_temp_path() -> Path:
        nonlocal temp_files
        temp_files += 1
        return new_temp_path()

    h.sink.new_temp_path = counted_temp_path  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.serve)
        await h.send(raw)
        with trio.fail_after(100):
            try:
                while True:
                    t, _ = await h.client.read_pdu()
                    answers.append(t)
            except (PeerClosed, P.PduError):
                pass
            await h.done.wait()
    assert h.sink.leftovers() == []
    return answers, temp_files


def _run_fuzz(raw: bytes, memory_max: int = 0) -> tuple[list[int], int]:
    """Every data set goes to a temporary file unless `memory_max` says otherwise, so that
    "never leaves a file" is tested."""
    with tempfile.TemporaryDirectory() as d:
        return trio.run(
            _fuzz_once,
            raw,
            Path(d),
            memory_max,
            clock=trio.testing.MockClock(autojump_threshold=0),
        )


def test_the_fuzzed_session_goes_through_a_temporary_file() -> None:
    assert _run_fuzz(VALID) == ([P.A_ASSOCIATE_AC, P.P_DATA_TF, P.A_RELEASE_RP], 1)
    assert _run_fuzz(VALID, CONFIG.memory_max_bytes) == (
        [P.A_ASSOCIATE_AC, P.P_DATA_TF, P.A_RELEASE_RP],
        0,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=600))
def test_fuzz_random_bytes(raw: bytes) -> None:
    answers, _ = _run_fuzz(raw)
    assert set(answers) <= {P.A_ABORT, P.A_ASSOCIATE_RJ}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6
    ),
    st.integers(0, len(VALID)),
    st.booleans(),
)
@example(mutations=[(CONTEXT_ID_AT, 2)], cut=0, in_memory=False)
def test_fuzz_mutated_session(mutations: list[tuple[int, int]], cut: int, in_memory: bool) -> None:
    raw = bytearray(VALID)
    for pos, value in mutations:
        raw[pos] = value
    memory_max = CONFIG.memory_max_bytes if in_memory else 0
    answers, _ = _run_fuzz(bytes(raw[:cut]) if cut else bytes(raw), memory_max)
    if answers and answers[0] != P.A_ASSOCIATE_AC:
        assert set(answers) <= {P.A_ABORT, P.A_ASSOCIATE_RJ}
    assert set(answers) <= {
        P.A_ABORT,
        P.A_ASSOCIATE_RJ,
        P.A_ASSOCIATE_AC,
        P.P_DATA_TF,
        P.A_RELEASE_RP,
    }
