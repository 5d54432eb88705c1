"""The sans-IO DIMSE message assembler: PDVs in, command sets and data fragments out."""

from __future__ import annotations

import pytest

from capacitor_trio.dicom import dimse
from capacitor_trio.dicom import pdu as P
from capacitor_trio.dicom.assembler import (
    AssemblyError,
    CommandSet,
    DataFragment,
    MessageAssembler,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
STORE_RQ = dimse.encode_c_store_rq(7, CT, "1.2.3.4")
STORE_RSP = dimse.encode_c_store_rsp(7, CT, "1.2.3.4", 0)
COMMAND, LAST, DATA = 0x01, 0x02, 0x00


def feed(a: MessageAssembler, ctx: int, mch: int, data: bytes) -> CommandSet | DataFragment | None:
    return a.feed(ctx, mch, memoryview(data))


def test_a_command_set_in_one_pdv_then_its_data_set() -> None:
    a = MessageAssembler()
    part = feed(a, 1, COMMAND | LAST, STORE_RQ)
    assert isinstance(part, CommandSet) and part.context_id == 1
    assert (part.command.command_field, part.command.message_id) == (dimse.C_STORE_RQ, 7)
    assert not a.idle  # a C-STORE-RQ announces a data set
    first = feed(a, 1, DATA, b"abc")
    assert isinstance(first, DataFragment) and (bytes(first.data), first.last) == (b"abc", False)
    last = feed(a, 1, DATA | LAST, b"de")
    assert isinstance(last, DataFragment) and (bytes(last.data), last.last) == (b"de", True)
    assert a.idle


def test_a_command_set_over_several_pdvs_and_one_without_data_set() -> None:
    a = MessageAssembler()
    for i in range(0, len(STORE_RSP) - 10, 10):
        assert feed(a, 3, COMMAND, STORE_RSP[i : i + 10]) is None
        assert not a.idle
    part = feed(a, 3, COMMAND | LAST, STORE_RSP[i + 10 :])
    assert isinstance(part, CommandSet) and part.command.status == 0
    assert a.idle  # a response has no data set


def test_the_command_set_cap_holds_both_ways_of_arriving() -> None:
    a = MessageAssembler(max_command_bytes=100)
    assert feed(a, 1, COMMAND, b"\0" * 60) is None
    with pytest.raises(AssemblyError, match="larger than 100 bytes") as exc:
        feed(a, 1, COMMAND, b"\0" * 41)
    assert exc.value.abort_reason == P.ABORT_REASON_INVALID_PARAMETER
    with pytest.raises(AssemblyError, match="larger than 100 bytes"):
        feed(MessageAssembler(max_command_bytes=100), 1, COMMAND | LAST, b"\0" * 101)
    exact = MessageAssembler(max_command_bytes=len(STORE_RQ))
    assert feed(exact, 1, COMMAND, STORE_RQ[:40]) is None
    assert isinstance(feed(exact, 1, COMMAND | LAST, STORE_RQ[40:]), CommandSet)


@pytest.mark.parametrize(
    ("pdvs", "message", "reason"),
    [
        ([(1, DATA, b"x")], "data fragment without a command", P.ABORT_REASON_UNEXPECTED_PDU),
        (
            [(1, COMMAND | LAST, STORE_RQ), (1, COMMAND, b"x")],
            "command fragment while a data set was expected",
            P.ABORT_REASON_UNEXPECTED_PDU,
        ),
        (
            [(1, COMMAND, STORE_RQ[:10]), (3, COMMAND, STORE_RQ[10:])],
            "command fragments on two presentation contexts",
            P.ABORT_REASON_UNEXPECTED_PDU,
        ),
        (
            [(1, COMMAND | LAST, STORE_RQ), (3, DATA, b"x")],
            "data fragment on another presentation context",
            P.ABORT_REASON_INVALID_PARAMETER,
        ),
        ([(1, COMMAND | LAST, b"\1\2\3")], "undecodable", P.ABORT_REASON_INVALID_PARAMETER),
        (
            [(1, COMMAND | LAST, STORE_RSP), (1, DATA | LAST, b"x")],
            "data fragment without a command",
            P.ABORT_REASON_UNEXPECTED_PDU,
        ),
    ],
    ids=[
        "data first",
        "command inside a data set",
        "command on two contexts",
        "data on another context",
        "undecodable command",
        "data after a command without data set",
    ],
)
def test_pdvs_out_of_order_are_protocol_errors(
    pdvs: list[tuple[int, int, bytes]], message: str, reason: int
) -> None:
    a = MessageAssembler()
    *before, bad = pdvs
    for ctx, mch, data in before:
        feed(a, ctx, mch, data)
    with pytest.raises(AssemblyError, match=message) as exc:
        feed(a, *bad)
    assert isinstance(exc.value, P.PduError) and exc.value.abort_reason == reason
