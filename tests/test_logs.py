from __future__ import annotations

import io
import logging
import re
import threading

import pytest

from capacitor_trio.logs import LogEntry, RingBufferHandler, parse_level, setup_logging


@pytest.fixture
def logger():
    log = logging.getLogger("capacitor_trio.test_logs")
    log.setLevel(1)
    log.propagate = False
    yield log
    log.handlers.clear()
    log.propagate = True


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def attach(logger, capacity=1000):
    ring = RingBufferHandler(capacity)
    logger.addHandler(ring)
    return ring


def test_entry_fields(logger):
    ring = attach(logger)
    logger.info("Study delivered to %s", "PACS")
    [entry] = ring.recent()
    assert isinstance(entry, LogEntry)
    assert entry.level == "INFO"
    assert entry.message == "Study delivered to PACS"
    assert entry.logger == "capacitor_trio.test_logs"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry.timestamp)
    assert entry.to_json() == {
        "timestamp": entry.timestamp,
        "level": "INFO",
        "message": "Study delivered to PACS",
        "logger": "capacitor_trio.test_logs",
    }


def test_timestamp_is_utc(logger):
    ring = attach(logger)
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "x", (), None)
    record.created = 1774173660.5  # 2026-03-22T10:01:00.5Z
    ring.handle(record)
    assert ring.recent()[0].timestamp == "2026-03-22T10:01:00.500Z"


def test_level_mapping(logger):
    ring = attach(logger)
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    logger.critical("c")
    logger.log(5, "trace")
    logger.log(25, "between")
    assert [(e.level, e.message) for e in ring.recent()] == [
        ("DEBUG", "d"),
        ("INFO", "i"),
        ("WARN", "w"),
        ("ERROR", "e"),
        ("ERROR", "c"),
        ("DEBUG", "trace"),
        ("INFO", "between"),
    ]


def test_capacity_keeps_newest(logger):
    ring = attach(logger, capacity=5)
    for n in range(12):
        logger.info("m%d", n)
    assert len(ring) == 5
    assert [e.message for e in ring.recent()] == ["m7", "m8", "m9", "m10", "m11"]


def test_recent_lines_newest_last(logger):
    ring = attach(logger)
    for n in range(150):
        logger.info("m%d", n)
    assert len(ring.recent()) == 100
    assert [e.message for e in ring.recent(3)] == ["m147", "m148", "m149"]
    assert ring.recent(0) == []
    assert ring.recent(-1) == []
    assert len(ring.recent(10_000)) == 150


def test_recent_filters_level_and_above(logger):
    ring = attach(logger)
    logger.debug("d")
    logger.info("i")
    logger.warning("w1")
    logger.error("e")
    logger.warning("w2")
    assert [e.message for e in ring.recent(level="WARN")] == ["w1", "e", "w2"]
    assert [e.message for e in ring.recent(level="warning")] == ["w1", "e", "w2"]
    assert [e.message for e in ring.recent(level="error")] == ["e"]
    assert [e.message for e in ring.recent(2, level="WARN")] == ["e", "w2"]
    assert len(ring.recent(level="DEBUG")) == 5
    with pytest.raises(ValueError, match="unknown log level"):
        ring.recent(level="LOUD")


def test_exception_text_included(logger):
    ring = attach(logger)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("send failed")
    message = ring.recent()[0].message
    assert message.startswith("send failed\n")
    assert "RuntimeError: boom" in message


def test_bad_format_args_do_not_raise(logger, monkeypatch):
    monkeypatch.setattr(logging, "raiseExceptions", False)
    ring = attach(logger)
    logger.info("%d", "not a number")
    logger.info("after")
    assert [e.message for e in ring.recent()] == ["after"]


def test_thread_safe(logger):
    ring = attach(logger, capacity=1000)

    def spam(k):
        for n in range(500):
            logger.info("t%d-%d", k, n)
            ring.recent(5)

    threads = [threading.Thread(target=spam, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ring) == 1000
    assert len(ring.recent(1000)) == 1000


def test_clear_and_capacity_validation(logger):
    ring = attach(logger)
    logger.info("x")
    ring.clear()
    assert ring.recent() == []
    with pytest.raises(ValueError):
        RingBufferHandler(0)


def test_parse_level():
    assert parse_level("warning") == "WARN"
    assert parse_level(" Info ") == "INFO"
    assert parse_level("CRITICAL") == "ERROR"
    with pytest.raises(ValueError):
        parse_level("verbose")


def test_setup_logging_format_and_ring(restore_root):
    out = io.StringIO()
    ring = RingBufferHandler()
    setup_logging("INFO", ring, stream=out)
    log = logging.getLogger("capacitor_trio.setup_test")
    log.info("DICOM listening on %s:%d", "0.0.0.0", 11112)
    log.warning("careful")
    log.debug("hidden")
    assert out.getvalue().splitlines() == [
        "INFO: DICOM listening on 0.0.0.0:11112",
        "WARN: careful",
    ]
    assert [e.message for e in ring.recent()] == ["DICOM listening on 0.0.0.0:11112", "careful"]


def test_setup_logging_is_idempotent(restore_root):
    out = io.StringIO()
    ring = RingBufferHandler()
    setup_logging("WARNING", ring, stream=io.StringIO())
    setup_logging("DEBUG", ring, stream=out)
    root = restore_root
    assert sum(h is ring for h in root.handlers) == 1
    assert root.level == logging.DEBUG
    logging.getLogger("capacitor_trio.x").debug("once")
    assert out.getvalue() == "DEBUG: once\n"
    assert len(ring.recent()) == 1
    setup_logging(logging.ERROR, None, stream=out)
    assert ring not in root.handlers
    assert root.level == logging.ERROR


def test_control_characters_cannot_forge_a_line(restore_root):
    """A calling AE with a newline, logged through pynetdicom's logger, stays on its own line."""
    out = io.StringIO()
    ring = RingBufferHandler()
    setup_logging("INFO", ring, stream=out)
    ae = "EVIL\nERROR: disk failed, delete the spool\r\x1b[2K\u2028x\x85"
    logging.getLogger("pynetdicom.acse").info("Association request from %s", ae)
    logging.getLogger("hypercorn.error").warning(ae)
    assert out.getvalue().splitlines() == [
        "INFO: Association request from EVIL\\nERROR: disk failed, delete the spool\\r\\x1b[2K\\u2028x\\x85",
        "WARN: EVIL\\nERROR: disk failed, delete the spool\\r\\x1b[2K\\u2028x\\x85",
    ]
    assert "\n" not in ring.recent()[0].message and "\\nERROR: disk" in ring.recent()[0].message


def test_a_traceback_stays_readable_and_indented(restore_root):
    out = io.StringIO()
    setup_logging("INFO", None, stream=out)
    try:
        raise ValueError("bad AE 'X\nERROR: forged'")
    except ValueError:
        logging.getLogger("pynetdicom").exception("handler failed for %s", "A\nB")
    lines = out.getvalue().splitlines()
    assert lines[0] == "ERROR: handler failed for A\\nB"
    assert lines[1] == "    Traceback (most recent call last):"
    assert all(line.startswith("    ") for line in lines[1:])
    assert "ValueError: bad AE 'X" in lines[-2] and lines[-1] == "    ERROR: forged'"
    assert not any(re.match(r"(DEBUG|INFO|WARN|ERROR):", line) for line in lines[1:])


def test_pynetdicom_cannot_be_made_to_forge_a_line(restore_root):
    """The finding itself: an A-ASSOCIATE-RQ whose calling AE holds a newline, decoded by the
    acceptor, makes pynetdicom log the raw value; it stays one escaped line."""
    from capacitor_trio.dicom import pdu as P

    out = io.StringIO()
    setup_logging("INFO", None, stream=out)
    context = P.ProposedContext(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",))
    raw = P.encode_associate_rq("CALLING", "CAPACITOR", [context], 16384)
    raw = raw.replace(b"CALLING         ", b"X\nERROR: forged!")
    with pytest.raises(P.PduError):
        P.decode_associate_rq(raw)
    lines = out.getvalue().splitlines()
    assert lines and all(not line.startswith("ERROR: forged") for line in lines), lines
    assert any("X\\nERROR: forged!" in line for line in lines), lines
