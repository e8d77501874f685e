"""No lost data: every file graphlora writes goes through ``graphlora/io/atomic.py``, and a
failure at any stage of saving or exporting leaves the previous artefact byte-identical and no
temporary files behind.

Two parts:

* an audit of the source (``ast``): no module writes files except inside a block of the atomic
  helper (``atomic_write`` / ``atomic_path`` / ``atomic_directory``); the few exceptions are in
  an explicit, commented allow-list;
* failure injection through ``graphlora.io.atomic._fail_at`` at *every* checkpoint a real save
  passes (each file and directory stage, for every file written), for ``export_onnx`` (a small
  model and one with external data), ``save_encodings``, ``save_graph_text``, ``save_rules`` and
  ``LoraModel.save_pretrained`` in its three modes. Before the commit point the previous
  artefact must be byte-identical; after it (``*:committed``) the new one must be complete. In
  both cases the parent directory holds no temporary or orphaned file.
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from toy_models import MLP

import graphlora
from graphlora import LoraRule, QuantRule
from graphlora.errors import ExportError
from graphlora.io import atomic
from graphlora.io.atomic import DIRECTORY_STAGES, FILE_STAGES
from graphlora.rules_file import save_rules

PACKAGE = Path(graphlora.__file__).parent
X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))

pytestmark = pytest.mark.filterwarnings("ignore::graphlora.GraphloraWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ============================================================================== 1. source audit
ATOMIC_HELPERS = {"atomic_write", "atomic_path", "atomic_directory", "atomic_write_text"}

# Calls that write (or move, or copy) files, by the last part of their dotted name.
WRITER_CALLS = {
    "write_text", "write_bytes", "touch",  # pathlib
    "save_file",  # safetensors
    "save", "save_model", "save_tensor",  # torch.save, onnx.save(_model), onnx_ir.save, np.save
    "savez", "savez_compressed", "savetxt", "tofile",  # numpy
    "dump",  # json.dump / pickle.dump (to a file; dumps is fine)
    "copy", "copy2", "copyfile", "copytree", "move",  # shutil
    "replace", "rename", "renames", "link", "symlink",  # os (moves are writes too)
    "export_adapter",  # onnxruntime.AdapterFormat
    "to_json_file", "save_pretrained",  # transformers / PEFT objects writing their own files
    "mkstemp", "NamedTemporaryFile",  # temporary files that outlive a call
}
# Bare names (``from x import f``) that write; other bare calls are graphlora's own functions
# (``save_model``, ``rename``, dataclasses' ``replace`` ...), audited where they are defined.
BARE_WRITERS = {"save_file", "copyfile", "copy2", "copytree", "copyfileobj", "mkstemp",
                "NamedTemporaryFile"}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}

# (file relative to the package, writer) -> why it may write outside an atomic block.
ALLOWED = {
    # The atomic helper itself: the one place that opens temporary files and renames them.
    ("io/atomic.py", "*"): "the helper",
    # The helper's lock: an empty lock file created with O_CREAT | O_NOFOLLOW next to the target
    # while a write runs, and removed when it ends (no data is written to it).
    ("io/write_lock.py", "open with ['O_CREAT']"): "the helper's lock file",
    # onnxruntime writes the optimised model itself during session creation when the caller
    # asks for it (a diagnostic for reading what onnxruntime runs, not an artefact graphlora
    # saves); the path is the caller's and the write happens inside onnxruntime's C++ code.
    ("onnx/runtime.py", "optimized_model_filepath"): "onnxruntime diagnostic output",
    # `LoraModel.save_pretrained` forwards to graphlora.checkpoint.save_pretrained (atomic).
    ("model.py", "save_pretrained"): "graphlora's own atomic save",
    ("cli/transform.py", "save_pretrained"): "graphlora's own atomic save",
    ("demo.py", "save_pretrained"): "graphlora's own atomic save",
    ("distributed/saving.py", "save_pretrained"): "graphlora's own atomic save",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    if isinstance(node, ast.Call):
        return _dotted(node.func) + "()"
    return ""


def _open_mode(call: ast.Call, position: int) -> str | None:
    """The mode of an open-like call, '?' when it is not a literal, None when read-only default."""
    mode = None
    if len(call.args) > position:
        mode = call.args[position]
    for kw in call.keywords:
        if kw.arg == "mode":
            mode = kw.value
    if mode is None:
        return None
    if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
        return mode.value
    return "?"


def _writes(mode: str | None) -> bool:
    return mode is not None and (mode == "?" or any(c in mode for c in "wax+"))


class _Audit(ast.NodeVisitor):
    def __init__(self, rel: str):
        self.rel = rel
        self.depth = 0  # nesting inside `with atomic_*(...)` blocks
        self.found: list[tuple[str, int, str]] = []

    def visit_With(self, node: ast.With) -> None:
        atomic_block = any(
            isinstance(item.context_expr, ast.Call)
            and _dotted(item.context_expr.func).rpartition(".")[2] in ATOMIC_HELPERS
            for item in node.items
        )
        self.depth += atomic_block
        self.generic_visit(node)
        self.depth -= atomic_block

    def _flag(self, node: ast.AST, what: str) -> None:
        if self.depth == 0:
            self.found.append((self.rel, node.lineno, what))

    def visit_Call(self, node: ast.Call) -> None:
        name = _dotted(node.func)
        last = name.rpartition(".")[2]
        if name in ("open", "io.open", "os.fdopen", "codecs.open") and _writes(_open_mode(node, 1)):
            self._flag(node, f"{name}(..., mode={_open_mode(node, 1)!r})")
        elif last == "open" and isinstance(node.func, ast.Attribute) and name != "os.open" \
                and _writes(_open_mode(node, 0)):
            self._flag(node, f"{name}(mode={_open_mode(node, 0)!r})")
        elif name == "os.open":
            flags = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)} & WRITE_FLAGS
            if flags:
                self._flag(node, f"os.open with {sorted(flags)}")
        elif isinstance(node.func, ast.Name):
            if name in BARE_WRITERS:  # imported writers: `from safetensors.torch import save_file`
                self._flag(node, name)
        elif last in WRITER_CALLS and not self._harmless(name, last):
            self._flag(node, name)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            if isinstance(target, ast.Attribute) and target.attr == "optimized_model_filepath":
                self._flag(node, "optimized_model_filepath")
        self.generic_visit(node)

    @staticmethod
    def _harmless(name: str, last: str) -> bool:
        # `.replace(` on strings and dataclasses, `copy.copy`, `torch.save`-like names on objects
        # that are not files: only module-level functions and path/file receivers count.
        if last == "replace":
            return name not in ("os.replace", "shutil.replace")
        if last in ("copy", "move"):
            return not name.startswith("shutil.")
        if last == "link":
            return name != "os.link"
        if last == "dump":
            return name not in ("json.dump", "pickle.dump", "yaml.dump", "marshal.dump")
        if last == "save":
            return not (name.startswith(("torch.", "onnx", "ir.", "np.", "numpy.")) or name == "save")
        return False


def _audit() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if (rel, "*") in ALLOWED:
            continue
        visitor = _Audit(rel)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for rel_, line, what in visitor.found:
            key = what.rpartition(".")[2].split("(")[0]
            if (rel_, key) not in ALLOWED:
                found.append((rel_, line, what))
    return found


def test_every_file_write_goes_through_the_atomic_helper():
    offenders = _audit()
    assert offenders == [], "files written outside graphlora/io/atomic.py:\n" + "\n".join(
        f"  graphlora/{rel}:{line}: {what}" for rel, line, what in offenders
    )


def test_the_audit_catches_writes(tmp_path):
    """The audit flags each kind of write it claims to (and not reads, or writes in a block)."""
    source = '''
import json, os, shutil, torch, onnx
from graphlora.io.atomic import atomic_path, atomic_write

def bad(p, obj):
    open(p, "w").write("x")
    p.write_text("x")
    torch.save(obj, p)
    onnx.save(obj, p)
    json.dump(obj, open(p, "w"))
    shutil.copy2(p, p)
    os.replace(p, p)
    os.open(p, os.O_WRONLY | os.O_CREAT)

def good(p, obj):
    open(p).read()
    open(p, "rb").read()
    json.dumps(obj)
    "a".replace("a", "b")
    with atomic_path(p) as tmp:
        torch.save(obj, tmp)
    with atomic_write(p, "w") as fh:
        fh.write(json.dumps(obj))
'''
    visitor = _Audit("example.py")
    visitor.visit(ast.parse(source))
    lines = sorted({line for _, line, _ in visitor.found})
    assert lines == [6, 7, 8, 9, 10, 11, 12, 13], visitor.found


# ============================================================================== 2. failure injection
class Injected(Exception):
    pass


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Relative path -> bytes (None for a directory) of everything under ``root``."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            full = os.path.join(dirpath, f)
            out[os.path.relpath(full, root)] = Path(full).read_bytes()
    return out


def stray(root: Path) -> list[str]:
    """Temporary, staging or backup entries of the atomic helper anywhere under ``root``."""
    return sorted(
        os.path.relpath(os.path.join(d, n), root)
        for d, dirs, files in os.walk(root)
        for n in dirs + files
        if ".graphlora-" in n
    )


def record_stages(write) -> list[str]:
    """The checkpoints one successful ``write()`` passes, in order."""
    seen: list[str] = []
    previous = atomic._fail_at
    atomic._fail_at = seen.append
    try:
        write()
    finally:
        atomic._fail_at = previous
    return seen


def fail_at_event(index: int):
    """A hook raising at the ``index``-th checkpoint (counted over all stages)."""
    count = [0]

    def hook(stage: str) -> None:
        count[0] += 1
        if count[0] - 1 == index:
            raise Injected(f"injected failure at checkpoint #{index} ({stage})")

    return hook


def check_every_stage(monkeypatch, root: Path, write_old, write_new, check_new) -> list[str]:
    """Write the previous artefact, then the new one with a failure injected at each checkpoint
    it passes. Returns the stages exercised (tests assert the expected ones were)."""
    write_old()
    stages = record_stages(write_new)  # a clean run of the new write, to count checkpoints ...
    write_old()  # ... then back to the previous artefact
    before = snapshot(root)
    assert stray(root) == []
    for index, stage in enumerate(stages):
        monkeypatch.setattr(atomic, "_fail_at", fail_at_event(index))
        with pytest.raises(Injected):
            write_new()
        monkeypatch.setattr(atomic, "_fail_at", None)
        assert stray(root) == [], (index, stage)
        if index == _last_commit(stages):
            check_new()  # after the commit point the new artefact is in place, complete
            write_old()
            before = snapshot(root)  # (an external-data file name is fresh on every export)
            continue
        assert snapshot(root) == before, f"checkpoint #{index} ({stage}) changed the previous artefact"
    return stages


def _last_commit(stages: list[str]) -> int:
    """Index of the commit that publishes the artefact: the directory's if there is one, else
    the last file's (files committed inside a staging directory are not yet published)."""
    if "dir:committed" in stages:
        return stages.index("dir:committed")
    return max(i for i, s in enumerate(stages) if s == "file:committed")


# ------------------------------------------------------------------------------ small files
@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    lm = graphlora.transform(
        MLP().eval(),
        [LoraRule(r"layers\.[01]", rank=2, weight_qtype="int4", group_size=8),
         QuantRule(r"layers\.2", weight_qtype="int8")],
        (X,),
    )
    return lm


def _same_keys(a, b) -> None:
    assert sorted(a) == sorted(b)


def test_save_encodings_failure_at_every_stage(quantized, tmp_path, monkeypatch):
    path = tmp_path / "encodings.json"
    other = graphlora.transform(MLP().eval(), [QuantRule(".*", weight_qtype="uint8")], (X,))
    stages = check_every_stage(
        monkeypatch, tmp_path,
        write_old=lambda: graphlora.save_encodings(other, path),
        write_new=lambda: graphlora.save_encodings(quantized, path),
        check_new=lambda: _same_keys(graphlora.load_encodings(path), quantized.encodings()),
    )
    assert stages == list(FILE_STAGES)
    assert sorted(graphlora.load_encodings(path)) == sorted(other.encodings())


def test_save_graph_text_failure_at_every_stage(quantized, tmp_path, monkeypatch):
    path = tmp_path / "model.graph.txt"
    plain = graphlora.trace(MLP().eval(), (X,))

    def check_new():
        assert graphlora.read_graph_text(path) == graphlora.graph_text(quantized)

    stages = check_every_stage(
        monkeypatch, tmp_path,
        write_old=lambda: graphlora.save_graph_text(plain, path),
        write_new=lambda: graphlora.save_graph_text(quantized, path),
        check_new=check_new,
    )
    assert stages == list(FILE_STAGES)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_save_rules_failure_at_every_stage(tmp_path, monkeypatch, suffix):
    from graphlora.rules_file import load_rules

    path = tmp_path / f"rules{suffix}"
    old = [LoraRule(".*", rank=2)]
    new = [LoraRule(r"layers\.0", rank=4, weight_qtype="nf4", group_size=16), QuantRule(".*", weight_qtype="int8")]

    def check_new():
        assert load_rules(path) == new

    stages = check_every_stage(
        monkeypatch, tmp_path,
        write_old=lambda: save_rules(old, path),
        write_new=lambda: save_rules(new, path),
        check_new=check_new,
    )
    assert stages == list(FILE_STAGES)
    assert load_rules(path) == old


# ------------------------------------------------------------------------------ save_pretrained
SAVE_MODES = {
    "adapters": {"only_save_adapters": True},
    "separate": {},
    "merged": {"save_adapters_separately": False},
    "separate-keep-quantized": {"keep_quantized": True},  # codes + quantization config too
}


@pytest.fixture(scope="module")
def lora_pair():
    """Two QLoRA models of the same base with different adapter weights (old and new saves)."""
    torch.manual_seed(0)
    base = MLP().eval()
    models = []
    for seed in (1, 2):
        lm = graphlora.transform(base, [LoraRule(r"layers\.[01]", rank=2, weight_qtype="int4", group_size=8)],
                                 (X,))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lm.lora_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        models.append(lm)
    return models


@pytest.mark.parametrize("mode", sorted(SAVE_MODES))
def test_save_pretrained_failure_at_every_stage(lora_pair, tmp_path, monkeypatch, mode):
    old, new = lora_pair
    target = tmp_path / "ckpt"
    options = SAVE_MODES[mode]

    def write_old():
        old.save_pretrained(target, **options)
        (target / "tokenizer.json").write_text('{"kept": true}')  # a file graphlora does not own

    def check_new():
        fresh = tmp_path.parent / f"{tmp_path.name}-clean"
        new.save_pretrained(fresh, **options)
        expected = snapshot(fresh)
        got = snapshot(target)
        assert got.pop("tokenizer.json") == b'{"kept": true}'
        assert got == expected

    stages = check_every_stage(monkeypatch, tmp_path, write_old, lambda: new.save_pretrained(target, **options),
                               check_new)
    # every directory stage (the target exists: the two-rename window too) and every file stage
    assert [s for s in stages if s.startswith("dir:")] == list(DIRECTORY_STAGES)
    assert set(FILE_STAGES) <= set(stages)
    # the previous save still loads and computes what the old model does
    if mode != "merged":
        again = graphlora.load_adapter(MLP().eval(), target, example_args=(X,))
        assert again.lora_state_dict().keys() == old.lora_state_dict().keys()
        for k, v in old.lora_state_dict().items():
            assert torch.equal(again.lora_state_dict()[k], v)


def test_save_pretrained_into_a_new_directory_leaves_nothing_on_failure(lora_pair, tmp_path, monkeypatch):
    """No previous artefact: a failure before the commit leaves no directory at all."""
    _, new = lora_pair
    target = tmp_path / "fresh"
    stages = record_stages(lambda: new.save_pretrained(target))
    assert "dir:old_moved" not in stages  # one rename, no window
    shutil.rmtree(target)
    for index, stage in enumerate(stages):
        if stage == "dir:committed":
            continue
        monkeypatch.setattr(atomic, "_fail_at", fail_at_event(index))
        with pytest.raises(Injected):
            new.save_pretrained(target)
        monkeypatch.setattr(atomic, "_fail_at", None)
        assert os.listdir(tmp_path) == [], (index, stage)


# ------------------------------------------------------------------------------ export_onnx
def _onnx_files(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("model.onnx"))


@pytest.mark.parametrize("external", [False, True], ids=["single-file", "external-data"])
def test_export_onnx_failure_at_every_stage(quantized, lora_pair, tmp_path, monkeypatch, external):
    """The export writes ``model.onnx`` (and, with external data, ``model.onnx.<token>.data``):
    a failure anywhere keeps the previous pair byte-identical and leaves no new data file."""
    from graphlora.onnx import InferenceSession, export_onnx

    path = tmp_path / "model.onnx"
    old, _ = lora_pair

    def write_old():  # branch: the ONNX model computes exactly what `old` does
        export_onnx(old, path, (X,), lora="branch", external_data=external)

    def write_new():
        export_onnx(quantized, path, (X,), external_data=external)

    def check_new():
        files = _onnx_files(tmp_path)
        assert len(files) == (2 if external else 1), files  # the new model and only its data
        onnx.checker.check_model(str(path), full_check=True)
        got = InferenceSession(path, "cpu", accuracy_level=0).run(None, {"x": X.numpy()})[0]
        assert got.shape == (3, 4)

    stages = check_every_stage(monkeypatch, tmp_path, write_old, write_new, check_new)
    assert stages == list(FILE_STAGES)
    files = _onnx_files(tmp_path)
    assert len(files) == (2 if external else 1), files
    ref = old(X).detach().numpy()
    got = InferenceSession(path, "cpu", accuracy_level=0).run(None, {"x": X.numpy()})[0]
    assert abs(got - ref).max() < 1e-4 * max(1.0, abs(ref).max())


@pytest.mark.parametrize("external", [False, True], ids=["single-file", "external-data"])
def test_export_error_before_or_while_writing_leaves_nothing(quantized, tmp_path, monkeypatch, external):
    """An exception raised inside the export (here: onnx.checker rejecting the model, which
    happens before the single file is written and after the external data is) writes nothing
    and keeps the previous export."""
    from graphlora.onnx import export_onnx

    path = tmp_path / "model.onnx"
    export_onnx(quantized, path, (X,), external_data=external)
    before = snapshot(tmp_path)

    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("injected checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(ExportError, match="injected checker failure"):
        export_onnx(quantized, path, (X,), external_data=external)
    assert snapshot(tmp_path) == before and stray(tmp_path) == []
    # and into an empty directory: nothing at all
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="injected checker failure"):
        export_onnx(quantized, empty / "model.onnx", (X,), external_data=external)
    assert os.listdir(empty) == []
