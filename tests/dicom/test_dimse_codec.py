"""The hand-written command-set and PDV codec against pynetdicom/pydicom, field by field."""

from __future__ import annotations

import contextlib
import io

from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF

from capacitor_trio.dicom import dimse
from capacitor_trio.dicom import pdu as P

component = st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,8}", fullmatch=True))
uids = st.lists(component, min_size=2, max_size=12).map(".".join).filter(lambda u: len(u) <= 64)
message_ids = st.integers(0, 0xFFFF)
ae_titles = st.from_regex(r"[A-Z0-9_]([A-Z0-9_ -]{0,14}[A-Z0-9_])?", fullmatch=True)
comments = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9 .:]{0,62}[A-Za-z0-9.])?", fullmatch=True)


def pynetdicom_bytes(message_cls: type, primitive: object) -> bytes:
    msg = message_cls()
    msg.primitive_to_message(primitive)
    return encode(msg.command_set, True, True)


def pydicom_fields(raw: bytes) -> dict[str, object]:
    ds = decode(io.BytesIO(raw), True, True)
    return {e.keyword: e.value for e in ds}


@settings(max_examples=150, deadline=None)
@given(message_ids, uids, uids, st.integers(0, 2), st.none() | ae_titles, st.none() | message_ids)
def test_c_store_rq(
    msg_id: int,
    sop_class: str,
    sop_instance: str,
    priority: int,
    move_ae: str | None,
    move_id: int | None,
) -> None:
    p = C_STORE()
    p.MessageID = msg_id
    p.AffectedSOPClassUID = sop_class
    p.AffectedSOPInstanceUID = sop_instance
    p.Priority = priority
    if move_ae is not None:
        p.MoveOriginatorApplicationEntityTitle = move_ae
    if move_id is not None:
        p.MoveOriginatorMessageID = move_id
    p.DataSet = io.BytesIO(b"")
    theirs = pynetdicom_bytes(C_STORE_RQ, p)
    ours = dimse.encode_c_store_rq(msg_id, sop_class, sop_instance, priority, move_ae, move_id)
    assert ours == theirs
    cmd = dimse.decode_command(theirs)
    assert cmd == dimse.Command(
        command_field=dimse.C_STORE_RQ,
        message_id=msg_id,
        affected_sop_class_uid=sop_class,
        affected_sop_instance_uid=sop_instance,
        priority=priority,
        data_set_type=dimse.DATA_SET_PRESENT,
        move_originator_ae=move_ae,
        move_originator_message_id=move_id,
    )
    assert cmd.has_data_set
    fields = pydicom_fields(ours)
    assert fields["AffectedSOPInstanceUID"] == sop_instance
    assert fields["CommandGroupLength"] == len(ours) - 12


@settings(max_examples=150, deadline=None)
@given(message_ids, uids, uids, st.integers(0, 0xFFFF), st.none() | comments)
def test_c_store_rsp(
    msg_id: int, sop_class: str, sop_instance: str, status: int, comment: str | None
) -> None:
    p = C_STORE()
    p.MessageIDBeingRespondedTo = msg_id
    p.AffectedSOPClassUID = sop_class
    p.AffectedSOPInstanceUID = sop_instance
    p.Status = status
    if comment is not None:
        p.ErrorComment = comment
    theirs = pynetdicom_bytes(C_STORE_RSP, p)
    ours = dimse.encode_c_store_rsp(msg_id, sop_class, sop_instance, status, comment)
    assert ours == theirs
    assert dimse.decode_command(theirs) == dimse.Command(
        command_field=dimse.C_STORE_RSP,
        message_id_being_responded_to=msg_id,
        affected_sop_class_uid=sop_class,
        affected_sop_instance_uid=sop_instance,
        data_set_type=dimse.NO_DATA_SET,
        status=status,
        error_comment=comment,
    )


@settings(max_examples=100, deadline=None)
@given(message_ids, st.integers(0, 0xFFFF))
def test_c_echo(msg_id: int, status: int) -> None:
    p = C_ECHO()
    p.MessageID = msg_id
    p.AffectedSOPClassUID = dimse.VERIFICATION_SOP_CLASS
    assert dimse.encode_c_echo_rq(msg_id) == pynetdicom_bytes(C_ECHO_RQ, p)
    r = C_ECHO()
    r.MessageIDBeingRespondedTo = msg_id
    r.AffectedSOPClassUID = dimse.VERIFICATION_SOP_CLASS
    r.Status = status
    theirs = pynetdicom_bytes(C_ECHO_RSP, r)
    assert dimse.encode_c_echo_rsp(msg_id, status) == theirs
    cmd = dimse.decode_command(theirs)
    assert (cmd.command_field, cmd.message_id_being_responded_to, cmd.status) == (
        dimse.C_ECHO_RSP,
        msg_id,
        status,
    )
    assert not cmd.has_data_set


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 255), st.binary(min_size=1, max_size=3000), st.integers(16, 1024))
def test_pdv_framing_matches_pynetdicom(ctx: int, payload: bytes, max_pdu: int) -> None:
    ours = P.encode_command_pdus(ctx, payload, max_pdu)
    # decode our PDUs with pynetdicom and reassemble
    off, got, flags = 0, b"", []
    while off < len(ours):
        length = int.from_bytes(ours[off + 2 : off + 6], "big")
        assert length <= max_pdu
        pdu = P_DATA_TF()
        pdu.decode(ours[off : off + 6 + length])
        for item in pdu.presentation_data_value_items:
            assert item.presentation_context_id == ctx
            mch = item.presentation_data_value[0]
            flags.append(mch)
            got += item.presentation_data_value[1:]
        off += 6 + length
    assert got == payload
    assert all(f & 1 for f in flags) and flags[-1] == 3 and all(f == 1 for f in flags[:-1])
    # and pynetdicom's P-DATA-TF through our parser
    theirs = P_DATA_TF()
    theirs.presentation_data_value_items = []
    from pynetdicom.pdu import PresentationDataValueItem

    item = PresentationDataValueItem()
    item.presentation_context_id = ctx
    item.presentation_data_value = b"\x02" + payload
    theirs.presentation_data_value_items.append(item)
    raw = theirs.encode()
    assert [(c, m, bytes(d)) for c, m, d in P.iter_pdvs(memoryview(raw)[6:])] == [(ctx, 2, payload)]
    assert raw[:12] == P.p_data_header(ctx, 2, len(payload))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_never_crashes_on_garbage(raw: bytes) -> None:
    with contextlib.suppress(dimse.CommandDecodeError):
        dimse.decode_command(raw)
