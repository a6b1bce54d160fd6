"""The soft-to-hard policy and its presets.

One policy covers the family (METHODS.md, "One policy, six methods"): at step t a group of N channels
selects S_t, the floor(N * P_t) lowest-scoring channels; the floor(N * P_t * lambda_t) lowest of those
are hard (zero and frozen, never back); the rest of S_t are soft and multiplied by alpha_t.

A preset is a named bundle of the three schedules; every knob can be overridden.

| preset | rate P_t    | decay alpha_t | hardness lambda_t | selection            |
|--------|-------------|---------------|-------------------|----------------------|
| hfp    | constant    | 0             | 1                 | chosen once, kept    |
| sfp    | constant    | 0             | 0                 | re-chosen every step |
| asfp   | asymptotic  | 0             | 0                 | re-chosen every step |
| srfp   | constant    | exponential   | 0                 | re-chosen every step |
| asrfp  | asymptotic  | exponential   | 0                 | re-chosen every step |
| ghfp   | poly ramp   | 0             | cubic ramp 0 -> 1 | soft part re-chosen  |

GHFP follows its first author's released code (docs/methods.md, "GHFP"): the rate ramps up (PolyRate)
and filters are scored by the BN-scaled norm (criterion l2_bn). The code's pruning step before
training is left out: on the methods benchmark it cost 0.7 points
(benchmarks/results/methods_2026-12-02_epyc.json, rows ghfp, ghfp-init and ghfp-paper).
rate_schedule="constant" and criterion="l2" give the paper's version back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .errors import SoftpruneError, choice_error
from .registry import Registry
from .schedules import (
    AnnealingRate,
    AsymptoticRate,
    Constant,
    CubicRamp,
    ExponentialDecay,
    LinearRamp,
    PolyRate,
    Schedule,
    Step,
    schedule_from_dict,
)


@dataclass(frozen=True)
class Policy:
    """Rate, decay and hardness schedules, plus HFP's "keep the first selection" rule."""

    rate: Schedule
    decay: Schedule
    hardness: Schedule
    keep_first: bool = False
    name: str = "custom"

    def values(self, t: int, T: int) -> tuple[float, float, float]:
        """(P_t, alpha_t, lambda_t), each checked to lie in its range."""
        p, a, h = self.rate(t, T), self.decay(t, T), self.hardness(t, T)
        if not 0.0 <= p < 1.0:
            raise SoftpruneError(f"the rate schedule gave P_t={p:.4g} at t={t}; rates must lie in [0, 1)")
        if not 0.0 <= a <= 1.0:
            raise SoftpruneError(
                f"the decay schedule gave alpha_t={a:.4g} at t={t}; decay must lie in [0, 1]"
            )
        if not 0.0 <= h <= 1.0:
            raise SoftpruneError(
                f"the hardness schedule gave lambda_t={h:.4g} at t={t}; it must lie in [0, 1]"
            )
        return p, a, h

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "rate": self.rate.to_dict(),
            "decay": self.decay.to_dict(),
            "hardness": self.hardness.to_dict(),
            "keep_first": self.keep_first,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Policy:
        return cls(
            rate=schedule_from_dict(data["rate"]),
            decay=schedule_from_dict(data["decay"]),
            hardness=schedule_from_dict(data["hardness"]),
            keep_first=bool(data.get("keep_first", False)),
            name=str(data.get("name", "custom")),
        )


# The family's policies, by preset name: rate -> Policy. A new policy is one more entry
# (register_preset); a method (softprune.methods) names the preset it uses.
PRESETS: Registry[Callable[[float], Policy]] = Registry("preset")


def register_preset(name: str, build: Callable[[float], Policy], *, replace: bool = False) -> None:
    PRESETS.register(name, build, replace=replace)


_ZERO = Constant(0.0)
register_preset("hfp", lambda p: Policy(Constant(p), _ZERO, Constant(1.0), keep_first=True))
register_preset("sfp", lambda p: Policy(Constant(p), _ZERO, _ZERO))
register_preset("asfp", lambda p: Policy(AsymptoticRate(p), _ZERO, _ZERO))
register_preset("srfp", lambda p: Policy(Constant(p), ExponentialDecay(), _ZERO))
register_preset("asrfp", lambda p: Policy(AsymptoticRate(p), ExponentialDecay(), _ZERO))
register_preset("ghfp", lambda p: Policy(PolyRate(p), _ZERO, CubicRamp()))


# Override values that name a schedule rather than give its full mapping.
_NAMED = {
    "rate_schedule": {
        "constant": lambda p: Constant(p),
        "asymptotic": lambda p: AsymptoticRate(p),
        "poly": lambda p: PolyRate(p),
        "step": lambda p: Step(p),
        "linear": lambda p: LinearRamp(p),
        "annealing": lambda p: AnnealingRate(p),
    },
    "decay": {
        "zero": lambda: Constant(0.0),
        "one": lambda: Constant(1.0),
        "exponential": lambda: ExponentialDecay(),
    },
    "hardness": {
        "zero": lambda: Constant(0.0),
        "one": lambda: Constant(1.0),
        "cubic": lambda: CubicRamp(),
        "step": lambda: Step(1.0),
    },
}


def check_rate(rate: object) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise SoftpruneError(f"rate must be a number in [0, 1), got {rate!r}")
    if not 0.0 <= float(rate) < 1.0:
        raise SoftpruneError(f"rate must lie in [0, 1) (the fraction of filters to prune), got {rate}")
    return float(rate)


def make_policy(
    preset: str,
    rate: float,
    *,
    rate_schedule: str | dict | None = None,
    decay: float | str | dict | None = None,
    hardness: float | str | dict | None = None,
    keep_first: bool | None = None,
) -> Policy:
    """A preset by name with any knob overridden.

    ``rate_schedule``: "constant", "asymptotic", "poly", "step", "linear", "annealing", or a mapping such as
    {"kind": "asymptotic", "D": 0.25} or {"kind": "step", "at": 0.5}
    (the rate value always comes from ``rate``). ``decay``: a number (constant alpha), "zero",
    "one" (soft filters left as they are, for regularizers that shrink them), "exponential" or a mapping
    such as {"kind": "exponential", "alpha0": 1, "sigma": 1e-3, "cutoff": 0.8}.
    ``hardness``: a number, "zero", "one", "cubic", "step" (0, then 1 from half-way) or a mapping. ``keep_first``: HFP's fixed selection.
    """
    rate = check_rate(rate)
    policy = replace(PRESETS[preset](rate), name=preset)
    changes: dict = {}
    if rate_schedule is not None:
        if isinstance(rate_schedule, str):
            changes["rate"] = _named("rate_schedule", rate_schedule)(rate)
        elif isinstance(rate_schedule, dict):
            changes["rate"] = schedule_from_dict({**rate_schedule, "value": rate})
        else:
            raise SoftpruneError(
                f"rate_schedule must be a name ({', '.join(_NAMED['rate_schedule'])}) or a mapping, got {rate_schedule!r}"
            )
    for key, value in (("decay", decay), ("hardness", hardness)):
        if value is None:
            continue
        changes[key] = _named(key, value)() if isinstance(value, str) else schedule_from_dict(value)
    if keep_first is not None:
        if not isinstance(keep_first, bool):
            raise SoftpruneError(f"keep_first must be true or false, got {keep_first!r}")
        changes["keep_first"] = keep_first
    if changes:
        policy = replace(policy, **changes)
    # Check every value the schedules can take once, so bad overrides fail before training starts.
    for t in range(0, 200):
        policy.values(t, 200)
    return policy


def _named(key: str, value: str):
    choices = _NAMED[key]
    if value not in choices:
        raise choice_error(key.replace("_", " "), value, choices)
    return choices[value]


@dataclass
class StepReport:
    """What one pruning step did, summed over groups (for logs and progress bars)."""

    t: int
    rate: float
    alpha: float
    hardness: float
    kept: int
    soft: int
    hard: int
    revived: int = 0  # units soft after the previous step and kept by this one (they came back)
    revived_norm_ratio: float | None = None  # largest norm of a revived filter / median kept filter

    def as_dict(self) -> dict:
        return dict(self.__dict__)
