"""Conversion on the way out: an instance the destination accepts only in another transfer
syntax is converted into it just before it is sent (requestor.py decides when; negotiation.py's
`route` decides into what).

`Converter` is the requestor's seam: whether a conversion is possible, and doing it, file to
file. `ThreadConverter`, the default, runs the transcode package's `convert_file` in a worker
thread of the process that sends, one conversion at a time. The requestor runs in the sender
child process (docs/architecture.md, "Sending on a second core"), so receiving never waits for
such a conversion; it is the exception (a node's prepared copies are made in its syntax by the
prepare stage's worker processes), and one thread keeps it bounded without starting more
processes in the child. What the thread costs the child's other associations is the interpreter
lock while Python code of the codec runs (the C codecs do the bulk of the work); their watchdogs
count in seconds. A send cancelled during a conversion does not wait for it: the thread finishes
on its own and its output is removed (`convert`).

The converted copy is a scratch file in `scratch_dir` (the cache's `outgoing` directory), named
after the process that writes it: it is removed once sent, and files of processes that are gone
(a router killed during a conversion) are removed the first time a process converts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import trio

from capacitor_trio.limiter import run_var_limiter


class ConvertedFile(Protocol):
    """What a conversion made (transcode.codec.Converted fits)."""

    @property
    def transfer_syntax_uid(self) -> str: ...

    @property
    def sop_instance_uid(self) -> str: ...


class Converter(Protocol):
    def can_convert(self, from_uid: str, to_uid: str) -> bool:
        """Whether an instance stored in `from_uid` can be sent in `to_uid` (decoded and encoded
        again; uncompressed syntaxes into each other). A conversion it allows may still fail for
        one instance (its pixel data are unreadable, say): `convert` raises then."""
        ...

    async def convert(self, src: Path, dst: Path, target_uid: str) -> ConvertedFile:
        """Write `src` (a Part 10 file) to `dst` in `target_uid`. Raises ConversionFailed when
        this instance cannot be converted, OSError when the copy cannot be written."""
        ...


class ConversionFailed(Exception):
    """This instance cannot be converted into the syntax asked for (the message says why)."""


_limiter = run_var_limiter("capacitor_trio_outgoing_conversion", 1)


class ThreadConverter:
    """`Converter` with the transcode package's codec, in a worker thread, one at a time."""

    def can_convert(self, from_uid: str, to_uid: str) -> bool:
        from capacitor_trio.transcode import codec

        return codec.can_convert(from_uid, to_uid)

    async def convert(self, src: Path, dst: Path, target_uid: str) -> ConvertedFile:
        abandoned = False

        def work() -> ConvertedFile:
            from capacitor_trio.transcode import codec

            try:
                return codec.convert_file(src, dst, target_uid)
            except codec.TranscodeError as exc:
                raise ConversionFailed(str(exc)) from None
            except MemoryError:  # another time, with less else in memory, it may go
                raise OSError(errno.ENOMEM, "out of memory while converting") from None
            finally:
                if abandoned:  # the send was cancelled meanwhile: nobody takes the copy
                    _remove(dst)

        try:
            return await trio.to_thread.run_sync(work, limiter=_limiter(), abandon_on_cancel=True)
        except BaseException:
            abandoned = True  # before the unlink: the thread, if still running, removes it too
            _remove(dst)
            raise


class Transcoder(Protocol):
    """The router's transcode pool (transcode/pool.py's `TranscodePool`): worker processes."""

    async def convert(self, src: Path, dst: Path, target_uid: str) -> ConvertedFile: ...


class PoolConverter:
    """`Converter` with the router's transcode pool (worker processes), for sends that run in
    the router process (`deliveryProcess: false`, or while the sender process cannot start):
    there a thread would take the interpreter lock from receiving."""

    def __init__(self, pool: Transcoder) -> None:
        self.pool = pool

    def can_convert(self, from_uid: str, to_uid: str) -> bool:
        from capacitor_trio.transcode import codec

        return codec.can_convert(from_uid, to_uid)

    async def convert(self, src: Path, dst: Path, target_uid: str) -> ConvertedFile:
        from capacitor_trio.transcode import codec

        try:
            return await self.pool.convert(src, dst, target_uid)
        except codec.TranscodeError as exc:
            raise ConversionFailed(str(exc)) from None
        except MemoryError:
            raise OSError(errno.ENOMEM, "out of memory while converting") from None


_swept: set[Path] = set()


@contextlib.contextmanager
def scratch_file(scratch_dir: Path) -> Iterator[Path]:
    """A fresh path in `scratch_dir` (created if missing) for a converted copy, removed on the
    way out. The first use of a directory in a process removes the copies left there by
    processes that no longer run."""
    scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if scratch_dir not in _swept:
        _sweep(scratch_dir)
        _swept.add(scratch_dir)
    path = scratch_dir / f"{os.getpid()}-{uuid.uuid4().hex}.part"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _sweep(scratch_dir: Path) -> None:
    for entry in os.scandir(scratch_dir):
        pid, _, rest = entry.name.partition("-")
        if rest.endswith(".part") and pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
