"""Crashes, concurrent writers and planted symlinks (issue 17, classes 2, 3, 4 and 10).

* class 2 — a crash before and after every rename of a real save (SIGKILL-like ``os._exit`` in a
  forked child), then either ``recover()`` or the next save, then ``recover()``: the user's files
  survive every crash point, the result is a complete version, and ``recover()`` restores the
  newest of several stranded backups (by the time they were made, not by name);
* class 3 — two processes writing the same ONNX model with external data, the same directory and
  the same file, many times at once: both succeed and the result is one complete artefact;
* class 4 — a symlink planted at the target of every writer: refused, nothing outside changes;
* class 10 — leftovers of crashed writes are cleaned by the next save to the same target.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import graphlora
from graphlora import SaveError
from graphlora.io import atomic
from graphlora.io.atomic import atomic_directory, atomic_write, recover
from graphlora.io.peft_format import LoraModule, read_adapter, save_adapter
from hostile import crash_at_rename, in_children, leftovers, tree

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="crash injection and writers use fork"),
]

USER_FILES = {"tokenizer.json": b'{"model": "mine"}', "README.md": b"# my notes\n"}


def _modules(seed: int) -> list[LoraModule]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoraModule(p, 2, 4.0, torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g))
        for p in ("layers.0", "layers.1")
    ]


# computed once, in this process: forked children only write files (no torch compute after fork)
_VERSIONS = {seed: _modules(seed) for seed in range(6)}


def modules(seed: int) -> list[LoraModule]:
    return _VERSIONS[seed]


def version_of(directory: Path) -> int | None:
    """Which ``modules(seed)`` the adapter in ``directory`` holds (None: not a readable adapter)."""
    try:
        adapter = read_adapter(directory)
    except graphlora.GraphloraError:
        return None
    for seed in _VERSIONS:
        if all(torch.equal(adapter.modules[m.path].lora_A, m.lora_A) for m in modules(seed)):
            return seed
    return None


def with_user_files(directory: Path, seed: int) -> Path:
    save_adapter(directory, modules(seed))
    for name, data in USER_FILES.items():
        (directory / name).write_bytes(data)
    return directory


def user_files_intact(directory: Path) -> bool:
    return all((directory / n).is_file() and (directory / n).read_bytes() == d for n, d in USER_FILES.items())


def _all_points(make, action, tmp_path: Path) -> list[tuple[str, int, Path]]:
    """Crash ``action`` before and after each of its renames, each time on a fresh copy made by
    ``make(dir)``; returns (when, n, directory) for every crash that happened."""
    out = []
    for when in ("before", "after"):
        n = 1
        while True:
            work = tmp_path / f"{when}{n}"
            work.mkdir()
            target = make(work)
            if not crash_at_rename(when, n, lambda: action(target)):
                break
            out.append((when, n, target))
            n += 1
    return out


# --------------------------------------------------------------------------- class 2: crashes


def test_crash_at_every_rename_then_recover_keeps_the_users_files(tmp_path):
    points = _all_points(lambda w: with_user_files(w / "ckpt", 1), lambda t: save_adapter(t, modules(2)), tmp_path)
    assert len(points) >= 8  # two file commits in the staging directory, the swap, the clean-up
    seen = set()
    for when, n, target in points:
        recover(target)
        version = version_of(target)
        assert version in (1, 2), (when, n)  # a complete version, old or new
        seen.add(version)
        assert user_files_intact(target), (when, n, sorted(os.listdir(target)))
        assert leftovers(target.parent) == [], (when, n)
        assert recover(target) == []
    assert seen == {1, 2}  # crashes before the commit keep the old version, after it the new one


def test_crash_at_every_rename_then_the_next_save_keeps_the_users_files(tmp_path):
    """Issue 17's sequence: a crash between the two renames, the next save, then recover(): the
    next save restores the stranded backup first, carries the user's files over and cleans up."""
    points = _all_points(lambda w: with_user_files(w / "ckpt", 1), lambda t: save_adapter(t, modules(2)), tmp_path)
    for when, n, target in points:
        with _maybe_warns():
            save_adapter(target, modules(3))
        assert version_of(target) == 3, (when, n)
        assert user_files_intact(target), (when, n, sorted(os.listdir(target)))
        assert leftovers(target.parent) == [], (when, n)
        assert recover(target) == []
        assert user_files_intact(target)


class _maybe_warns:
    """A crash in the window makes the next save warn that it restored a backup; others don't."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        for record in self.records:
            assert issubclass(record.category, graphlora.GraphloraWarning)
            assert "interrupted by a crash" in str(record.message)
        return False


def test_crash_in_the_window_of_a_save_pretrained_keeps_tokenizer_and_readme(tmp_path):
    """The reported case end to end, with LoraModel.save_pretrained."""
    lm = graphlora.transform(torch.nn.Sequential(torch.nn.Linear(8, 8)), [graphlora.LoraRule(".*", rank=2)],
                             (torch.randn(2, 8),))
    target = tmp_path / "ckpt"
    lm.save_pretrained(target)
    for name, data in USER_FILES.items():
        (target / name).write_bytes(data)
    before = tree(target)

    def fail(stage):
        if stage == "dir:old_moved":
            os._exit(17)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        atomic._fail_at = fail
        try:
            save_adapter(target, modules(2))  # any save of this directory: the swap is the same
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 17 and not target.exists()  # the two-rename window
    with pytest.warns(graphlora.GraphloraWarning, match="restored"):
        lm.save_pretrained(target)  # the next save
    assert recover(target) == []
    assert user_files_intact(target)
    assert sorted(tree(target)) == sorted(before)
    assert leftovers(tmp_path) == []


def _backup(target: Path, token: str, seed: int, extra: dict[str, bytes] | None = None) -> Path:
    path = target.parent / f".{target.name}.graphlora-old-{token}"
    save_adapter(path, modules(seed))
    for name, data in (extra or {}).items():
        (path / name).write_bytes(data)
    return path


def test_recover_restores_the_newest_of_several_backups(tmp_path):
    target = tmp_path / "ckpt"
    now = time.time_ns()
    # names sort the other way round from their age: order by name would restore the oldest
    _backup(target, f"{now:016x}" + "f" * 12, seed=1)
    _backup(target, f"{now + 10**9:016x}" + "0" * 12, seed=2)
    actions = recover(target)
    assert version_of(target) == 2
    assert any(a.startswith("restored") for a in actions)
    assert leftovers(tmp_path) == []


def test_backups_of_an_older_graphlora_are_kept_while_they_hold_the_only_copy(tmp_path):
    """Untimestamped backups (written before this version): newest by inode change time; one
    holding a file the target lacks is kept by recover() and carried over by the next save."""
    target = tmp_path / "ckpt"
    older = _backup(target, "f" * 12, seed=1, extra={"notes.txt": b"only copy"})
    time.sleep(0.01)
    _backup(target, "0" * 12, seed=2)
    actions = recover(target)
    assert version_of(target) == 2 and older.is_dir()
    assert any("kept" in a and "notes.txt" in a for a in actions)
    assert (older / "notes.txt").read_bytes() == b"only copy"
    save_adapter(target, modules(3))
    assert version_of(target) == 3 and (target / "notes.txt").read_bytes() == b"only copy"
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- class 3: two writers


def _tiny_onnx():
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)), onnx


def test_two_processes_exporting_onnx_with_external_data_to_one_path(tmp_path):
    from graphlora.onnx.export import save_model

    model, onnx = _tiny_onnx()
    path = tmp_path / "model.onnx"

    def writer():
        for _ in range(15):
            save_model(model, path, external_data=True)

    assert in_children(writer, writer) == [0, 0]
    data = [n for n in os.listdir(tmp_path) if n.endswith(".data")]
    assert len(data) == 1  # the current model's; every other one was removed
    loaded = onnx.load(str(path))  # loads the external data the model names
    assert onnx.numpy_helper.to_array(loaded.graph.initializer[0]).shape == (64, 64)
    assert leftovers(tmp_path) == []
    # a single-file export over it removes the data file the old model used
    save_model(model, path, external_data=False)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".data")] == []


def test_two_processes_saving_one_directory_and_one_file(tmp_path):
    target = with_user_files(tmp_path / "ckpt", 1)
    file = tmp_path / "enc.json"

    def writer(seed):
        def run():
            for i in range(10):
                save_adapter(target, modules(seed))
                with atomic_write(file, "w") as fh:
                    fh.write(json.dumps({"writer": seed, "i": i, "pad": "x" * 10000}))
        return run

    assert in_children(writer(2), writer(3)) == [0, 0]
    assert version_of(target) in (2, 3)
    assert user_files_intact(target)
    assert json.loads(file.read_text())["writer"] in (2, 3)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- class 4: symlinks


def _write_bytes(path: Path) -> None:
    with atomic_write(path) as fh:
        fh.write(b"overwritten")


def test_planted_symlinks_are_refused_by_every_writer(tmp_path):
    from graphlora.onnx.adapters import write_adapter as write_ort_adapter
    from graphlora.onnx.export import save_model
    from graphlora.rules_file import save_rules

    shared, outside = tmp_path / "shared", tmp_path / "victim"
    shared.mkdir()
    outside.mkdir()
    victim_file = outside / "important.txt"
    victim_file.write_bytes(b"keep me")
    victim_dir = outside / "project"
    victim_dir.mkdir()
    (victim_dir / "thesis.tex").write_bytes(b"keep me too")
    before = tree(outside)

    lm = graphlora.transform(torch.nn.Sequential(torch.nn.Linear(8, 8)),
                             [graphlora.LoraRule(".*", rank=2, weight_qtype="int8")], (torch.randn(2, 8),))
    model, _ = _tiny_onnx()
    file_writers = {
        "enc.json": lambda p: graphlora.save_encodings(lm, p),
        "g.graph.txt": lambda p: graphlora.save_graph_text(lm, p),
        "rules.toml": lambda p: save_rules(lm.rules, p),
        "m.onnx": lambda p: save_model(model, p, external_data=False),
        "x.onnx": lambda p: save_model(model, p, external_data=True),
        "a.onnx_adapter": lambda p: write_ort_adapter({"x.lora_A": np.ones((2, 2), np.float32)}, p),
        "f.bin": _write_bytes,
    }
    for name, write in file_writers.items():
        link = shared / name
        link.symlink_to(victim_file)
        with pytest.raises(SaveError, match="symbolic link"):
            write(link)
        assert link.is_symlink(), name
    dir_writers = {
        "ckpt": lambda p: lm.save_pretrained(p),
        "adapter": lambda p: lm.save_pretrained(p, only_save_adapters=True),
        "merged": lambda p: lm.save_pretrained(p, save_adapters_separately=False),
        "weights": lambda p: graphlora.io.save_state_dict({"w": torch.ones(2)}, p),
    }
    for name, write in dir_writers.items():
        link = shared / name
        link.symlink_to(victim_dir, target_is_directory=True)
        with pytest.raises(SaveError, match="symbolic link"):
            write(link)
    (shared / ".fresh.json.graphlora-lock").symlink_to(victim_file)  # a planted lock file
    with pytest.raises(SaveError, match=r"graphlora-lock is a symbolic link"):
        graphlora.save_encodings(lm, shared / "fresh.json")
    assert tree(outside) == before and not (shared / "fresh.json").exists()
    assert leftovers(shared) == [".fresh.json.graphlora-lock"]  # the planted link, untouched


# --------------------------------------------------------------------------- class 10: leftovers


def test_the_next_save_cleans_what_crashes_left(tmp_path):
    target = with_user_files(tmp_path / "ckpt", 1)
    # what crashed writers leave: a half-written file, a staging directory, a half-deleted
    # backup, a superseded backup (crash after the commit), a lock file
    (tmp_path / f".ckpt.graphlora-tmp-{'1' * 12}").write_bytes(b"half")
    stage = tmp_path / f".ckpt.graphlora-new-{'2' * 12}"
    save_adapter(stage, modules(5))  # as big as a full copy of the weights
    (tmp_path / f".ckpt.graphlora-del-{'3' * 12}").mkdir()
    _backup(target, f"{time.time_ns():016x}" + "4" * 12, seed=0)
    (tmp_path / ".ckpt.graphlora-lock").write_bytes(b"")
    (tmp_path / ".other.graphlora-tmp-0123456789ab").write_bytes(b"not ours")
    save_adapter(target, modules(2))
    assert version_of(target) == 2 and user_files_intact(target)
    assert leftovers(tmp_path) == [".other.graphlora-tmp-0123456789ab"]

    file = tmp_path / "f.txt"
    (tmp_path / f".f.txt.graphlora-tmp-{'5' * 12}").write_bytes(b"half")
    with atomic_write(file) as fh:
        fh.write(b"new")
    assert file.read_bytes() == b"new"
    assert leftovers(tmp_path) == [".other.graphlora-tmp-0123456789ab"]


def test_the_next_onnx_export_cleans_orphaned_data_files(tmp_path):
    from graphlora.onnx.export import save_model

    model, onnx = _tiny_onnx()
    path = tmp_path / "model.onnx"
    save_model(model, path, external_data=True)
    (tmp_path / "model.onnx.0badc0de.data").write_bytes(b"orphan of a crashed export")
    (tmp_path / "model.onnx.backup.data").write_bytes(b"the user's, not ours")
    save_model(model, path, external_data=True)
    data = sorted(n for n in os.listdir(tmp_path) if n.endswith(".data"))
    assert len(data) == 2 and "model.onnx.backup.data" in data
    assert onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]).shape == (64, 64)
