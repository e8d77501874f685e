"""Where LoRA weights live inside a transformed GraphModule, and how they are named.

Every adapter's weights sit under one root attribute of the GraphModule, mirroring the module
paths of the sites: ``graphlora_adapters.<adapter>.<module_path>.lora_A.weight`` (rank, in) and
``...lora_B.weight`` (out, rank). Keeping them in their own tree (rather than beside the base
weight) works for sites whose "module" is a bare parameter (``raw``) and lets several named
adapters coexist. Users see PEFT's names, ``<module_path>.lora_A.weight``; the mapping is here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from graphlora.errors import AdapterError
from graphlora.dora import MAGNITUDE
from graphlora.graph_utils import ensure_container
from graphlora.scaling import lora_scale
from graphlora.sites import ConvGeometry

ADAPTERS_ROOT = "graphlora_adapters"
DEFAULT_ADAPTER = "default"


#: Base dtypes whose LoRA factors are created in float32 when autocasting (PEFT 0.21's
#: ``cast_adapter_dtype``: float16, bfloat16 and the float8 types this torch has).
UPCAST_DTYPES = frozenset(
    {torch.float16, torch.bfloat16}
    | {getattr(torch, name) for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
                                          "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, name)}
)


def adapter_dtype(base_dtype: torch.dtype, autocast: bool = True) -> torch.dtype:
    """The dtype new LoRA factors get on a base weight of ``base_dtype``: float32 for a
    half-precision (or float8) base with ``autocast``, as PEFT's ``autocast_adapter_dtype=True``
    (the default there too: small factors trained in bf16 lose most of their updates to
    rounding), else the base's own dtype."""
    return torch.float32 if autocast and base_dtype in UPCAST_DTYPES else base_dtype


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters of one module path in one adapter.

    ``autocast_dtype``: new factors of a float16/bfloat16 base are float32 (see
    :func:`adapter_dtype`); the branch then casts its input up and its sum back, as PEFT does.
    ``False`` keeps them in the base's dtype.
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    autocast_dtype: bool = True
    loftq_iter: int = 1
    use_dora: bool = False  # DoRA: a magnitude vector next to the pair (graphlora.dora)
    share_experts: bool = False  # experts sites: one pair for every expert

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)


def _path(adapter: str, module_path: str) -> str:
    return ".".join(p for p in (ADAPTERS_ROOT, adapter, module_path) if p)


def lora_param_name(adapter: str, module_path: str, which: str) -> str:
    """Qualified attribute name of ``lora_A``/``lora_B`` weight in the GraphModule."""
    if which not in ("lora_A", "lora_B", MAGNITUDE):
        raise ValueError(which)
    return f"{_path(adapter, module_path)}.{which}.weight"


def peft_name(module_path: str, which: str) -> str:
    """PEFT's user-facing name: ``<module_path>.lora_A.weight``."""
    return f"{module_path}.{which}.weight" if module_path else f"{which}.weight"


class LoraFactor(nn.Module):
    """A LoRA factor that is not a matrix of a linear layer (a convolution's ``A`` of shape
    ``(r, in, *kernel)``, an embedding's factors), named ``.weight`` like PEFT's layers."""

    def __init__(self, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))


def factor_shapes(rank: int, in_features: int, out_features: int, conv: ConvGeometry | None = None,
                  experts: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(A, B)`` shapes of one pair, PEFT's: ``(r, in)`` and ``(out, r)``; for a convolution
    ``A`` is a convolution with the site's kernel, ``(r, in, *kernel)``, and ``B`` a 1x1
    convolution in the site's groups, ``(out, r / groups, 1, ...)``; for ``experts`` stacked
    weights one pair per expert, stacked as PEFT's ``ParamWrapper`` does: ``(r * E, in)`` and
    ``(out, r * E)`` (see :func:`graphlora.branches.expert_factors`)."""
    if conv is None:
        return (rank * experts, in_features), (out_features, rank * experts)
    ones = (1,) * conv.dims
    return (rank, in_features, *conv.kernel_size), (out_features, rank // conv.groups, *ones)


def create_lora_pair(
    gm: nn.Module,
    adapter: str,
    module_path: str,
    spec: LoraSpec,
    in_features: int,
    out_features: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    site_kind: str = "linear",
    conv: ConvGeometry | None = None,
    experts: int = 1,
) -> tuple[str, str]:
    """Create (or keep, if present with the right shapes) the A/B weights of one module path.

    New factors start as PEFT's for the site's kind: ``B = 0`` and ``A`` kaiming-uniform
    (``a = sqrt(5)``, over the fan-in of a convolution's kernel too) or N(0, 1/r) (``gaussian``);
    an embedding's the other way round, ``A = 0`` and ``B`` ~ N(0, 1), as PEFT's
    ``lora_embedding_A/B``.
    """
    container = ensure_container(gm, _path(adapter, module_path))
    a_name = lora_param_name(adapter, module_path, "lora_A")
    b_name = lora_param_name(adapter, module_path, "lora_B")
    a_shape, b_shape = factor_shapes(spec.rank, in_features, out_features, conv, experts)
    existing = container._modules.get("lora_A")
    if existing is not None and tuple(existing.weight.shape) == a_shape:
        return a_name, b_name
    if spec.init not in ("kaiming", "gaussian"):
        # PiSSA/OLoRA/LoftQ factors come from the base weight, set by LoraInitPass before the
        # base is quantized (graphlora.passes.lora_init); a fresh pair cannot make them
        raise AdapterError(
            f"{module_path!r}: init={spec.init!r} computes LoRA factors from the base weight and changes the "
            "base, which only transform() does (a LoraRule with that init); add this adapter with init "
            "'kaiming' or 'gaussian'"
        )
    if site_kind in ("linear", "experts"):
        lora_a = nn.Linear(in_features, a_shape[0], bias=False, device=device, dtype=dtype)
        lora_b = nn.Linear(b_shape[1], out_features, bias=False, device=device, dtype=dtype)
    else:
        lora_a = LoraFactor(a_shape, dtype=dtype, device=device)
        lora_b = LoraFactor(b_shape, dtype=dtype, device=device)
    with torch.no_grad():
        if site_kind == "embedding":  # PEFT's lora_embedding_A/B: the other factor starts at zero
            nn.init.zeros_(lora_a.weight)
            nn.init.normal_(lora_b.weight)
        else:
            if spec.init == "gaussian":
                # PEFT's "gaussian": std = 1/rank
                nn.init.normal_(lora_a.weight, std=1.0 / spec.rank)
            else:
                # PEFT's default: kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))
                nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
    container.add_module("lora_A", lora_a)
    container.add_module("lora_B", lora_b)
    return a_name, b_name


#: Attribute of a pair's container holding the factors a base-changing init started from.
INITIAL_ATTR = "_graphlora_initial_factors"


def set_lora_pair(
    gm: nn.Module,
    adapter: str,
    module_path: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    dtype: torch.dtype,
    keep_initial: bool = False,
) -> tuple[str, str]:
    """Create the A/B weights of one module path with the given values (an init computed from the
    base weight). ``keep_initial``: remember a copy of them, which turning the adapter into a plain
    LoRA on the original base needs (PEFT's ``path_initial_model_for_weight_conversion``)."""
    container = ensure_container(gm, _path(adapter, module_path))
    for which, value in (("lora_A", lora_a), ("lora_B", lora_b)):
        layer = nn.Linear(value.shape[1], value.shape[0], bias=False, device=value.device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(value)
        container.add_module(which, layer)
    if keep_initial:
        initial = tuple(m.weight.detach().clone() for m in (container.lora_A, container.lora_B))
        object.__setattr__(container, INITIAL_ATTR, initial)
    return lora_param_name(adapter, module_path, "lora_A"), lora_param_name(adapter, module_path, "lora_B")


def initial_factors(gm: nn.Module, adapter: str, module_path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A0, B0) a base-changing init started ``module_path``'s pair of ``adapter`` from, or None."""
    try:
        container = gm.get_submodule(_path(adapter, module_path))
    except AttributeError:
        return None
    return getattr(container, INITIAL_ATTR, None)


class Magnitude(nn.Module):
    """DoRA's magnitude vector ``(out,)`` under PEFT's module name, so its parameter is named
    ``<module_path>.lora_magnitude_vector.weight`` as in a PEFT model."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value.detach().clone())


def create_magnitude(gm: nn.Module, adapter: str, module_path: str, value: torch.Tensor) -> str:
    """Create (or keep, if present with the right shape) the DoRA magnitude of one module path,
    initialised to ``value`` (the base weight's row norms); returns its qualified name."""
    container = ensure_container(gm, _path(adapter, module_path))
    existing = container._modules.get(MAGNITUDE)
    if existing is None or tuple(existing.weight.shape) != tuple(value.shape):
        container.add_module(MAGNITUDE, Magnitude(value))
    return lora_param_name(adapter, module_path, MAGNITUDE)


def iter_lora_weights(gm: nn.Module, adapter: str) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(module_path, "lora_A"|"lora_B"|"lora_magnitude_vector", parameter) for every pair of
    ``adapter`` (and DoRA magnitude)."""
    root = gm._modules.get(ADAPTERS_ROOT)
    if root is None or adapter not in root._modules:
        return
    base = root._modules[adapter]
    for name, module in base.named_modules():
        head, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B") and isinstance(module, (nn.Linear, LoraFactor)):
            yield head, leaf, module.weight
        elif leaf == MAGNITUDE and isinstance(module, Magnitude):
            yield head, leaf, module.weight


def adapter_names(gm: nn.Module) -> list[str]:
    root = gm._modules.get(ADAPTERS_ROOT)
    return list(root._modules) if root is not None else []


def delete_adapter_weights(gm: nn.Module, adapter: str) -> None:
    root = gm._modules.get(ADAPTERS_ROOT)
    if root is not None:
        root._modules.pop(adapter, None)
