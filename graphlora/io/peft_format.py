"""The PEFT LoRA adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Why exact: users load graphlora adapters with ``peft.PeftModel.from_pretrained`` or
``transformers``' ``model.load_adapter`` and hand PEFT adapters to graphlora. Both directions must
give the same numbers, so this module mirrors PEFT 0.21's file format (it does not import PEFT:
reading and writing work without it). The config file — its fields, its validation and PEFT's
name-matching rules — is :mod:`graphlora.io.peft_config`; this module holds the weights and reads
and writes the pair.

File format
-----------
* Tensor keys: ``base_model.model.<module path>.lora_A.weight`` with shape ``(rank, in_features)``
  and ``...lora_B.weight`` with shape ``(out_features, rank)``; header metadata ``{"format": "pt"}``.
  PEFT strips the adapter name when saving; ``...lora_A.<adapter>.weight`` is accepted on read.
  The shapes do not depend on ``fan_in_fan_out`` (a transformers ``Conv1D`` stores its weight as
  ``(in, out)``, but its LoRA factors are still ``(r, in)`` / ``(out, r)``); the flag only says how
  ``B @ A`` lines up with the base weight when merging.
* Embeddings (PEFT's ``lora.Embedding``): ``...<path>.lora_embedding_A`` ``(rank, num_embeddings)``
  and ``...lora_embedding_B`` ``(dim, rank)``, bare parameters (no ``.weight``), delta
  ``(B @ A).T``. Convolutions: ``lora_A.weight`` ``(rank, in, *kernel)`` and ``lora_B.weight``
  ``(out, rank / groups, 1, ...)``, the layers PEFT's ``lora.Conv1d/2d/3d`` hold.
* ``target_parameters`` (stacked expert weights, PEFT's ``lora.ParamWrapper``): ``lora_A.weight``
  ``(rank * E, in)`` / ``lora_B.weight`` ``(out, rank * E)`` under the wrapper path
  (:func:`graphlora.io.peft_keys.wrapper_paths`); a module of the file is then the parameter.
* Scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphlora.errors import AdapterError, FileFormatError, UnsafeFileError
from graphlora.io.atomic import atomic_directory
from graphlora.io.peft_config import (
    ADAPTER_CONFIG_NAME,
    build_adapter_config,
    peft_selects,
    read_adapter_config,
    resolve_pattern,
)
from graphlora.io.peft_keys import (
    BASE_LAYER_SUFFIX,
    EMBEDDING_FACTORS,
    MAGNITUDE_KEY,
    PEFT_KEY_PREFIX,
    lora_keys,
    parameter_owner,
    parse_embedding_key,
    parse_lora_key,
    parse_magnitude_key,
    peft_embedding_keys,
    peft_lora_keys,
    peft_magnitude_key,
    targets_parameters_of,
)
from graphlora.io.safetensors_io import read_safetensors, write_json, write_safetensors
from graphlora.patterns import PatternSet
from graphlora.scaling import lora_scale
from graphlora.validate import check_lora_factor

__all__ = [
    "EMBEDDING_FACTORS",
    "MAGNITUDE_KEY",
    "ADAPTER_FILES",
    "ADAPTER_LEGACY_WEIGHTS_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_KEY_PREFIX",
    "LoraAdapter",
    "LoraModule",
    "check_adapter_shapes",
    "check_shapes",
    "lora_keys",
    "lora_shapes",
    "parse_embedding_key",
    "parameter_owner",
    "parse_magnitude_key",
    "peft_embedding_keys",
    "peft_magnitude_key",
    "parse_lora_key",
    "peft_lora_keys",
    "read_adapter",
    "save_adapter",
    "write_adapter",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_LEGACY_WEIGHTS_NAME = "adapter_model.bin"
#: Every file an adapter directory holds (what a save replaces, what carrying over skips).
ADAPTER_FILES = frozenset({ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_LEGACY_WEIGHTS_NAME})
def lora_shapes(
    rank: int, in_features: int, out_features: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of ``(lora_A, lora_B)``: ``(rank, in_features)`` and ``(out_features, rank)``."""
    return (rank, in_features), (out_features, rank)


def _shape(value: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(int(v) for v in value)


def check_shapes(
    expected: Mapping[str, Sequence[int]],
    found: Mapping[str, torch.Tensor | Sequence[int]],
    *,
    source: str = "adapter",
    limit: int = 5,
) -> None:
    """Raise :class:`AdapterError` unless ``found`` has exactly the keys of ``expected`` with the
    expected shapes. The message names up to ``limit`` offending keys per kind (missing,
    unexpected, wrong shape with expected vs found) and counts the rest."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        (k, tuple(expected[k]), _shape(found[k]))
        for k in expected
        if k in found and tuple(expected[k]) != _shape(found[k])
    ]
    if not (missing or unexpected or wrong):
        return

    def more(items: list[Any]) -> str:
        return f"; ... and {len(items) - limit} more" if len(items) > limit else ""

    parts = []
    if wrong:
        shown = "; ".join(f"{k}: expected {list(e)}, found {list(f)}" for k, e, f in wrong[:limit])
        parts.append(f"{len(wrong)} shape mismatch(es): {shown}{more(wrong)}")
    if missing:
        parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:limit])}{more(missing)}")
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:limit])}{more(unexpected)}"
        )
    raise AdapterError(
        f"{source} does not fit the model: " + " | ".join(parts)
        + ". Was it trained on a different base model or with other target modules?"
    )


def check_adapter_shapes(
    adapter: LoraAdapter | Mapping[str, LoraModule],
    expected: Mapping[str, Sequence[int]],
    *,
    limit: int = 5,
) -> None:
    """Check an adapter against the model: ``expected`` maps module path to ``(in, out)`` (any rank),
    ``(rank, in, out)``, or the two factor shapes ``((A shape), (B shape))`` (a convolution's).
    Raises :class:`AdapterError` naming keys ``<path>.lora_A.weight`` /
    ``<path>.lora_B.weight`` with expected vs found shapes, missing and unexpected modules."""
    modules = adapter.modules if isinstance(adapter, LoraAdapter) else adapter
    want: dict[str, tuple[int, ...]] = {}
    for path, dims in expected.items():
        if len(dims) == 2 and all(isinstance(d, (tuple, list)) for d in dims):
            a_key, b_key = lora_keys(path)
            want[a_key], want[b_key] = (tuple(int(d) for d in dims[0]), tuple(int(d) for d in dims[1]))
            continue
        dims = tuple(int(d) for d in dims)
        if len(dims) == 2:
            rank = modules[path].rank if path in modules else 0
            dims = (rank, *dims)
        if len(dims) != 3:
            raise ValueError(
                f"expected shape for {path!r} must be (in, out) or (rank, in, out), got {dims}"
            )
        a_shape, b_shape = lora_shapes(*dims)
        a_key, b_key = lora_keys(path)
        want[a_key], want[b_key] = a_shape, b_shape
    have: dict[str, tuple[int, ...]] = {}
    for path, module in modules.items():
        a_key, b_key = lora_keys(path)
        have[a_key], have[b_key] = tuple(module.lora_A.shape), tuple(module.lora_B.shape)
    source = getattr(adapter, "source", None) or "adapter"
    check_shapes(want, have, source=str(source), limit=limit)


# ---------------------------------------------------------------------------------------------
# plain descriptions


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One adapted module: factors ``lora_A`` ``(rank, in)`` and ``lora_B`` ``(out, rank)``.

    ``fan_in_fan_out`` means the *base* weight is stored ``(in, out)`` (transformers ``Conv1D``),
    so the merged delta is ``(B @ A).T``; it does not change the factors' shapes.
    """

    path: str
    rank: int
    alpha: float
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    magnitude: torch.Tensor | None = None  # DoRA's lora_magnitude_vector (out,), None: plain LoRA
    embedding: bool = False  # PEFT's lora_embedding_A/B keys (an nn.Embedding module)
    #: A ``target_parameters`` entry (stacked expert weights): ``path`` names the parameter, and
    #: its keys sit under PEFT's wrapper path, ``<owner module>`` plus one ``.base_layer`` per
    #: wrapper around it (see :func:`parameter_owner`). Factors ``(r * E, in)`` / ``(out, r * E)``.
    peft_path: str | None = None

    @property
    def scale(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (PEFT's ``scaling``)."""
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    @property
    def in_features(self) -> int:
        return int(self.lora_A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_B.shape[0])


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A parsed adapter: modules by path (file order) plus adapter-wide settings and provenance."""

    modules: dict[str, LoraModule]
    use_rslora: bool
    lora_dropout: float
    fan_in_fan_out: bool
    config: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""
    #: The base weight of a targeted embedding, which PEFT saves beside its factors
    #: (``save_embedding_layers="auto"``: ``<path>.base_layer.weight``), by module path.
    embedding_tables: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    @property
    def peft_version(self) -> str | None:
        return self.config.get("peft_version")


# ---------------------------------------------------------------------------------------------
# reading


def _read_weights(
    root: Path, device: str | torch.device, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    st = root / ADAPTER_WEIGHTS_NAME
    if st.is_file():
        tensors, metadata = read_safetensors(st, device=device)
        return tensors, metadata, st
    legacy = root / ADAPTER_LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        if not allow_pickle:
            raise UnsafeFileError(
                f"{legacy} is a pickle (PyTorch's legacy format) and {root} has no {ADAPTER_WEIGHTS_NAME}. "
                "graphlora unpickles nothing unless told to: convert it to safetensors, or pass "
                "allow_pickle=True if you trust the file (it is then read with torch.load(weights_only=True))"
            )
        try:
            obj = torch.load(legacy, map_location=device, weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt pickles/zips
            raise FileFormatError(f"{legacy} cannot be read as a PyTorch state dict: {exc}") from exc
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise FileFormatError(f"{legacy} does not hold a dict of tensors")
        return obj, {}, legacy
    raise AdapterError(
        f"adapter weights are missing from {root}: expected {ADAPTER_WEIGHTS_NAME} "
        f"(or the legacy {ADAPTER_LEGACY_WEIGHTS_NAME})"
    )


def _unsupported_key(key: str) -> str:
    if re.search(r"\.lora_B(\.[^.]+)?\.bias$", key):
        return "a lora_B bias (lora_bias)"
    if ".modules_to_save." in key or ".original_module." in key:
        return "a modules_to_save copy"
    return "not a LoRA A/B weight"


def read_adapter(
    directory: str | os.PathLike[str], *, device: str | torch.device = "cpu", allow_pickle: bool = False
) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory (saved by graphlora or by PEFT).

    Checks, in order: the config (see :func:`validate_adapter_config`); the weights file
    (``adapter_model.safetensors``, else legacy ``adapter_model.bin``, a pickle read only with
    ``allow_pickle=True``); every factor is a finite floating-point tensor; every key is a LoRA factor
    (``base_model.model.<path>.lora_A.weight``, or with an adapter name — one name only); each
    module has 2-D ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` with matching ``r``; ``r``
    equals the rank PEFT would build (``rank_pattern``/``r``); ``target_modules`` selects every
    module. Ranks and alphas are resolved per module exactly as PEFT does.
    """
    root = Path(directory)
    config = read_adapter_config(root)
    tensors, metadata, weights_file = _read_weights(root, device, allow_pickle)
    source = str(weights_file)
    patterns = PatternSet(str(root / ADAPTER_CONFIG_NAME), error=FileFormatError)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names: set[str | None] = set()
    problems: list[str] = []
    magnitudes: dict[str, torch.Tensor] = {}
    embeddings: set[str] = set()
    linears: set[str] = set()
    tables: dict[str, tuple[str, torch.Tensor]] = {}  # PEFT's copy of a targeted embedding's weight
    for key, tensor in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is not None:
            linears.add(parsed[0])
        elif (parsed := parse_embedding_key(key)) is not None:
            embeddings.add(parsed[0])
        if parsed is not None and parsed[0] in embeddings and parsed[0] in linears:
            raise FileFormatError(f"{source}: module {parsed[0]!r} has both lora_embedding_A/B keys (an "
                                  "embedding's) and lora_A/B keys (a linear or convolution layer's)")
        if parsed is None and key.startswith(PEFT_KEY_PREFIX) and key.endswith(BASE_LAYER_SUFFIX):
            tables[key[len(PEFT_KEY_PREFIX) : -len(BASE_LAYER_SUFFIX)]] = (key, tensor)
            continue
        dora_key = parse_magnitude_key(key) if parsed is None else None
        if dora_key is not None:
            check_lora_factor(tensor, key, source=source, error=FileFormatError)
            adapter_names.add(dora_key[1])
            if dora_key[0] in magnitudes:
                raise FileFormatError(f"{source}: the magnitude of {dora_key[0]!r} appears under more than one key")
            magnitudes[dora_key[0]] = tensor
            continue
        if parsed is None:
            problems.append(f"{key} ({_unsupported_key(key)})")
            continue
        path, factor, adapter_name = parsed
        check_lora_factor(tensor, key, source=source, error=FileFormatError)
        adapter_names.add(adapter_name)
        slot = factors.setdefault(path, {})
        if factor in slot:
            raise FileFormatError(f"{source}: lora_{factor} of {path!r} appears under more than one key")
        slot[factor] = tensor
    problems += [f"{key} ({_unsupported_key(key)})" for path, (key, _) in tables.items() if path not in embeddings]
    if problems:
        shown = "; ".join(problems[:5])
        if len(problems) > 5:
            shown += f"; ... and {len(problems) - 5} more"
        raise AdapterError(f"{source}: unsupported tensor(s) in adapter: {shown}")
    if len(adapter_names) > 1:
        names = sorted(str(n) for n in adapter_names)
        raise AdapterError(
            f"{source} mixes keys of several adapters ({names}); save each adapter separately"
        )
    if not factors:
        raise AdapterError(f"{source} contains no LoRA weights")

    r_default = config.get("r", 8)
    alpha_default = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    _check_magnitudes(config, factors, magnitudes, source)
    modules: dict[str, LoraModule] = {}
    for path, slot in factors.items():
        missing = [f"lora_{f}" for f in "AB" if f not in slot]
        if missing:
            raise AdapterError(f"{source}: module {path!r} has no {' or '.join(missing)} weight")
        a, b = slot["A"], slot["B"]
        problem = _factor_problem(a, b, path in embeddings)
        if problem:
            raise AdapterError(f"{source}: module {path!r}: {problem}")
        rank = resolve_pattern(rank_pattern, path, r_default, matcher=patterns)
        if targets_parameters_of(config, parameter_owner(path)):  # one pair per expert, stacked
            if a.shape[0] % rank:
                raise AdapterError(f"{source}: module {path!r} (target_parameters) has lora_A {list(a.shape)}, "
                                   f"whose rows are not a multiple of rank {rank} (one block of rows per expert)")
            modules[path] = LoraModule(path=path, rank=int(rank), alpha=alpha_default, lora_A=a, lora_B=b,
                                       use_rslora=use_rslora, peft_path=path)
            continue
        if a.shape[0] != rank:
            raise AdapterError(
                f"{source}: module {path!r} has rank {a.shape[0]} but {ADAPTER_CONFIG_NAME} gives it "
                f"rank {rank} (r / rank_pattern); PEFT would fail to load this adapter"
            )
        if config.get("target_modules") is not None and not peft_selects(config, path, matcher=patterns):
            raise AdapterError(
                f"{source}: weights for {path!r}, but target_modules="
                f"{config.get('target_modules')!r} does not select that module; PEFT would ignore them"
            )
        alpha = resolve_pattern(alpha_pattern, path, alpha_default, matcher=patterns)
        modules[path] = LoraModule(
            path=path,
            rank=int(rank),
            alpha=alpha,
            lora_A=a,
            lora_B=b,
            fan_in_fan_out=fan_in_fan_out,
            use_rslora=use_rslora,
            magnitude=magnitudes.get(path),
            embedding=path in embeddings,
        )
    return LoraAdapter(
        embedding_tables={p: t for p, (_, t) in tables.items() if p in embeddings},
        modules=modules,
        use_rslora=use_rslora,
        lora_dropout=float(config.get("lora_dropout", 0.0)),
        fan_in_fan_out=fan_in_fan_out,
        config=dict(config),
        metadata=metadata,
        source=str(root),
    )


def _check_magnitudes(config: Mapping[str, Any], factors: Mapping[str, Mapping[str, torch.Tensor]],
                      magnitudes: Mapping[str, torch.Tensor], source: str) -> None:
    """With ``use_dora`` every module has a 1-D magnitude of ``lora_B``'s rows, without it none."""
    if not config.get("use_dora", False):
        if magnitudes:
            raise AdapterError(f"{source}: DoRA magnitude(s) for {sorted(magnitudes)[:5]}, but "
                               f"{ADAPTER_CONFIG_NAME} does not set use_dora")
        return
    for path, slot in factors.items():
        m = magnitudes.get(path)
        if m is None:
            raise AdapterError(f"{source}: use_dora is set but module {path!r} has no lora_magnitude_vector")
        b = slot.get("B")
        if m.dim() != 1 or (b is not None and m.shape[0] != b.shape[0]):
            raise AdapterError(f"{source}: the lora_magnitude_vector of {path!r} has shape {list(m.shape)}; "
                               f"expected [{b.shape[0] if b is not None else 'out'}] (lora_B's rows)")
    extra = sorted(set(magnitudes) - set(factors))
    if extra:
        raise AdapterError(f"{source}: lora_magnitude_vector for {extra[:5]} without lora_A/lora_B")


# ---------------------------------------------------------------------------------------------
# writing


def _factor_problem(a: torch.Tensor, b: torch.Tensor, embedding: bool = False) -> str | None:
    """What is wrong with a pair's shapes, or None: a linear's or an embedding's 2-D ``A (r, in)``
    and ``B (out, r)``, or a convolution's ``A (r, in, *kernel)`` and 1x1 ``B (out, r / groups, 1..)``."""
    shapes = f"lora_A {list(a.shape)} and lora_B {list(b.shape)}"
    if a.dim() == 2 and b.dim() == 2:
        if a.shape[0] != b.shape[1]:
            return f"lora_A {list(a.shape)} has rank {a.shape[0]} but lora_B {list(b.shape)} has rank {b.shape[1]}"
        return None
    if embedding or not (3 <= a.dim() <= 5 and b.dim() == a.dim()):
        return (f"{shapes}: expected 2-D factors (linear or embedding), or the 3/4/5-D factors of "
                "a Conv1d/2d/3d")
    if any(d != 1 for d in b.shape[2:]) or b.shape[1] < 1 or a.shape[0] % b.shape[1]:
        return (f"{shapes}: a convolution's lora_B is a 1x1 kernel whose second dim divides the rank "
                "(rank / groups)")
    return None


def _check_module(m: LoraModule) -> None:
    a, b = m.lora_A, m.lora_B
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError(f"{m.path!r}: lora_A and lora_B must be tensors")
    problem = _factor_problem(a, b, m.embedding)
    if problem or (a.shape[0] % m.rank if m.peft_path else a.shape[0] != m.rank):
        raise AdapterError(
            f"{m.path!r}: expected lora_A (rank={m.rank}, in[, kernel]) and lora_B (out, rank[/groups]), "
            f"got {list(a.shape)} and {list(b.shape)}" + (f" ({problem})" if problem else "")
        )
    if m.magnitude is not None and tuple(m.magnitude.shape) != (b.shape[0],):
        raise AdapterError(f"{m.path!r}: the DoRA magnitude has shape {list(m.magnitude.shape)}, "
                           f"expected [{b.shape[0]}]")


def write_adapter(
    directory: str | os.PathLike[str],
    modules: Iterable[LoraModule],
    *,
    lora_dropout: float = 0.0,
    use_rslora: bool | None = None,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    task_type: str | None = None,
    module_names: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into an existing directory
    (each file atomically; use :func:`save_adapter` for the pair). Returns the config written.
    ``use_rslora`` defaults to the modules' common flag."""
    mods = list(modules)
    for m in mods:
        _check_module(m)
    flags = {bool(m.use_rslora) for m in mods}
    if use_rslora is None:
        if len(flags) > 1:
            raise ValueError("modules disagree on use_rslora; PEFT has one flag per adapter")
        use_rslora = flags.pop() if flags else False
    dora = {m.magnitude is not None for m in mods}
    if len(dora) > 1:
        raise ValueError("some modules are DoRA and some are not; PEFT has one use_dora flag per adapter")
    config = build_adapter_config(
        mods,
        use_dora=dora == {True},
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        base_model_name_or_path=base_model_name_or_path,
        revision=revision,
        task_type=task_type,
        module_names=module_names,
    )
    tensors: dict[str, torch.Tensor] = {}
    for m in mods:
        a_key, b_key = peft_embedding_keys(m.path) if m.embedding else peft_lora_keys(m.peft_path or m.path)
        tensors[a_key], tensors[b_key] = m.lora_A, m.lora_B
        if m.magnitude is not None:
            tensors[peft_magnitude_key(m.path)] = m.magnitude
    root = Path(directory)
    write_safetensors(tensors, root / ADAPTER_WEIGHTS_NAME)
    legacy = root / ADAPTER_LEGACY_WEIGHTS_NAME
    if legacy.exists():  # PEFT would still prefer our safetensors, but a stale .bin misleads people
        legacy.unlink()
    write_json(root / ADAPTER_CONFIG_NAME, config)
    return config


def save_adapter(
    directory: str | os.PathLike[str],
    modules: Iterable[LoraModule],
    *,
    overwrite: bool = True,
    **config: Any,
) -> dict[str, Any]:
    """Save an adapter all-or-nothing (via :func:`atomic_directory`): on any error an existing
    directory is unchanged. Files other than the adapter's own (README, tokenizer, ...) already
    in ``directory`` are kept. Keyword arguments as for :func:`write_adapter`."""
    keep = lambda name: name not in ADAPTER_FILES  # noqa: E731 - carry README, tokenizer, ...
    with atomic_directory(directory, overwrite=overwrite, keep=keep) as tmp:
        return write_adapter(tmp, modules, **config)
