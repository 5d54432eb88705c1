"""The few file-system calls the store makes, behind one seam so tests can inject faults.

Every method is blocking and runs in a worker thread or the writer thread, never on the Trio loop,
except in a commit without durable writes that the writer runs on the loop (`Writer._run_inline`:
a rename, an unlink, no fsync).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class FileOps:
    """Real file operations. `durable=False` turns every fsync into a no-op."""

    def __init__(self, *, durable: bool = True) -> None:
        self.durable = durable

    def fsync_file(self, path: Path) -> None:
        if not self.durable:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        if not self.durable:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def mkdir(self, path: Path) -> None:
        os.makedirs(path, exist_ok=True)

    def before_index_commit(self) -> None:
        """Called just before COMMIT, in the writer thread or, for a commit without durable
        writes run on the loop (`Writer._run_inline`), there (a fault-injection point)."""

    def free_space_percent(self, path: Path, extra_bytes: int = 0) -> float:
        """Free space of the file system holding `path`, plus `extra_bytes` known to be reusable
        (free pages inside the index), in percent of its size."""
        st = os.statvfs(path)
        if st.f_blocks == 0:
            return 100.0
        return 100.0 * (st.f_bavail + extra_bytes / st.f_frsize) / st.f_blocks
