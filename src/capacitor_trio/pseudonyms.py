"""The anonymize action's pseudonym mapping files: CSV, one per `Destination.Value`.

A mapping file holds one line per patient, `patient_id,issuer,pseudonym` (that header first, RFC
4180 quoting), and is only ever appended to: a new patient's line is written and fsync'd before
the pseudonym is used, so the same patient keeps the same pseudonym across restarts. Beside it,
`<file>.key` holds the mapping's secret (64 hex digits) that keys the UID replacement: keep both
together (a lost key file gives the same patients new UIDs). Both are created mode 0600: the
mapping links pseudonyms to real patient IDs.

Within one router, threads share a store (a lock) and processes take an exclusive `flock` on the
file while they add a line, reading what others appended first. Two routers writing the same file
over a network file system are out of scope (flock may not hold there).
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import secrets
import threading
from pathlib import Path

from capacitor_trio.domain.anonymize import PatientKey, new_pseudonym

HEADER = ("patient_id", "issuer", "pseudonym")
_HEADER_LINE = ",".join(HEADER) + "\n"


class CsvPseudonyms:
    """A PseudonymStore over CSV mapping files; a relative mapping path is taken from `root`
    (the directory of mutations.yml)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._lock = threading.Lock()
        self._files: dict[Path, _MappingFile] = {}

    def pseudonym(self, mapping: str, key: PatientKey) -> str:
        with self._lock:
            return self._file(mapping).pseudonym(key)

    def secret(self, mapping: str) -> bytes:
        with self._lock:
            return self._file(mapping).secret()

    def _file(self, mapping: str) -> _MappingFile:
        path = self._root / Path(mapping).expanduser()
        if path not in self._files:
            self._files[path] = _MappingFile(path)
        return self._files[path]


class _MappingFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._table: dict[PatientKey, str] = {}
        self._offset = 0  # bytes read so far (complete lines only)
        self._secret: bytes | None = None

    def pseudonym(self, key: PatientKey) -> str:
        known = self._table.get(key)
        if known is not None:
            return known
        with _locked(self.path) as fd:
            self._read_new(fd)
            if key not in self._table:
                pseudonym = new_pseudonym()
                _append(fd, _line(key.patient_id, key.issuer, pseudonym))
                self._table[key] = pseudonym
            return self._table[key]

    def secret(self) -> bytes:
        if self._secret is None:
            with _locked(self.path):
                self._secret = _read_or_make_key(self.path.with_name(self.path.name + ".key"))
        return self._secret

    def _read_new(self, fd: int) -> None:
        """Read the lines appended since the last look (by us or another process)."""
        size = os.fstat(fd).st_size
        if size <= self._offset:
            return
        data = os.pread(fd, size - self._offset, self._offset)
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read once it is whole
        rows = list(csv.reader(io.StringIO(complete.decode("utf-8"), newline="")))
        if self._offset == 0 and rows:
            if tuple(rows[0]) != HEADER:
                raise ValueError(f"{self.path} is not a pseudonym mapping (its header is not {_HEADER_LINE.strip()})")
            rows = rows[1:]
        for row in rows:
            if len(row) == 3 and row[2]:
                self._table.setdefault(PatientKey(row[0], row[1]), row[2])
        self._offset += len(complete)


class _locked:
    """The mapping file open for reading and appending (created 0600 with its header when
    missing), under an exclusive flock."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> int:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            _end_last_line(self.fd)
            if os.fstat(self.fd).st_size == 0:
                _append(self.fd, _HEADER_LINE.encode("utf-8"))
                _fsync_dir(self.path.parent)
        except BaseException:
            os.close(self.fd)
            raise
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the flock


def _line(*fields: str) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(fields)
    return out.getvalue().encode("utf-8")


def _end_last_line(fd: int) -> None:
    """End a last line written without its newline (by an editor, or a crash mid-write), so that
    it is read like the others and the next line does not join it; a header cut short by a
    crash is dropped (and written again)."""
    size = os.fstat(fd).st_size
    if size and size < len(_HEADER_LINE) and _HEADER_LINE.encode("utf-8").startswith(os.pread(fd, size, 0)):
        os.ftruncate(fd, 0)
    elif size and os.pread(fd, 1, size - 1) != b"\n":
        _append(fd, b"\n")


def _append(fd: int, data: bytes) -> None:
    """Append `data` durably."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _read_or_make_key(path: Path) -> bytes:
    try:
        text = path.read_text("ascii").strip()
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        temporary = path.with_name(path.name + ".tmp")  # written whole, then renamed into place
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _append(fd, key.hex().encode("ascii") + b"\n")
        finally:
            os.close(fd)
        os.replace(temporary, path)
        _fsync_dir(path.parent)
        return key
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"{path} does not hold a mapping secret (64 hex digits)")
    return key


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
