"""Schedules: pure functions of the pruning step t (0 .. T-1) and the number of steps T.

A soft-to-hard policy is three schedules (see docs/methods.md and ../METHODS.md):

- the rate P_t, the fraction of a group's channels selected for pruning at step t;
- the decay alpha_t, the factor applied to soft-pruned filters;
- the hardness lambda_t, the fraction of the selected channels that become hard (zero and frozen).

Each schedule is a small frozen dataclass: calling it gives the value, ``to_dict`` gives plain data
for configs and checkpoints, and :func:`schedule_from_dict` rebuilds it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

from .errors import SoftpruneError
from .registry import Registry


def _check_steps(t: int, T: int) -> None:
    if T < 1:
        raise SoftpruneError(f"total_steps must be at least 1, got {T}")
    if not 0 <= t < T:
        raise SoftpruneError(f"pruning step {t} is outside 0..{T - 1} (total_steps={T})")


@dataclass(frozen=True)
class Schedule:
    """Base class: ``schedule(t, T) -> float``."""

    kind: ClassVar[str] = ""

    def __call__(self, t: int, T: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class Constant(Schedule):
    """value_t = value. Rate of SFP and HFP; decay 0 (SFP) or a fixed alpha; hardness 0 or 1."""

    value: float
    kind: ClassVar[str] = "constant"

    def __call__(self, t: int, T: int) -> float:
        _check_steps(t, T)
        return float(self.value)


@dataclass(frozen=True)
class AsymptoticRate(Schedule):
    """ASFP (He et al., IEEE TCyb 2020): P_t = P * (1 - exp(-k t)), k = ln(4) / (D T).

    With D = 1/8 the rate reaches 3P/4 at t = T/8. From t >= hold * T (0.95 T) the rate is held at P,
    so the last steps prune exactly P.
    """

    value: float
    D: float = 0.125
    hold: float = 0.95
    kind: ClassVar[str] = "asymptotic"

    def __call__(self, t: int, T: int) -> float:
        _check_steps(t, T)
        if t >= self.hold * T:
            return float(self.value)
        k = math.log(4.0) / (self.D * T)
        return float(self.value * (1.0 - math.exp(-k * t)))


@dataclass(frozen=True)
class PolyRate(Schedule):
    """GHFP's released code (the first author's PGMPF repository, pruning_resnet_soft_hard.py, its
    default "poly" ramp): P_t = P * [1 - (1 - (t+1)/T)^power], power = 3, held at P from
    t >= hold * T (0.95 T). The rate rises fast at first and flattens towards P."""

    value: float
    power: float = 3.0
    hold: float = 0.95
    kind: ClassVar[str] = "poly"

    def __call__(self, t: int, T: int) -> float:
        _check_steps(t, T)
        if t >= self.hold * T:
            return float(self.value)
        return float(self.value * (1.0 - (1.0 - (t + 1) / T) ** self.power))


@dataclass(frozen=True)
class ExponentialDecay(Schedule):
    """SRFP (Cai et al., ICPR 2020): alpha_t = alpha0 * exp(-beta t),
    beta = -ln(sigma / (alpha0 + 0.01 sigma)) / T, and alpha_t = 0 from t >= cutoff * T.

    sigma = 1e-5 and cutoff = 0.9 for CIFAR; sigma = 1e-3 and cutoff = 0.8 for ImageNet from scratch.
    With alpha0 = 0 it is SFP's decay (always 0).
    """

    alpha0: float = 1.0
    sigma: float = 1e-5
    cutoff: float = 0.9
    kind: ClassVar[str] = "exponential"

    def __call__(self, t: int, T: int) -> float:
        _check_steps(t, T)
        if t >= self.cutoff * T or self.alpha0 == 0.0:
            return 0.0
        beta = -math.log(self.sigma / (self.alpha0 + 0.01 * self.sigma)) / T
        return float(self.alpha0 * math.exp(-beta * t))


@dataclass(frozen=True)
class CubicRamp(Schedule):
    """GHFP (Cai et al., arXiv 2011.03170): lambda_t = 1 - (1 - (t+1)/T)^power, power = 3.

    Starts near 0 (soft pruning, like SFP) and reaches exactly 1 at t = T-1 (hard pruning).
    """

    power: float = 3.0
    kind: ClassVar[str] = "cubic"

    def __call__(self, t: int, T: int) -> float:
        _check_steps(t, T)
        return float(1.0 - (1.0 - (t + 1) / T) ** self.power)


@dataclass(frozen=True)
class Step(Schedule):
    """value_t = 0 before step floor(at * T), then value. Prune once after dense (or sparsity) training,
    as Network Slimming and growing regularization do: a rate, or a hardness switching from 0 to 1."""

    value: float
    at: float = 0.5
    kind: ClassVar[str] = "step"

    def __call__(self, t: int, T: int) -> float:
        _check_steps(t, T)
        return float(self.value) if t >= math.floor(self.at * T + 1e-9) else 0.0


@dataclass(frozen=True)
class LinearRamp(Schedule):
    """value_t = value * min(1, (t + 1) / ceil(ramp * T)): equal increments until ``ramp`` of the way,
    then held. Iterative pruning that removes a little more at every step (Tick-Tock, Taylor)."""

    value: float
    ramp: float = 0.5
    kind: ClassVar[str] = "linear"

    def __call__(self, t: int, T: int) -> float:
        _check_steps(t, T)
        steps = max(1, math.ceil(self.ramp * T - 1e-9))
        return float(self.value * min(1.0, (t + 1) / steps))


@dataclass(frozen=True)
class AnnealingRate(Schedule):
    """ADSC's annealing (Guo, She, Barbu; the schedule of Feature Selection with Annealing, Barbu et
    al.): the kept count M_e = k + (M - k) max(0, (N - 2e) / (2 e mu + N)) after e of N steps, as a
    rate: P_t = P [1 - max(0, (T - 2(t+1)) / (2 (t+1) mu + T))]. It reaches P at half the steps and
    holds it; a larger mu removes more early."""

    value: float
    mu: float = 5.0
    kind: ClassVar[str] = "annealing"

    def __post_init__(self) -> None:
        if isinstance(self.mu, bool) or not isinstance(self.mu, (int, float)) or self.mu < 0:
            raise SoftpruneError(f"annealing mu must be a number >= 0, got {self.mu!r}")

    def __call__(self, t: int, T: int) -> float:
        _check_steps(t, T)
        e = t + 1
        return float(self.value * (1.0 - max(0.0, (T - 2 * e) / (2 * e * self.mu + T))))


SCHEDULES: Registry[type[Schedule]] = Registry("schedule kind", instance_of=Schedule)
for _cls in (
    Constant,
    AsymptoticRate,
    PolyRate,
    ExponentialDecay,
    CubicRamp,
    Step,
    LinearRamp,
    AnnealingRate,
):
    SCHEDULES.register(_cls.kind, _cls)


def register_schedule(cls: type[Schedule], *, replace: bool = False) -> type[Schedule]:
    """Add a schedule class (a frozen dataclass with a ``kind``; usable as a decorator)."""
    return SCHEDULES.register(cls.kind, cls, replace=replace)


def schedule_from_dict(data: dict | float | int | Schedule) -> Schedule:
    """Rebuild a schedule from ``to_dict`` output; a bare number means :class:`Constant`."""
    if isinstance(data, Schedule):
        return data
    if isinstance(data, bool) or not isinstance(data, (dict, int, float)):
        raise SoftpruneError(f"a schedule is a number or a mapping with 'kind', got {data!r}")
    if isinstance(data, (int, float)):
        return Constant(float(data))
    options = {k: v for k, v in data.items() if k != "kind"}
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SoftpruneError(
                f"schedule {data.get('kind')!r} option {key!r} must be a number, got {value!r}"
            )
    return SCHEDULES.build({"kind": data.get("kind"), **{k: float(v) for k, v in options.items()}})
