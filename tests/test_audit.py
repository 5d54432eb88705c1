"""The audit trail (audit.py): HMAC-chained JSON lines; an edited and a removed line are both
detected, and where; a restart continues the chain; rotated files are compressed, kept, and
checked with the rest; a full queue holds the recorder up instead of dropping its line;
`capacitor-trio audit-verify` prints the result."""

from __future__ import annotations

import gzip
import json
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from capacitor_trio import audit
from capacitor_trio.audit import (
    ARCHIVE_DIR,
    AUDIT_LOG,
    KEY_FILE,
    AuditTrail,
    Delivery,
    OperatorAction,
    RoutingDecision,
    TagMutation,
    verify,
)
from capacitor_trio.cli import main
from capacitor_trio.domain.filtering import TagChange


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def write_events(data: Path, n: int, *, start: int = 0, **kw: object) -> AuditTrail:
    trail = AuditTrail(data, data / "log", **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.run)
        for i in range(start, start + n):
            await trail.record(OperatorAction("token@127.0.0.1", "item-retry", f"item {i}", items=(i,)), written=True)
        nursery.cancel_scope.cancel()
    return trail


def lines(data: Path) -> list[str]:
    return (data / "log" / AUDIT_LOG).read_text().splitlines()


def rewrite(data: Path, new: list[str]) -> None:
    (data / "log" / AUDIT_LOG).write_text("".join(f"{line}\n" for line in new))


async def test_a_chain_verifies_and_its_files_are_private(tmp_path: Path) -> None:
    await write_events(tmp_path, 5)
    assert verify(tmp_path, tmp_path / "log") == (5, None)
    first = json.loads(lines(tmp_path)[0])
    assert first["event"] == "operator" and first["who"] == "token@127.0.0.1" and first["items"] == [0]
    assert first["seq"] == 1 and len(first["mac"]) == 64
    assert _mode(tmp_path / KEY_FILE) == 0o600 and _mode(tmp_path / "log" / AUDIT_LOG) == 0o600
    assert _mode(tmp_path / "log") == 0o700


async def test_an_edited_line_is_detected(tmp_path: Path) -> None:
    await write_events(tmp_path, 5)
    edited = lines(tmp_path)
    edited[2] = edited[2].replace("item 2", "item 9")
    rewrite(tmp_path, edited)
    count, broken = verify(tmp_path, tmp_path / "log")
    assert count == 2 and broken is not None and broken.line_number == 3 and "item 9" in broken.line


async def test_a_removed_line_is_detected(tmp_path: Path) -> None:
    await write_events(tmp_path, 5)
    kept = lines(tmp_path)
    del kept[1]
    rewrite(tmp_path, kept)
    count, broken = verify(tmp_path, tmp_path / "log")
    assert count == 1 and broken is not None and broken.line_number == 2 and "item 2" in broken.line


async def test_a_restart_continues_the_chain(tmp_path: Path) -> None:
    await write_events(tmp_path, 3)
    await write_events(tmp_path, 4, start=3)  # a new trail on the same files: the next start
    assert verify(tmp_path, tmp_path / "log") == (7, None)
    assert [json.loads(line)["seq"] for line in lines(tmp_path)] == list(range(1, 8))


async def test_rotated_files_are_compressed_kept_and_verified(tmp_path: Path) -> None:
    await write_events(tmp_path, 30, max_bytes=1000)
    archived = sorted((tmp_path / "log" / ARCHIVE_DIR).iterdir())
    assert len(archived) >= 3 and all(p.name.endswith(".gz") and _mode(p) == 0o600 for p in archived)
    assert verify(tmp_path, tmp_path / "log") == (30, None)
    await write_events(tmp_path, 5, start=30, max_bytes=1000)  # a restart after rotations
    assert verify(tmp_path, tmp_path / "log") == (35, None)
    # a line edited inside an archive is found there
    victim = sorted((tmp_path / "log" / ARCHIVE_DIR).iterdir(), key=lambda p: int(p.name.split(".")[-2]))[1]
    text = gzip.decompress(victim.read_bytes()).decode().replace("item-retry", "item-delet", 1)
    victim.write_bytes(gzip.compress(text.encode()))
    _count, broken = verify(tmp_path, tmp_path / "log")
    assert broken is not None and broken.path == victim and broken.line_number == 1


async def test_a_full_queue_holds_the_recorder_up_and_loses_nothing(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path, tmp_path / "log", queue_size=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.run)
        async with trio.open_nursery() as recorders:
            for i in range(50):
                recorders.start_soon(trail.record, Delivery("PACS", "Storage", delivered=(f"1.2.{i}",)))
        nursery.cancel_scope.cancel()
    assert verify(tmp_path, tmp_path / "log") == (50, None)
    assert sorted(json.loads(line)["delivered"][0] for line in lines(tmp_path)) == sorted(f"1.2.{i}" for i in range(50))


async def test_filter_events_have_their_entry_point(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path, tmp_path / "log")
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.run)
        await trail.record(RoutingDecision("1.2.3", "CT1", ("PACS", "ARCHIVE"), rule="route CT"))
        await trail.record(
            TagMutation("1.2.3", "PACS", (TagChange(0x00100010, "PatientName", "A^B", None),), rule="anonymise"),
            written=True,
        )
        nursery.cancel_scope.cancel()
    routing, mutation = (json.loads(line) for line in lines(tmp_path))
    assert routing["event"] == "routing" and routing["destinations"] == ["PACS", "ARCHIVE"]
    assert mutation["changes"] == [{"tag": "(0010,0010)", "keyword": "PatientName", "before": "A^B", "after": None}]


async def test_recorded_after_the_writer_stopped_is_still_written(tmp_path: Path) -> None:
    trail = await write_events(tmp_path, 2)
    await trail.record(Delivery("PACS", "Storage", delivered=("9.9",)))  # e.g. a shielded flush at shutdown
    trail.close()
    assert verify(tmp_path, tmp_path / "log") == (3, None)


async def test_audit_verify_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await write_events(tmp_path, 4)
    assert main(["audit-verify", "--path", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "ok, 4 lines"
    kept = lines(tmp_path)
    del kept[2]
    rewrite(tmp_path, kept)
    assert main(["audit-verify", "--path", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{AUDIT_LOG}:3" in out and "item 3" in out


class _FailingOnce:
    """A file whose first write fails (a full disk), then writes through."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.failed = inner, False

    def write(self, text: str) -> int:
        if not self.failed:
            self.failed = True
            raise OSError(28, "No space left on device")
        return int(self.inner.write(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_failed_write_is_retried_and_the_recorder_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "WRITE_RETRY", 0.01)
    trail = AuditTrail(tmp_path, tmp_path / "log")
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.run)
        trail._file = _FailingOnce(trail._file)
        await trail.record(OperatorAction("token@127.0.0.1", "pause", "PACS (Storage)"), written=True)
        await trail.record(OperatorAction("token@127.0.0.1", "resume", "PACS (Storage)"), written=True)
        nursery.cancel_scope.cancel()
    assert verify(tmp_path, tmp_path / "log") == (2, None)  # written once the disk took it, chained
    assert [json.loads(line)["action"] for line in lines(tmp_path)] == ["pause", "resume"]
