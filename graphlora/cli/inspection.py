"""``graphlora inspect``: what ``transform`` would do with a rules file, before anything changes.

The matching is ``transform``'s own (:class:`~graphlora.passes.match_rules.MatchRulesPass` on the
traced graph), so the report and the rank check cannot drift from what ``transform`` does.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphlora.cli.app import subcommand, wrap_help
from graphlora.cli.model_options import MODEL_HELP, add_model_arguments, load_rules_and_model
from graphlora.errors import RuleError
from graphlora.model_source import LoadedModel

if TYPE_CHECKING:
    import torch.fx as fx
    import torch.nn as nn

    from graphlora.rules import QuantRule

__all__ = ["Inspection", "SiteReport", "inspect_sites"]


@dataclass
class SiteReport:
    """One matched module path: its shape, how often the graph uses it, and the winning rule."""

    module_path: str
    in_features: int
    out_features: int
    uses: int
    rule_index: int
    rule: "QuantRule"

    @property
    def lora_parameters(self) -> int:
        rank = getattr(self.rule, "rank", 0) if self.rule.has_lora else 0
        return rank * (self.in_features + self.out_features)

    @property
    def quantized_parameters(self) -> int:
        return self.in_features * self.out_features if self.rule.weight_qtype else 0

    def qtypes(self) -> str:
        """``weight=int4/g32 act=int8 lora_weight=... lora_act=...`` (only what the rule sets)."""
        r = self.rule
        parts = []
        if r.weight_qtype:
            parts.append(f"weight={r.weight_qtype}" + (f"/g{r.group_size}" if r.group_size else ""))
        for name in ("act_qtype", "lora_weight_qtype", "lora_act_qtype"):
            value = getattr(r, name)
            if value:
                parts.append(f"{name[: -len('_qtype')]}={value}")
        return " ".join(parts) or "-"


@dataclass
class Inspection:
    """What ``transform`` would do with these rules, computed without changing anything."""

    sites: list[SiteReport]
    unmatched: list[str]
    unused_rules: list[int]
    problems: list[str]
    model_parameters: int

    @property
    def lora_parameters(self) -> int:
        return sum(s.lora_parameters for s in self.sites)

    @property
    def quantized_parameters(self) -> int:
        return sum(s.quantized_parameters for s in self.sites)


def inspect_sites(gm: "fx.GraphModule", rules: Sequence["QuantRule"], model_parameters: int = 0) -> Inspection:
    """Run ``transform``'s own MatchRulesPass on a traced graph (a throwaway one: the pass tags its
    nodes), collecting every rank problem instead of raising on the first, and group its results
    by module path."""
    from graphlora.passes.match_rules import MatchRulesPass
    from graphlora.sites import iter_site_groups

    matching = MatchRulesPass(rules, collect_problems=True)
    matching(gm)
    match_of = {site.module_path: match for site, match in matching.matched}
    reports = []
    for path, group in iter_site_groups([site for site, _ in matching.matched]):
        spec, match = group[0].spec, match_of[path]
        reports.append(SiteReport(path, spec.in_features, spec.out_features, len(group), match.index, match.rule))
    unmatched = [path for path, _ in iter_site_groups(matching.unmatched)]
    problems = [f"rule #{index}: {problem}" for index, problem in matching.problems]
    return Inspection(reports, unmatched, matching.unused_rules, problems, model_parameters)


def _count_parameters(model: "nn.Module") -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already skips tied duplicates


def _inspection_json(ins: Inspection, rules: Sequence["QuantRule"], loaded: LoadedModel) -> dict[str, Any]:
    return {
        "model": loaded.description,
        "rules": [{"index": i, "rule": r.describe(), "sites": [s.module_path for s in ins.sites if s.rule_index == i]}
                  for i, r in enumerate(rules)],
        "sites": [
            {
                "module_path": s.module_path,
                "in_features": s.in_features,
                "out_features": s.out_features,
                "uses": s.uses,
                "rule_index": s.rule_index,
                "lora": s.rule.has_lora,
                "rank": getattr(s.rule, "rank", None),
                "alpha": getattr(s.rule, "lora_alpha", None),
                "weight_qtype": s.rule.weight_qtype,
                "group_size": s.rule.group_size,
                "act_qtype": s.rule.act_qtype,
                "lora_weight_qtype": s.rule.lora_weight_qtype,
                "lora_act_qtype": s.rule.lora_act_qtype,
                "lora_parameters": s.lora_parameters,
            }
            for s in ins.sites
        ],
        "unmatched": ins.unmatched,
        "unused_rules": ins.unused_rules,
        "problems": ins.problems,
        "parameters": {
            "model": ins.model_parameters,
            "lora": ins.lora_parameters,
            "quantized": ins.quantized_parameters,
        },
    }


def _describe_inputs(loaded: LoadedModel) -> str:
    import torch

    def one(name: str, value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{name}[{','.join(str(d) for d in value.shape)}]"
        return f"{name}={value!r}"

    items = [one(f"arg{i}", v) for i, v in enumerate(loaded.example_args)]
    items += [one(k, v) for k, v in loaded.example_kwargs.items()]
    return ", ".join(items) if items else "none"


def _format_inspection(ins: Inspection, rules: Sequence["QuantRule"], loaded: LoadedModel, rules_path: str,
                       show_unmatched: bool) -> str:
    total_sites = len(ins.sites) + len(ins.unmatched)
    lines = [
        f"model: {loaded.description}",
        f"example inputs: {_describe_inputs(loaded)}",
        f"rules: {rules_path} ({len(rules)} rule{'s' if len(rules) != 1 else ''})",
        "",
    ]
    width = max([len(s.module_path) for s in ins.sites] + [11])
    for i, rule in enumerate(rules):
        mine = [s for s in ins.sites if s.rule_index == i]
        lines.append(f"rule #{i} {rule.describe()}: {len(mine)} site{'s' if len(mine) != 1 else ''}")
        for s in mine:
            rank = f"rank {s.rule.rank:<3} alpha {s.rule.lora_alpha:g}" if s.rule.has_lora else "no LoRA"
            uses = f"  (used {s.uses}x)" if s.uses > 1 else ""
            lines.append(
                f"  {s.module_path:<{width}}  in {s.in_features:>5} out {s.out_features:>5}  {rank:<18} {s.qtypes()}{uses}"
            )
    lines.append("")
    lines.append(f"linear sites: {total_sites} ({len(ins.sites)} matched, {len(ins.unmatched)} left untouched)")
    if ins.unmatched and show_unmatched:
        lines.extend(f"  untouched: {path}" for path in ins.unmatched)
    if ins.unused_rules:
        lines.append("unused rules: " + "; ".join(f"#{i} {rules[i].describe()}" for i in ins.unused_rules))
    pct = 100.0 * ins.lora_parameters / ins.model_parameters if ins.model_parameters else 0.0
    lines.append(
        f"parameters: {ins.model_parameters:,d} in the model; LoRA adds {ins.lora_parameters:,d} trainable "
        f"({pct:.2f}%); {ins.quantized_parameters:,d} base weights quantized"
    )
    for problem in ins.problems:
        lines.append(f"problem: {problem}")
    return "\n".join(lines)


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    parser.add_argument("-a", "--all", action="store_true", help="also list the linear sites no rule matches")
    parser.add_argument("--strict", action="store_true", help="unused rules are an error (exit 2), as transform(strict=True)")


@subcommand(
    "inspect",
    help="show which layers each rule would change, before changing anything",
    arguments=_inspect_arguments,
    description=wrap_help(
        "Trace MODEL and match RULES against its linear layers the way `graphlora transform` would: "
        "for each rule the module paths it wins (shape, rank, alpha, qtypes), the rules that match "
        "nothing and the parameter counts. Nothing is written.",
        "exit status: 0 if transform would accept the rules, 2 otherwise (a rank larger than a layer "
        "allows; unused rules with --strict).",
    )
    + MODEL_HELP,
)
def run_inspect(args: argparse.Namespace) -> int:
    from graphlora.trace import trace

    rules, loaded = load_rules_and_model(args, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # static-shape fallbacks do not matter here
        gm = trace(loaded.model, loaded.example_args, loaded.example_kwargs, method=args.method)
    ins = inspect_sites(gm, rules, _count_parameters(loaded.model))
    if args.json:
        print(json.dumps(_inspection_json(ins, rules, loaded), indent=2))
    else:
        print(_format_inspection(ins, rules, loaded, args.rules, args.all))
    if ins.problems:
        more = f" (and {len(ins.problems) - 1} more)" if len(ins.problems) > 1 else ""
        raise RuleError(f"{args.rules}: {ins.problems[0]}{more}")
    if args.strict and ins.unused_rules:
        raise RuleError(
            f"{args.rules}: {len(ins.unused_rules)} rule(s) matched no linear site: "
            + ", ".join(f"#{i}" for i in ins.unused_rules)
            + " (--strict)"
        )
    return 0
