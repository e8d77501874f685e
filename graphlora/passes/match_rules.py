"""Match rules to linear sites and tag each matched site's node.

This pass is where op spellings are recognised (through :mod:`graphlora.sites`); it writes the
normalised :class:`~graphlora.sites.SiteSpec` and the winning rule into the node metadata, so the
passes after it only read tags. Checks that need the model happen here, naming the rule and the
site: a rank larger than the layer it is applied to, and a quantization the ONNX export could not
express (an NF4 group size onnxruntime's MatMulBnb4 cannot hold), refused before any training
is spent on it rather than at export.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx

from graphlora import meta
from graphlora.errors import GraphloraWarning, RuleError
from graphlora.passes.base import GraphPass, PassResult
from graphlora.quant import get_qtype
from graphlora.quant.bnb_blocks import bnb_block_problem
from graphlora.rules import SITE_KINDS, QuantRule, RuleMatch, RuleMatcher, rule_name
from graphlora.sites import LinearSite, find_sites


@dataclass
class MatchRulesPass(GraphPass):
    rules: Sequence[QuantRule]
    strict: bool = False
    #: Keep every rank problem in ``problems`` instead of raising on the first, and leave unused
    #: rules to the caller instead of warning: for a report of everything at once (graphlora inspect).
    collect_problems: bool = False
    matched: list[tuple[LinearSite, RuleMatch]] = field(default_factory=list)
    unmatched: list[LinearSite] = field(default_factory=list)
    unused_rules: list[int] = field(default_factory=list)
    #: (rule index, what is wrong) once per problem, with ``collect_problems``.
    problems: list[tuple[int, str]] = field(default_factory=list)

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.matched, self.unmatched, self.problems = [], [], []
        used: set[int] = set()
        matcher = RuleMatcher(self.rules)
        kinds = tuple(dict.fromkeys(k for r in self.rules for k in r.site_kinds)) or ("linear",)
        other_kinds: dict[int, set[str]] = {}  # rule -> kinds of sites its pattern matched but not its kinds
        for site in find_sites(gm, SITE_KINDS):
            kind = site.spec.site_kind
            match = matcher.first(site.module_path, kind) if kind in kinds else None
            if match is None:
                if kind == "linear":
                    self.unmatched.append(site)
                else:
                    near = matcher.any_kind(site.module_path)
                    if near is not None:
                        other_kinds.setdefault(near.index, set()).add(kind)
                continue
            used.add(match.index)
            problem = (_rank_problem(match.rule, site) or _kind_problem(match.rule, site)
                       or _export_problem(match.rule, site))
            if problem is not None:
                if not self.collect_problems:
                    raise RuleError(f"{rule_name(match.index, match.rule)}: {problem}")
                if (match.index, problem) not in self.problems:  # a layer used twice is one problem
                    self.problems.append((match.index, problem))
            meta.tag(
                site.node,
                "base",
                module_path=site.module_path,
                site=site.spec,
                rule=match.rule,
                rule_index=match.index,
            )
            self.matched.append((site, match))
        self.unused_rules = [i for i in range(len(self.rules)) if i not in used]
        if self.unused_rules:
            names = "; ".join(rule_name(i, self.rules[i]) + _kinds_hint(other_kinds.get(i))
                              for i in self.unused_rules)
            what = ("linear site" if all(self.rules[i].site_kinds == ("linear",) for i in self.unused_rules)
                    else "site of their site_kinds")
            message = f"{len(self.unused_rules)} rule(s) matched no {what}: {names}"
            if self.strict:
                raise RuleError(message + " (strict=True)")
            if not self.collect_problems:
                warnings.warn(message, GraphloraWarning, stacklevel=4)
        return PassResult(gm, bool(self.matched))


def _kinds_hint(kinds: set[str] | None) -> str:
    if not kinds:
        return ""
    return (f" (its module_path matches {' and '.join(sorted(kinds))} sites; add site_kinds="
            f"{('linear', *sorted(kinds))!r} to adapt them)")


def _kind_problem(rule: QuantRule, site: LinearSite) -> str | None:
    """Why ``rule`` cannot apply to an embedding or convolution ``site``, or None: those sites get
    plain LoRA (kaiming or gaussian init) on a float weight, nothing else yet."""
    kind = site.spec.site_kind
    if kind == "linear":
        return None
    where = f"site {site.spec.key!r} ({kind})"
    quantized = [f for f in ("act_qtype", "lora_weight_qtype", "lora_act_qtype") if getattr(rule, f) is not None]
    if rule.weight_qtype is not None and kind in ("embedding", "conv"):
        qtype = get_qtype(rule.weight_qtype)
        if qtype.kind != "int":
            return (f"{where}: weight_qtype={rule.weight_qtype!r}: embedding and convolution weights are "
                    "quantized to integer grids (int8, int4, uint8, uint4, ...), which ONNX's "
                    "DequantizeLinear feeds to Gather / Conv")
        if kind == "conv" and rule.group_size is not None:
            return (f"{where}: group_size={rule.group_size}: a convolution's weight is quantized per "
                    "output channel (group_size=None)")
        if rule.weight_method.needs_data:
            return f"{where}: weight_calibration={rule.weight_calibration!r} runs on linear sites only"
    elif rule.weight_qtype is not None:
        quantized.insert(0, "weight_qtype")
    if quantized:
        return (f"{where}: {quantized[0]} is not supported on {kind} sites yet (quantize its linear "
                "layers with a rule whose site_kinds is ('linear',), and LoRA here with another rule)")
    if getattr(rule, "use_dora", False):
        return f"{where}: DoRA is supported on linear sites only"
    if getattr(rule, "init", "kaiming") not in ("kaiming", "gaussian"):
        return f"{where}: init={rule.init!r} is supported on linear sites only; use 'kaiming' or 'gaussian'"
    if site.spec.use_layout != site.spec.param_layout:
        return f"{where}: the weight is also read in the other orientation"
    if kind == "experts" and getattr(rule, "dropout", 0.0):
        return (f"{where}: LoRA dropout cannot apply to stacked expert weights (the input of each "
                "expert's pair is not factored out; PEFT refuses it too); set dropout=0 for this rule")
    conv = site.spec.conv
    if conv is not None and rule.has_lora and rule.rank % conv.groups:
        return (f"{where}: rank {rule.rank} is not a multiple of the convolution's groups={conv.groups} "
                "(B is a 1x1 convolution in those groups, as in PEFT)")
    return None


def _rank_problem(rule: QuantRule, site: LinearSite) -> str | None:
    """Why ``rule``'s LoRA cannot apply to ``site`` (a rank above min(in, out)), or None."""
    if not rule.has_lora or site.spec.conv is not None:  # a kernel's fan-in is in * taps: no bound
        return None
    limit = min(site.spec.in_features, site.spec.out_features)
    if rule.rank <= limit:
        return None
    return (
        f"rank {rule.rank} is larger than the matched site {site.module_path!r} allows "
        f"(in={site.spec.in_features}, out={site.spec.out_features}, so rank <= {limit})"
    )


def _export_problem(rule: QuantRule, site: LinearSite) -> str | None:
    """Why ``rule``'s weight quantization of ``site`` could not be exported to ONNX, or None."""
    if rule.weight_qtype != "nf4":
        return None
    if site.spec.use_layout != site.spec.param_layout:
        return (
            f"site {site.spec.key!r} reads its weight transposed (the weight is also used the other "
            "way round), so its NF4 blocks would run along the output features; onnxruntime's "
            "MatMulBnb4 (the only kernel that reads NF4) needs them along the input features of "
            "every use. Quantize this weight with int4/uint4 (QDQ reads either orientation)"
        )
    problem = bnb_block_problem(rule.group_size, site.spec.in_features)
    return None if problem is None else f"site {site.module_path!r}: {problem}"
