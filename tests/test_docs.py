"""Every code block in the docs runs, so the docs cannot drift from the code.

For each ``docs/*.md`` and ``README.md`` (one test per file), fenced blocks run in document order
in a fresh temporary working directory:

* ```` ```python ```` blocks are executed in one namespace per file (a fresh module), so later
  blocks use what earlier ones defined. The code runs as if from a copy of the page in the
  temporary directory, so tracebacks point at the page's own line numbers.
* ```` ```bash ```` blocks run only when marked: ```` ```bash run ```` or ``<!-- run -->`` on the
  line before the fence. They run with ``bash -euo pipefail`` in the same directory, with this
  interpreter's ``bin`` first on ``PATH`` (so ``graphlora`` and ``python`` are the ones under test).
* A block whose info string has ``file=NAME`` (```` ```toml file=rules.toml ````) is written to
  ``NAME`` instead of being executed, e.g. a rules file or a module a later block imports.
* ```` ```python no-run ```` or ``<!-- no-run -->`` on the line before skips a block. Use it
  sparingly: for what cannot run here (``torchrun`` launches, GPUs, downloads), never to hide a
  broken example.
* ``<!-- docs-timeout: N -->`` anywhere in a file sets its time limit in seconds (default
  :data:`DEFAULT_TIMEOUT`).

The conventions are documented for doc writers in ``docs/README.md``.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
DEFAULT_TIMEOUT = 300
PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<what>no-run|run)\s*-->\s*$")
_TIMEOUT = re.compile(r"<!--\s*docs-timeout:\s*(\d+)\s*-->")


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, flags and where its code starts in the file (1-based)."""

    lang: str
    flags: frozenset[str]
    file: str | None
    line: int
    code: str

    @property
    def action(self) -> str:
        """``write``, ``python``, ``shell`` or ``skip``."""
        if self.file:
            return "write"
        if "no-run" in self.flags:
            return "skip"
        if self.lang in PYTHON_LANGS:
            return "python"
        if self.lang in SHELL_LANGS and "run" in self.flags:
            return "shell"
        return "skip"


def extract_blocks(text: str, source: str = "<doc>") -> list[Block]:
    """The fenced code blocks of a Markdown text, with marker comments folded into their flags."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match.group("indent"), match.group("fence"), match.group("info").strip()
        words = info.split()
        lang = words[0].lower() if words else ""
        flags = {w for w in words[1:] if "=" not in w}
        options = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        marker = _previous_marker(lines, i)
        if marker:
            flags.add(marker)
        start = i + 1
        end = start
        while end < len(lines) and not _closes(lines[end], fence):
            end += 1
        if end == len(lines):
            raise ValueError(f"{source}:{i + 1}: the {fence}{lang} block is never closed")
        body = [_strip_indent(line, indent) for line in lines[start:end]]
        blocks.append(Block(lang, frozenset(flags), options.get("file"), start + 1, "\n".join(body) + "\n"))
        i = end + 1
    return blocks


def _previous_marker(lines: list[str], fence_index: int) -> str | None:
    j = fence_index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    match = _MARKER.match(lines[j]) if j >= 0 else None
    return match.group("what") if match else None


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}


def _strip_indent(line: str, indent: str) -> str:
    return line[len(indent):] if line.startswith(indent) else line.lstrip()


def doc_files() -> list[Path]:
    files = sorted(DOCS.glob("*.md"))
    readme = REPO / "README.md"
    return files + ([readme] if readme.is_file() else [])


def _timeout(path: Path) -> int:
    match = _TIMEOUT.search(path.read_text(encoding="utf-8"))
    return int(match.group(1)) if match else DEFAULT_TIMEOUT


def _params() -> list:
    return [
        pytest.param(path, id=str(path.relative_to(REPO)),
                     marks=[pytest.mark.timeout(_timeout(path)), pytest.mark.slow])
        for path in doc_files()
    ]


def _shell_env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), PYTHONPATH=pythonpath,
                HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


def _run_python(block: Block, path: Path, module: types.ModuleType) -> None:
    # pad with newlines so the compiled code's line numbers are the Markdown file's line numbers
    code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
    exec(code, module.__dict__)


def _run_shell(block: Block, path: Path, deadline: float) -> None:
    try:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.code],
            env=_shell_env(),
            capture_output=True,
            text=True,
            timeout=max(1.0, deadline - time.monotonic()),
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{path.name}:{block.line}: bash block timed out") from exc
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{path.name}:{block.line}: bash block exited {proc.returncode}\n--- stdout\n{proc.stdout}"
            f"--- stderr\n{proc.stderr}"
        )


def run_doc(path: Path, workdir: Path) -> int:
    """Run one Markdown file's blocks in ``workdir``; returns how many blocks ran or were written."""
    text = path.read_text(encoding="utf-8")
    blocks = extract_blocks(text, str(path))
    deadline = time.monotonic() + _timeout(path)
    # the code "lives" in a copy inside workdir: tracebacks show the page's lines, and helpers that
    # resolve paths against the calling file (snapshot_dir=...) stay inside the temporary directory
    source = workdir / path.name
    if source != path:
        source.write_text(text, encoding="utf-8")
    name = "docs_" + re.sub(r"\W", "_", path.stem)
    module = types.ModuleType(name)
    module.__file__ = str(workdir / f"{name}.py")
    sys.modules[name] = module  # dataclasses and pickling look classes' modules up by name
    done = 0
    try:
        for block in blocks:
            action = block.action
            if action == "write":
                target = workdir / block.file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.code, encoding="utf-8")
            elif action == "python":
                _run_python(block, source, module)
            elif action == "shell":
                _run_shell(block, path, deadline)
            else:
                continue
            done += 1
    finally:
        sys.modules.pop(name, None)
    return done


@pytest.mark.parametrize("path", _params())
def test_doc_code_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # modules a doc writes (file=...) are importable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_doc(path, tmp_path)


# ------------------------------------------------------------------------------ the harness itself


def test_extract_blocks_flags_markers_and_files():
    text = "\n".join([
        "# Title",
        "```python",
        "x = 1",
        "```",
        "<!-- no-run -->",
        "",
        "```python",
        "launch()",
        "```",
        "```python no-run",
        "launch()",
        "```",
        "```bash",
        "echo not run",
        "```",
        "<!-- run -->",
        "```bash",
        "echo run",
        "```",
        "```toml file=conf/rules.toml",
        "[[rules]]",
        "```",
        "1. a list item:",
        "   ````python",
        "   y = x + 1",
        "   ```",
        "   ````",
    ])
    blocks = extract_blocks(text)
    assert [(b.lang, b.action, b.line) for b in blocks] == [
        ("python", "python", 3),
        ("python", "skip", 8),
        ("python", "skip", 11),
        ("bash", "skip", 14),
        ("bash", "shell", 18),
        ("toml", "write", 21),
        ("python", "python", 25),
    ]
    assert blocks[5].file == "conf/rules.toml"
    assert blocks[6].code == "y = x + 1\n```\n"  # a shorter fence inside a longer one is content


def test_unclosed_fence_is_an_error():
    with pytest.raises(ValueError, match="doc.md:2: the ```python block is never closed"):
        extract_blocks("text\n```python\nx = 1\n", "doc.md")


def test_run_doc_shares_one_namespace_writes_files_and_reports_doc_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = tmp_path / "example.md"
    doc.write_text("\n".join([
        "```python file=helper.py",
        "VALUE = 41",
        "```",
        "```python",
        "import helper",
        "value = helper.VALUE",
        "```",
        "text between",
        "```python",
        "assert value + 1 == 42",
        "```",
        "<!-- run -->",
        "```bash",
        "test -f helper.py && echo shell-ok",
        "```",
        "```python",
        "raise RuntimeError('boom')",
        "```",
    ]) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="boom") as info:
        run_doc(doc, tmp_path)
    frame = info.traceback[-1]
    assert Path(str(frame.path)).name == "example.md" and frame.lineno + 1 == 17  # pytest's lineno is 0-based
    sys.modules.pop("helper", None)


def test_failing_shell_block_shows_its_output(tmp_path):
    doc = tmp_path / "shell.md"
    doc.write_text("```bash run\necho about to fail\nfalse\n```\n")
    with pytest.raises(AssertionError, match=r"shell.md:2: bash block exited 1[\s\S]*about to fail"):
        run_doc(doc, tmp_path)


# ------------------------------------------------------------------------------ API reference


def plain_signature(name: str, obj: object) -> str:
    """``name(a, b=1, *, c=None)``: parameters and defaults, no annotations (they are long and
    change with typing style), private dataclass fields left out. Exceptions: ``class E(Bases)``."""
    if isinstance(obj, type) and issubclass(obj, (BaseException, Warning)):
        return f"class {name}({', '.join(b.__name__ for b in obj.__bases__)})"
    parts: list[str] = []
    star = False
    params = list(inspect.signature(obj).parameters.values())
    if "." in name and inspect.isfunction(obj) and params and params[0].name == "self":
        params = params[1:]  # a method documented as Class.method(...)
    for p in params:
        if p.name.startswith("_"):
            continue
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                parts.append("*")
                star = True
            parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"{name}({', '.join(parts)})"


def _api_entries() -> dict[str, str]:
    """``### `name` `` headings of docs/api.md and the text of the first block after each."""
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    entries: dict[str, str] = {}
    for match in re.finditer(r"^###\s+`([\w.]+)`\s*$", text, flags=re.M):
        rest = text[match.end():]
        block = re.search(r"```\w*\n(.*?)```", rest, flags=re.S)
        following_heading = re.search(r"^#{1,3}\s", rest, flags=re.M)
        if block and (not following_heading or block.start() < following_heading.start()):
            entries[match.group(1)] = block.group(1)
        else:
            entries[match.group(1)] = ""
    return entries


def _resolve(dotted: str) -> object:
    """``graphlora.<dotted>``, importing submodules (``rules_file.load_rules``) on the way."""
    import importlib

    import graphlora

    obj: object = graphlora
    prefix = "graphlora"
    for part in dotted.split("."):
        prefix = f"{prefix}.{part}"
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(prefix)  # ModuleNotFoundError when it does not exist
    return obj


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_every_public_name_is_in_the_api_reference():
    import graphlora

    documented = _api_entries()
    missing = [name for name in graphlora.__all__ if name not in documented]
    assert not missing, f"docs/api.md has no '### `name`' section for: {', '.join(missing)}"


def test_api_reference_signatures_match_the_code():
    """Every documented signature is the real one (so a changed default shows up here)."""
    wrong = []
    for name, block in _api_entries().items():
        try:
            obj = _resolve(name)
        except (AttributeError, ImportError):
            wrong.append(f"{name}: not found in graphlora")
            continue
        if not callable(obj):
            continue
        expected = plain_signature(name, obj)
        if _squash(expected) not in _squash(block):
            wrong.append(f"{name}: expected\n    {expected}")
    assert not wrong, "docs/api.md signatures out of date:\n" + "\n".join(wrong)


def test_every_cli_subcommand_is_in_the_cli_reference():
    from graphlora.cli import app as cli

    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    missing = [name for name in cli._SUBCOMMANDS if f"## `graphlora {name}" not in text]
    assert not missing, f"docs/cli.md has no '## `graphlora NAME ...`' section for: {', '.join(missing)}"
