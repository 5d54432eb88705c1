"""Hostile input against the router subprocess: hundreds of concurrent associations beyond
`maxClientsPerServer`, unknown called AEs, refused abstract syntaxes, associations that never send
anything, hypothesis-fuzzed PDUs and data sets on the DICOM listener, and on the API malformed
JSON, huge bodies, wrong types, path tricks and missing or forged credentials.

Nothing crashes (the router answers a C-ECHO and routes an instance afterwards), memory stays
bounded, no partial file is left behind, and every answer is a protocol-level refusal (A-ASSOCIATE-RJ,
A-ABORT, a C-STORE failure status) or an HTTP 4xx in the API's envelope.
"""

from __future__ import annotations

import functools
import gc
import json
import socket
import struct
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from capacitor_trio.dicom import dimse
from capacitor_trio.dicom import pdu as P
from capacitor_trio.dicom.requestor import Peer, echo
from capacitor_trio.dicom.transport import PeerClosed, Transport
from tests.helpers.datasets import make_dataset, to_part10_bytes
from tests.helpers.peers import RouterProcess, free_port
from tests.helpers.soak import Gate, RssSampler, Sender, series_of, write_router_config
from tests.store.util import incoming_leftovers

from .conftest import start_sinks

pytestmark = [
    pytest.mark.soak,
    pytest.mark.timeout(3600),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

MAX_CLIENTS = 40
TOKEN = "soak-token"
CT_CTX = P.ProposedContext(1, CTImageStorage, (ExplicitVRLittleEndian,))
MR_CTX = P.ProposedContext(3, MRImageStorage, (ExplicitVRLittleEndian,))


def associate_rq(called: str = "DEST", contexts: tuple[P.ProposedContext, ...] = (CT_CTX,)) -> bytes:
    return P.encode_associate_rq("HOSTILE", called, list(contexts), 16384)


def store_pdus(uid: str, cls: str, data: bytes, ctx: int = 1) -> bytes:
    cmd = dimse.encode_c_store_rq(7, cls, uid, 0)
    out = P.encode_command_pdus(ctx, cmd, 16384)
    for i in range(0, max(len(data), 1), 8000):
        chunk = data[i:i + 8000]
        last = i + 8000 >= len(data)
        out += P.PDU_HEADER.pack(P.P_DATA_TF, 0, 6 + len(chunk)) + P.p_data_header(
            ctx, 0x02 if last else 0x00, len(chunk))[6:] + chunk
    return out


def _dataset() -> tuple[str, bytes]:
    ds = make_dataset(rows=8, columns=8)
    raw = to_part10_bytes(ds)
    return str(ds.SOPInstanceUID), raw[raw.index(b"DICM") + 4:][_meta_len(raw):]


def _meta_len(raw: bytes) -> int:
    # group 2 length: (0002,0000) UL right after "DICM"
    start = raw.index(b"DICM") + 4
    (group_len,) = struct.unpack_from("<I", raw, start + 8)
    return 12 + group_len


UID, DATA = _dataset()
VALID_SESSION = associate_rq() + store_pdus(UID, CTImageStorage, DATA) + P.RELEASE_RQ_BYTES


def exchange(port: int, raw: bytes) -> list[int]:
    """Send `raw`, half-close, read PDU types until the router closes (blocking; for threads)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the router may have closed already (an A-ABORT for an early error)
        buf = b""
        try:
            while chunk := s.recv(65536):
                buf += chunk
        except ConnectionResetError:
            pass
    types, off = [], 0
    while off + 6 <= len(buf):
        t, _, length = P.PDU_HEADER.unpack_from(buf, off)
        types.append(t)
        off += 6 + length
    return types


ANSWERS = {P.A_ASSOCIATE_AC, P.A_ASSOCIATE_RJ, P.P_DATA_TF, P.A_RELEASE_RP, P.A_ABORT}


def fuzz(port: int, n: int) -> dict[str, int]:
    """Three hypothesis runs of `n` cases each; returns the cases tried per kind."""
    tried = {"random PDUs": 0, "mutated sessions": 0, "fuzzed data sets": 0}
    common = settings(max_examples=n, deadline=None, database=None, derandomize=False,
                      suppress_health_check=list(HealthCheck))

    @common
    @given(st.binary(min_size=1, max_size=2000))
    def random_bytes(raw: bytes) -> None:
        tried["random PDUs"] += 1
        assert set(exchange(port, raw)) <= {P.A_ABORT, P.A_ASSOCIATE_RJ}

    @common
    @given(st.lists(st.tuples(st.integers(0, len(VALID_SESSION) - 1), st.integers(0, 255)),
                    min_size=1, max_size=8),
           st.integers(0, len(VALID_SESSION)))
    def mutated(mutations: list[tuple[int, int]], cut: int) -> None:
        tried["mutated sessions"] += 1
        raw = bytearray(VALID_SESSION)
        for pos, value in mutations:
            raw[pos] = value
        answers = exchange(port, bytes(raw[:cut]) if cut else bytes(raw))
        assert set(answers) <= ANSWERS
        if answers and answers[0] != P.A_ASSOCIATE_AC:
            assert set(answers) <= {P.A_ABORT, P.A_ASSOCIATE_RJ}

    @common
    @given(st.one_of(
        st.binary(max_size=3000),
        st.lists(st.tuples(st.integers(0, len(DATA) - 1), st.integers(0, 255)), min_size=1,
                 max_size=10).map(lambda ms: _mutate(DATA, ms)),
        st.integers(0, len(DATA)).map(lambda cut: DATA[:cut]),
    ))
    def datasets(data: bytes) -> None:
        tried["fuzzed data sets"] += 1
        answers = exchange(port, associate_rq() + store_pdus(UID, CTImageStorage, data)
                           + P.RELEASE_RQ_BYTES)
        assert answers[:1] == [P.A_ASSOCIATE_AC]
        # an answer to the C-STORE (any status), or an A-ABORT for a broken message
        assert P.P_DATA_TF in answers or P.A_ABORT in answers, answers

    random_bytes()
    mutated()
    datasets()
    return tried


def _mutate(data: bytes, mutations: list[tuple[int, int]]) -> bytes:
    raw = bytearray(data)
    for pos, value in mutations:
        raw[pos] = value
    return bytes(raw)


async def open_association(port: int, raw: bytes) -> tuple[Transport, int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    t = Transport(stream)
    await t.send_all(raw)
    pdu_type, body = await t.read_pdu()
    return t, pdu_type, bytes(body)


async def burst(port: int, n: int) -> dict[str, int]:
    """`n` associations at once, all held open until every one has its answer."""
    answers: dict[str, int] = {"accepted": 0, "rejected transient (local limit)": 0, "other": 0}
    all_answered = trio.Event()
    counted = 0

    async def one() -> None:
        nonlocal counted
        t, pdu_type, body = await open_association(port, associate_rq())
        try:
            if pdu_type == P.A_ASSOCIATE_AC:
                answers["accepted"] += 1
            elif pdu_type == P.A_ASSOCIATE_RJ and not P.decode_associate_rj(body).permanent:
                answers["rejected transient (local limit)"] += 1
            else:
                answers["other"] += 1
            counted += 1
            if counted == n:
                all_answered.set()
            await all_answered.wait()
            if pdu_type == P.A_ASSOCIATE_AC:
                await t.send_all(P.RELEASE_RQ_BYTES)
                await t.read_pdu()
        finally:
            await t.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return answers


async def silent(port: int, associate: bool, closed: list[float]) -> None:
    """Connect and say nothing (or nothing after the association); note when the router closes."""
    start = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    t = Transport(stream)
    try:
        if associate:
            await t.send_all(associate_rq())
            assert (await t.read_pdu())[0] == P.A_ASSOCIATE_AC
            assert (await t.read_pdu())[0] == P.A_ABORT  # idle: clientTimeout
        await t.wait_closed()
    except PeerClosed:
        pass
    finally:
        await t.aclose()
    closed.append(trio.current_time() - start)


async def api_abuse(base: str, port_ae: str, n_fuzz: int) -> dict[str, int]:
    """Malformed, oversized, mistyped, path-tricked and unauthenticated requests: each must be a
    4xx in the envelope. Returns how many requests of each kind were made."""
    tried = {"API hostile requests": 0, "API fuzzed requests": 0}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    auth_json = {**auth, "Content-Type": "application/json"}  # else 415 before any parsing
    cases: list[tuple[str, str, dict[str, Any], set[int]]] = [
        # missing and forged credentials
        ("POST", "/api/service/pause", {}, {403}),
        ("POST", "/api/service/pause", {"headers": {"Authorization": "Bearer forged"}}, {403}),
        ("POST", "/api/service/pause", {"headers": {"Authorization": "Basic Zm9vOmJhcg=="}}, {403}),
        ("POST", "/api/service/pause", {"headers": {"Authorization": "Bearer " + "x" * 10000}},
         {403, 431}),
        ("POST", "/api/service/pause", {"headers": {"Cookie": "capacitor_session=forged"}}, {403}),
        ("POST", "/api/auth/login", {"json": {"password": "wrong"}}, {403}),
        ("POST", "/api/auth/login", {"json": {"password": 12345}}, {400}),
        ("DELETE", "/api/queue/items/1", {}, {403}),
        ("PUT", f"/api/nodes/{port_ae}", {"json": {"port": 1}}, {403}),
        # malformed JSON, wrong types, huge bodies
        ("PUT", f"/api/nodes/{port_ae}", {"headers": auth_json, "content": b"{not json"}, {400}),
        ("PUT", f"/api/nodes/{port_ae}", {"headers": auth, "json": {"port": "eighty"}}, {400, 409}),
        ("PUT", f"/api/nodes/{port_ae}", {"headers": auth, "json": [1, 2, 3]}, {400, 409}),
        ("PUT", f"/api/nodes/{port_ae}",
         {"headers": auth_json, "content": b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"},
         {400, 409, 413}),
        ("POST", "/api/queue/items/1/move", {"headers": auth, "json": {"state": ["x"]}},
         {400, 404}),
        ("POST", "/api/queue/items/1/move", {"headers": auth_json, "content": b"\xff\xfe\x00"},
         {400, 404}),
        ("POST", "/api/queue/actions/retry-failed", {"headers": auth, "json": {"node": 5}},
         {400}),
        ("GET", "/api/queue/items?limit=-5&skip=abc", {}, {400}),
        ("GET", "/api/queue/items?limit=99999999999999999999", {}, {400}),
        ("GET", "/api/queue/items?state=nonsense", {}, {400}),
        # path tricks in ids and AE titles
        ("GET", "/api/nodes/..%2F..%2Fetc%2Fpasswd", {}, {404}),
        ("GET", "/api/nodes/%2e%2e", {}, {404}),
        ("GET", "/api/nodes/" + "A" * 5000, {}, {404, 414}),
        ("GET", "/api/nodes/A%5CB", {}, {404}),
        ("GET", "/api/nodes/%00", {}, {404, 400}),
        ("GET", "/api/queue/items/-1", {}, {404, 400}),
        ("GET", "/api/queue/items/99999999999999999999999", {}, {404, 400}),
        ("GET", "/api/queue/items/1%20OR%201=1", {}, {404, 400}),
        ("GET", "/api/queue/items/..%2F..%2Fetc%2Fpasswd", {}, {404, 400}),
        ("DELETE", "/api/queue/studies/..%2F..", {"headers": auth}, {404, 400}),
        ("PUT", "/api/nodes/..%2Fnodes", {"headers": auth, "json": {"port": 104}}, {404, 400}),
        ("POST", "/api/nodes/%2e%2e/pause", {"headers": auth}, {404}),
    ]
    async with httpx.AsyncClient(base_url=base, timeout=20) as client:
        for method, path, kwargs, allowed in cases:
            # one connection per request: after an answer that left the body unread (403 before
            # reading it), the next request on the same keep-alive connection hangs (reported)
            headers = {**kwargs.pop("headers", {}), "Connection": "close"}
            try:
                r = await client.request(method, path, headers=headers, **kwargs)
            except httpx.TimeoutException as exc:
                raise AssertionError(f"no answer to {method} {path[:80]} {kwargs!r:.200}") from exc
            tried["API hostile requests"] += 1
            assert r.status_code in allowed, (method, path[:80], r.status_code, r.text[:300])
            if r.status_code in (400, 403, 404):
                body = r.json()
                assert body["ok"] is False and body["error"]["code"], body

    # a body four times over the 1 MB limit: 413, and the connection is closed (the rest unread)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        r = await client.put(f"/api/nodes/{port_ae}", headers=auth,
                             content=b'{"x": "' + b"A" * (4 << 20) + b'"}')
        tried["API hostile requests"] += 1
        assert r.status_code == 413, r.text[:300]
    async with httpx.AsyncClient(base_url=base, timeout=60,
                                 headers={"Connection": "close"}) as client:

        def check(r: httpx.Response) -> None:
            tried["API fuzzed requests"] += 1
            # never an internal error (a %2F in an id may get werkzeug's 308 to the decoded path)
            assert r.status_code < 500, (r.request.url, r.status_code, r.text[:300])

        text = st.text(min_size=1, max_size=80)
        jsonish = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text,
                               lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4),
                               max_leaves=12)
        examples: list[tuple[str, str, Any]] = []

        @settings(max_examples=n_fuzz, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(["GET node", "GET item", "move", "PUT node", "fail", "login"]),
               text, jsonish)
        def collect(kind: str, ident: str, body: Any) -> None:
            examples.append((kind, ident, body))

        collect()
        for kind, ident, body in examples:
            quoted = urllib.parse.quote(ident, safe="")
            if kind == "GET node":
                check(await client.get(f"/api/nodes/{quoted}"))
            elif kind == "GET item":
                check(await client.get(f"/api/queue/items/{quoted}"))
            elif kind == "move":
                check(await client.post(f"/api/queue/items/{quoted}/move", headers=auth,
                                        content=json.dumps(body)))
            elif kind == "PUT node":
                check(await client.put(f"/api/nodes/{quoted}", headers=auth,
                                       content=json.dumps(body)))
            elif kind == "fail":
                check(await client.post(f"/api/queue/items/{quoted}/fail", headers=auth,
                                        content=json.dumps(body)))
            else:
                check(await client.post("/api/auth/login", content=json.dumps(body)))
    return tried


async def test_hostile_input(
    tmp_path: Path, nursery: trio.Nursery, soak: bool, figures: dict[str, Any],
    router_factory: list[RouterProcess], rss: RssSampler,
) -> None:
    # silent peers stay below maxClientsPerServer (40), so the fuzzer keeps a slot
    n_burst, n_fuzz, n_api, n_silent = (600, 3000, 1500, 30) if soak else (300, 150, 150, 20)
    wall = time.monotonic()
    sinks, ports = await start_sinks(nursery, tmp_path / "dest", ("DEST",))
    data = tmp_path / "data"
    scp_port, api_port = free_port(), free_port()
    write_router_config(
        data, scp_port, ports, api_port=api_port,
        extra=(f"maxClientsPerServer: {MAX_CLIENTS}\nclientTimeout: 5\n"
               f"rejectAbstractSyntaxes: [{MRImageStorage}]\n"
               f"maxPduSize: 65536\n"
               f"api:\n  enabled: true\n  port: {api_port}\n  token: {TOKEN}\n"
               "  servicePassword: soak-password\n"),
    )
    # the api block above replaces the default one (the last key wins)
    text = (data / "config.yml").read_text().replace("api:\n  enabled: false\n", "")
    (data / "config.yml").write_text(text)
    router = RouterProcess(data)
    router_factory.append(router)
    await router.start(nursery, timeout=120)
    base = f"http://127.0.0.1:{api_port}"

    # 1. hundreds of associations at once, beyond maxClientsPerServer
    burst_answers = await burst(scp_port, n_burst)
    assert burst_answers["other"] == 0, burst_answers
    assert 1 <= burst_answers["accepted"] <= MAX_CLIENTS, burst_answers

    # 2. unknown called AE; a refused abstract syntax
    t, pdu_type, body = await open_association(scp_port, associate_rq("NOBODY"))
    await t.aclose()
    rj = P.decode_associate_rj(body)
    assert pdu_type == P.A_ASSOCIATE_RJ and rj.permanent and rj.reason == 7
    rq = associate_rq("DEST", (CT_CTX, MR_CTX))
    t, pdu_type, body = await open_association(scp_port, rq)
    assert pdu_type == P.A_ASSOCIATE_AC
    ac = P.decode_associate_ac(P.PDU_HEADER.pack(pdu_type, 0, len(body)) + body, [CT_CTX, MR_CTX])
    assert {r.context_id: r.result for r in ac.contexts} == {
        1: P.PC_ACCEPTANCE, 3: P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED}
    await t.send_all(P.RELEASE_RQ_BYTES)
    await t.read_pdu()
    await t.aclose()

    # 3. silent connections (ARTIM closes them) and silent associations (clientTimeout aborts)
    closed: list[float] = []
    async with trio.open_nursery() as quiet:
        for i in range(n_silent):
            quiet.start_soon(silent, scp_port, i % 2 == 0, closed)
        # 4. meanwhile: fuzzing on the DICOM listener and hostile requests on the API
        tried = await trio.to_thread.run_sync(fuzz, scp_port, n_fuzz)
        tried |= await api_abuse(base, "DEST", n_api)
    assert len(closed) == n_silent

    # still serving: C-ECHO, and an instance routed and delivered
    result = await echo(Peer("ROUTER", "127.0.0.1", scp_port), "HOSTILE", timeout=30)
    assert result.success, result.error
    gate = Gate()
    gate.open()
    sender = Sender(scp_port, "DEST", series_of(5, patient="AFTER"), gate)
    await trio.to_thread.run_sync(functools.partial(sender.run))
    gate.close()
    gc.collect()
    with trio.fail_after(120):
        await sinks["DEST"].count.wait_until(lambda: set(sender.acked) <= set(sinks["DEST"].received))
    assert router.proc is not None and router.proc.returncode is None
    assert incoming_leftovers(data / "cache" / "incoming") == []
    assert rss.peak < 400 * 2**20, rss.peak
    fuzz_cases = sum(v for k, v in tried.items())
    figures["hostile: fuzz cases tried"] = fuzz_cases
    figures["hostile: cases by kind"] = tried
    figures["hostile: concurrent associations"] = {"sent": n_burst, **burst_answers}
    figures["hostile: silent connections closed by the router"] = len(closed)
    figures["hostile: router peak RSS (MB)"] = round(rss.peak / 2**20, 1)
    figures["hostile: wall time (s)"] = round(time.monotonic() - wall, 1)
