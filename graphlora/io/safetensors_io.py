"""Save and load plain state dicts as (sharded) safetensors, in the layout transformers uses.

Why this layout: a directory holding ``config.json`` plus ``model.safetensors`` — or
``model-00001-of-0000N.safetensors`` shards with ``model.safetensors.index.json`` — is what
``transformers.AutoModel.from_pretrained`` loads, so a merged graphlora model is an ordinary
Hugging Face checkpoint.

Format facts this module follows (from transformers 5 / huggingface_hub):

* every file's header metadata is ``{"format": "pt"}``; transformers refuses files without it;
* shards are filled greedily in state-dict order, as ``huggingface_hub`` splits them; a tensor
  larger than the limit gets a shard of its own; shards are named
  ``<stem>-<i:05d>-of-<n:05d>.safetensors`` (1-based);
* the index is ``{"metadata": {"total_size": <bytes of tensor data>}, "weight_map": {key: file}}``
  written with ``indent=2, sort_keys=True`` and a trailing newline;
* size strings follow ``transformers.utils.hub.convert_file_size_to_int``: ``"5GB"`` is
  5 * 10**9 bytes (decimal), ``"5GiB"`` is 5 * 2**30; a *lower-case* trailing ``b`` means bits
  (``"5Mb"`` is 625000 bytes).

Shared tensors: safetensors refuses to save two keys backed by the same memory (tied embeddings,
views). transformers drops the tied copy using the model's ``_tied_weights_keys``; this module
knows no model, so by default (``shared="clone"``) it writes every key, giving later aliases their
own copy — the file is larger but loads into any model, tied or not. ``shared="dedupe"`` instead
drops keys that are exact aliases (same storage, offset, shape, strides, dtype) of an earlier key —
or of a key not listed in ``drop`` — and reports them; only use it when the loading model re-ties
those weights itself (as ``from_pretrained`` does for e.g. ``lm_head.weight``). Partially
overlapping views are always cloned. Non-contiguous tensors are made contiguous.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from graphlora.errors import AdapterError, FileFormatError, InputError
from graphlora.io.atomic import TargetNotADirectoryError, atomic_directory, atomic_path, atomic_write
from graphlora.io.json_file import read_json

__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "SavedWeights",
    "load_state_dict",
    "parse_size",
    "plan_shards",
    "read_safetensors",
    "save_state_dict",
    "write_json",
    "write_safetensors",
    "write_state_dict",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_METADATA = {"format": "pt"}


# ---------------------------------------------------------------------------------------------
# sizes and shard planning


def parse_size(size: int | str) -> int:
    """Bytes for ``size``: an int, or ``"<int><unit>"`` with unit GiB/MiB/KiB (binary) or GB/MB/KB
    (decimal), exactly as ``transformers.utils.hub.convert_file_size_to_int`` reads it (so the same
    ``max_shard_size`` shards the same way), including its quirk that a trailing lower-case ``b``
    means bits. Refuses non-positive sizes."""
    if isinstance(size, bool):
        raise InputError("max_shard_size must be an int or a string such as '5GB', not a bool")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        text = size.strip()
        upper = text.upper()
        binary = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10}
        decimal = {"GB": 10**9, "MB": 10**6, "KB": 10**3}
        value = None
        try:
            for unit, factor in binary.items():
                if upper.endswith(unit):
                    value = int(text[: -len(unit)]) * factor
                    break
            else:
                for unit, factor in decimal.items():
                    if upper.endswith(unit):
                        value = int(text[: -len(unit)]) * factor
                        if text.endswith("b"):
                            value //= 8
                        break
        except ValueError:
            value = None
        if value is None:
            raise InputError(
                f"max_shard_size {size!r} is not in a valid format: use an int (bytes) or an integer "
                "followed by GB/MB/KB (10**9/10**6/10**3 bytes) or GiB/MiB/KiB (2**30/2**20/2**10), e.g. '5GB'"
            )
    else:
        raise InputError(f"max_shard_size must be an int or a str such as '5GB', not {type(size).__name__}")
    if value <= 0:
        raise InputError(f"max_shard_size must be positive, got {size!r}")
    return value


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _shard_names(weights_name: str, count: int) -> list[str]:
    stem, dot, ext = weights_name.rpartition(".")
    if not dot:
        stem, ext = weights_name, ""
    suffix = f".{ext}" if ext else ""
    if count == 1:
        return [weights_name]
    return [f"{stem}-{i:05d}-of-{count:05d}{suffix}" for i in range(1, count + 1)]


def plan_shards(
    sizes: Mapping[str, int], max_shard_size: int | str, weights_name: str = SAFE_WEIGHTS_NAME
) -> dict[str, list[str]]:
    """Assign keys (in the mapping's order) to shard files exactly as huggingface_hub does, so a
    given ``max_shard_size`` splits the same way as ``save_pretrained``: close the current shard
    when the next tensor would push it past the limit; a tensor bigger than the limit is emitted
    as a shard of its own immediately (the current shard keeps filling). Returns
    ``{filename: [keys]}``; a single entry named ``weights_name`` when everything fits."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for key, size in sizes.items():
        if size > limit:
            shards.append([key])
            continue
        if current and current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    if current or not shards:
        shards.append(current)
    names = _shard_names(weights_name, len(shards))
    return dict(zip(names, shards))


# ---------------------------------------------------------------------------------------------
# preparing tensors (aliases, contiguity)


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (NotImplementedError, RuntimeError):  # pragma: no cover - exotic tensor subclasses
        return None
    if storage.nbytes() == 0 or storage.data_ptr() == 0:
        return None
    return (str(tensor.device), storage.data_ptr())


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _prepare(
    state_dict: Mapping[str, torch.Tensor],
    shared: Literal["clone", "dedupe"],
    drop: Iterable[str],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Detached, contiguous, alias-free tensors in the original key order, plus
    ``{dropped_key: kept_key}`` for ``shared="dedupe"``."""
    if shared not in ("clone", "dedupe"):
        raise ValueError(f"shared must be 'clone' or 'dedupe', not {shared!r}")
    drop_set = set(drop)
    groups: dict[tuple[str, int], list[str]] = {}
    for key, tensor in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state dict keys must be str, got {key!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict value for {key!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.device.type == "meta":
            raise ValueError(f"{key!r} is on the meta device and has no data to save")
        if tensor.layout != torch.strided:
            raise ValueError(f"{key!r} has layout {tensor.layout}; only dense tensors can be saved")
        skey = _storage_key(tensor)
        if skey is not None:
            groups.setdefault(skey, []).append(key)

    dropped: dict[str, str] = {}
    needs_clone: set[str] = set()
    for keys in groups.values():
        if len(keys) < 2:
            continue
        if shared == "clone":
            needs_clone.update(keys[1:])
            continue
        keepers = [k for k in keys if k not in drop_set] or keys
        kept: list[str] = []
        for key in sorted(keys, key=lambda k: (k not in keepers, keys.index(k))):
            twin = next((k for k in kept if _same_view(state_dict[k], state_dict[key])), None)
            if twin is not None:
                dropped[key] = twin
            elif kept:
                needs_clone.add(key)  # overlaps (or merely shares storage with) a kept tensor
                kept.append(key)
            else:
                kept.append(key)

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in dropped:
            continue
        tensor = tensor.detach()
        if key in needs_clone:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        out[key] = tensor.contiguous()
    return out, dropped


# ---------------------------------------------------------------------------------------------
# writing


@dataclass(frozen=True)
class SavedWeights:
    """What :func:`write_state_dict` wrote: file names (relative to the directory), the index
    (``None`` when unsharded), total tensor bytes and aliases dropped by ``shared="dedupe"``."""

    directory: Path
    files: list[str]
    weight_map: dict[str, str]
    total_size: int
    index_file: str | None = None
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def is_sharded(self) -> bool:
        return self.index_file is not None


def write_json(path: str | os.PathLike[str], obj: object) -> None:
    """Write ``obj`` as JSON (indent 2, sorted keys, trailing newline) through :func:`atomic_write`."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    shared: Literal["clone", "dedupe"] = "clone",
) -> dict[str, str]:
    """Write one safetensors file atomically; metadata defaults to ``{"format": "pt"}`` (and
    ``"format": "pt"`` is always set). Returns the aliases dropped (``shared="dedupe"``)."""
    from safetensors.torch import save_file

    prepared, dropped = _prepare(tensors, shared, ())
    meta = {**DEFAULT_METADATA, **(dict(metadata) if metadata else {}), "format": "pt"}
    with atomic_path(path) as tmp:
        save_file(prepared, str(tmp), metadata=meta)
    return dropped


def _is_weights_file(name: str, weights_name: str) -> bool:
    stem, _, ext = weights_name.rpartition(".")
    shard = re.compile(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.{re.escape(ext)}")
    return name in (weights_name, f"{weights_name}.index.json") or shard.fullmatch(name) is not None


def write_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    shared: Literal["clone", "dedupe"] = "clone",
    drop: Iterable[str] = (),
    weights_name: str = SAFE_WEIGHTS_NAME,
    metadata: Mapping[str, str] | None = None,
) -> SavedWeights:
    """Write ``state_dict`` into an existing ``directory`` as ``weights_name`` or as shards plus an
    index, deleting weight files of the same name family left by an earlier save (stale shards
    would otherwise be loaded). Each file is written atomically, but the set is not: use
    :func:`save_state_dict` (or wrap in :func:`atomic_directory`) for an all-or-nothing save."""
    if not weights_name.endswith(".safetensors"):
        raise ValueError(f"weights_name must end in .safetensors, got {weights_name!r}")
    root = Path(directory)
    if not root.is_dir():
        raise TargetNotADirectoryError(f"{root} is not a directory")
    prepared, dropped = _prepare(state_dict, shared, drop)
    sizes = {key: _nbytes(t) for key, t in prepared.items()}
    plan = plan_shards(sizes, max_shard_size, weights_name)
    meta = {**DEFAULT_METADATA, **(dict(metadata) if metadata else {}), "format": "pt"}

    from safetensors.torch import save_file

    for filename, keys in plan.items():
        with atomic_path(root / filename) as tmp:
            save_file({k: prepared[k] for k in keys}, str(tmp), metadata=meta)
    weight_map = {key: filename for filename, keys in plan.items() for key in keys}
    total = sum(sizes.values())
    index_name = f"{weights_name}.index.json"
    sharded = len(plan) > 1
    if sharded:
        write_json(root / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map})
    written = set(plan) | ({index_name} if sharded else set())
    for entry in os.listdir(root):
        if entry not in written and _is_weights_file(entry, weights_name):
            (root / entry).unlink()
    return SavedWeights(
        directory=root,
        files=list(plan),
        weight_map=weight_map,
        total_size=total,
        index_file=index_name if sharded else None,
        dropped=dropped,
    )


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    shared: Literal["clone", "dedupe"] = "clone",
    drop: Iterable[str] = (),
    weights_name: str = SAFE_WEIGHTS_NAME,
    metadata: Mapping[str, str] | None = None,
) -> SavedWeights:
    """Save ``state_dict`` into ``directory`` all-or-nothing (via :func:`atomic_directory`).

    Other files already in ``directory`` (``config.json``, tokenizer files, an adapter) are kept;
    weight files of the ``weights_name`` family from an earlier save are replaced. On any error the
    directory is left exactly as it was. See the module docstring for sharding and shared tensors.
    """
    root = Path(directory)
    with atomic_directory(root, keep=lambda name: not _is_weights_file(name, weights_name)) as tmp:
        saved = write_state_dict(
            state_dict,
            tmp,
            max_shard_size=max_shard_size,
            shared=shared,
            drop=drop,
            weights_name=weights_name,
            metadata=metadata,
        )
    return SavedWeights(
        directory=root,
        files=saved.files,
        weight_map=saved.weight_map,
        total_size=saved.total_size,
        index_file=saved.index_file,
        dropped=saved.dropped,
    )


# ---------------------------------------------------------------------------------------------
# reading


def read_safetensors(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read one safetensors file; return ``(tensors, header_metadata)``.

    Raises :class:`FileFormatError` naming the file when it is missing, truncated or corrupt, or
    when its metadata declares a framework other than PyTorch (``format`` other than ``"pt"``).
    """
    from safetensors import SafetensorError, safe_open

    file = Path(path)
    if not file.is_file():
        raise FileFormatError(f"safetensors file {file} does not exist")
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FileFormatError(
            f"{file} is not a valid safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    fmt = metadata.get("format")
    if fmt is not None and fmt != "pt":
        raise FileFormatError(
            f"{file} declares format {fmt!r} in its metadata; graphlora reads PyTorch ('pt') "
            "weights only"
        )
    return tensors, metadata


def _load_index(index_path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    index = read_json(index_path, what="a safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FileFormatError(
            f"{index_path} is not a safetensors index: expected an object with a 'weight_map' "
            "mapping tensor names to shard file names"
        )
    by_file: dict[str, list[str]] = {}
    for key, filename in weight_map.items():
        if filename != os.path.basename(filename) or filename in ("", ".", ".."):
            raise FileFormatError(
                f"{index_path} maps {key!r} to {filename!r}, which is not a plain file name in the "
                "checkpoint directory"
            )
        by_file.setdefault(filename, []).append(key)
    root = index_path.parent
    missing_files = [name for name in by_file if not (root / name).is_file()]
    if missing_files:
        raise FileFormatError(
            f"shard file(s) {', '.join(missing_files)} listed in {index_path} are missing from {root}"
        )
    out: dict[str, torch.Tensor] = {}
    for filename, keys in by_file.items():
        tensors, _ = read_safetensors(root / filename, device=device)
        absent = [k for k in keys if k not in tensors]
        if absent:
            raise FileFormatError(
                f"{root / filename} lacks {len(absent)} tensor(s) that {index_path.name} places "
                f"there: {_preview(absent)}"
            )
        extra = [k for k in tensors if weight_map.get(k) != filename]
        if extra:
            raise FileFormatError(
                f"{root / filename} holds tensor(s) that {index_path.name} does not place there: "
                f"{_preview(extra)}; the index and the shards disagree"
            )
        out.update(tensors)
    return {key: out[key] for key in weight_map}


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_state_dict(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    weights_name: str = SAFE_WEIGHTS_NAME,
) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.safetensors`` file, a ``*.safetensors.index.json`` index, or a
    directory holding ``weights_name`` (preferred, as transformers does) or its index.

    Validates everything it reads; errors are :class:`FileFormatError` naming the file (truncated or
    corrupt shard, missing shard, invalid JSON, index keys absent from their shard) or
    :class:`AdapterError` when a directory holds no weights at all.
    """
    p = Path(path)
    if p.is_dir():
        single, index = p / weights_name, p / f"{weights_name}.index.json"
        if single.is_file():
            return read_safetensors(single, device=device)[0]
        if index.is_file():
            return _load_index(index, device)
        raise AdapterError(
            f"no weights in {p}: expected {weights_name} or {index.name}"
            + (" (found a pytorch_model.bin; graphlora reads safetensors only)"
               if (p / "pytorch_model.bin").exists() else "")
        )
    if p.name.endswith(".json"):
        return _load_index(p, device)
    return read_safetensors(p, device=device)[0]
