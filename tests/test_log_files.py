"""The log files (logs.py): the main log and the request log in their own files, 0600 in a 0700
directory, rotated at the size given with the backups given; lines of associations from
suppressLogAeTitles muted (with a real association through the router); the instance identity in
logSuffix's format; the keys no longer reported as not implemented."""

from __future__ import annotations

import contextvars
import io
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from capacitor_trio.config import load_settings
from capacitor_trio.domain.instance import InstanceHeader
from capacitor_trio.logs import (
    ACCESS_LOGGER,
    CALLING_AE,
    MAIN_LOG,
    WEB_LOG,
    instance_identity,
    setup_file_logging,
    setup_logging,
)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    access = logging.getLogger(ACCESS_LOGGER)
    saved = (list(root.handlers), root.level, list(access.handlers), access.propagate, access.level)
    yield
    for h in root.handlers + access.handlers:
        if h not in saved[0] and h not in saved[2]:
            h.close()
    root.handlers[:], access.handlers[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    access.propagate, access.level = saved[3], saved[4]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_main_and_web_logs_are_private_files(tmp_path: Path, restore_logging: None) -> None:
    setup_logging("INFO", stream=io.StringIO())
    log_dir = tmp_path / "log"
    setup_file_logging(log_dir)
    logging.getLogger("capacitor_trio.node").info("node PACS: delivered %d instance(s)", 3)
    logging.getLogger(ACCESS_LOGGER).info('127.0.0.1 "GET /metrics" 200')
    main = (log_dir / MAIN_LOG).read_text()
    web = (log_dir / WEB_LOG).read_text()
    assert "INFO capacitor_trio.node: node PACS: delivered 3 instance(s)" in main
    assert "GET /metrics" in web and "GET /metrics" not in main  # the request log on its own
    assert _mode(log_dir) == 0o700 and _mode(log_dir / MAIN_LOG) == _mode(log_dir / WEB_LOG) == 0o600


def test_suppress_web_log_writes_no_request_file(tmp_path: Path, restore_logging: None) -> None:
    setup_logging("INFO", stream=io.StringIO())
    setup_file_logging(tmp_path / "log", web_log=False)
    logging.getLogger(ACCESS_LOGGER).info('127.0.0.1 "GET /metrics" 200')
    assert not (tmp_path / "log" / WEB_LOG).exists()
    assert "GET /metrics" not in (tmp_path / "log" / MAIN_LOG).read_text()


def test_loose_modes_are_tightened(tmp_path: Path, restore_logging: None) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir(mode=0o755)
    (log_dir / MAIN_LOG).touch(mode=0o644)
    log_dir.chmod(0o755)
    (log_dir / MAIN_LOG).chmod(0o644)
    setup_file_logging(log_dir)
    assert _mode(log_dir) == 0o700 and _mode(log_dir / MAIN_LOG) == 0o600


def test_rotation_keeps_the_backups_given(tmp_path: Path, restore_logging: None) -> None:
    setup_logging("INFO", stream=io.StringIO())
    log_dir = tmp_path / "log"
    setup_file_logging(log_dir, max_bytes=1000, backups=2)
    log = logging.getLogger("capacitor_trio.test_rotation")
    for i in range(100):
        log.info("line %03d %s", i, "x" * 80)
    names = sorted(p.name for p in log_dir.iterdir())
    assert names == [MAIN_LOG, f"{MAIN_LOG}.1", f"{MAIN_LOG}.2", WEB_LOG]
    for p in log_dir.iterdir():
        assert p.stat().st_size <= 1000 and _mode(p) == 0o600
    # the newest lines in the current file, the next older ones in .1; the oldest are gone
    assert "line 099" in (log_dir / MAIN_LOG).read_text()
    assert "line 000" not in "".join(p.read_text() for p in log_dir.iterdir())


def test_suppressed_calling_ae_is_muted_everywhere(tmp_path: Path, restore_logging: None) -> None:
    stream = io.StringIO()
    setup_logging("INFO", stream=stream, suppress_calling_aes=["HEALTHCHECK"])
    setup_file_logging(tmp_path / "log", suppress_calling_aes=["HEALTHCHECK"])
    log = logging.getLogger("capacitor_trio.dicom")

    def association(calling: str) -> None:  # one association's task, its own context
        CALLING_AE.set(calling)
        log.warning("A-ASSOCIATE-RJ: called AE 'X' not recognized (calling AE %r)", calling)

    contextvars.copy_context().run(association, "HEALTHCHECK")
    contextvars.copy_context().run(association, "CT1")
    main = (tmp_path / "log" / MAIN_LOG).read_text()
    for text in (stream.getvalue(), main):
        assert "'CT1'" in text and "HEALTHCHECK" not in text


def test_instance_identity_in_log_suffix_format() -> None:
    header = InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.4", transfer_syntax_uid="1.2.840.10008.1.2.1",
        accession_number="ACC7", patient_id="PID9", modality="CT",
    )
    assert instance_identity("#{2,2}-#{8,50}-#{10,20}", header) == "1.2.840.10008.5.1.4.1.1.2-ACC7-PID9"
    assert instance_identity("#{0008,0060}/#{8,18} #{8,1030}.", header) == "CT/1.2.3.4 ."  # unknown: empty


def test_log_keys_are_implemented(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text(
        "logSuffix: '#{8,50}'\nsuppressLogAeTitles: [PROBE, NAGIOS]\nsuppressWebLog: true\n"
    )
    (tmp_path / "nodes.yml").write_text("[]\n")
    settings = load_settings(tmp_path)
    c = settings.config
    assert (c.log_suffix, c.suppress_log_ae_titles, c.suppress_web_log) == ("#{8,50}", ("PROBE", "NAGIOS"), True)
    assert not [w for w in settings.warnings if "not implemented" in w]
