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
LORA_INITS = ("kaiming", "gaussian")


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
    """

    module_path: str = field(default=".*", kw_only=False)
    weight_qtype: str | None = None
    group_size: int | None = None
    weight_symmetric: bool | None = None  # None: the calibration method's default
    weight_calibration: str = "absmax"
    double_quant: bool = False
    act_qtype: str | None = None
    act_symmetric: bool = False
    act_calibration: str = "minmax"
    act_percentile: float = 99.99
    lora_weight_qtype: str | None = None
    lora_act_qtype: str | None = None

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
    """

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    init: str = "kaiming"
    use_rslora: bool = False

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
        if rule.init not in LORA_INITS:
            raise RuleError(f"{where}: init must be one of {LORA_INITS}, got {rule.init!r}")


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

    def first(self, module_path: str) -> RuleMatch | None:
        """The first rule whose ``module_path`` fully matches ``module_path`` (None: no rule)."""
        for i, (rule, pattern) in enumerate(zip(self.rules, self._patterns)):
            if pattern.fullmatch(module_path):
                return RuleMatch(i, rule)
        return None


def first_match(module_path: str, rules: Sequence[QuantRule]) -> RuleMatch | None:
    """The first rule matching ``module_path`` (see :class:`RuleMatcher` to match many paths)."""
    return RuleMatcher(rules).first(module_path)
