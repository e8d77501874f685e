"""Collectives that graphlora's calibration needs, below every graph and model layer.

Calibration across ranks is the one place graphlora itself talks to ``torch.distributed``:
observers and GPTQ Hessian accumulators keep mergeable statistics, and :func:`sync_stats`
all-reduces them following each object's reduce protocol, so every rank computes the encodings
one process would compute from all ranks' data. Nothing here knows graphs or ``LoraModel``: the
protocol is ``state_tensors()`` / ``load_state_tensors()`` / ``reduce_phases()`` (or
``reduce_ops()``), which ``graphlora.calibrate`` and the GPTQ pass call without importing the
distributed training helpers above the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from graphlora.errors import DistributedError

__all__ = ["is_initialized", "rank", "require_initialized", "sync_stats"]

_REDUCE_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


# =============================================================================================
# process group basics


def is_initialized() -> bool:
    """Whether a default process group exists (graphlora's distributed paths are no-ops otherwise)."""
    return dist.is_available() and dist.is_initialized()


def rank(group: Any = None) -> int:
    """This process's rank in ``group``; 0 without a process group, so one process is rank 0."""
    return dist.get_rank(group) if is_initialized() else 0


def require_initialized(what: str) -> None:
    """Refuse ``what`` without a process group: wrapping or sharding alone would fail deep in torch."""
    if not is_initialized():
        raise DistributedError(
            f"{what} needs an initialised torch.distributed process group: launch with torchrun and "
            "call torch.distributed.init_process_group() first (backend 'nccl' on GPUs, 'gloo' on CPU)"
        )


def _comm_device(group: Any, tensor_device: torch.device) -> torch.device:
    """Where a collective's tensors must live: NCCL needs CUDA, gloo takes CPU tensors."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "gloo" in backend and "nccl" not in backend:
        return torch.device("cpu")
    return tensor_device


# =============================================================================================
# calibration statistics


def sync_stats(objs: Any, group: Any = None) -> None:
    """All-reduce mergeable statistics (observers, GPTQ Hessian accumulators) across ranks.

    ``objs``: an iterable (or mapping) of objects with ``state_tensors()`` /
    ``load_state_tensors()`` and ``reduce_phases()`` (a list of ``{tensor name: "sum" | "min" |
    "max"}``) or ``reduce_ops()`` (one phase), or an ``nn.Module`` whose submodules include such
    observers. Phases run in order because later ones depend on earlier ones (a histogram first
    agrees on its range, then sums counts); within a phase all objects' tensors of one op and
    dtype travel in one collective. Afterwards every rank holds the statistics one process would
    have after observing every rank's data. A no-op without an initialised process group.
    """
    objects = _stat_objects(objs)
    plans = [_reduce_plan(o) for o in objects]
    if not is_initialized() or dist.get_world_size(group) == 1:
        return
    # even with nothing to reduce: a rank with no objects must not leave the others hanging
    _check_same_on_all_ranks(objects, plans, group)
    for k in range(max((len(p) for p in plans), default=0)):
        members = [(o, plan[k]) for o, plan in zip(objects, plans) if k < len(plan)]
        reduced = _all_reduce_phase(members, group)
        for (obj, _), state in zip(members, reduced):
            obj.load_state_tensors(state)


def _stat_objects(objs: Any) -> list[Any]:
    """Flatten the accepted inputs into a list of distinct objects, in a rank-independent order.

    Distinct matters: a graph may call one observer module from several nodes, and reducing it
    twice would double its sums.
    """
    if isinstance(objs, nn.Module) and not hasattr(objs, "state_tensors"):
        items: Iterable[Any] = (m for _, m in objs.named_modules() if _has_protocol(m))
    elif isinstance(objs, Mapping):
        items = objs.values()
    elif hasattr(objs, "state_tensors"):
        items = [objs]
    else:
        items = objs
    seen: set[int] = set()
    out = []
    for obj in items:
        if id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
    return out


def _has_protocol(obj: Any) -> bool:
    return (
        hasattr(obj, "state_tensors")
        and hasattr(obj, "load_state_tensors")
        and (hasattr(obj, "reduce_phases") or hasattr(obj, "reduce_ops"))
    )


def _reduce_plan(obj: Any) -> list[dict[str, str]]:
    """The object's reduce phases, checked: known ops, tensors that exist."""
    if not _has_protocol(obj):
        raise DistributedError(
            f"cannot reduce {type(obj).__name__} across ranks: it needs state_tensors(), "
            "load_state_tensors() and reduce_phases() or reduce_ops()"
        )
    phases = obj.reduce_phases() if hasattr(obj, "reduce_phases") else [obj.reduce_ops()]
    state = obj.state_tensors()
    for phase in phases:
        for name, op in phase.items():
            if op not in _REDUCE_OPS:
                raise DistributedError(
                    f"{_describe(obj)}: unknown reduce op {op!r} for {name!r} (expected sum, min or max)"
                )
            if name not in state or not isinstance(state[name], torch.Tensor):
                raise DistributedError(f"{_describe(obj)}: reduce phase names {name!r}, not a state tensor")
    return [dict(p) for p in phases]


def _describe(obj: Any) -> str:
    name = getattr(obj, "name", None)
    return f"{type(obj).__name__} {name!r}" if name else type(obj).__name__


def _signature(objects: Sequence[Any], plans: Sequence[list[dict[str, str]]]) -> list[Any]:
    """What must agree across ranks for the collectives to line up (kinds, order, shapes)."""
    sig = []
    for obj, plan in zip(objects, plans):
        state = obj.state_tensors()
        sig.append(
            (
                _describe(obj),
                [
                    [(k, op, str(state[k].dtype), tuple(state[k].shape)) for k, op in phase.items()]
                    for phase in plan
                ],
            )
        )
    return sig


def _check_same_on_all_ranks(objects: Sequence[Any], plans: Sequence[Any], group: Any) -> None:
    """Fail on every rank (instead of hanging or mixing up tensors) when ranks hold different
    statistics: e.g. one rank inserted observers at other sites."""
    sig = _signature(objects, plans)
    digest = hashlib.blake2b(repr(sig).encode(), digest_size=8).digest()
    h = int.from_bytes(digest, "little") >> 2  # fits int64 and its negation
    device = _comm_device(group, torch.device("cpu"))
    both = torch.tensor([h, -h], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if int(both[0]) == -int(both[1]):
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, [s[0] for s in sig], group=group)
    counts = ", ".join(f"rank {r}: {len(g)}" for r, g in enumerate(gathered))
    raise DistributedError(
        "ranks hold different statistics to reduce (objects, order, kinds or shapes differ; "
        f"numbers of objects {counts}). Every rank must calibrate the same model with the same "
        "rules so that each has the same observers in the same order"
    )


def _all_reduce_phase(members: Sequence[tuple[Any, dict[str, str]]], group: Any) -> list[dict[str, torch.Tensor]]:
    """Reduce one phase of every member; tensors of equal (op, dtype) share one flat buffer."""
    states = [obj.state_tensors() for obj, _ in members]
    buckets: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for i, (_, phase) in enumerate(members):
        for name, op in phase.items():
            buckets.setdefault((op, str(states[i][name].dtype)), []).append((i, name))
    out: list[dict[str, torch.Tensor]] = [{} for _ in members]
    for (op, _), entries in sorted(buckets.items()):
        tensors = [states[i][name] for i, name in entries]
        device = _comm_device(group, tensors[0].device)
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in tensors])
        dist.all_reduce(flat, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]), group=group)
        offset = 0
        for (i, name), t in zip(entries, tensors):
            n = t.numel()
            out[i][name] = flat[offset : offset + n].view(t.shape).to(t.device).clone()
            offset += n
    return out
