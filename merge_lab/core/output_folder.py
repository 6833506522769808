"""Taking an output path safely: one run at a time, built aside, put in place atomically.

A run claims its target with an exclusive lock (`.NAME.lock` beside it, held until the end, so a
second run aimed at the same output is refused at once instead of replacing the first one's
result), builds in a hidden `.NAME.partial-PID-*` sibling, and renames it into place without
replacing anything it was not asked to (`renameat2(RENAME_NOREPLACE)` where the system has it).
A replaced target (a folder, a file or a link) is first renamed into a fresh hidden folder and
deleted from there, so nothing of it is left behind. A failed run removes its partial folder, its
lock and the parent folders it created. The parent may be writable by others: whatever they plant
under these names is never followed (links, FIFOs) and never mistaken for a run's own.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from merge_lab.core.untrusted import is_inside
from merge_lab.errors import MergeLabError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked against each other
    fcntl = None  # type: ignore[assignment]

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def format_size(n: float) -> str:
    """Bytes with a unit that shows small numbers as well as large: 512 B, 40.0 kB, 1.50 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.2f} {unit}" if abs(v) < 10 else f"{v:.1f} {unit}" if abs(v) < 100 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


def absolute(target: str | Path) -> Path:
    """`target` made absolute and normalised (`out/..` folded) without following links: a link
    at the target is replaced, never what it points to."""
    path = Path(os.path.abspath(target))
    if not path.name:
        raise MergeLabError(f"{target}: not usable as an output folder; name a folder to create.")
    return path


def check_target(target: Path, inputs: Iterable[Path | None]) -> None:
    """Refuse an output that is, contains or lies inside an input folder (compared by resolved
    path, links followed), whether or not it may be replaced: replacing it would destroy the input,
    and writing inside it would change a model while it is read."""
    out = Path(os.path.realpath(target))
    for folder in inputs:
        if folder is None:
            continue
        real = Path(os.path.realpath(folder))
        if out == real or is_inside(out, [real]) or is_inside(real, [out]):
            how = "is" if out == real else "lies inside" if is_inside(out, [real]) else "contains"
            raise MergeLabError(
                f"{target}: the output {how} the input folder {folder}; writing there would overwrite or change "
                "an input. Choose an output folder outside every model folder (with or without --force)."
            )


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new folder with a random suffix, made with the user's umask (mkdtemp's are 0700)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise MergeLabError(f"{parent}: cannot make a temporary folder there (100 names taken).")


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it created, outermost first."""
    missing = []
    p = folder
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o777)
        except FileExistsError:
            pass
    return list(reversed(missing))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Delete temporary folders that a killed run (SIGKILL, power loss) left beside `target`.

    Exceptions and Ctrl-C clean up after themselves; a killed process cannot, so the next run
    towards the same target removes the folders whose writing process no longer exists. Links
    and files under these names are left alone (never followed)."""
    removed = []
    for kind in ("partial", "old"):
        for p in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = p.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
            try:
                is_dir = stat.S_ISDIR(os.lstat(p).st_mode)
            except OSError:  # removed meanwhile
                continue
            if pid.isdigit() and not _alive(int(pid)) and is_dir:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


class _Lock:
    """An exclusive flock on `.NAME.lock` beside the target, released (and the file removed) at
    the end; the kernel drops it when a killed run dies, so a stale file never blocks."""

    def __init__(self, target: Path) -> None:
        self.path = target.parent / f".{target.name}.lock"
        self.fd: int | None = None
        if fcntl is None:
            return
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        for _ in range(10):
            try:
                fd = os.open(self.path, flags, 0o666)
            except OSError as e:
                raise MergeLabError(
                    f"{self.path}: cannot take the lock on {target} ({e.strerror}); remove whatever is at that path."
                ) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise MergeLabError(f"{self.path}: is not a lock file merge-lab made; remove it and run again.")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MergeLabError(
                    f"{target}: another merge-lab run is writing this output right now (it holds {self.path}). "
                    "Wait for it to finish, or choose another output folder."
                ) from None
            try:  # the previous holder may have removed the file between our open and our lock
                same = os.path.samestat(os.lstat(self.path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return
            os.close(fd)
        raise MergeLabError(f"{self.path}: the lock file keeps changing; is another program removing it?")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(src, dst) that fails with FileExistsError instead of replacing an existing dst."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # else: this file system cannot; fall back
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):  # fallback: only the lock guards the moment between check and rename
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


class OutputClaim:
    """One run's hold on its output path: `folder` to fill, then commit() or abort().

    Raises MergeLabError at once when the target is an input, when another run holds it, or when
    it exists and `replace` is false."""

    def __init__(self, target: str | Path, replace: bool, inputs: Iterable[Path | None] = ()) -> None:
        self.target = absolute(target)
        self.replace = replace
        self.done = False
        self.folder: Path | None = None
        self._lock: _Lock | None = None
        check_target(self.target, inputs)
        self._created = _make_parents(self.target.parent)
        try:
            self._lock = _Lock(self.target)
            if not replace and os.path.lexists(self.target):
                raise MergeLabError(
                    f"{self.target}: already exists. Choose another output folder or pass --force to replace it."
                )
            remove_stale_partials(self.target)
            self.folder = _fresh_dir(self.target.parent, f".{self.target.name}.partial-{os.getpid()}-")
        except BaseException:
            self.abort()
            raise

    def commit(self) -> Path:
        """Put the finished folder at the target (replacing what is there only when allowed)."""
        assert self.folder is not None and not self.done
        aside = None
        if os.path.lexists(self.target):
            if not self.replace:
                self.abort()
                raise MergeLabError(
                    f"{self.target}: appeared while this run was writing it; the new output was not put in its place. "
                    "Choose another output folder or pass --force."
                )
            aside = _fresh_dir(self.target.parent, f".{self.target.name}.old-{os.getpid()}-")
            os.rename(self.target, aside / "old")  # a link is moved, never followed
        try:
            _rename_noreplace(self.folder, self.target)
        except BaseException as e:
            if aside is not None and not os.path.lexists(self.target):
                os.rename(aside / "old", self.target)
                os.rmdir(aside)
            self.abort()
            if isinstance(e, FileExistsError):
                raise MergeLabError(f"{self.target}: appeared while this run was writing it; nothing was replaced.") from None
            raise
        self.done = True
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
        return self.target

    def abort(self) -> None:
        """Remove the partial folder, the lock and the parent folders this run created."""
        if self.done:
            return
        self.done = True
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
        for folder in reversed(self._created):
            try:
                os.rmdir(folder)
            except OSError:
                break


def disk_full(exc: BaseException | None, target: Path, need: int) -> MergeLabError | None:
    """The user-facing error for a write that ran out of space (ENOSPC, EDQUOT), else None."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_FULL:
        return None
    return MergeLabError(
        f"{target}: the disk ran out of space while writing the output ({exc.strerror}); nothing was left at the "
        f"output path. The output needs about {format_size(need)}: free space there or choose another output folder."
    )
