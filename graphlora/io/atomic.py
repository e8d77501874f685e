"""Atomic file and directory writes: the one path every file graphlora writes goes through.

Why: a checkpoint that is half written (power cut, full disk, Ctrl-C, an exception while
serialising) must never replace a good one. Everything here writes to a hidden temporary name in
the *same directory* as the target, makes the bytes durable, and only then renames it into place.

Guarantees (POSIX, local file systems)
--------------------------------------
* :func:`atomic_write` / :func:`atomic_path` — ``rename(2)`` over an existing file is atomic: a
  reader (or a crash) sees either the complete old file or the complete new one, never a mix. The
  data is ``fsync``-ed before the rename and the parent directory after it, so once the context
  manager returns the new file survives a power cut. On an exception nothing at ``path`` changes
  and the temporary file is removed.
* :func:`atomic_directory` — a new directory is built under a hidden staging name, every file and
  directory in it is ``fsync``-ed, then it is renamed into place. If ``path`` did not exist that is
  one atomic rename. If it did, POSIX has no "exchange two directories" call that works everywhere
  (``renameat2(RENAME_EXCHANGE)`` is Linux-only and not exposed by Python), so the swap is **two
  renames**: ``path -> .<name>.graphlora-old-<token>`` then ``staging -> path``. Between the two
  (microseconds) ``path`` does not exist. An exception in that window renames the backup back; a
  *crash* in that window leaves the old directory, complete, under the backup name, and
  :func:`recover` puts it back. After the second rename the backup is deleted.
* Exceptions never leave temporary files or directories behind. A crash (SIGKILL, power cut) can
  leave hidden ``.<name>.graphlora-*`` entries next to the target; they are never mistaken for the
  target, and :func:`recover` removes or restores them.

Symlinks are followed: when ``path`` is a symlink, the file or directory it points to is
replaced (next to itself) and the link keeps pointing at it.

Not guaranteed: atomicity across several paths, network file systems with weaker rename
semantics, or Windows (rename over an open file fails there; the code still works but the swap
window is larger).

Test hook
---------
Every step calls :func:`_checkpoint` with a stage name from :data:`FILE_STAGES` or
:data:`DIRECTORY_STAGES`. Tests set the module attribute ``_fail_at`` to a callable that receives
the stage name and may raise (or ``os._exit`` to simulate a crash). Stages before the commit point
must leave the previous artefact untouched; stages after it (``*:committed``) must leave the new one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DIRECTORY_STAGES",
    "FILE_STAGES",
    "atomic_directory",
    "atomic_path",
    "atomic_write",
    "recover",
]

#: Stages of a file write, in order. The commit point is the rename between ``file:synced`` and
#: ``file:committed``.
FILE_STAGES: tuple[str, ...] = (
    "file:created",  # temporary file exists (empty)
    "file:written",  # caller finished writing, not yet flushed/fsynced
    "file:synced",  # data fsynced, about to rename over the target
    "file:committed",  # renamed into place, parent directory not yet fsynced
)

#: Stages of a directory write, in order. ``dir:old_moved`` is the two-rename window (only reached
#: when the target existed); the commit point is the rename after it.
DIRECTORY_STAGES: tuple[str, ...] = (
    "dir:created",  # staging directory exists (empty), about to run the caller's block
    "dir:written",  # caller's block finished
    "dir:carried",  # entries kept from the old directory are linked into the staging directory
    "dir:synced",  # staging tree fsynced, about to rename
    "dir:old_moved",  # old directory renamed to the backup name, new one not yet in place
    "dir:committed",  # new directory in place, backup not yet removed
)

#: Test hook: ``None`` or a callable receiving each stage name (may raise to inject a failure).
_fail_at: Callable[[str], None] | None = None

_MARK = ".graphlora-"


def _checkpoint(stage: str) -> None:
    hook = _fail_at
    if hook is not None:
        hook(stage)


def _token() -> str:
    return secrets.token_hex(6)


def _resolve(path: str | os.PathLike[str]) -> Path:
    """``path`` with a final symlink followed (so the link survives and its target is replaced)."""
    target = Path(path)
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - some file systems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a file, symlink or directory tree if it exists; never raises for a missing path."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _new_temp_file(directory: Path, name: str) -> Path:
    """Create an empty, exclusive temporary file; ``os.open`` with 0o666 so the umask applies as
    it would for a plain ``open`` (``mkstemp`` would force 0o600)."""
    while True:
        tmp = directory / f".{name}{_MARK}tmp-{_token()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        os.close(fd)
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success make it durable and rename it over ``path``.

    For writers that insist on opening the file themselves (e.g. ``safetensors.torch.save_file``,
    which streams tensors without an extra in-memory copy). The temporary file exists (empty) when
    the block starts; the writer may truncate or replace it. If an existing ``path`` is a regular
    file its permission bits are copied to the new file.
    """
    target = _resolve(path)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        raise IsADirectoryError(f"cannot atomically write a file over the directory {target}")
    tmp = _new_temp_file(parent, target.name)
    committed = False
    try:
        _checkpoint("file:created")
        yield tmp
        _checkpoint("file:written")
        if not tmp.is_file():
            raise FileNotFoundError(f"the writer removed or replaced the temporary file {tmp}")
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        except FileNotFoundError:
            pass
        _fsync_file(tmp)
        _checkpoint("file:synced")
        os.replace(tmp, target)
        committed = True
        _checkpoint("file:committed")
        _fsync_dir(parent)
    finally:
        if not committed:
            _remove(tmp)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "wb",
    *,
    encoding: str | None = None,
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on success fsync it and rename it over ``path``.

    ``mode`` is ``"wb"`` (default) or ``"w"``/``"wt"`` (text, UTF-8 unless ``encoding`` says
    otherwise). Append and read modes are refused: they cannot be made atomic this way. On an
    exception inside the block, ``path`` is untouched and the temporary file is deleted.
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"atomic_write supports modes 'wb', 'w' and 'wt', not {mode!r}")
    binary = "b" in mode
    if binary and (encoding is not None or newline is not None):
        raise ValueError("encoding/newline only apply to text mode")
    with atomic_path(path) as tmp:
        if binary:
            fh: IO[Any] = open(tmp, "wb")
        else:
            fh = open(tmp, "w", encoding=encoding or "utf-8", newline=newline)
        with fh:  # closing flushes; atomic_path fsyncs before the rename
            yield fh


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Hard-link (or copy) the old directory's top-level entries selected by ``keep`` that the
    new directory does not already contain. Hard links are safe here: the old directory is only
    ever renamed and deleted, never modified in place, so both names see the same bytes."""
    for entry in os.scandir(old):
        if not keep(entry.name) or os.path.lexists(new / entry.name):
            continue
        src, dst = Path(entry.path), new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif entry.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(dst))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            if not full.is_symlink():
                _fsync_file(full)
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    keep: Callable[[str], bool] | None = None,
) -> Iterator[Path]:
    """Yield an empty staging directory next to ``path``; on success swap it into place.

    ``overwrite=False`` refuses (``FileExistsError``, before anything is created) when ``path``
    exists. ``keep`` selects top-level entries of an existing ``path`` (by name) to carry into the
    new directory when the block did not write an entry of that name — so e.g. saving weights
    does not delete a ``config.json`` or tokenizer files that live next to them. Without ``keep``
    the new directory replaces the old one wholesale.

    On an exception the staging directory is deleted and an existing ``path`` is left exactly as
    it was. See the module docstring for the two-rename window and :func:`recover`.
    """
    target = _resolve(path)
    parent = target.parent
    exists = os.path.lexists(target)
    if exists and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    if exists and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; refusing to replace it")
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{target.name}{_MARK}new-{_token()}"
    staging.mkdir()
    backup: Path | None = None
    committed = False
    try:
        _checkpoint("dir:created")
        yield staging
        _checkpoint("dir:written")
        if keep is not None and target.is_dir():
            _carry_over(target, staging, keep)
        _checkpoint("dir:carried")
        _fsync_tree(staging)
        _checkpoint("dir:synced")
        if os.path.lexists(target):
            if not overwrite:
                raise FileExistsError(f"{target} appeared while it was being written")
            with contextlib.suppress(OSError):
                os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
            backup = parent / f".{target.name}{_MARK}old-{_token()}"
            os.rename(target, backup)
            try:
                _checkpoint("dir:old_moved")
                os.rename(staging, target)
            except BaseException:
                # From here on the backup is never deleted by us: if renaming it back fails too,
                # it stays on disk (complete) for recover().
                old, backup = backup, None
                os.rename(old, target)
                raise
        else:
            os.rename(staging, target)
        committed = True
        _checkpoint("dir:committed")
        _fsync_dir(parent)
    finally:
        if not committed:
            _remove(staging)
        if backup is not None:
            _remove(backup)


_STALE = re.compile(r"^\.(?P<name>.+)\.graphlora-(?P<kind>tmp|new|old)-[0-9a-f]{12}$")


def recover(path: str | os.PathLike[str]) -> list[str]:
    """Clean up after a crash (not an exception) during a write to ``path``; return what was done.

    * ``path`` missing and a backup ``.<name>.graphlora-old-*`` present (crash inside the
      two-rename window): the backup is renamed back to ``path`` — the old artefact, complete.
    * Every other temporary/staging/backup entry for ``path`` is deleted: it is either an
      unfinished write or an old version already superseded by a complete new one.

    Only call this when no other process is writing ``path``: an in-progress write looks exactly
    like a crashed one.
    """
    target = _resolve(path)
    parent = target.parent
    actions: list[str] = []
    if not parent.is_dir():
        return actions
    stale = []
    for entry in sorted(os.listdir(parent)):
        match = _STALE.match(entry)
        if match and match.group("name") == target.name:
            stale.append((match.group("kind"), parent / entry))
    if not os.path.lexists(target):
        backups = [p for kind, p in stale if kind == "old"]
        if backups:
            os.rename(backups[0], target)
            actions.append(f"restored {target} from {backups[0].name}")
            stale = [(k, p) for k, p in stale if p != backups[0]]
    for _kind, p in stale:
        _remove(p)
        actions.append(f"removed {p.name}")
    if actions:
        _fsync_dir(parent)
    return actions
