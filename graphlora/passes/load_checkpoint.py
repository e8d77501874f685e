"""Fill a graph's tensors from a checkpoint, quantizing base weights as they are read.

QLoRA of a model that does not fit in float: the model is built on the ``meta`` device and traced
(shapes only), the rules are matched, and then this pass reads the checkpoint tensor by tensor.
A weight whose rule quantizes it (round to nearest) is quantized the moment it is read, and only
its codes are kept; every other tensor (norms, embeddings, an unquantized ``lm_head``, biases)
takes its place in the graph. The float model never exists: the peak is the quantized model
plus what the source holds while reading (one shard, or less).

The encodings and codes are those :class:`~graphlora.passes.quantize_weights.QuantizeWeightsPass`
computes for the same float values (the same functions run), and tensors are registered in the
order that pass registers them, so the result is the model ``transform`` makes from the float
model loaded normally. The pass knows no file format: it is given a :class:`TensorSource`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora import meta
from graphlora.errors import CheckpointMismatchError, GraphloraWarning, PassError, first_few
from graphlora.graph_utils import is_own, set_tensor
from graphlora.passes.base import GraphPass, PassResult
from graphlora.passes.quantize_weights import WEIGHT_ROOT, Storage, install_encoding, rule_encoding
from graphlora.passes.weights import groups_by_weight
from graphlora.sites import tagged_sites

__all__ = ["CheckpointMismatchError", "LoadCheckpointPass", "StateDictSource", "TensorSource"]


class TensorSource(Protocol):
    """Where tensors come from, by state-dict key (see :class:`graphlora.io.lazy_safetensors.LazyCheckpoint`)."""

    entries: Mapping  # key -> an object with .dtype and .shape

    def where(self, key: str) -> str: ...

    def read(self, keys: Iterable[str], *, progress: bool = True, desc: str = "loading") -> Iterator[tuple[str, torch.Tensor]]: ...


class StateDictSource:
    """A :class:`TensorSource` over tensors already in memory (a small checkpoint read whole)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str):
        self.entries = dict(tensors)
        self._where = where

    def where(self, key: str) -> str:
        return self._where

    def read(self, keys: Iterable[str], *, progress: bool = True, desc: str = "loading") -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys:
            yield key, self.entries[key]


@dataclass
class LoadCheckpointPass(GraphPass):
    """Give every tensor of the graph its value from ``source``.

    ``quantize``: weights whose rule asks for a round-to-nearest qtype are quantized as they are
    read (``storage`` as for QuantizeWeightsPass); otherwise they are loaded in float. ``skip``
    names tensors left as they are (``load_quantized`` installs saved codes there instead).
    ``compute_buffers`` gives values to meta buffers that are not in a state dict (rotary
    frequencies), which no checkpoint holds. Floating tensors of another float dtype are cast to
    the model's, as ``from_pretrained`` does; any other difference is refused.
    """

    source: TensorSource
    quantize: bool = True
    storage: Storage = "packed"
    skip: frozenset[str] = frozenset()
    compute_buffers: Callable[[list[str]], dict[str, torch.Tensor]] | None = None
    device: str = "cpu"
    progress: bool = True
    loaded: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "LoadCheckpointPass"

    def call(self, gm: fx.GraphModule) -> PassResult:
        groups = _tensor_groups(gm)
        state_keys = set(gm.meta.get(meta.STATE_KEYS_KEY) or ())
        plan: dict[str, list[str]] = {}  # checkpoint key -> the graph names it fills
        computed: list[list[str]] = []
        missing: list[str] = []
        for names in groups:
            key = next((n for n in names if n in self.source.entries), None)
            if key is not None:
                plan[key] = names
            elif any(n in self.skip for n in names):
                continue
            elif not any(n in state_keys for n in names) and _stand_in(_get(gm, names[0])):
                computed.append(names)
            elif any(n in state_keys for n in names):
                missing.append(names[0])
        if missing:
            raise CheckpointMismatchError(
                f"{self.source.where('')}: the checkpoint lacks {len(missing)} tensor(s) of this model: "
                f"{first_few(missing)}" + _unexpected_hint(self.source, gm)
            )
        self._check(gm, plan)
        unexpected = sorted(set(self.source.entries) - set(plan) - {n for g in groups for n in g})
        if unexpected:
            warnings.warn(f"{self.source.where('')}: {len(unexpected)} tensor(s) of the checkpoint belong to no tensor "
                          f"of this model and are not read: {first_few(unexpected)}", GraphloraWarning, stacklevel=2)
        quantized = self._quantized(gm)
        self.loaded = []
        for key, value in self.source.read(plan, progress=self.progress, desc="loading checkpoint"):
            names = plan[key]
            target = _get(gm, names[0])
            if value.dtype != target.dtype:
                value = value.to(target.dtype)
            for name in names:
                sites = quantized.get(name)
                if sites is not None:
                    rule = sites[0].rule
                    encoding = rule_encoding(sites[0], rule, value)
                    install_encoding(gm, sites, encoding, self.storage, weight=value, method=rule.weight_calibration)
            _assign(gm, names, value.to(self.device))
            self.loaded.append(key)
        for names in computed:
            values = self.compute_buffers(names) if self.compute_buffers is not None else {}
            if names[0] not in values:
                raise CheckpointMismatchError(
                    f"{names[0]!r} is on the meta device, belongs to no state dict (a buffer computed at "
                    "construction) and the checkpoint does not hold it: build the model with real buffers "
                    f"or give a model whose _init_weights computes it"
                )
            _assign(gm, names, values[names[0]].to(self.device))
        for site in tagged_sites(gm):
            spec = dataclasses.replace(site.spec, weight_device=self.device)
            meta.tag(site.node, "base", site=spec)
        _register_in_graph_order(gm)
        return PassResult(gm, bool(self.loaded or computed))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n for names in _tensor_groups(gm) for n in names[:1]
                if _stand_in(_get(gm, n)) and not any(m in self.skip for m in names)]
        if left:
            raise PassError(f"{self.name}: tensors still without a value (meta or fake): {first_few(left)}")

    def _check(self, gm: fx.GraphModule, plan: dict[str, list[str]]) -> None:
        wrong = []
        for key, names in plan.items():
            entry = self.source.entries[key]
            have = _get(gm, names[0])
            same_kind = entry.dtype == have.dtype or (entry.dtype.is_floating_point and have.dtype.is_floating_point)
            if tuple(entry.shape) != tuple(have.shape) or not same_kind:
                wrong.append(f"{key!r} in {self.source.where(key)} is {_describe(entry.dtype, entry.shape)}, "
                             f"the model's {names[0]!r} is {_describe(have.dtype, have.shape)}")
        if wrong:
            raise CheckpointMismatchError(
                f"{len(wrong)} tensor(s) of the checkpoint do not fit the model: {'; '.join(wrong[:5])}"
            )

    def _quantized(self, gm: fx.GraphModule) -> dict[str, list]:
        if not self.quantize:
            return {}
        out = {}
        for name, sites in groups_by_weight(tagged_sites(gm)).items():
            rule = sites[0].rule
            info = meta.info(sites[0].node)
            if name in self.skip or "weight_qtype" in info or "weight_encoding" in info:
                continue
            if rule is not None and rule.weight_qtype and not rule.needs_calibration_data:
                out[name] = sites
        return out


def _describe(dtype: torch.dtype, shape) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


def _unexpected_hint(source: TensorSource, gm: fx.GraphModule) -> str:
    names = {n for g in _tensor_groups(gm) for n in g}
    extra = [k for k in source.entries if k not in names]
    return f" (it holds tensors this model does not have, e.g. {first_few(extra, 3)}: another model's checkpoint?)" if extra else ""


def _tensor_groups(gm: fx.GraphModule) -> list[list[str]]:
    """The graph's own-model tensors (not graphlora's), names of one tensor (ties) together, in
    registration order."""
    by_id: dict[int, list[str]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if not is_own(name):
            by_id.setdefault(id(t), []).append(name)
    return list(by_id.values())


def _stand_in(t: torch.Tensor) -> bool:
    """A tensor that only stands for one (a meta tensor of the model, a fake of its trace)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def _get(gm: nn.Module, name: str) -> torch.Tensor:
    head, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(head) if head else gm
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def _assign(gm: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """Put one tensor under each of ``names`` that the graph still holds (a quantized weight's
    float name is gone), in the slot the name had, so the state dict keeps its order."""
    new = None
    for name in names:
        head, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(head) if head else gm
        if leaf in owner._parameters:
            new = new if isinstance(new, nn.Parameter) else nn.Parameter(value, requires_grad=False)
            owner._parameters[leaf] = new
        elif leaf in owner._buffers:
            owner._buffers[leaf] = value


def _register_in_graph_order(gm: fx.GraphModule) -> None:
    """Register the quantized storage in the order of the graph's sites (as QuantizeWeightsPass
    does), not in the checkpoint's order."""
    prefix = WEIGHT_ROOT + "."
    stored = {name: t for name, t in gm.named_buffers() if name.startswith(prefix)}
    if not stored:
        return
    root, _, leaf = WEIGHT_ROOT.rpartition(".")
    gm.get_submodule(root)._modules.pop(leaf)
    order = list(groups_by_weight(tagged_sites(gm)))
    rank = {name: i for i, name in enumerate(order)}

    def position(qual: str) -> int:
        weight = qual[len(prefix):].rpartition(".")[0]
        return rank.get(weight, len(rank))

    for qual in sorted(stored, key=position):
        set_tensor(gm, qual, stored[qual], parameter=False)
