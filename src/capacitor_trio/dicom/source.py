"""The stored bytes of one outgoing instance, read for the requestor (`_Source`): bytes kept in
the index, or a spool file read at offsets — from the page cache on the loop (preadv with
RWF_NOWAIT), a cold file in a worker thread, so the loop never waits for the disk.
"""

from __future__ import annotations

import errno
import io
import os
from typing import TYPE_CHECKING

import trio

from .part10 import HeaderError, read_meta

if TYPE_CHECKING:
    from .requestor import OutgoingInstance

THREAD_READ_THRESHOLD = 256 * 1024
#: first read of a spool file: its Part 10 preamble and meta group (a few hundred bytes)
META_READ = 4096


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            raise HeaderError("spool file shorter than expected")
        got += n


#: preadv(RWF_NOWAIT): read what is in the page cache without blocking (Linux ≥ 4.14); off once
#: the file system refuses it
_nowait: int | None = getattr(os, "RWF_NOWAIT", None)


class _Source:
    """The stored bytes of one outgoing instance: its bytes in memory (kept in the index), or its
    spool file, read at offsets."""

    def __init__(self, inst: OutgoingInstance) -> None:
        self.path = inst.path
        self.data = memoryview(inst.data) if inst.data is not None else None
        self.fd = os.open(inst.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) if self.data is None else -1

    async def dataset_span(self) -> tuple[int, int]:
        """(offset of the data set, size of the Part 10 bytes)."""
        if self.data is not None:
            return read_meta(io.BytesIO(self.data))[0], len(self.data)
        size = os.fstat(self.fd).st_size
        head = bytearray(min(META_READ, size))  # the meta group is a few hundred bytes
        with memoryview(head) as mv:
            await self.read_into(mv, 0)  # like the data: a cold file is read off the loop
        offset, _ = read_meta(io.BytesIO(head))
        if offset >= len(head) and len(head) < size:  # an unusually long meta group
            offset = await trio.to_thread.run_sync(self._long_meta_offset)
        return offset, size

    def _long_meta_offset(self) -> int:
        with open(self.fd, "rb", closefd=False) as f:
            return read_meta(f)[0]

    async def read_into(self, view: memoryview, offset: int) -> None:
        """Fill `view` from `offset`: on the loop when the bytes are in memory or in the page
        cache (a file just received), else — a cold file, e.g. queued before a restart — from
        the disk in a worker thread, so the loop never waits for the disk."""
        global _nowait
        if self.data is not None:
            chunk = self.data[offset : offset + len(view)]
            if len(chunk) < len(view):
                raise HeaderError("stored instance shorter than expected")
            view[:] = chunk
            return
        got = 0
        if _nowait is not None:
            try:
                got = os.preadv(self.fd, [view], offset, _nowait)
            except BlockingIOError:
                got = 0
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                _nowait = None
                got = 0
        if got < len(view):
            rest = view[got:]
            if len(rest) >= THREAD_READ_THRESHOLD or _nowait is not None:
                await trio.to_thread.run_sync(_pread_into, self.fd, rest, offset + got)
            else:
                _pread_into(self.fd, rest, offset + got)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
