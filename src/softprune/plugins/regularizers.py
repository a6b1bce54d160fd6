"""Regularizers: plugins whose penalty shrinks what will be pruned, added to the gradients before
every step of the hooked optimizer (``before_optimizer_step``).

| name    | paper                                  | penalty added to the gradient                                   |
|---------|----------------------------------------|-----------------------------------------------------------------|
| bn_l1   | Liu et al., ICCV 2017 (Slimming)       | strength * sign(gamma) on the BatchNorm scales of prunable groups |
| greg1   | Wang et al., ICLR 2021 (GReg-1)        | lambda_u * w on the filters of selected units; lambda_u grows by delta every ``every`` steps up to ``ceiling`` |
| greg2   | Wang et al., ICLR 2021 (GReg-2)        | first a uniform growing lambda * w on every filter (magnitudes then separate by curvature), then GReg-1 on the selected units |

Slimming's penalty stops once units are hard (``until="pruned"``, the paper fine-tunes without it)
or runs to the end (``until="end"``, the Tock phase of Tick-Tock). The growing penalties act on the
units the policy has selected but not yet made hard: use them with ``decay=1`` (soft units left as
they are) and a hardness that switches to 1 once the penalty has done its work.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SoftpruneError, choice_error
from ..graph import Role
from . import PLUGINS, Plugin, PruningView, number_option


class Regularizer(Plugin):
    """A plugin with a penalty; ``Pruner(regularizer=...)`` (a config's ``prune.regularizer``) takes one."""

    name = "regularizer"


def _per_position(member, per_unit: torch.Tensor) -> torch.Tensor:
    """per_unit[u] at u's positions along the member's dim, 0 elsewhere."""
    full = torch.cat([per_unit, per_unit.new_zeros(1)])
    return full[member.unit]


def _add_to_grad(tensor: torch.Tensor, member, per_unit: torch.Tensor, fn) -> None:
    if tensor.grad is None or member.dim is None:
        return
    values = _per_position(member, per_unit).to(tensor.device, tensor.dtype)
    view = [1] * tensor.dim()
    view[member.dim] = tensor.shape[member.dim]
    tensor.grad.add_(fn(tensor.detach()) * values.view(view))


class BNL1(Regularizer):
    name = "bn_l1"

    def __init__(self, strength: float = 1e-4, until: str = "pruned") -> None:
        self.strength = number_option("bn_l1", "strength", strength, 0.0)
        if until not in ("pruned", "end"):
            raise choice_error("bn_l1 until", until, ("pruned", "end"))
        self.until = until

    @torch.no_grad()
    def before_optimizer_step(self, view: PruningView) -> None:
        if self.until == "pruned" and view.counts()[2] > 0:
            return
        for group, mask in zip(view.groups, view.masks):
            live = (~mask.hard).double() * self.strength
            for member in group.members_with(Role.SCALE):
                module = view.model.get_submodule(member.module)
                if member.param == "weight" and isinstance(module, nn.modules.batchnorm._BatchNorm):
                    _add_to_grad(member.tensor(view.model), member, live, torch.sign)


class GrowingL2(Regularizer):
    """GReg-1 (``uniform_delta=0``) and GReg-2 (a uniform growing phase before the selection)."""

    name = "greg1"

    def __init__(
        self,
        delta: float = 1e-4,
        every: int = 5,
        ceiling: float = 1.0,
        uniform_delta: float = 0.0,
        uniform_ceiling: float = 1e-2,
    ) -> None:
        self.delta = number_option("greg", "delta", delta, 0.0)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise SoftpruneError(f"greg every must be a positive number of optimizer steps, got {every!r}")
        self.every = every
        self.ceiling = number_option("greg", "ceiling", ceiling, 0.0)
        self.uniform_delta = number_option("greg", "uniform_delta", uniform_delta, 0.0)
        self.uniform_ceiling = number_option("greg", "uniform_ceiling", uniform_ceiling, 0.0)
        self.steps = 0
        self.penalty: list[torch.Tensor] = []  # per group, per original unit
        self.uniform: list[float] = []

    def _ensure(self, view: PruningView) -> None:
        if len(self.penalty) != len(view.groups):
            self.penalty = [torch.zeros(n, dtype=torch.float64) for n in view.original_sizes]
            self.uniform = [0.0] * len(view.groups)

    @torch.no_grad()
    def before_optimizer_step(self, view: PruningView) -> None:
        self._ensure(view)
        self.steps += 1
        grow = self.steps % self.every == 0
        for i, (group, mask) in enumerate(zip(view.groups, view.masks)):
            origin = view.origins[i]
            selected = mask.soft  # chosen, not yet hard
            if bool(selected.any()):
                if grow:
                    index = origin[selected]
                    self.penalty[i][index] = (self.penalty[i][index] + self.delta).clamp(max=self.ceiling)
                per_unit = self.penalty[i][origin] * selected.double()
            elif self.uniform_delta > 0 and not bool(mask.hard.any()):
                if grow:
                    self.uniform[i] = min(self.uniform[i] + self.uniform_delta, self.uniform_ceiling)
                per_unit = torch.full((group.size,), self.uniform[i], dtype=torch.float64)
            else:
                continue
            if not bool((per_unit > 0).any()):
                continue
            for member in group.members_with(Role.FILTER):
                _add_to_grad(member.tensor(view.model), member, per_unit, lambda w: w)

    def options(self) -> dict:
        out = {"delta": self.delta, "every": self.every, "ceiling": self.ceiling}
        if self.uniform_delta:
            out.update(uniform_delta=self.uniform_delta, uniform_ceiling=self.uniform_ceiling)
        return out

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "penalty": [p.clone() for p in self.penalty],
            "uniform": list(self.uniform),
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state.get("steps", 0))
        self.penalty = [p.clone().double() for p in state.get("penalty", [])]
        self.uniform = [float(u) for u in state.get("uniform", [])]


class GrowingL2Uniform(GrowingL2):
    """GReg-2: GrowingL2 with the paper's uniform phase on by default (1e-5 per step up to 1e-2)."""

    name = "greg2"

    def __init__(
        self,
        delta: float = 1e-4,
        every: int = 5,
        ceiling: float = 1.0,
        uniform_delta: float = 1e-5,
        uniform_ceiling: float = 1e-2,
    ) -> None:
        super().__init__(delta, every, ceiling, uniform_delta, uniform_ceiling)


# the plugins that are regularizers, by name (all of them are in PLUGINS too)
REGULARIZERS: dict[str, type[Regularizer]] = {c.name: c for c in (BNL1, GrowingL2, GrowingL2Uniform)}
for _cls in REGULARIZERS.values():
    PLUGINS.register(_cls.name, _cls)


def make_regularizer(spec: str | dict | Regularizer | None) -> Regularizer | None:
    """None, a name, or a mapping {"kind": name, **options}."""
    if spec is None:
        return None
    kind = spec.get("kind") if isinstance(spec, dict) else spec
    if isinstance(kind, str) and kind not in PLUGINS:
        raise choice_error("regularizer", kind, REGULARIZERS)
    built = PLUGINS.build(spec)
    if not isinstance(built, Regularizer):
        raise SoftpruneError(
            f"{getattr(built, 'name', built)!r} is a plugin but not a regularizer; regularizers: "
            + ", ".join(REGULARIZERS)
        )
    return built
