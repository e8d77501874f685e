"""A transformers-layout safetensors checkpoint read one tensor at a time.

Why not :func:`graphlora.io.safetensors_io.load_state_dict`: that returns every tensor at once,
which is the float model in memory — exactly what QLoRA from a checkpoint must avoid. Here only
the headers are read up front (names, dtypes, shapes: what is needed to check a checkpoint against
a model before any work), and :meth:`LazyCheckpoint.read` then yields the tensors asked for,
shard by shard, with one file open at a time.

Reading goes through ``safetensors.safe_open`` only: the format holds no code, its header is
bounded by the parser, and a tensor is read when it is asked for. The pages of the shard being
read are mapped into the process; a file is reopened after :data:`REMAP_BYTES` of tensor data
so those pages leave the process's resident set instead of adding up to a whole shard, and
the memory of each tensor is returned to the system once the caller is done with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from graphlora.errors import AdapterError, FileFormatError, first_few
from graphlora.io.json_file import read_json
from graphlora.io.safetensors_io import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

__all__ = ["LazyCheckpoint", "TensorEntry", "REMAP_BYTES"]

#: Tensor bytes read from one mapping of a file before it is closed and mapped again.
REMAP_BYTES = 256 * 2**20

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    """What a checkpoint's header says about one tensor."""

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


class LazyCheckpoint:
    """The tensors of a checkpoint directory (``model.safetensors`` or shards with
    ``model.safetensors.index.json``), a single ``.safetensors`` file, or an index file.

    ``entries`` (from the headers) is filled at construction; a checkpoint whose index and shards
    disagree, a missing shard, a corrupt header or a non-PyTorch file is refused there, with a
    :class:`FileFormatError` naming the file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.files = _files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        for file, expected in self.files.items():
            for entry in _header(file):
                if expected is not None and entry.key not in expected:
                    raise FileFormatError(
                        f"{file} holds tensor {entry.key!r}, which the index does not place there; "
                        "the index and the shards disagree"
                    )
                self.entries[entry.key] = entry
            absent = sorted(set(expected or ()) - {k for k, e in self.entries.items() if e.file == file})
            if absent:
                raise FileFormatError(
                    f"{file} lacks {len(absent)} tensor(s) that the index places there: {first_few(absent)}"
                )

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __repr__(self) -> str:
        return f"LazyCheckpoint({str(self.path)!r}, {len(self.entries)} tensors in {len(self.files)} file(s))"

    def where(self, key: str) -> str:
        """The file holding ``key`` (for messages)."""
        entry = self.entries.get(key)
        return str(entry.file) if entry is not None else str(self.path)

    def read(self, keys: Iterable[str], *, progress: bool = True, desc: str = "loading") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for ``keys``, file by file in the checkpoint's order and each
        file's tensors in header order; one file is open at a time, each tensor a copy owned by
        the caller (nothing keeps it alive but the caller)."""
        from safetensors import SafetensorError, safe_open

        wanted = set(keys)
        unknown = sorted(wanted - set(self.entries))
        if unknown:
            raise FileFormatError(f"{self.path}: no tensor(s) {first_few(unknown)} in the checkpoint")
        order = [k for k in self.entries if k in wanted]
        bar = _bar(len(order), desc, progress)
        try:
            for file in self.files:
                todo = [k for k in order if self.entries[k].file == file]
                if not todo:
                    continue
                bar.set_postfix_str(file.name, refresh=False)
                mapped = 0
                handle = None
                try:
                    for key in todo:
                        if handle is None:
                            handle = safe_open(str(file), framework="pt", device="cpu").__enter__()
                        tensor = handle.get_tensor(key)
                        mapped += tensor.numel() * tensor.element_size()
                        if mapped >= REMAP_BYTES:
                            handle.__exit__(None, None, None)
                            handle, mapped = None, 0
                        bar.update(1)
                        yield key, tensor
                        del tensor
                        _release_freed_memory()
                except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                    raise FileFormatError(f"{file}: cannot read tensor data (truncated or corrupt?): {exc}") from exc
                finally:
                    if handle is not None:
                        handle.__exit__(None, None, None)
        finally:
            bar.close()


def _release_freed_memory() -> None:
    """Give the memory of the tensor just processed back to the system (glibc's ``malloc_trim``).

    glibc serves allocations of a size it has freed from its heap afterwards, and keeps freed
    heap memory: a weight read, cast and quantized after another leaves its temporaries behind,
    and the resident set climbs towards the float model the reader exists to avoid (measured on a
    1B Llama: 2.6 GiB instead of 1.5 GiB by the last tensor). Elsewhere than glibc, nothing."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not progress, leave=False)


def _files(path: Path) -> dict[Path, set[str] | None]:
    """The checkpoint's files in order, each with the keys its index places there (None: no index)."""
    if path.is_dir():
        single, index = path / SAFE_WEIGHTS_NAME, path / SAFE_WEIGHTS_INDEX_NAME
        if single.is_file():
            return {single: None}
        if index.is_file():
            return _index(index)
        hint = " (found pickled *.bin weights; graphlora reads safetensors only)" if any(path.glob("*.bin")) else ""
        raise AdapterError(f"no weights in {path}: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}{hint}")
    if not path.is_file():
        raise FileFormatError(f"checkpoint {path} does not exist")
    if path.name.endswith(".json"):
        return _index(path)
    return {path: None}


def _index(index_path: Path) -> dict[Path, set[str] | None]:
    index = read_json(index_path, what="a safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise FileFormatError(
            f"{index_path} is not a safetensors index: expected an object with a 'weight_map' "
            "mapping tensor names to shard file names"
        )
    files: dict[Path, set[str] | None] = {}
    for key, name in weight_map.items():
        if name != os.path.basename(name) or name in ("", ".", ".."):
            raise FileFormatError(f"{index_path} maps {key!r} to {name!r}, which is not a plain file name in its directory")
        keys = files.setdefault(index_path.parent / name, set())
        assert keys is not None
        keys.add(key)
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise FileFormatError(f"shard file(s) {', '.join(missing)} listed in {index_path} are missing from {index_path.parent}")
    return dict(sorted(files.items(), key=lambda item: item[0].name))


def _header(file: Path) -> list[TensorEntry]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            fmt = (fh.metadata() or {}).get("format")
            raw = [(key, fh.get_slice(key)) for key in fh.keys()]
            described = [(key, s.get_dtype(), tuple(int(d) for d in s.get_shape())) for key, s in raw]
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FileFormatError(f"{file} is not a valid safetensors file (truncated or corrupt?): {exc}") from exc
    if fmt is not None and fmt != "pt":
        raise FileFormatError(f"{file} declares format {fmt!r} in its metadata; graphlora reads PyTorch ('pt') weights only")
    entries = []
    for key, dtype, shape in described:
        if dtype not in _DTYPES:
            raise FileFormatError(f"{file}: tensor {key!r} has dtype {dtype}, which graphlora does not read")
        entries.append(TensorEntry(key, file, _DTYPES[dtype], shape))
    return entries
