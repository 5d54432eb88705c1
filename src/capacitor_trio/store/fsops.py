"""The few file-system calls the store makes, behind one seam so tests can inject faults.

Every method is blocking and runs in a worker thread or the writer thread, never on the Trio loop,
except in a commit without durable writes that the writer runs on the loop (`Writer._run_inline`:
a rename, an unlink, no fsync).

The cache directory holds patient data: what the store creates there is its owner's only (0700
directories, 0600 files, whatever the umask), a cache directory owned by another user or
writable by others is refused (`check_private_dir`), and files in it are opened without following
symbolic links (`open_private`), so that a link put in place of one cannot make the router
write through it to another file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("capacitor_trio.store")

#: the mode of every directory the store creates
DIR_MODE = 0o700
#: the mode of every file the store creates
FILE_MODE = 0o600


class UnsafePath(PermissionError):
    """A cache directory others could tamper with, or a symbolic link where a file should be."""


def relative_name(root: Path, path: Path) -> str:
    """`path` under `root` as the index names it: relative, '/'-separated (``spool/000001/x.dcm``).
    A string operation on the two paths (`Path.relative_to` parses both again): it runs for
    every instance stored and every file removed. ValueError when `path` is not under `root`."""
    top, full = str(root), str(path)
    if full.startswith(top) and full[len(top) : len(top) + 1] == "/":
        return full[len(top) + 1 :]
    return path.relative_to(root).as_posix()


def check_private_dir(path: Path) -> None:
    """Refuse a directory that is not this user's or that others may write to; make one that
    others may read or enter the owner's only (0700), saying so."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(errno.ENOTDIR, f"the cache directory {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafePath(
            errno.EPERM,
            f"the cache directory {path} belongs to uid {st.st_uid}, not to this user (uid "
            f"{os.geteuid()}); refusing to use it",
        )
    if st.st_mode & stat.S_IWOTH:
        raise UnsafePath(
            errno.EPERM,
            f"the cache directory {path} is writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); refusing to use it (chmod 700 {path})",
        )
    if st.st_mode & 0o077:
        os.chmod(path, DIR_MODE)
        log.warning(
            "store: the cache directory %s was open to other users (mode %04o); now 0700",
            path, stat.S_IMODE(st.st_mode),
        )


def open_private(path: Path, flags: int, mode: int = FILE_MODE) -> int:
    """`os.open` of a file in the cache directory: never through a symbolic link, created
    `mode` (0600)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(errno.ELOOP, f"{path} is a symbolic link; refusing to follow it") from None
        raise


def make_private(path: Path, *, create: bool = False) -> None:
    """Make an existing file (or a new one, with `create`) the owner's only (0600)."""
    try:
        fd = open_private(path, (os.O_RDWR | os.O_CREAT) if create else (os.O_RDONLY | os.O_NONBLOCK))
    except FileNotFoundError:
        return
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _mkdir_private(path: Path) -> None:
    """`os.makedirs(path, exist_ok=True)`, each directory it creates 0700."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    except FileNotFoundError:
        if path.parent == path:
            raise
        _mkdir_private(path.parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)


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
        _mkdir_private(path)

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
