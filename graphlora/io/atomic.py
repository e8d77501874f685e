"""Atomic file and directory writes: the one path every file graphlora writes goes through.

Why: a checkpoint that is half written (power cut, full disk, Ctrl-C, an exception while
serialising) must never replace a good one, a crash must never cost the user a file, and two
processes saving to the same place must not corrupt each other. Everything here writes to a
hidden temporary name in the *same directory* as the target, makes the bytes durable, and only
then renames it into place, holding the target's lock.

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
  *crash* in that window leaves the old directory, complete, under the backup name. After the
  second rename the backup is renamed to ``.<name>.graphlora-del-<token>`` and deleted.
* **Crash leftovers are settled by the next write to the same target** (and by :func:`recover`):
  a stranded backup is restored first (the newest, when a crash-prone older version left several),
  unfinished temporary files and staging directories are deleted, and a directory save carries the
  user's files (those its ``keep`` selects) over from every older backup before it deletes them —
  so no crash sequence deletes the only copy of a file.
* **One writer per target at a time.** Each write holds an exclusive lock on the target (``flock``
  of a hidden ``.<name>.graphlora-lock`` file next to it, removed when the write ends), so two
  processes saving to the same path run one after the other and the result is one complete
  artefact; a second writer waits. Writes nested inside one process (an ONNX model and its data
  file) share the lock.
* **No write follows a symbolic link.** A target that is a symlink is refused
  (:class:`~graphlora.errors.SaveError`, naming the link and where it points): a link planted in a
  shared directory cannot redirect a save onto a file elsewhere. Lock files are opened with
  ``O_NOFOLLOW``; carried-over symlinks are copied as links, never followed.
* Exceptions never leave temporary files or directories behind. Targets that cannot be replaced
  safely — ``.``, ``..``, an empty path, the current working directory or a directory containing
  it, a file where a directory belongs — are refused before anything is written.

Not guaranteed: atomicity across several paths, network file systems with weaker rename or lock
semantics, or Windows (no ``flock``: writers are not serialised; rename over an open file fails).

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
import logging
import os
import secrets
import shutil
import stat
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from graphlora.errors import GraphloraWarning, SaveError
from graphlora.io.write_lock import STALE, age_key, hidden, locked, stale_entries

__all__ = [
    "DIRECTORY_STAGES",
    "FILE_STAGES",
    "TargetExistsError",
    "TargetIsADirectoryError",
    "TargetNotADirectoryError",
    "atomic_directory",
    "atomic_path",
    "atomic_write",
    "recover",
    "target_lock",
]

log = logging.getLogger("graphlora.io")

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

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class TargetExistsError(SaveError, FileExistsError):
    """The target exists and the write was told not to replace it."""


class TargetNotADirectoryError(SaveError, NotADirectoryError):
    """A directory save names an existing file."""


class TargetIsADirectoryError(SaveError, IsADirectoryError):
    """A file write names an existing directory."""


def _checkpoint(stage: str) -> None:
    hook = _fail_at
    if hook is not None:
        hook(stage)


def _token() -> str:
    return secrets.token_hex(6)


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


def _retire(path: Path, target: Path) -> None:
    """Delete a superseded backup: renamed to a ``del`` name first, so a crash during the
    (non-atomic) tree removal leaves something every later write knows it may delete."""
    doomed = hidden(target, "del", _token())
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    except OSError:
        doomed = path
    _remove(doomed)


# ------------------------------------------------------------------------------ targets


def _target(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path, refusing names that cannot be written atomically."""
    try:
        text = os.fspath(path)
    except TypeError:
        raise SaveError(f"the {what} path must be a str or os.PathLike, got {type(path).__name__}") from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if "\0" in text:
        raise SaveError(f"the {what} path {text!r} contains a NUL character")
    target = Path(text)
    if text.strip() == "" or target.name in ("", ".", ".."):
        shown = text if text else "''"
        raise SaveError(
            f"cannot save to {shown!r}: it names no {what} of its own (an empty path, '.', '..' or a "
            f"root); graphlora replaces the {what} it writes, so name it, e.g. './checkpoint'"
        )
    return target


def _refuse_symlink(target: Path) -> None:
    if target.is_symlink():
        try:
            where = os.readlink(target)
        except OSError:  # pragma: no cover - the link vanished
            where = "?"
        raise SaveError(
            f"{target} is a symbolic link (to {where}); graphlora does not write through links, so "
            "a link planted in a shared directory cannot redirect a save. Write to the real path "
            "(os.path.realpath) or remove the link"
        )


def _refuse_cwd(target: Path) -> None:
    """Replacing the working directory (or one containing it) would pull it out from under the
    running process: every relative path after the save would point into a deleted tree."""
    if not target.is_dir():
        return
    real = os.path.realpath(target)
    try:
        cwd = os.path.realpath(os.getcwd())
    except FileNotFoundError:  # pragma: no cover - the cwd is already gone
        return
    if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise SaveError(
            f"cannot replace {target}: it is (or contains) the current working directory {cwd}; "
            "save to a subdirectory, e.g. './checkpoint'"
        )


# ------------------------------------------------------------------------------ settling leftovers


def _entries(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _settle(target: Path) -> tuple[list[str], list[Path]]:
    """Settle what crashed writes of ``target`` left (the caller holds the lock).

    A stranded backup is restored when ``target`` is missing (the newest of several: the newest
    committed version); unfinished temporary files, staging directories and half-deleted backups
    are deleted, and so are the remaining backups this version wrote (timestamped): each is the
    predecessor of a committed version that carried its user files over. Returns ``(actions,
    legacy)``: what was done, and backups an older graphlora wrote (no timestamp), newest first,
    which may hold the only copy of a user's file and are left to the caller.
    """
    actions: list[str] = []
    stale = stale_entries(target)
    backups = sorted(
        ((token, p) for kind, token, p in stale if kind == "old"), key=lambda tp: age_key(*tp), reverse=True
    )
    if backups and not os.path.lexists(target):
        _token_, newest = backups.pop(0)
        os.rename(newest, target)
        _fsync_dir(target.parent)
        actions.append(f"restored {target} from {newest.name}")
    for kind, _token_, p in stale:
        if kind in ("tmp", "new", "del"):
            _remove(p)
            actions.append(f"removed {p.name}")
    legacy = []
    for token, p in backups:
        if len(token) == 28:
            _retire(p, target)
            actions.append(f"removed {p.name} (superseded)")
        else:
            legacy.append(p)
    return actions, legacy


def _warn_settled(actions: list[str], target: Path) -> None:
    if any(a.startswith("restored") for a in actions):
        warnings.warn(
            f"an earlier write of {target} was interrupted by a crash; before writing again: "
            + "; ".join(actions),
            GraphloraWarning,
            stacklevel=4,
        )
    elif actions:
        log.info("cleaned up after an interrupted write of %s: %s", target, "; ".join(actions))


def _only_copies(backup: Path, target: Path) -> list[str]:
    """Top-level entries of ``backup`` that ``target`` lacks."""
    return sorted(_entries(backup) - _entries(target))


# ------------------------------------------------------------------------------ files


def _new_temp_file(target: Path) -> Path:
    """Create an empty, exclusive temporary file; ``os.open`` with 0o666 so the umask applies as
    it would for a plain ``open`` (``mkstemp`` would force 0o600). ``O_EXCL`` never follows a link."""
    while True:
        tmp = hidden(target, "tmp", _token())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o666)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        os.close(fd)
        return tmp


@contextlib.contextmanager
def target_lock(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the write lock of the file ``path`` (settling crash leftovers first) for a write made
    of several files, e.g. an ONNX model and its external data; yields the checked target path.
    :func:`atomic_path` inside the block shares the lock."""
    target = _target(path, "file")
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target) as outermost:
        if outermost:
            actions, _ = _settle(target)
            _warn_settled(actions, target)
        _refuse_symlink(target)
        yield target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success make it durable and rename it over ``path``.

    For writers that insist on opening the file themselves (e.g. ``safetensors.torch.save_file``,
    which streams tensors without an extra in-memory copy). The temporary file exists (empty) when
    the block starts; the writer may truncate or replace it. If an existing ``path`` is a regular
    file its permission bits are copied to the new file. A symlink at ``path`` is refused.
    """
    with target_lock(path) as target:
        if target.is_dir():
            raise TargetIsADirectoryError(f"cannot atomically write a file over the directory {target}")
        parent = target.parent
        tmp = _new_temp_file(target)
        committed = False
        try:
            _checkpoint("file:created")
            yield tmp
            _checkpoint("file:written")
            if not tmp.is_file() or tmp.is_symlink():
                raise SaveError(f"the writer removed or replaced the temporary file {tmp}")
            try:
                os.chmod(tmp, stat.S_IMODE(os.lstat(target).st_mode))
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


# ------------------------------------------------------------------------------ directories


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
        if not keep(entry.name) or os.path.lexists(new / entry.name) or STALE.match(entry.name):
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

    ``overwrite=False`` refuses (:class:`TargetExistsError`, a ``FileExistsError``, before anything
    is created) when ``path`` exists. ``keep`` selects top-level entries of an existing ``path``
    (by name) to carry into the new directory when the block did not write an entry of that name
    — so e.g. saving weights does not delete a ``config.json`` or tokenizer files that live next to
    them; entries it selects are also carried from older backups a crash left behind. Without
    ``keep`` the new directory replaces the old one wholesale.

    On an exception the staging directory is deleted and an existing ``path`` is left exactly as
    it was. See the module docstring for the two-rename window, the lock and crash leftovers.
    """
    target = _target(path, "directory")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with locked(target) as outermost:
        older: list[Path] = []  # backups of an older graphlora that may hold a user's only copy
        if outermost:
            actions, older = _settle(target)
            _warn_settled(actions, target)
        _refuse_symlink(target)
        exists = os.path.lexists(target)
        if exists and not overwrite:
            raise TargetExistsError(f"{target} already exists (pass overwrite=True to replace it)")
        if exists and not target.is_dir():
            raise TargetNotADirectoryError(f"{target} exists and is not a directory; refusing to replace it")
        _refuse_cwd(target)
        staging = hidden(target, "new", _token())
        staging.mkdir()
        backup: Path | None = None
        committed = False
        try:
            _checkpoint("dir:created")
            yield staging
            _checkpoint("dir:written")
            if keep is not None:
                for source in ([target] if target.is_dir() else []) + older:
                    _carry_over(source, staging, keep)
            _checkpoint("dir:carried")
            _fsync_tree(staging)
            _checkpoint("dir:synced")
            if os.path.lexists(target):
                with contextlib.suppress(OSError):
                    os.chmod(staging, stat.S_IMODE(os.lstat(target).st_mode))
                backup = hidden(target, "old", f"{time.time_ns():016x}{_token()}")
                os.rename(target, backup)
                try:
                    _checkpoint("dir:old_moved")
                    os.rename(staging, target)
                except BaseException:
                    # From here on the backup is never deleted by us: if renaming it back fails
                    # too, it stays on disk (complete) for the next write or recover().
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
            else:
                # superseded: what keep selected is in the new directory; the rest was replaced
                for done in ([backup] if backup is not None else []) + older:
                    _retire(done, target)


def recover(path: str | os.PathLike[str]) -> list[str]:
    """Clean up after a crash (not an exception) during a write to ``path``; return what was done.

    * ``path`` missing and backups ``.<name>.graphlora-old-*`` present (a crash inside the
      two-rename window): the newest backup is renamed back to ``path`` — that version, complete.
    * Unfinished temporary files, staging directories and half-deleted backups are deleted, and so
      are backups superseded by a committed version (a crash after the second rename).
    * A backup written by an older graphlora (no timestamp in its name) is deleted when ``path``
      holds every top-level entry it holds; otherwise it is kept (and reported): it may be the only
      copy of a user's file. The next save to ``path`` carries such entries over (those its
      ``keep`` selects) and deletes the backup.

    Safe while other processes write ``path``: it takes the same lock and waits for them.
    """
    target = Path(os.fspath(path))
    if not target.parent.is_dir() or target.name in ("", ".", ".."):
        return []
    with locked(target):
        actions, older = _settle(target)
        for backup in older:
            unique = _only_copies(backup, target)
            if unique and os.path.lexists(target):
                shown = ", ".join(unique[:5]) + (f" and {len(unique) - 5} more" if len(unique) > 5 else "")
                actions.append(
                    f"kept {backup.name}: it holds {shown}, which {target.name} lacks (move what you "
                    "need, then delete it; the next save carries the user's files over)"
                )
                continue
            _retire(backup, target)
            actions.append(f"removed {backup.name}")
    if actions:
        _fsync_dir(target.parent)
    return actions
