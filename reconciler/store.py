"""The only module that touches the state directory's files: listing, reads, atomic writes,
the lock.

Below the state directory nothing is followed through a symbolic link: every directory is
opened relative to its parent's descriptor with O_NOFOLLOW, and so is every file. A link, or a
file that cannot be read, is reported as such (Found.UNREADABLE) and plan decides what it means.
Writes go to a temporary file beside the target, created with its final mode, fsynced and
renamed over the target, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from reconciler import layout
from reconciler.errors import StateError
from reconciler.model import CertKind, Found

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
MAX_READ = 64 * 1024 * 1024  # no state file comes near this; a device or a huge file stops here


class LockTimeout(Exception):
    """Another process holds the state directory's lock."""


@dataclasses.dataclass(frozen=True, slots=True)
class FileRead:
    found: Found  # OK, MISSING or UNREADABLE
    data: bytes = b""
    mode: int = 0  # permission bits
    detail: str = ""  # why it could not be read


_MISSING = FileRead(Found.MISSING)


def _why(exc: OSError) -> str:
    if exc.errno in (errno.ELOOP, errno.EMLINK):
        return "it is a symbolic link"
    if exc.errno == errno.ENOTDIR:
        return "a part of its path is not a directory"
    return exc.strerror or type(exc).__name__


@dataclasses.dataclass
class Listing:
    """Everything below the state directory, classified, without following any link."""

    leaf_names: dict[CertKind, list[str]] = dataclasses.field(default_factory=dict)
    dir_modes: dict[str, int] = dataclasses.field(default_factory=dict)  # ca/, clients/, ...
    temp_files: list[str] = dataclasses.field(default_factory=list)
    other_files: list[str] = dataclasses.field(default_factory=list)  # not written by apply
    unreadable: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    ca_generations: set[int] = dataclasses.field(default_factory=set)  # with any CA file


def _read_fd(fd: int) -> FileRead:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return FileRead(Found.UNREADABLE, detail="it is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    chunks: list[bytes] = []
    want, size = min(info.st_size + 1, MAX_READ), 0
    while True:
        chunk = os.read(fd, want)
        chunks.append(chunk)
        size += len(chunk)
        if len(chunk) < want:  # a regular file reads short only at its end
            return FileRead(Found.OK, b"".join(chunks), mode)
        if size > MAX_READ:
            return FileRead(Found.UNREADABLE, detail="it is larger than any state file can be")
        want = 1 << 16  # it grew since fstat


def read_at(dir_fd: int | None, name: str) -> FileRead:
    """A regular file, opened without following a link; dir_fd None: name is a path."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return _MISSING
    except OSError as exc:
        return FileRead(Found.UNREADABLE, detail=_why(exc))
    try:
        return _read_fd(fd)
    except OSError as exc:
        return FileRead(Found.UNREADABLE, detail=_why(exc))
    finally:
        os.close(fd)


def write_at(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Write .NAME.tmp in the directory with its final mode, fsync it, rename it over NAME,
    fsync the directory. A key is 0600 from its first byte."""
    temp = layout.temp_path(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp, dir_fd=dir_fd)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed a public file; never widens a key
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


_ADVICE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EROFS: "the file system is read-only: make it writable",
    errno.EACCES: "give this user write access",
    errno.EPERM: "give this user write access",
    errno.ENOENT: "create the directory first",
}


def cannot_write(exc: OSError, what: str) -> StateError:
    """The world refused a write (disk full, read-only, no permission): one sentence."""
    advice = _ADVICE.get(exc.errno or 0, "check the file system")
    return StateError(f"cannot write {what} ({exc.strerror}): {advice}, then run it again")


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """write_at for a file outside the state directory (exports, the Prometheus textfile)."""
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            write_at(dir_fd, path.name, data, mode)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise cannot_write(exc, str(path)) from None


class StateDir:
    """The state directory: the only reads and writes below it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, relative: str) -> Path:
        """For messages only: every access goes through a directory descriptor."""
        return self.root / relative

    @contextlib.contextmanager
    def _directory(self, relative: str, *, create: bool = False) -> Iterator[int]:
        """A descriptor of a directory below the root, each part opened without following a
        link; with create, missing parts are made (mode 0755)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in relative.split("/") if relative else ():
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, layout.DIR_MODE, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(child, layout.DIR_MODE)  # the umask may have narrowed it
                    os.fsync(fd)
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading

    def read(self, relative: str) -> FileRead:
        directory, _, name = relative.rpartition("/")
        try:
            with self._directory(directory) as dir_fd:
                return read_at(dir_fd, name)
        except FileNotFoundError:
            return _MISSING
        except OSError as exc:
            return FileRead(Found.UNREADABLE, detail=_why(exc))

    def read_leaves(
        self, kind: CertKind, names: list[str]
    ) -> Iterator[tuple[str, FileRead, FileRead]]:
        """(name, key file, certificate file) for each name, through one directory descriptor."""
        try:
            with self._directory(kind.directory) as dir_fd:
                for name in names:
                    yield name, read_at(dir_fd, f"{name}.key"), read_at(dir_fd, f"{name}.crt")
        except OSError as exc:  # the directory itself: the listing reported it already
            failed = FileRead(Found.UNREADABLE, detail=_why(exc))
            for name in names:
                yield name, failed, failed

    def listing(self) -> Listing:
        """Every file and directory below the root, classified by name (the file system's
        entry types tell links, directories and files apart without a stat per file). Links,
        special files and directories that cannot be opened go to unreadable."""
        listing = Listing()
        names: dict[CertKind, set[str]] = {kind: set() for kind in CertKind}
        leaf_dirs = {kind.directory: names[kind] for kind in CertKind}
        leaf_dirs[layout.PENDING_DIR] = names[CertKind.SERVER]  # pending keys (layout.pending_key)
        suffixes = {
            CertKind.SERVER.directory: (".crt", ".key", ".csr"),
            layout.PENDING_DIR: (".key",),
        }
        try:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return listing  # no state directory: every file is simply missing
        pending = [("", root_fd)]
        while pending:
            relative_dir, fd = pending.pop()
            generation = layout.ca_generation(relative_dir)
            if relative_dir in layout.DIRECTORIES or generation is not None:
                listing.dir_modes[relative_dir] = stat.S_IMODE(os.fstat(fd).st_mode)
            leaves = leaf_dirs.get(relative_dir)
            leaf_suffixes = suffixes.get(relative_dir, (".crt", ".key"))
            try:
                with os.scandir(fd) as found:
                    entries = list(found)
            except OSError as exc:
                listing.unreadable.append((relative_dir, _why(exc)))
                entries = []
            for entry in entries:
                name = entry.name
                relative = f"{relative_dir}/{name}" if relative_dir else name
                if entry.is_dir(follow_symlinks=False):
                    if relative == ".git":
                        continue  # a state directory at the top of its repository
                    try:
                        pending.append((relative, os.open(name, _DIR_FLAGS, dir_fd=fd)))
                    except OSError as exc:
                        listing.unreadable.append((relative, _why(exc)))
                elif not entry.is_file(follow_symlinks=False):
                    what = "a symbolic link" if entry.is_symlink() else "not a regular file"
                    listing.unreadable.append((relative, f"it is {what}"))
                elif layout.is_temp(name):
                    listing.temp_files.append(relative)
                elif leaves is not None and name.endswith(leaf_suffixes) and name[0] != ".":
                    leaves.add(name[:-4])
                elif generation is not None and layout.is_ca_file(relative):
                    listing.ca_generations.add(generation)
                elif relative not in (layout.LEDGER, layout.USERS_YAML):
                    listing.other_files.append(relative)
            os.close(fd)
        listing.leaf_names = {kind: sorted(found) for kind, found in names.items()}
        listing.temp_files.sort()
        listing.other_files.sort()
        listing.unreadable.sort()
        return listing

    # ------------------------------------------------------------------ writing

    # A write the world refuses (disk full, read-only) stops the apply with one sentence; what
    # it leaves (a temporary file, a certificate the ledger lacks) the next apply repairs.

    def write(self, relative: str, data: bytes, *, secret: bool = False) -> None:
        """Atomically replace the file; secret files are 0600 from their first byte."""
        directory, _, name = relative.rpartition("/")
        try:
            with self._directory(directory, create=True) as dir_fd:
                write_at(dir_fd, name, data, layout.KEY_MODE if secret else layout.PUBLIC_MODE)
        except OSError as exc:
            raise cannot_write(exc, str(self.path(relative))) from None

    def remove(self, relative: str) -> bool:
        directory, _, name = relative.rpartition("/")
        try:
            with self._directory(directory) as dir_fd:
                os.unlink(name, dir_fd=dir_fd)
                os.fsync(dir_fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise cannot_write(exc, str(self.path(relative))) from None
        return True

    def chmod(self, relative: str, mode: int) -> None:
        """Set a file's or directory's mode without following a link; gone is fine."""
        directory, _, name = relative.rpartition("/")
        try:
            with self._directory(directory) as dir_fd:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise cannot_write(exc, str(self.path(relative))) from None

    @contextlib.contextmanager
    def locked(self, timeout: float, waiting: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Hold the state directory's lock, waiting up to timeout seconds (calling waiting()
        once when it must wait). The lock is a flock on the directory itself, so taking it
        writes nothing."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waiting()
                deadline = time.monotonic() + timeout
                while True:
                    time.sleep(0.05)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise LockTimeout from None
            yield
        finally:
            os.close(fd)  # closing releases the lock
