"""The lock a write holds on its target, and the hidden names a write uses next to it.

Why a lock: two processes saving to the same path interleave their renames (one writer's backup
step meets the other's commit) and can leave a model file naming a data file the other one
deleted. Every write in :mod:`graphlora.io.atomic` holds the target's lock, so writers of one
target run one after the other; writers of different targets do not wait for each other.

The lock is ``flock`` on ``.<name>.graphlora-lock`` next to the target, opened with
``O_NOFOLLOW`` (a planted symlink is refused) and removed when the write ends. Removing a lock
file while another process waits on it is safe: after locking, a writer checks that the path
still names the file it locked, and locks the new file otherwise. A crash releases the lock
(the kernel drops it with the process); the file it leaves is reused and removed by the next
write. Nested writes in one thread (an ONNX model and its data file) share the lock. Without
``fcntl`` (Windows) writers are not serialised.

Hidden names: ``.<name>.graphlora-<kind>-<token>`` with kind ``tmp`` (a file being written),
``new`` (a directory being built), ``old`` (the previous directory during the swap; its token
starts with the time it was made, in nanoseconds, so the newest is known) and ``del`` (a backup
being deleted). Names too long to embed whole are shortened to a prefix plus a hash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from graphlora.errors import SaveError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["MARK", "STALE", "age_key", "hidden", "locked", "stale_entries", "stem"]

log = logging.getLogger("graphlora.io")

MARK = ".graphlora-"
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def stem(name: str) -> str:
    """The target's name as hidden names embed it: itself, or for names too long to take a
    prefix and suffix within the 255-byte limit, a prefix plus a hash of the whole name."""
    if len(os.fsencode(name)) <= 150:
        return name
    prefix = name
    while len(os.fsencode(prefix)) > 100:
        prefix = prefix[:-1]
    return f"{prefix}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}"


def hidden(target: Path, kind: str, token: str) -> Path:
    return target.parent / f".{stem(target.name)}{MARK}{kind}-{token}"


# Backups created by this version carry the time they were made (nanoseconds, 16 hex digits)
# before the random part, so the newest is known without trusting file system timestamps.
STALE = re.compile(
    r"^\.(?P<stem>.+)\.graphlora-(?P<kind>tmp|new|old|del)-(?P<token>[0-9a-f]{28}|[0-9a-f]{12})$"
)


def stale_entries(target: Path) -> list[tuple[str, str, Path]]:
    """``(kind, token, path)`` of every hidden leftover belonging to ``target``."""
    parent, own = target.parent, stem(target.name)
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    out = []
    for entry in sorted(names):
        match = STALE.match(entry)
        if match and match.group("stem") == own:
            out.append((match.group("kind"), match.group("token"), parent / entry))
    return out


def age_key(token: str, path: Path) -> tuple[int, int]:
    """Sort key: larger is newer. Timestamped tokens first, then the inode change time."""
    if len(token) == 28:
        return (1, int(token[:16], 16))
    try:
        return (0, os.lstat(path).st_ctime_ns)
    except FileNotFoundError:
        return (0, 0)


_local = threading.local()


def _in_staging(directory: Path) -> bool:
    """Writes inside a staging directory of ours need no lock: nobody else knows its name."""
    match = STALE.match(directory.name)
    return match is not None and match.group("kind") == "new"


@contextlib.contextmanager
def locked(target: Path) -> Iterator[bool]:
    """Hold ``target``'s write lock; yields True for the outermost holder in this thread (the one
    that settles leftovers). Other threads and processes wait for it."""
    held: dict[str, list] = _local.__dict__.setdefault("held", {})
    key = os.path.join(os.path.realpath(target.parent), stem(target.name))
    entry = held.get(key)
    if entry is not None:
        entry[0] += 1
        try:
            yield False
        finally:
            entry[0] -= 1
        return
    lock_path = target.parent / f".{stem(target.name)}{MARK}lock"
    fd = _acquire(lock_path, target) if fcntl is not None and not _in_staging(target.parent) else None
    held[key] = [1]
    try:
        yield True
    finally:
        del held[key]
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
            os.close(fd)


def _acquire(lock_path: Path, target: Path) -> int:
    """``flock`` the lock file, retrying when its previous holder removed it meanwhile."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SaveError(
                    f"{lock_path} is a symbolic link (planted?); refusing to write {target} through it. "
                    "Remove the link"
                ) from None
            raise SaveError(f"cannot lock {target} for writing ({lock_path}: {exc.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process writing %s", target)
                fcntl.flock(fd, fcntl.LOCK_EX)
            here = os.fstat(fd)
            try:
                there = os.lstat(lock_path)
            except FileNotFoundError:
                there = None
        except BaseException:
            os.close(fd)
            raise
        if there is not None and (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino):
            return fd
        os.close(fd)  # we locked a file its previous holder already unlinked: lock the new one
