"""Activation observers: collect statistics of a tensor during calibration and turn them into a
per-tensor :class:`Encoding`.

Every observer is an ``nn.Module`` whose ``forward`` observes and returns its input unchanged (so a
graph pass can insert it as a node), and whose statistics are *mergeable*: combining the states of
several ranks gives exactly the state one process would have after observing all their batches.
Distributed code reduces them through a small protocol that knows nothing about the observer
kind::

    for phase in obs.reduce_phases():           # list of {tensor name: "sum" | "min" | "max"}
        state = obs.state_tensors()
        reduced = {k: all_reduce(state[k], op) for k, op in phase.items()}
        obs.load_state_tensors(reduced)

:func:`reduce_observers` runs the same protocol in-process (tests use it to check exactness) and
:meth:`Observer.merge` merges two observers pairwise.

Observers:

* :class:`MinMaxObserver` — running min/max (one phase: min, max, count sum).
* :class:`HistogramObserver` with ``mode="percentile"`` or ``"mse"`` — a histogram whose bins sit
  on an exact power-of-two grid. The range is ``[-R, R)`` with ``R = 2**e`` where ``e`` is the
  smallest integer with ``max|x| < 2**e``; with ``B`` bins (a power of two) the bin width
  ``w = 2R/B`` is a power of two too, so a value's bin ``floor(x / w) + B/2`` is computed exactly
  in floating point. When the range must grow from ``e`` to ``e' > e``, signed bin index ``j``
  becomes ``floor(j / 2**(e'-e))`` — exactly the bin the value would have landed in had the range
  been ``e'`` from the start. Hence observation order and sharding do not matter, and merging is
  exact: phase 1 max-reduces the exponent (each rank then rebins to it), phase 2 sums the counts
  (int64, exact).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from graphlora.errors import CalibrationError, QuantizationError
from graphlora.quant.encoding import Encoding
from graphlora.quant.qtypes import QType, check_qtype_use, get_qtype, resolve_grid
from graphlora.quant.weight_calibration import params_from_range

_E_MIN = -100  # exponent of an observer that has seen only zeros (R = 2**-100)


class Observer(nn.Module):
    """Base class: ``observe``/``forward``, mergeable state, ``compute_encoding``."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    # subclasses implement _observe(x: float tensor, finite) and the state protocol
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe(x)
        return x

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"observer at {self._where()}: calibration batch contains NaN/Inf values")
        self._observe(x)
        self.count += x.numel()

    def _where(self) -> str:
        return repr(self.name) if self.name else "<unnamed site>"

    def _require_data(self) -> None:
        if int(self.count) == 0:
            raise CalibrationError(
                f"observer at {self._where()}: no values were observed; run calibration batches "
                "through the model before computing encodings")

    def _observe(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError  # pragma: no cover

    def reduce_phases(self) -> list[dict[str, str]]:
        raise NotImplementedError  # pragma: no cover

    def reduce_ops(self) -> dict[str, str]:
        """Every state tensor and how it is reduced (all phases flattened)."""
        ops: dict[str, str] = {}
        for phase in self.reduce_phases():
            ops.update(phase)
        return ops

    def merge(self, other: Observer) -> None:
        """Fold ``other``'s statistics into this observer (exact; see the module docstring)."""
        if type(other) is not type(self):
            raise CalibrationError(
                f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        reduce_observers([self, copy.deepcopy(other)])

    def compute_range(self, qtype: QType, symmetric: bool) -> tuple[float, float]:
        """The float range ``(lo, hi)`` the encoding for ``qtype`` should cover."""
        raise NotImplementedError  # pragma: no cover

    def compute_encoding(self, qtype: str | QType = "uint8", symmetric: bool = False,
                         grid: str | None = None) -> Encoding:
        """A per-tensor activation encoding for the observed range, on the symmetric grid
        ``grid`` (see :func:`graphlora.quant.qtypes.resolve_grid`; asymmetric: full range)."""
        check_qtype_use(qtype, "activation")
        qt = get_qtype(qtype)
        if symmetric is False and qt.kind != "int":
            raise QuantizationError(f"qtype {qt.name!r} is symmetric only")
        qt = resolve_grid(qtype, grid, symmetric)
        self._require_data()
        lo, hi = self.compute_range(qt, symmetric)
        scale, zp = params_from_range(torch.tensor(lo), torch.tensor(hi), qt, symmetric,
                                      torch.float32)
        return Encoding(qt, scale, zp, None, None, (), symmetric, None, self.name)


class MinMaxObserver(Observer):
    """Running minimum and maximum."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.to(torch.float32))
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"min_val": self.min_val, "max_val": self.max_val, "count": self.count}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            setattr(self, k, v.clone())

    def reduce_phases(self) -> list[dict[str, str]]:
        return [{"min_val": "min", "max_val": "max", "count": "sum"}]

    def compute_range(self, qtype: QType, symmetric: bool) -> tuple[float, float]:
        self._require_data()
        lo, hi = float(self.min_val), float(self.max_val)
        if symmetric and _mirrored(qtype):
            a = max(abs(lo), abs(hi))
            return -a, a
        if symmetric:
            return min(lo, 0.0), max(hi, 0.0)
        return lo, hi


class HistogramObserver(Observer):
    """Exactly mergeable histogram on a power-of-two grid; encodings by percentile or MSE search.

    ``mode="percentile"``: the range is the ``percentile``-th percentile of the data at the top
    and the ``(100 - percentile)``-th at the bottom (of ``|x|`` when symmetric), read off the
    histogram by linear interpolation inside the bin (accurate to one bin width) and clipped to
    the exact observed min/max.

    ``mode="mse"``: shrink the observed range by each of ``candidates`` ratios from 1.0 down to
    ``min_ratio`` and keep the one minimising the expected quantize-dequantize squared error,
    estimated from the histogram (each bin's count at its centre).
    """

    def __init__(self, name: str | None = None, *, mode: str = "percentile",
                 percentile: float = 99.99, bins: int = 4096, candidates: int = 100,
                 min_ratio: float = 0.01) -> None:
        super().__init__(name)
        if mode not in ("percentile", "mse"):
            raise CalibrationError(f"unknown histogram observer mode {mode!r} (percentile, mse)")
        if bins < 4 or bins & (bins - 1):
            raise CalibrationError(f"bins must be a power of two >= 4, got {bins}")
        if not 50.0 < percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (50, 100], got {percentile}")
        self.mode, self.percentile, self.bins = mode, percentile, bins
        self.candidates, self.min_ratio = candidates, min_ratio
        self.register_buffer("hist", torch.zeros(bins, dtype=torch.int64))
        self.register_buffer("exponent", torch.tensor(_E_MIN, dtype=torch.int64))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    # ---------------------------------------------------------------------- grid helpers
    @property
    def bin_width(self) -> float:
        return 2.0 ** (int(self.exponent) + 1) / self.bins

    def bin_edges(self) -> torch.Tensor:
        """float64 edges ``[-R, ..., R]`` (``bins + 1`` values)."""
        w = self.bin_width
        return (torch.arange(self.bins + 1, dtype=torch.float64) - self.bins // 2) * w

    def _rebin(self, new_exponent: int) -> None:
        d = new_exponent - int(self.exponent)
        if d <= 0:
            return
        half = self.bins // 2
        signed = torch.arange(self.bins, dtype=torch.int64) - half
        new_idx = torch.div(signed, 2 ** min(d, 62), rounding_mode="floor") + half
        hist = torch.zeros_like(self.hist)
        hist.index_add_(0, new_idx, self.hist)
        self.hist = hist
        self.exponent = torch.tensor(new_exponent, dtype=torch.int64)

    def _observe(self, x: torch.Tensor) -> None:
        x = x.reshape(-1).to(torch.float64)
        lo, hi = torch.aminmax(x)
        self.min_val = torch.minimum(self.min_val, lo.to(torch.float32))
        self.max_val = torch.maximum(self.max_val, hi.to(torch.float32))
        amax = float(torch.maximum(lo.abs(), hi.abs()))
        if amax > 0:
            e = max(math.frexp(amax)[1], _E_MIN)  # amax < 2**e, e minimal
            self._rebin(e)
        idx = torch.floor(x / self.bin_width).to(torch.int64) + self.bins // 2
        self.hist += torch.bincount(idx.clamp_(0, self.bins - 1), minlength=self.bins)

    # ------------------------------------------------------------------- state protocol
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"exponent": self.exponent, "min_val": self.min_val, "max_val": self.max_val,
                "count": self.count, "hist": self.hist}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        if "exponent" in state:
            self._rebin(int(state["exponent"]))  # align to the reduced exponent first
        for k, v in state.items():
            if k != "exponent":
                setattr(self, k, v.clone())

    def reduce_phases(self) -> list[dict[str, str]]:
        return [{"exponent": "max", "min_val": "min", "max_val": "max", "count": "sum"},
                {"hist": "sum"}]

    # ------------------------------------------------------------------------ ranges
    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Histogram of |x| over ``[0, R)``: negative bin ``-k`` (covering ``[-k w, -(k-1) w)``)
        lands in positive bin ``k - 1``."""
        half = self.bins // 2
        counts = self.hist[half:].clone()
        counts += self.hist[:half].flip(0)
        edges = torch.arange(half + 1, dtype=torch.float64) * self.bin_width
        return counts, edges

    @staticmethod
    def _quantile(counts: torch.Tensor, edges: torch.Tensor, q: float) -> float:
        """Value below which a fraction ``q`` of the mass lies (uniform inside a bin)."""
        cdf = torch.cumsum(counts.to(torch.float64), 0)
        total = float(cdf[-1])
        target = q * total
        i = int(torch.searchsorted(cdf, torch.tensor(target, dtype=torch.float64)))
        i = min(i, counts.numel() - 1)
        before = float(cdf[i - 1]) if i > 0 else 0.0
        inside = float(counts[i])
        frac = 0.0 if inside == 0 else (target - before) / inside
        return float(edges[i] + min(max(frac, 0.0), 1.0) * (edges[i + 1] - edges[i]))

    def compute_range(self, qtype: QType, symmetric: bool) -> tuple[float, float]:
        self._require_data()
        lo_obs, hi_obs = float(self.min_val), float(self.max_val)
        if self.mode == "mse":
            return self._mse_range(qtype, symmetric, lo_obs, hi_obs)
        p = self.percentile / 100.0
        if symmetric:
            counts, edges = self._folded()
            a = min(self._quantile(counts, edges, p), max(abs(lo_obs), abs(hi_obs)))
            if _mirrored(qtype):
                return -a, a
            # the full grid: the observed extent, capped at the percentile of |x|, per side
            return max(-a, min(lo_obs, 0.0)), min(a, max(hi_obs, 0.0))
        edges = self.bin_edges()
        lo = max(self._quantile(self.hist, edges, 1.0 - p), lo_obs)
        hi = min(self._quantile(self.hist, edges, p), hi_obs)
        return min(lo, hi_obs), max(hi, lo_obs)

    def _mse_range(self, qtype: QType, symmetric: bool, lo_obs: float,
                   hi_obs: float) -> tuple[float, float]:
        centres = ((self.bin_edges()[:-1] + self.bin_edges()[1:]) / 2).to(torch.float64)
        # the bins holding min/max are represented by the exact extremes, not their centres
        centres = centres.clamp(min(lo_obs, 0.0), max(hi_obs, 0.0))
        counts = self.hist.to(torch.float64)
        keep = counts > 0
        centres, counts = centres[keep], counts[keep]
        if symmetric and _mirrored(qtype):
            a = max(abs(lo_obs), abs(hi_obs))
            lo0, hi0 = -a, a
        else:
            lo0, hi0 = min(lo_obs, 0.0), max(hi_obs, 0.0)
        ratios = torch.linspace(1.0, self.min_ratio, self.candidates, dtype=torch.float64)
        lo_c, hi_c = lo0 * ratios, hi0 * ratios
        scale, zp = params_from_range(lo_c, hi_c, qtype, symmetric, torch.float32)
        s = scale.to(torch.float64).unsqueeze(1)
        z = torch.zeros_like(s) if zp is None else zp.to(torch.float64).unsqueeze(1)
        q = torch.clamp(torch.round(centres / s) + z, qtype.qmin, qtype.qmax)
        err = (counts * ((q - z) * s - centres) ** 2).sum(dim=1)  # one per candidate
        best = int(torch.argmin(err))  # first minimum: the widest of equally good ranges
        return float(lo_c[best]), float(hi_c[best])


def _mirrored(qtype: QType) -> bool:
    """Whether a symmetric range is mirrored (``[-a, a]``): on every grid but a full integer one,
    whose extra negative code makes the sides differ (see ``weight_calibration.group_ranges``)."""
    return qtype.kind != "int" or qtype.grid != "full"


def make_observer(kind: str, name: str | None = None, **kwargs) -> Observer:
    """``"minmax"``, ``"percentile"`` or ``"mse"`` -> an observer."""
    if kind == "minmax":
        return MinMaxObserver(name, **kwargs)
    if kind in ("percentile", "mse"):
        return HistogramObserver(name, mode=kind, **kwargs)
    raise CalibrationError(f"unknown observer {kind!r}; expected minmax, percentile or mse")


def reduce_observers(observers: Sequence[Observer]) -> None:
    """Reduce the states of ``observers`` (as if each were a rank) with the same phase protocol
    distributed code uses, leaving every observer with the merged state."""
    if not observers:
        return
    first = observers[0]
    for o in observers[1:]:
        if type(o) is not type(first) or any(
            a.shape != b.shape for a, b in zip(o.state_tensors().values(),
                                               first.state_tensors().values())):
            raise CalibrationError(
                f"cannot reduce observer {o._where()} with {first._where()}: different kinds or "
                "settings (e.g. histogram bins)")
    _ops = {"sum": lambda ts: torch.stack(ts).sum(0),
            "min": lambda ts: torch.stack(ts).amin(0),
            "max": lambda ts: torch.stack(ts).amax(0)}
    for phase in observers[0].reduce_phases():
        states = [o.state_tensors() for o in observers]
        reduced = {k: _ops[op]([s[k] for s in states]) for k, op in phase.items()}
        for o in observers:
            o.load_state_tensors(reduced)
