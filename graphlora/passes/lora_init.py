"""Start LoRA factors from the base weight (PiSSA, OLoRA, LoftQ) and rewrite the base to match.

Runs after the rules are matched and before the base is quantized, because all three need the
float weight: PiSSA/OLoRA leave the residual ``W - scale * B @ A`` as the base (a quantized base
then quantizes the residual: PEFT's documented QPiSSA flow, the residual made in float and
quantized afterwards); LoftQ leaves the tensor whose quantization is its final ``Q``, which the
quantization pass after this one turns into exactly that ``Q`` (same rule, same encoding).
The factors are created here; :class:`~graphlora.passes.insert_lora.InsertLoraPass` keeps a pair
that already exists, so it inserts branches reading them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from graphlora import lora_init, meta
from graphlora.adapters import adapter_dtype, set_lora_pair
from graphlora.errors import PassError
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.insert_lora import param_features
from graphlora.passes.quantize_weights import rule_encoding
from graphlora.passes.weights import groups_by_weight, replace_with_tensor
from graphlora.rules import LoraRule
from graphlora.sites import LinearSite, tagged_sites


@dataclass
class LoraInitPass(GraphPass):
    """Compute the factors of every site whose LoraRule has a base-changing ``init``."""

    adapter: str
    autocast_dtype: bool = True
    initialised: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"LoraInitPass[{self.adapter}]"

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.initialised = []
        for weight_name, sites in groups_by_weight(tagged_sites(gm)).items():
            rule = sites[0].rule
            if not isinstance(rule, LoraRule) or not lora_init.is_base_init(rule.init):
                continue
            _init_group(gm, self.adapter, weight_name, sites, rule, self.autocast_dtype)
            self.initialised.append(sites[0].module_path)
        return PassResult(gm, bool(self.initialised))


def _init_group(gm: fx.GraphModule, adapter: str, weight_name: str, sites: list[LinearSite],
                rule: LoraRule, autocast: bool) -> None:
    where = f"{sites[0].module_path!r} (weight {weight_name!r}, init={rule.init!r})"
    paths = sorted({s.module_path for s in sites})
    if len(paths) > 1:
        raise PassError(f"{where}: the weight is used by {', '.join(paths)}; a base-changing init would "
                        "change it for all of them. Use init='kaiming' for a shared weight")
    info = meta.info(sites[0].node)
    if "weight_qtype" in info or "weight_encoding" in info:
        raise PassError(f"{where}: the base is quantized already (a checkpoint read with quantization); "
                        "this init needs the float weight. Transform the float model instead")
    site = sites[0]
    in_f, out_f = param_features(site)
    stored = site.param_value().detach()
    transposed = site.spec.param_layout != "out_in"
    weight = stored.t() if transposed else stored
    if tuple(weight.shape) != (out_f, in_f):
        raise PassError(f"{where}: weight of shape {tuple(stored.shape)} does not read as ({out_f}, {in_f})")
    base_dtype = getattr(torch, site.spec.weight_dtype)
    scale = float(rule.scale)
    try:
        if rule.init == "olora":
            a, b, base = lora_init.olora(weight, rule.rank, scale)
        elif rule.init == "loftq":
            a, b, base = lora_init.loftq(weight, rule.rank, scale, rule.loftq_iter,
                                         _quant_dequant(site, rule, base_dtype, transposed))
        else:
            a, b, base = lora_init.pissa(weight, rule.rank, scale, lora_init.pissa_niter(rule.init))
    except ValueError as exc:
        raise PassError(f"{where}: {exc}") from None
    set_lora_pair(gm, adapter, site.module_path, a, b, dtype=adapter_dtype(base_dtype, autocast),
                  keep_initial=True)
    base = base.to(base_dtype)
    replace_with_tensor(gm, sites, base.t().contiguous() if transposed else base, suffix="lora_init")


def _quant_dequant(site: LinearSite, rule: LoraRule, dtype: torch.dtype, transposed: bool):
    """The base's quantizer as the quantization pass will apply it: the rule's encoding of the
    weight in its stored dtype and layout, dequantized to float32 ``(out, in)``."""

    def quant_dequant(w: torch.Tensor) -> torch.Tensor:
        stored = (w.t() if transposed else w).to(dtype).contiguous()
        encoding = rule_encoding(site, rule, stored)
        on_grid = encoding.dequantize(encoding.quantize(stored), torch.float32)
        return on_grid.t() if transposed else on_grid

    return quant_dequant
