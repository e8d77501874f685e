"""PEFT's ``adapter_config.json``: building it, validating it, and PEFT's rules for which module
a config selects and which rank/alpha it gives it.

Why exact: a config graphlora writes must make PEFT rebuild exactly the modules graphlora saved,
and a config PEFT wrote must give graphlora the ranks and alphas PEFT would use. This module
mirrors PEFT 0.21's ``LoraConfig`` fields and name-matching rules (it does not import PEFT). The
weights next to the config, and reading/writing the pair, are :mod:`graphlora.io.peft_format`.

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

import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphlora.errors import AdapterError, FileFormatError, GraphloraWarning
from graphlora.io.json_file import read_json
from graphlora.patterns import PatternSet
from graphlora.validate import check_lora_alpha

if TYPE_CHECKING:
    from graphlora.io.peft_format import LoraModule

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "PEFT_FORMAT_VERSION",
    "LoraModuleSpec",
    "build_adapter_config",
    "most_common",
    "peft_selects",
    "read_adapter_config",
    "resolve_pattern",
    "validate_adapter_config",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
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
    "velora_config": "VeLoRA (velora_config) is a LoRA variant",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) acts after invocation tokens",
    "monteclora_config": "MonteCLoRA (monteclora_config) is a LoRA variant",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is a LoRA variant",
    "arrow_config": "Arrow routing (arrow_config) is a LoRA variant",
    "kasa_config": "KaSA (kasa_config) is a LoRA variant",
    "use_qalora": "QALoRA (use_qalora) pools inputs before lora_A",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "layer_replication": "layer_replication duplicates base layers",
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


@dataclass(frozen=True)
class LoraModuleSpec:
    """What the config needs to know about one adapted module."""

    path: str
    rank: int
    alpha: float
    fan_in_fan_out: bool = False


# ---------------------------------------------------------------------------------------------
# PEFT name matching


_PATTERN_KEY = r"(.*\.)?({})$"


def _matcher(matcher: PatternSet | None) -> PatternSet:
    return matcher if matcher is not None else PatternSet(ADAPTER_CONFIG_NAME, error=FileFormatError)


def resolve_pattern(
    patterns: Mapping[str, Any], path: str, default: Any, *, matcher: PatternSet | None = None
) -> Any:
    """The value PEFT picks for ``path`` from a ``rank_pattern``/``alpha_pattern`` dict: the first
    key (in order) with ``re.match(rf"(.*\\.)?({key})$", path)``, else ``default``. Keys are
    matched within a time bound (:mod:`graphlora.patterns`); pass the ``matcher`` of the config
    being read so errors name its file."""
    found = _matcher(matcher)
    for key in patterns:
        if found.compile(key, "pattern key", template=_PATTERN_KEY).match(path):
            return patterns[key]
    return default


def peft_selects(config: Mapping[str, Any], path: str, *, matcher: PatternSet | None = None) -> bool:
    """Whether PEFT's ``check_target_module_exists`` would adapt the module named ``path``
    (``exclude_modules``, ``modules_to_save``, ``target_modules`` as list or regex,
    ``layers_to_transform``/``layers_pattern``). Regexes are matched within a time bound."""
    rx = _matcher(matcher)
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if rx.compile(exclude, "'exclude_modules'").fullmatch(path):
                return False
        elif path in exclude or any(path.endswith(f".{e}") for e in exclude):
            return False
    for m in config.get("modules_to_save") or ():
        if rx.compile(m, "'modules_to_save' entry", template=r"(^|.*\.){}($|\..*)").match(path):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return targets == "all-linear" or rx.compile(targets, "'target_modules'").fullmatch(path)
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
            match = rx.compile(p, "'layers_pattern'", template=r"(?:^|.*?\.){}\.(?P<idx>\d+)\.").run("match", path)
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


def most_common(values: list[Any]) -> Any:
    """The most frequent value; ties go to the first in order (module order, for a config)."""
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


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
    use_dora: bool = False,
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
    parameters = sorted(s.path for s in specs if getattr(s, "peft_path", None))  # target_parameters
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
    r = most_common(ranks)
    alpha = most_common(alphas)
    odd = [s.path for s, a in zip(specs, alphas) if s.path in parameters and (s.rank != r or a != alpha)]
    if odd:
        raise ValueError(f"target_parameters {odd[:3]} need the adapter's common rank {r} and alpha {alpha}: "
                         "PEFT's rank_pattern / alpha_pattern name modules, not parameters")
    rank_pattern = {f"^{re.escape(s.path)}": s.rank for s in specs if s.rank != r}
    alpha_pattern = {f"^{re.escape(s.path)}": a for s, a in zip(specs, alphas) if a != alpha}
    fan_flags = [bool(s.fan_in_fan_out) for s in specs if s.path not in parameters]
    fan_in_fan_out = sum(fan_flags) * 2 > len(fan_flags)

    paths = [p for p in paths if p not in parameters]
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
        target_parameters=parameters or None,
        lora_dropout=float(lora_dropout),
        use_rslora=bool(use_rslora),
        use_dora=bool(use_dora),
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


def _check_regex(patterns: PatternSet, pattern: str, what: str, template: str = "{}") -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise FileFormatError(f"{patterns.source}: {what} is not a valid regex: {exc}") from None
    patterns.compile(pattern, what, template=template)


def _is_names(value: Any) -> bool:
    """null, a string, or a list of strings (PEFT's str | list[str] | None fields)."""
    return value is None or isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {}, ())


def _require(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise FileFormatError(f"{source}: {message}")


def validate_adapter_config(config: Mapping[str, Any], source: str = ADAPTER_CONFIG_NAME) -> None:
    """Raise unless ``config`` describes a plain LoRA adapter graphlora can apply exactly.

    :class:`AdapterError` for a non-LoRA ``peft_type``, LoRA variants other than DoRA, ``bias`` other
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
    check_lora_alpha(config.get("lora_alpha", 8), f"{source}: 'lora_alpha'", positive=False, error=FileFormatError)
    patterns = PatternSet(source, error=FileFormatError)
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        _require(isinstance(pattern, Mapping), source, f"'{name}' must be an object, got {pattern!r}")
        for key, value in pattern.items():
            _require(
                _is_number(value) and value > 0,
                source,
                f"'{name}' entry {key!r} must be a positive number, got {value!r}",
            )
            check_lora_alpha(value, f"{source}: '{name}' entry {key!r}", error=FileFormatError)
            _check_regex(patterns, key, f"'{name}' key {key!r}", template=_PATTERN_KEY)
    for key, value in (config.get("rank_pattern") or {}).items():
        _require(_is_int(value), source, f"'rank_pattern' entry {key!r} must be an int, got {value!r}")
    dropout = config.get("lora_dropout", 0.0)
    _require(
        _is_number(dropout) and 0 <= dropout < 1,
        source,
        f"'lora_dropout' must be a number in [0, 1), got {dropout!r}",
    )
    for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
        _require(isinstance(config.get(name, False), bool), source, f"'{name}' must be true or false")
    params = config.get("target_parameters")
    _require(params is None or (isinstance(params, list) and all(isinstance(p, str) and p for p in params)),
             source, f"'target_parameters' must be null or a list of parameter names, got {params!r}")
    targets = config.get("target_modules")
    _require(_is_names(targets), source,
             f"'target_modules' must be null, a regex string or a list of names, got {targets!r}")
    if isinstance(targets, str) and targets != "all-linear":
        _check_regex(patterns, targets, "'target_modules'")
    exclude = config.get("exclude_modules")
    _require(_is_names(exclude), source,
             f"'exclude_modules' must be null, a regex string or a list of names, got {exclude!r}")
    if isinstance(exclude, str):
        patterns.compile(exclude, "'exclude_modules'")
    layers = config.get("layers_pattern")
    _require(_is_names(layers), source, f"'layers_pattern' must be null, a string or a list of strings, got {layers!r}")
    for p in [layers] if isinstance(layers, str) else layers or ():
        patterns.compile(p, "'layers_pattern'")
    indexes = config.get("layers_to_transform")
    _require(
        indexes is None or _is_int(indexes) or (isinstance(indexes, list) and all(_is_int(i) for i in indexes)),
        source,
        f"'layers_to_transform' must be null, an int or a list of ints, got {indexes!r}",
    )
    unknown = sorted(k for k in config if k not in _KNOWN_FIELDS and _truthy(config[k]))
    if unknown:
        warnings.warn(
            f"{source}: ignoring field(s) unknown to graphlora: {unknown}; written by a newer PEFT? "
            "If they change the adapter's numerics, results will differ from PEFT's.",
            GraphloraWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# reading the file


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``adapter_config.json`` from an adapter directory."""
    root = Path(directory)
    path = root / ADAPTER_CONFIG_NAME
    if not root.is_dir():
        raise AdapterError(f"adapter directory {root} does not exist")
    if not path.exists():
        hint = (
            " (it holds a full model checkpoint: config.json/model weights, not an adapter)"
            if (root / "config.json").exists()
            else ""
        )
        raise AdapterError(f"{ADAPTER_CONFIG_NAME} is missing from {root}{hint}")
    config = read_json(path, what="a PEFT adapter config")
    validate_adapter_config(config, str(path))
    return config
