"""The PEFT LoRA adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Why exact: users load graphlora adapters with ``peft.PeftModel.from_pretrained`` or
``transformers``' ``model.load_adapter`` and hand PEFT adapters to graphlora. Both directions must
give the same numbers, so this module mirrors PEFT 0.21's file format and its name-matching rules
(it does not import PEFT: reading and writing work without it).

File format
-----------
* Tensor keys: ``base_model.model.<module path>.lora_A.weight`` with shape ``(rank, in_features)``
  and ``...lora_B.weight`` with shape ``(out_features, rank)``; header metadata ``{"format": "pt"}``.
  PEFT strips the adapter name when saving; ``...lora_A.<adapter>.weight`` is accepted on read.
  The shapes do not depend on ``fan_in_fan_out`` (a transformers ``Conv1D`` stores its weight as
  ``(in, out)``, but its LoRA factors are still ``(r, in)`` / ``(out, r)``); the flag only says how
  ``B @ A`` lines up with the base weight when merging.
* Scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` with ``use_rslora``.

How PEFT matches names (``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key``), relative to the base model's ``named_modules()``:

* ``target_modules`` as a list selects module ``k`` if ``k`` is in the list **or ends with**
  ``"." + entry`` — a suffix match. As a string it is a regex that must ``fullmatch`` ``k``.
* ``rank_pattern`` / ``alpha_pattern`` keys are regexes tried in order with
  ``re.match(rf"(.*\\.)?({key})$", k)``; the first match wins, else ``r`` / ``lora_alpha``.

So the writer uses full module paths as ``target_modules`` (and, when told the model's module
names, falls back to an exact regex if some other module's name ends with a targeted path), and
writes pattern keys as ``"^" + re.escape(path)``: the ``^`` can only match at position 0, which
forces the optional ``(.*\\.)?`` prefix to be empty, so each key selects exactly one module.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphlora.errors import AdapterError, FileFormatError, GraphloraWarning
from graphlora.io.atomic import atomic_directory
from graphlora.io.safetensors_io import read_safetensors, write_json, write_safetensors

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_LEGACY_WEIGHTS_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_FORMAT_VERSION",
    "PEFT_KEY_PREFIX",
    "LoraAdapter",
    "LoraModule",
    "LoraModuleSpec",
    "build_adapter_config",
    "check_adapter_shapes",
    "check_shapes",
    "lora_keys",
    "lora_shapes",
    "parse_lora_key",
    "peft_lora_keys",
    "peft_selects",
    "read_adapter",
    "read_adapter_config",
    "resolve_pattern",
    "save_adapter",
    "validate_adapter_config",
    "write_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_LEGACY_WEIGHTS_NAME = "adapter_model.bin"
ADAPTER_FILES = frozenset({ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_LEGACY_WEIGHTS_NAME})
PEFT_KEY_PREFIX = "base_model.model."
#: The PEFT release whose ``LoraConfig`` field set :func:`build_adapter_config` reproduces.
PEFT_FORMAT_VERSION = "0.21.2"
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# Every field PEFT 0.21's LoraConfig.save_pretrained writes, with the value graphlora writes when
# the description does not set it (PEFT's defaults, except inference_mode: PEFT forces True when
# saving an adapter). tests/test_io_peft.py checks this key set against the installed PEFT.
_CONFIG_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": PEFT_FORMAT_VERSION,
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}

# Fields that switch PEFT to a different method or add trainable state beyond plain A/B factors.
# Truthy value -> unsupported. Includes every LoraConfig field PEFT 0.21 tags "is_lora_variant".
_UNSUPPORTED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA (use_dora) adds a magnitude vector and changes the forward pass",
    "velora_config": "VeLoRA (velora_config) is a LoRA variant",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) acts after invocation tokens",
    "monteclora_config": "MonteCLoRA (monteclora_config) is a LoRA variant",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is a LoRA variant",
    "arrow_config": "Arrow routing (arrow_config) is a LoRA variant",
    "kasa_config": "KaSA (kasa_config) is a LoRA variant",
    "use_qalora": "QALoRA (use_qalora) pools inputs before lora_A",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "layer_replication": "layer_replication duplicates base layers",
    "target_parameters": "target_parameters applies LoRA to raw parameters, not modules",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "megatron_config": "megatron_config builds Megatron parallel LoRA layers",
    "modules_to_save": "modules_to_save stores fully trained copies of whole modules",
}
# init_lora_weights values whose saved adapter is only valid on a base model PEFT modified
# (PiSSA/OLoRA/CorDA/LoRA-GA subtract the initial adapter from the base weights; LoftQ replaces
# them), or that select a variant (MiCA). PEFT rewrites converted adapters to ``True``.
_MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
_VARIANT_INITS = ("mica",)
_KNOWN_FIELDS = frozenset(_CONFIG_DEFAULTS) | {"runtime_config"}


# ---------------------------------------------------------------------------------------------
# keys and shapes


def lora_keys(path: str) -> tuple[str, str]:
    """graphlora's own names for a module's factors: ``<path>.lora_A.weight``, ``<path>.lora_B.weight``."""
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def peft_lora_keys(path: str) -> tuple[str, str]:
    """The keys PEFT writes in ``adapter_model.safetensors`` for a module path."""
    a, b = lora_keys(path)
    return PEFT_KEY_PREFIX + a, PEFT_KEY_PREFIX + b


_LORA_KEY = re.compile(r"(?P<path>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


def parse_lora_key(key: str) -> tuple[str, str, str | None] | None:
    """``(module_path, "A" | "B", adapter_name or None)`` for a LoRA factor key (with or without
    the ``base_model.model.`` prefix), or ``None`` if ``key`` is not one."""
    stripped = key[len(PEFT_KEY_PREFIX) :] if key.startswith(PEFT_KEY_PREFIX) else key
    match = _LORA_KEY.fullmatch(stripped)
    if match is None:
        return None
    return match.group("path"), match.group("factor"), match.group("adapter")


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
    """Check an adapter against the model: ``expected`` maps module path to ``(in, out)`` (any rank)
    or ``(rank, in, out)``. Raises :class:`AdapterError` naming keys ``<path>.lora_A.weight`` /
    ``<path>.lora_B.weight`` with expected vs found shapes, missing and unexpected modules."""
    modules = adapter.modules if isinstance(adapter, LoraAdapter) else adapter
    want: dict[str, tuple[int, ...]] = {}
    for path, dims in expected.items():
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


@dataclass(frozen=True)
class LoraModuleSpec:
    """What the config needs to know about one adapted module."""

    path: str
    rank: int
    alpha: float
    fan_in_fan_out: bool = False


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

    @property
    def scale(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (PEFT's ``scaling``)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

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
# PEFT name matching


def resolve_pattern(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """The value PEFT picks for ``path`` from a ``rank_pattern``/``alpha_pattern`` dict: the first
    key (in order) with ``re.match(rf"(.*\\.)?({key})$", path)``, else ``default``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return patterns[key]
    return default


def peft_selects(config: Mapping[str, Any], path: str) -> bool:
    """Whether PEFT's ``check_target_module_exists`` would adapt the module named ``path``
    (``exclude_modules``, ``modules_to_save``, ``target_modules`` as list or regex,
    ``layers_to_transform``/``layers_pattern``)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, path):
                return False
        elif path in exclude or any(path.endswith(f".{e}") for e in exclude):
            return False
    for m in config.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", path):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, path) is not None
    if path in targets:
        return True
    if not any(path.endswith(f".{t}") for t in targets):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


# ---------------------------------------------------------------------------------------------
# building the config


def _number(value: float) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() else value


def _most_common(values: list[Any]) -> Any:
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)  # ties: first in module order


def build_adapter_config(
    modules: Iterable[LoraModuleSpec | LoraModule],
    *,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    task_type: str | None = None,
    init_lora_weights: bool | str = True,
    module_names: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` dict PEFT needs to rebuild exactly these modules.

    ``r``/``lora_alpha`` are the most common rank/alpha (ties: first module); modules that differ get
    exact-match ``rank_pattern``/``alpha_pattern`` entries. ``target_modules`` lists the full paths,
    sorted. Pass ``module_names`` (all of the base model's ``named_modules()`` names) to make sure
    PEFT's suffix matching selects no other module; if one would be selected (a module name ending
    in ``"." + targeted path``), ``target_modules`` becomes an exact regex instead. ``fan_in_fan_out``
    is the majority flag; PEFT corrects it per layer type (with a warning) if modules disagree.
    """
    specs = list(modules)
    if not specs:
        raise ValueError("an adapter needs at least one module")
    paths = [s.path for s in specs]
    dupes = sorted(p for p, n in Counter(paths).items() if n > 1)
    if dupes:
        raise ValueError(f"module path(s) listed twice: {dupes}")
    for s in specs:
        if not isinstance(s.path, str) or not s.path or s.path != s.path.strip("."):
            raise ValueError(f"invalid module path {s.path!r}")
        if isinstance(s.rank, bool) or not isinstance(s.rank, int) or s.rank <= 0:
            raise ValueError(f"rank of {s.path!r} must be a positive int, got {s.rank!r}")
        if not _is_number(s.alpha) or not math.isfinite(s.alpha):
            raise ValueError(f"alpha of {s.path!r} must be a finite number, got {s.alpha!r}")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be None or one of {TASK_TYPES}, got {task_type!r}")
    if isinstance(init_lora_weights, str) and init_lora_weights.lower().startswith(
        _MODIFIED_BASE_INITS + _VARIANT_INITS
    ):
        raise ValueError(
            f"init_lora_weights={init_lora_weights!r} would make PEFT expect a modified base model"
        )

    ranks = [s.rank for s in specs]
    alphas = [_number(s.alpha) for s in specs]
    r = _most_common(ranks)
    alpha = _most_common(alphas)
    rank_pattern = {f"^{re.escape(s.path)}": s.rank for s in specs if s.rank != r}
    alpha_pattern = {f"^{re.escape(s.path)}": a for s, a in zip(specs, alphas) if a != alpha}
    fan_flags = [bool(s.fan_in_fan_out) for s in specs]
    fan_in_fan_out = sum(fan_flags) * 2 > len(fan_flags)

    targets: list[str] | str = sorted(paths)
    if module_names is not None:
        names = set(module_names)
        missing = sorted(set(paths) - names)
        if missing:
            raise ValueError(f"targeted path(s) not among the model's module names: {missing[:5]}")
        chosen = set(paths)
        probe = {"target_modules": targets}
        if any(peft_selects(probe, n) for n in names - chosen):
            targets = "(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")"

    config = dict(_CONFIG_DEFAULTS)
    config.update(
        r=r,
        lora_alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=targets,
        lora_dropout=float(lora_dropout),
        use_rslora=bool(use_rslora),
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=init_lora_weights,
        base_model_name_or_path=base_model_name_or_path,
        revision=revision,
        task_type=task_type,
    )
    return config


# ---------------------------------------------------------------------------------------------
# validating a config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {}, ())


def _require(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise FileFormatError(f"{source}: {message}")


def validate_adapter_config(config: Mapping[str, Any], source: str = ADAPTER_CONFIG_NAME) -> None:
    """Raise unless ``config`` describes a plain LoRA adapter graphlora can apply exactly.

    :class:`AdapterError` for a non-LoRA ``peft_type``, DoRA and other variants, ``bias`` other
    than ``"none"``, non-empty ``modules_to_save`` and init methods whose adapter only works with a
    PEFT-modified base; :class:`FileFormatError` for fields of the wrong type. Unknown fields with
    non-default values trigger a :class:`GraphloraWarning` (a newer PEFT may have added them).
    """
    _require(isinstance(config, Mapping), source, "expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise FileFormatError(f"{source} has no 'peft_type'; it is not a PEFT adapter config")
    if peft_type != "LORA":
        raise AdapterError(
            f"{source}: peft_type {peft_type!r} is unsupported; graphlora reads LoRA adapters only"
        )
    bad = [why for name, why in _UNSUPPORTED_FIELDS.items() if _truthy(config.get(name))]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MODIFIED_BASE_INITS):
        bad.append(
            f"init_lora_weights={init!r}: the adapter was saved relative to a base model PEFT modified "
            "(re-save it with path_initial_model_for_weight_conversion to get a plain LoRA adapter)"
        )
    elif isinstance(init, str) and init.lower().startswith(_VARIANT_INITS):
        bad.append(f"init_lora_weights={init!r} selects a LoRA variant")
    bias = config.get("bias", "none")
    if bias != "none":
        bad.append(f"bias={bias!r} trains base-layer biases, which the adapter file then stores")
    if bad:
        raise AdapterError(f"{source}: unsupported adapter features: " + "; ".join(bad))

    r = config.get("r", 8)
    _require(_is_int(r) and r > 0, source, f"'r' must be a positive int, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    _require(_is_number(alpha), source, f"'lora_alpha' must be a number, got {alpha!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        _require(isinstance(pattern, Mapping), source, f"'{name}' must be an object, got {pattern!r}")
        for key, value in pattern.items():
            _require(
                _is_number(value) and value > 0,
                source,
                f"'{name}' entry {key!r} must be a positive number, got {value!r}",
            )
            try:
                re.compile(key)
            except re.error as exc:
                raise FileFormatError(
                    f"{source}: '{name}' key {key!r} is not a valid regex: {exc}"
                ) from exc
    for key, value in (config.get("rank_pattern") or {}).items():
        _require(_is_int(value), source, f"'rank_pattern' entry {key!r} must be an int, got {value!r}")
    dropout = config.get("lora_dropout", 0.0)
    _require(
        _is_number(dropout) and 0 <= dropout < 1,
        source,
        f"'lora_dropout' must be a number in [0, 1), got {dropout!r}",
    )
    for name in ("use_rslora", "fan_in_fan_out"):
        _require(isinstance(config.get(name, False), bool), source, f"'{name}' must be true or false")
    targets = config.get("target_modules")
    _require(
        targets is None or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets)),
        source,
        f"'target_modules' must be null, a regex string or a list of names, got {targets!r}",
    )
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise FileFormatError(f"{source}: 'target_modules' is not a valid regex: {exc}") from exc
    unknown = sorted(k for k in config if k not in _KNOWN_FIELDS and _truthy(config[k]))
    if unknown:
        warnings.warn(
            f"{source}: ignoring field(s) unknown to graphlora: {unknown}; written by a newer PEFT? "
            "If they change the adapter's numerics, results will differ from PEFT's.",
            GraphloraWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# reading


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``adapter_config.json`` from an adapter directory."""
    root = Path(directory)
    path = root / ADAPTER_CONFIG_NAME
    if not root.is_dir():
        raise AdapterError(f"adapter directory {root} does not exist")
    if not path.is_file():
        hint = (
            " (it holds a full model checkpoint: config.json/model weights, not an adapter)"
            if (root / "config.json").exists()
            else ""
        )
        raise AdapterError(f"{ADAPTER_CONFIG_NAME} is missing from {root}{hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FileFormatError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"cannot read {path}: {exc}") from exc
    validate_adapter_config(config, str(path))
    return config


def _read_weights(
    root: Path, device: str | torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    st = root / ADAPTER_WEIGHTS_NAME
    if st.is_file():
        tensors, metadata = read_safetensors(st, device=device)
        return tensors, metadata, st
    legacy = root / ADAPTER_LEGACY_WEIGHTS_NAME
    if legacy.is_file():
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
    if ".lora_magnitude_vector" in key:
        return "a DoRA magnitude vector"
    if ".lora_embedding_" in key:
        return "LoRA on an embedding layer"
    if re.search(r"\.lora_B(\.[^.]+)?\.bias$", key):
        return "a lora_B bias (lora_bias)"
    if ".modules_to_save." in key or ".original_module." in key:
        return "a modules_to_save copy"
    return "not a LoRA A/B weight"


def read_adapter(
    directory: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory (saved by graphlora or by PEFT).

    Checks, in order: the config (see :func:`validate_adapter_config`); the weights file
    (``adapter_model.safetensors``, else legacy ``adapter_model.bin``); every key is a LoRA factor
    (``base_model.model.<path>.lora_A.weight``, or with an adapter name — one name only); each
    module has 2-D ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` with matching ``r``; ``r``
    equals the rank PEFT would build (``rank_pattern``/``r``); ``target_modules`` selects every
    module. Ranks and alphas are resolved per module exactly as PEFT does.
    """
    root = Path(directory)
    config = read_adapter_config(root)
    tensors, metadata, weights_file = _read_weights(root, device)
    source = str(weights_file)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names: set[str | None] = set()
    problems: list[str] = []
    for key, tensor in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            problems.append(f"{key} ({_unsupported_key(key)})")
            continue
        path, factor, adapter_name = parsed
        adapter_names.add(adapter_name)
        slot = factors.setdefault(path, {})
        if factor in slot:
            raise FileFormatError(f"{source}: lora_{factor} of {path!r} appears under more than one key")
        slot[factor] = tensor
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
    modules: dict[str, LoraModule] = {}
    for path, slot in factors.items():
        missing = [f"lora_{f}" for f in "AB" if f not in slot]
        if missing:
            raise AdapterError(f"{source}: module {path!r} has no {' or '.join(missing)} weight")
        a, b = slot["A"], slot["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(
                f"{source}: module {path!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; only "
                "2-D factors of linear layers are supported (convolution LoRA is not)"
            )
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{source}: module {path!r}: lora_A {list(a.shape)} has rank {a.shape[0]} but lora_B "
                f"{list(b.shape)} has rank {b.shape[1]}"
            )
        rank = resolve_pattern(rank_pattern, path, r_default)
        if a.shape[0] != rank:
            raise AdapterError(
                f"{source}: module {path!r} has rank {a.shape[0]} but {ADAPTER_CONFIG_NAME} gives it "
                f"rank {rank} (r / rank_pattern); PEFT would fail to load this adapter"
            )
        if config.get("target_modules") is not None and not peft_selects(config, path):
            raise AdapterError(
                f"{source}: weights for {path!r}, but target_modules="
                f"{config.get('target_modules')!r} does not select that module; PEFT would ignore them"
            )
        alpha = resolve_pattern(alpha_pattern, path, alpha_default)
        modules[path] = LoraModule(
            path=path,
            rank=int(rank),
            alpha=alpha,
            lora_A=a,
            lora_B=b,
            fan_in_fan_out=fan_in_fan_out,
            use_rslora=use_rslora,
        )
    return LoraAdapter(
        modules=modules,
        use_rslora=use_rslora,
        lora_dropout=float(config.get("lora_dropout", 0.0)),
        fan_in_fan_out=fan_in_fan_out,
        config=dict(config),
        metadata=metadata,
        source=str(root),
    )


# ---------------------------------------------------------------------------------------------
# writing


def _check_module(m: LoraModule) -> None:
    a, b = m.lora_A, m.lora_B
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError(f"{m.path!r}: lora_A and lora_B must be tensors")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != m.rank or b.shape[1] != m.rank:
        raise AdapterError(
            f"{m.path!r}: expected lora_A (rank={m.rank}, in) and lora_B (out, rank={m.rank}), got "
            f"{list(a.shape)} and {list(b.shape)}"
        )


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
    config = build_adapter_config(
        mods,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        base_model_name_or_path=base_model_name_or_path,
        revision=revision,
        task_type=task_type,
        module_names=module_names,
    )
    tensors: dict[str, torch.Tensor] = {}
    for m in mods:
        a_key, b_key = peft_lora_keys(m.path)
        tensors[a_key], tensors[b_key] = m.lora_A, m.lora_B
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
