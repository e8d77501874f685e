"""Building blocks of the hostile-input suite (tests/test_hostile_*.py, issue 17).

* pickles and archives armed with a payload that writes a marker file when unpickled — the tests
  first prove that the plain loader *does* run it, then that graphlora's readers never do;
* a forked child that crashes (``os._exit``) right before or after the n-th rename of a save, and
  forked writers running at the same time;
* small helpers to list hidden leftovers next to a target.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import torch
from test_io_atomic import snapshot as tree  # noqa: F401 - every entry under a directory


class Payload:
    """Unpickling this runs ``code`` (``exec`` is what a real attack would call)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('payload ran')"


def armed_pickle(marker: Path) -> bytes:
    """``torch.save`` bytes whose unpickling writes ``marker``."""
    buffer = io.BytesIO()
    torch.save(Payload(marker_code(marker)), buffer)
    return buffer.getvalue()


def armed_pt2(path: Path, marker: Path) -> Path:
    """A real ``torch.export.save`` archive of a tiny module whose first weight is replaced by a
    pickle that writes ``marker`` (the archive format allows pickled weights: ``use_pickle``)."""
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),), strict=False)
    clean = path.with_name(path.name + ".clean")
    torch.export.save(program, clean)
    with zipfile.ZipFile(clean) as src:
        entries = [(info, src.read(info.filename)) for info in src.infolist()]
    config = json.loads(next(data for info, data in entries if info.filename.endswith("model_weights_config.json")))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    with zipfile.ZipFile(path, "w") as dst:
        for info, data in entries:
            if info.filename.endswith("model_weights_config.json"):
                data = json.dumps(config).encode()
            elif info.filename.endswith(f"weights/{first['path_name']}"):
                data = armed_pickle(marker)
            dst.writestr(info, data)
    clean.unlink()
    return path


def leftovers(parent: Path) -> list[str]:
    """graphlora's hidden entries (temporary, staging, backup, lock) in ``parent``."""
    return sorted(n for n in os.listdir(parent) if ".graphlora-" in n)


def crash_at_rename(when: str, n: int, action) -> bool:
    """Run ``action()`` in a forked child that exits abruptly (``os._exit``, like SIGKILL: no
    cleanup, no ``finally``) right before or after its n-th ``os.rename``/``os.replace``.
    Returns True if it crashed, False if the action made fewer than n renames."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            count = [0]

            def counted(real):
                def rename(src, dst, *args, **kwargs):
                    count[0] += 1
                    if when == "before" and count[0] == n:
                        os._exit(17)
                    real(src, dst, *args, **kwargs)
                    if when == "after" and count[0] == n:
                        os._exit(17)

                return rename

            os.rename, os.replace = counted(os.rename), counted(os.replace)
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 17), status
    return os.WEXITSTATUS(status) == 17


def in_children(*actions) -> list[int]:
    """Run each action in its own forked process at the same time; their exit codes (0: the
    action returned, 1: it raised)."""
    pids = []
    for action in actions:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                action()
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    codes = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        codes.append(os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1)
    return codes
