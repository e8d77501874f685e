"""Atomic writes: a failure injected at every stage leaves the previous artefact byte-identical
(or, after the commit point, the complete new one) and no temporary files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from graphlora.errors import SaveError
from graphlora.io import atomic
from graphlora.io.atomic import DIRECTORY_STAGES, FILE_STAGES, atomic_directory, atomic_write, recover

PRE_COMMIT_FILE = [s for s in FILE_STAGES if s != "file:committed"]
PRE_COMMIT_DIR = [s for s in DIRECTORY_STAGES if s != "dir:committed"]


class Boom(Exception):
    pass


def fail_at(stage: str):
    def hook(seen: str) -> None:
        if seen == stage:
            raise Boom(stage)

    return hook


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (relative path -> bytes, None for directories)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, root)] = Path(full).read_bytes()
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".graphlora-" in n)


@pytest.fixture
def hook(monkeypatch):
    def install(fn):
        monkeypatch.setattr(atomic, "_fail_at", fn)

    return install


# ---------------------------------------------------------------------------------------------
# files


def test_atomic_write_creates_and_replaces(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    with atomic_write(target) as fh:
        fh.write(b"one")
    assert target.read_bytes() == b"one"
    with atomic_write(target, "w") as fh:
        fh.write("twö")
    assert target.read_text(encoding="utf-8") == "twö"
    assert leftovers(target.parent) == []


def test_atomic_write_keeps_permissions_of_existing_file(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    with atomic_write(target) as fh:
        fh.write(b"new")
    assert (target.stat().st_mode & 0o777) == 0o640


@pytest.mark.parametrize("stage", PRE_COMMIT_FILE)
def test_file_failure_before_commit_keeps_old_bytes(tmp_path, hook, stage):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old contents")
    hook(fail_at(stage))
    with pytest.raises(Boom):
        with atomic_write(target) as fh:
            fh.write(b"new contents that must not appear")
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("stage", PRE_COMMIT_FILE)
def test_file_failure_before_commit_creates_nothing(tmp_path, hook, stage):
    hook(fail_at(stage))
    with pytest.raises(Boom):
        with atomic_write(tmp_path / "f.bin") as fh:
            fh.write(b"x")
    assert os.listdir(tmp_path) == []


def test_file_failure_after_commit_leaves_new_file(tmp_path, hook):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    hook(fail_at("file:committed"))
    with pytest.raises(Boom):
        with atomic_write(target) as fh:
            fh.write(b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_exception_in_body_keeps_old_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(target) as fh:
            fh.write(b"partial")
            1 / 0
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_rejects_non_write_modes(tmp_path):
    for mode in ("a", "ab", "r", "r+b"):
        with pytest.raises(ValueError):
            with atomic_write(tmp_path / "f", mode):
                pass
    assert os.listdir(tmp_path) == []


def test_every_file_stage_is_reached(tmp_path, hook):
    seen: list[str] = []
    hook(seen.append)
    with atomic_write(tmp_path / "f") as fh:
        fh.write(b"x")
    assert seen == list(FILE_STAGES)


# ---------------------------------------------------------------------------------------------
# directories


def make_old(root: Path) -> dict[str, bytes | None]:
    root.mkdir()
    (root / "a.txt").write_bytes(b"old a")
    (root / "nested").mkdir()
    (root / "nested" / "b.bin").write_bytes(bytes(range(256)))
    return snapshot(root)


def write_new(tmp: Path) -> None:
    (tmp / "a.txt").write_bytes(b"new a")
    (tmp / "c.txt").write_bytes(b"new c")


def test_atomic_directory_creates_and_replaces(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.graphlora-new-")
        write_new(tmp)
    assert snapshot(target) == {"a.txt": b"new a", "c.txt": b"new c"}
    with atomic_directory(target) as tmp:
        (tmp / "only.txt").write_bytes(b"z")
    assert snapshot(target) == {"only.txt": b"z"}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("stage", PRE_COMMIT_DIR)
def test_directory_failure_before_commit_keeps_old_tree(tmp_path, hook, stage):
    target = tmp_path / "ckpt"
    before = make_old(target)
    hook(fail_at(stage))
    with pytest.raises(Boom):
        with atomic_directory(target, keep=lambda name: name == "nested") as tmp:
            write_new(tmp)
    assert snapshot(target) == before
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("stage", [s for s in PRE_COMMIT_DIR if s != "dir:old_moved"])
def test_directory_failure_before_commit_creates_nothing(tmp_path, hook, stage):
    hook(fail_at(stage))
    with pytest.raises(Boom):
        with atomic_directory(tmp_path / "ckpt") as tmp:
            write_new(tmp)
    assert os.listdir(tmp_path) == []


def test_directory_failure_after_commit_leaves_new_tree(tmp_path, hook):
    target = tmp_path / "ckpt"
    make_old(target)
    hook(fail_at("dir:committed"))
    with pytest.raises(Boom):
        with atomic_directory(target) as tmp:
            write_new(tmp)
    assert snapshot(target) == {"a.txt": b"new a", "c.txt": b"new c"}
    assert os.listdir(tmp_path) == ["ckpt"]


def test_exception_in_directory_body_keeps_old_tree(tmp_path):
    target = tmp_path / "ckpt"
    before = make_old(target)
    with pytest.raises(KeyError):
        with atomic_directory(target) as tmp:
            write_new(tmp)
            raise KeyError("boom")
    assert snapshot(target) == before
    assert os.listdir(tmp_path) == ["ckpt"]


def test_every_directory_stage_is_reached(tmp_path, hook):
    target = tmp_path / "ckpt"
    make_old(target)
    seen: list[str] = []
    hook(seen.append)
    with atomic_directory(target) as tmp:
        write_new(tmp)
    assert seen == list(DIRECTORY_STAGES)
    seen.clear()
    with atomic_directory(tmp_path / "fresh") as tmp:
        write_new(tmp)
    assert seen == [s for s in DIRECTORY_STAGES if s != "dir:old_moved"]


def test_keep_carries_selected_old_entries(tmp_path):
    target = tmp_path / "ckpt"
    make_old(target)
    (target / "config.json").write_text("{}")
    with atomic_directory(target, keep=lambda name: name != "nested") as tmp:
        (tmp / "a.txt").write_bytes(b"new a")
    # a.txt: written anew wins over the old one; config.json carried; nested dropped.
    assert snapshot(target) == {"a.txt": b"new a", "config.json": b"{}"}


def test_keep_carries_directories(tmp_path):
    target = tmp_path / "ckpt"
    before = make_old(target)
    with atomic_directory(target, keep=lambda name: True) as tmp:
        (tmp / "extra").write_bytes(b"e")
    assert snapshot(target) == {**before, "extra": b"e"}


def test_overwrite_false_refuses_existing(tmp_path):
    target = tmp_path / "ckpt"
    before = make_old(target)
    with pytest.raises(FileExistsError):
        with atomic_directory(target, overwrite=False):
            pytest.fail("body must not run")
    assert snapshot(target) == before
    assert os.listdir(tmp_path) == ["ckpt"]


def test_refuses_to_replace_a_file_with_a_directory(tmp_path):
    (tmp_path / "ckpt").write_bytes(b"file")
    with pytest.raises(NotADirectoryError):
        with atomic_directory(tmp_path / "ckpt"):
            pass
    assert (tmp_path / "ckpt").read_bytes() == b"file"


def test_symlinks_are_refused_not_followed(tmp_path):
    """A link at the target is never written through (issue 17: a link planted in a shared
    directory redirected saves onto files elsewhere); the link and what it points to stay."""
    real_file = tmp_path / "real.txt"
    real_file.write_bytes(b"old")
    (tmp_path / "link.txt").symlink_to(real_file)
    with pytest.raises(SaveError, match="symbolic link"):
        with atomic_write(tmp_path / "link.txt") as fh:
            fh.write(b"new")
    assert (tmp_path / "link.txt").is_symlink() and real_file.read_bytes() == b"old"

    real_dir = tmp_path / "real_dir"
    before = make_old(real_dir)
    (tmp_path / "link_dir").symlink_to(real_dir)
    with pytest.raises(SaveError, match="symbolic link"):
        with atomic_directory(tmp_path / "link_dir") as tmp:
            write_new(tmp)
    assert (tmp_path / "link_dir").is_symlink()
    assert snapshot(real_dir) == before
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# crashes (os._exit in a forked child) and recover()


def crash_in_child(stage: str, action) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            def die(seen: str) -> None:
                if seen == stage:
                    os._exit(17)

            atomic._fail_at = die
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 17


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("stage", DIRECTORY_STAGES)
def test_crash_at_any_directory_stage_is_recoverable(tmp_path, stage):
    target = tmp_path / "ckpt"
    before = make_old(target)

    def action():
        with atomic_directory(target) as tmp:
            write_new(tmp)

    crash_in_child(stage, action)
    if stage == "dir:old_moved":
        assert not target.exists()  # the documented window
    recover(target)
    after = snapshot(target)
    assert after in (before, {"a.txt": b"new a", "c.txt": b"new c"})
    if stage != "dir:committed":
        assert after == before
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("stage", FILE_STAGES)
def test_crash_at_any_file_stage_is_recoverable(tmp_path, stage):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def action():
        with atomic_write(target) as fh:
            fh.write(b"new")

    crash_in_child(stage, action)
    assert target.read_bytes() == (b"new" if stage == "file:committed" else b"old")
    recover(target)
    assert os.listdir(tmp_path) == ["f.bin"]


def test_recover_leaves_unrelated_entries(tmp_path):
    (tmp_path / ".other.graphlora-tmp-0123456789ab").write_bytes(b"x")
    (tmp_path / "ckpt").mkdir()
    assert recover(tmp_path / "ckpt") == []
    assert sorted(os.listdir(tmp_path)) == [".other.graphlora-tmp-0123456789ab", "ckpt"]


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("POSIX rename semantics")
