"""Rules say which linear sites get LoRA and/or quantization, with Qwix's semantics.

A rule's ``module_path`` is a regular expression matched with ``re.fullmatch`` semantics against a
site's module path (with a bound on time, :mod:`graphlora.patterns`: a rules file may come from
anyone); rules are scanned in order and the first match wins; sites no rule matches are left
untouched; rules that match nothing are reported (a warning, or an error with ``strict=True``).
Rules are frozen dataclasses so they can be hashed, compared, stored in node metadata and
written to files unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Sequence

from graphlora.errors import RuleError
from graphlora.patterns import PatternSet
from graphlora.quant.qtypes import check_qtype_use
from graphlora.quant.weight_methods import WeightMethod, weight_method, weight_method_names
from graphlora.scaling import lora_scale
from graphlora.validate import check_lora_alpha

# The one-line toggle (Kithara's ``lora_rank=16``): attention query and value projections.
DEFAULT_TARGETS = r"(.*\.)?(q_proj|v_proj|query|value|c_attn)"

ACT_CALIBRATIONS = ("minmax", "percentile", "mse")
LORA_INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq")  # and "pissa_niter_K"
#: What a rule's ``site_kinds`` may name (:attr:`graphlora.sites.SiteSpec.site_kind`): every
#: spelling of a linear layer, ``nn.Embedding`` lookups, ``nn.Conv1d/2d/3d`` convolutions, the
#: stacked ``(experts, ., .)`` weights of a mixture of experts (PEFT's ``target_parameters``),
#: ``einsum`` contractions of an activation with a parameter (Qwix's einsum LoRA).
SITE_KINDS = ("linear", "embedding", "conv", "experts", "einsum")


@dataclass(frozen=True, kw_only=True)
class QuantRule:
    """Quantization of matched sites, without LoRA.

    ``weight_qtype`` quantizes the base weight (stored as integer codes, packed two per byte for
    4-bit types, dequantized on the fly); ``group_size`` blocks the scales along the input
    dimension (``None``: one scale per output channel). ``weight_calibration`` picks the
    encoding: ``absmax`` (symmetric), ``minmax`` (asymmetric), ``mse`` (clipping search) or
    ``gptq`` (data-aware; needs calibration data at transform time). ``act_qtype`` puts observers, then fake-quant, on the site's input
    activation. ``lora_weight_qtype`` / ``lora_act_qtype`` quantize the LoRA branch of a site
    (its A/B weights and the activation between them) when a LoRA rule also covers it.

    ``weight_grid`` / ``act_grid`` pick the symmetric integer grid of the rule's weights (base and
    LoRA) and activations: ``"full"`` uses every code (int4 -8..7, AIMET's, scale
    ``max(|min| / 8, max / 7)``), ``"restricted"`` drops the most negative code (int4 -7..7, scale
    ``max|w| / 7``); None takes the qtype's measured default
    (:data:`graphlora.quant.qtypes.DEFAULT_GRIDS`). Asymmetric encodings always use the full range.

    ``site_kinds`` names the kinds of site the rule applies to (:data:`SITE_KINDS`); a site of
    another kind never sees the rule, so the first rule *of its kind* whose pattern matches wins.
    Linear layers only by default: adapting embeddings or convolutions is asked for by name
    (``site_kinds=("linear", "embedding")``), so a ``".*"`` rule written for linears keeps meaning
    what it meant.
    """

    module_path: str = field(default=".*", kw_only=False)
    weight_qtype: str | None = None
    group_size: int | None = None
    weight_symmetric: bool | None = None  # None: the calibration method's default
    weight_calibration: str = "absmax"
    weight_grid: str | None = None  # None: the qtype's default grid
    double_quant: bool = False
    act_qtype: str | None = None
    act_symmetric: bool = False
    act_grid: str | None = None
    act_calibration: str = "minmax"
    act_percentile: float = 99.99
    lora_weight_qtype: str | None = None
    lora_act_qtype: str | None = None
    site_kinds: tuple[str, ...] = ("linear",)

    def __post_init__(self) -> None:
        if isinstance(self.site_kinds, (list, str)):  # a list from a file or a caller; one kind
            kinds = [self.site_kinds] if isinstance(self.site_kinds, str) else self.site_kinds
            object.__setattr__(self, "site_kinds", tuple(kinds))

    @property
    def has_lora(self) -> bool:
        return False

    @property
    def weight_method(self) -> WeightMethod:
        """The registered weight-calibration method this rule names."""
        return weight_method(self.weight_calibration)

    @property
    def needs_calibration_data(self) -> bool:
        """True when the base weight is quantized by a method that runs on calibration inputs."""
        return bool(self.weight_qtype) and self.weight_method.needs_data

    def describe(self) -> str:
        """Short, stable description used in messages and graph text."""
        parts = [f"module_path={self.module_path!r}"]
        for f in fields(self):
            if f.name == "module_path":
                continue
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class LoraRule(QuantRule):
    """LoRA on matched sites (plus optional QLoRA base quantization through the inherited fields).

    ``alpha`` defaults to ``rank`` (scale 1). ``scale = alpha / rank``, or ``alpha / sqrt(rank)``
    with ``use_rslora``. ``init="kaiming"`` is PEFT's default (A kaiming-uniform, a=sqrt(5));
    ``init="gaussian"`` draws A from N(0, 1/rank). B starts at zero either way, so a freshly
    transformed model computes exactly what the original did.

    ``init="pissa"`` / ``"pissa_niter_K"`` / ``"olora"`` / ``"loftq"`` compute A and B from the
    base weight and change the base (PEFT's inits of those names; see
    :mod:`graphlora.lora_init`): still the original function for PiSSA/OLoRA on a float base;
    LoftQ (which needs ``weight_qtype``) alternates ``loftq_iter`` times between quantizing the base
    and fitting A, B to the quantization error.
    ``use_dora`` (PEFT's ``use_dora=True``): weight-decomposed LoRA, the site's output rescaled
    row by row by a trainable magnitude over the detached norm of ``W + scale B A``
    (:mod:`graphlora.dora`); the magnitude starts at the base weight's row norms, so a fresh
    model still computes what the original did.
    ``share_experts``: on ``experts`` sites, one pair shared by every expert (the same ``B A``
    added to each expert's weight) instead of PEFT's one pair per expert.
    """

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    init: str = "kaiming"
    use_rslora: bool = False
    loftq_iter: int = 1
    use_dora: bool = False
    share_experts: bool = False

    @property
    def has_lora(self) -> bool:
        return True

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return lora_scale(self.lora_alpha, self.rank, self.use_rslora)


Rule = QuantRule  # LoraRule is a QuantRule


@dataclass(frozen=True, kw_only=True)
class ActivationRule:
    """Whole-graph activation quantization: the outputs of every op of the chosen ``kinds``
    (see :data:`graphlora.op_kinds.OP_KINDS`: ``linear``, ``matmul``, ``attention``, ``add``,
    ``mul``, ``norm``, ``activation``, ``softmax``, ``embedding``) computed in a module whose path
    ``re.fullmatch``-es ``module_path`` — or, with ``tensor``, the outputs whose name (e.g.
    ``encoder.layer.0.output.add``) ``re.fullmatch``-es it — get one encoding each.

    Rules are scanned in order, first match wins, so a specific rule before a general one makes a
    per-tensor choice (int16 for the one softmax int8 breaks); ``qtype=None`` leaves what it
    matches in float. Calibration and grid fields are those of :class:`QuantRule`'s activations.
    """

    module_path: str = field(default=".*", kw_only=False)
    kinds: tuple[str, ...] = ("linear", "matmul", "attention", "add", "mul", "norm", "activation",
                              "softmax", "embedding")
    tensor: str | None = None
    qtype: str | None = "uint8"
    symmetric: bool = False
    calibration: str = "minmax"
    percentile: float = 99.99
    grid: str | None = None

    def describe(self) -> str:
        parts = [f"module_path={self.module_path!r}"]
        for f in fields(self):
            if f.name != "module_path" and getattr(self, f.name) != f.default:
                parts.append(f"{f.name}={getattr(self, f.name)!r}")
        return f"ActivationRule({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def matches(self, module_path: str, kind: str, tensor: str,
                patterns: PatternSet | None = None) -> bool:
        """Whether this rule covers the output ``tensor`` of a ``kind`` op in ``module_path``;
        patterns are matched within the time bound of ``patterns`` (one set per rule list)."""
        if kind not in self.kinds:
            return False
        patterns = patterns if patterns is not None else PatternSet("", error=RuleError)
        if self.tensor is not None:
            return patterns.compile(self.tensor, f"{self.describe()}: tensor").fullmatch(tensor)
        return patterns.compile(self.module_path, f"{self.describe()}: module_path").fullmatch(module_path)


def normalize_activation_rules(rules) -> list[ActivationRule]:
    """Accept one ActivationRule or a sequence of them; validate each."""
    from graphlora.op_kinds import OP_KINDS

    if isinstance(rules, ActivationRule):
        rules = [rules]
    try:
        rules = list(rules)
    except TypeError:
        raise RuleError(f"activation rules must be an ActivationRule or a list of them, got "
                        f"{type(rules).__name__}") from None
    for i, rule in enumerate(rules):
        where = f"activation rule #{i} {rule.describe() if isinstance(rule, ActivationRule) else rule!r}"
        if not isinstance(rule, ActivationRule):
            raise RuleError(f"{where}: not an ActivationRule")
        patterns = PatternSet(where, error=RuleError)
        for name in ("module_path", "tensor"):
            pattern = getattr(rule, name)
            if pattern is not None:
                patterns.compile(pattern, name)
        kinds = rule.kinds
        if isinstance(kinds, str) or not all(k in OP_KINDS for k in kinds) or not kinds:
            raise RuleError(f"{where}: kinds must be a non-empty tuple of {OP_KINDS}, got {kinds!r}")
        _check_qtype(where, "qtype", rule.qtype, "activation")
        if rule.calibration not in ACT_CALIBRATIONS:
            raise RuleError(f"{where}: calibration must be one of {ACT_CALIBRATIONS}, got {rule.calibration!r}")
        if isinstance(rule.percentile, bool) or not isinstance(rule.percentile, (int, float)) or not (
            0.0 < rule.percentile <= 100.0
        ):
            raise RuleError(f"{where}: percentile must be in (0, 100], got {rule.percentile!r}")
        from graphlora.quant.qtypes import GRIDS

        if rule.grid is not None and rule.grid not in GRIDS:
            raise RuleError(f"{where}: grid must be one of {GRIDS} or None, got {rule.grid!r}")
        if rule.grid == "restricted" and not rule.symmetric:
            raise RuleError(f"{where}: grid='restricted' is a symmetric grid; set symmetric=True")
    return rules


def default_rules(rank: int) -> list[LoraRule]:
    """The one-line toggle ``transform(model, 16)``: LoRA on query/value projections, alpha=rank."""
    return [LoraRule(DEFAULT_TARGETS, rank=rank, alpha=float(rank))]


#: Attribute a rules file sets on the rules it read (not a dataclass field: rules compare and
#: hash by their fields only), so errors found later, when the rules match a model, name the file.
SOURCE_ATTR = "_graphlora_source"


def rule_name(index: int, rule: QuantRule) -> str:
    source = getattr(rule, SOURCE_ATTR, None)
    return f"rule #{index} {rule.describe()}" + (f" in {source}" if source else "")


def set_source(rule: QuantRule, source: str) -> QuantRule:
    """Remember the file a rule came from (for messages); returns the rule."""
    object.__setattr__(rule, SOURCE_ATTR, source)
    return rule


def normalize_rules(rules: int | QuantRule | Iterable[QuantRule]) -> list[QuantRule]:
    """Accept an int (the toggle), one rule or a sequence of rules; validate each."""
    if isinstance(rules, bool):
        raise RuleError(f"rules must be an int rank, a rule or a list of rules, got {rules!r}")
    if isinstance(rules, int):
        if rules < 1:
            raise RuleError(f"the LoRA rank toggle must be >= 1, got {rules}")
        rules = default_rules(rules)
    elif isinstance(rules, QuantRule):
        rules = [rules]
    else:
        try:
            rules = list(rules)
        except TypeError:
            raise RuleError(
                f"rules must be an int rank, a rule or a list of rules, got {type(rules).__name__}"
            ) from None
    for i, rule in enumerate(rules):
        if not isinstance(rule, QuantRule):
            raise RuleError(f"rule #{i} is a {type(rule).__name__}, not a LoraRule or QuantRule")
        validate_rule(i, rule)
    return rules


def validate_rule(index: int, rule: QuantRule) -> None:
    """Checks that need no model: types, ranges, regex, qtypes, method names."""
    where = rule_name(index, rule)
    if not isinstance(rule.module_path, str):
        raise RuleError(f"{where}: module_path must be a string regex")
    PatternSet(where, error=RuleError).compile(rule.module_path, "module_path")
    _check_qtype(where, "weight_qtype", rule.weight_qtype, "weight")
    _check_qtype(where, "act_qtype", rule.act_qtype, "activation")
    _check_qtype(where, "lora_weight_qtype", rule.lora_weight_qtype, "weight")
    _check_qtype(where, "lora_act_qtype", rule.lora_act_qtype, "activation")
    if rule.group_size is not None and (not isinstance(rule.group_size, int) or rule.group_size < 1):
        raise RuleError(f"{where}: group_size must be a positive int or None, got {rule.group_size!r}")
    if rule.group_size is not None and rule.weight_qtype == "fp8_e4m3":
        raise RuleError(f"{where}: fp8_e4m3 weights are scaled per channel; group_size must be None")
    if rule.weight_calibration not in weight_method_names():
        raise RuleError(
            f"{where}: weight_calibration must be one of {weight_method_names()}, "
            f"got {rule.weight_calibration!r}"
        )
    _check_grids(where, rule)
    kinds = rule.site_kinds
    if not isinstance(kinds, tuple) or not kinds or any(k not in SITE_KINDS for k in kinds):
        raise RuleError(f"{where}: site_kinds must be a non-empty list of {SITE_KINDS}, got {kinds!r}")
    if rule.act_calibration not in ACT_CALIBRATIONS:
        raise RuleError(
            f"{where}: act_calibration must be one of {ACT_CALIBRATIONS}, got {rule.act_calibration!r}"
        )
    if isinstance(rule.act_percentile, bool) or not isinstance(rule.act_percentile, (int, float)) or not (
        0.0 < rule.act_percentile <= 100.0
    ):
        raise RuleError(f"{where}: act_percentile must be in (0, 100], got {rule.act_percentile!r}")
    if isinstance(rule, LoraRule):
        if not isinstance(rule.rank, int) or isinstance(rule.rank, bool) or rule.rank < 1:
            raise RuleError(f"{where}: rank must be an int >= 1, got {rule.rank!r}")
        if rule.alpha is not None:
            check_lora_alpha(rule.alpha, f"{where}: alpha", error=RuleError)
        if not (isinstance(rule.dropout, (int, float)) and 0.0 <= rule.dropout < 1.0):
            raise RuleError(f"{where}: dropout must be in [0, 1), got {rule.dropout!r}")
        _check_init(where, rule)
        if not isinstance(rule.use_dora, bool):
            raise RuleError(f"{where}: use_dora must be true or false, got {rule.use_dora!r}")
        if not isinstance(rule.share_experts, bool):
            raise RuleError(f"{where}: share_experts must be true or false, got {rule.share_experts!r}")


def _check_init(where: str, rule: LoraRule) -> None:
    """The init names one of LORA_INITS (or PEFT's ``pissa_niter_K``) and fits the rule's base."""
    from graphlora.lora_init import pissa_niter

    if not isinstance(rule.init, str) or (rule.init not in LORA_INITS and pissa_niter(rule.init) is None):
        raise RuleError(f"{where}: init must be one of {LORA_INITS} or 'pissa_niter_K' (K >= 1 subspace "
                        f"iterations), got {rule.init!r}")
    if isinstance(rule.loftq_iter, bool) or not isinstance(rule.loftq_iter, int) or rule.loftq_iter < 1:
        raise RuleError(f"{where}: loftq_iter must be an int >= 1, got {rule.loftq_iter!r}")
    if rule.init == "loftq" and not rule.weight_qtype:
        raise RuleError(f"{where}: init='loftq' fits A, B to the base's quantization error; set "
                        "weight_qtype (e.g. 'nf4' or 'int4'), or use init='pissa' on a float base")
    if rule.init == "loftq" and rule.needs_calibration_data:
        raise RuleError(f"{where}: init='loftq' re-quantizes the base at each iteration, which "
                        f"weight_calibration={rule.weight_calibration!r} (data-driven) cannot; use "
                        "'absmax', 'minmax' or 'mse'")


def _check_grids(where: str, rule: QuantRule) -> None:
    """A grid is one of GRIDS; the restricted grid needs a symmetric integer encoding to apply to."""
    from graphlora.quant.qtypes import GRIDS, get_qtype

    for name in ("weight_grid", "act_grid"):
        grid = getattr(rule, name)
        if grid is not None and grid not in GRIDS:
            raise RuleError(f"{where}: {name} must be one of {GRIDS} or None, got {grid!r}")
    if rule.weight_grid == "restricted":
        qtypes = [q for q in (rule.weight_qtype, rule.lora_weight_qtype) if q is not None]
        if qtypes and not any(get_qtype(q).kind == "int" for q in qtypes):
            raise RuleError(f"{where}: weight_grid='restricted' needs an integer weight qtype "
                            f"({' / '.join(qtypes)} has no restricted grid)")
        asymmetric = rule.weight_symmetric is False or (
            rule.weight_calibration == "minmax" and rule.weight_symmetric is None)
        if rule.weight_qtype is not None and asymmetric:
            raise RuleError(f"{where}: weight_grid='restricted' is a symmetric grid, but the base "
                            "weights are asymmetric (weight_symmetric=False or minmax calibration)")
    if rule.act_grid == "restricted" and not rule.act_symmetric:
        raise RuleError(f"{where}: act_grid='restricted' is a symmetric grid; set act_symmetric=True "
                        "(asymmetric activations always use the full range)")


def _check_qtype(where: str, field_name: str, qtype: str | None, usage: str) -> None:
    if qtype is None:
        return
    try:
        check_qtype_use(qtype, usage)
    except Exception as exc:
        raise RuleError(f"{where}: {field_name}: {exc}") from None


@dataclass(frozen=True)
class RuleMatch:
    """The rule a module path matched: its index in the rule list and the rule itself."""

    index: int
    rule: QuantRule


class RuleMatcher:
    """The rules' ``module_path`` patterns compiled once, matched within one time budget."""

    def __init__(self, rules: Sequence[QuantRule]):
        self.rules = list(rules)
        patterns = PatternSet("", error=RuleError)
        self._patterns = [patterns.compile(r.module_path, f"{rule_name(i, r)}: module_path")
                          for i, r in enumerate(self.rules)]

    def first(self, module_path: str, site_kind: str = "linear") -> RuleMatch | None:
        """The first rule for ``site_kind`` sites whose ``module_path`` fully matches
        ``module_path`` (None: no rule)."""
        for i, (rule, pattern) in enumerate(zip(self.rules, self._patterns)):
            if site_kind in rule.site_kinds and pattern.fullmatch(module_path):
                return RuleMatch(i, rule)
        return None

    def any_kind(self, module_path: str) -> RuleMatch | None:
        """The first rule whose pattern matches ``module_path`` whatever its ``site_kinds``."""
        for i, (rule, pattern) in enumerate(zip(self.rules, self._patterns)):
            if pattern.fullmatch(module_path):
                return RuleMatch(i, rule)
        return None


def first_match(module_path: str, rules: Sequence[QuantRule], site_kind: str = "linear") -> RuleMatch | None:
    """The first rule matching ``module_path`` (see :class:`RuleMatcher` to match many paths)."""
    return RuleMatcher(rules).first(module_path, site_kind)
