"""CONet (Hosseini et al., ICCVW 2021): each layer's width follows the rank of its weights' low-rank
factorization and how fast that rank grows.

For a weight tensor, CONet unfolds it along the channel dimension (a producer's output channels,
[C_out, C_in k k]; a consumer's input channels, [C_in, C_out k k]) and factorizes the unfolding by
empirical variational Bayesian matrix factorization (EVBMF, Nakajima et al., JMLR 2013), whose
analytic solution keeps the singular values above a noise threshold it estimates itself. The
kept count over the channel count is the layer's *rank ratio* r in [0, 1]: how much of its width
the layer uses. For a group of channels (what one producer writes and its consumers read), r is the
mean over its producers' output unfoldings and consumers' input unfoldings, as the authors average
a layer's output rank with the next layer's input rank (and a whole residual stage for the stream).
The *mapping condition* is the ratio of the largest to the smallest kept singular value.

The plugin measures every group at every pruning step until the group is pruned (steps at epoch
ends, so the history is per epoch). CONet's rule then decides, per group:

    slope = (max_e r_e - r_0) / (argmax_e r_e + 1e-4)
    op    = -1 (shrink) if slope < ``delta`` or condition >= ``condition``, else +1 (grow)
    need  = N * (1 + ``factor`` * op)          (``widths: step``, CONet's own step)
    need  = r_last * N * (1 + ``factor`` * op) (``widths: rank``: in proportion to the rank count)

and the criterion ``conet`` scores the unit at position k of the group's filters by L2 norm
(largest first) as 1 - k / need. One threshold across layers (a MACs, parameter or global budget)
then keeps about c * need units of every group, c set by the budget, with the smallest filters
going: a layer CONet would shrink keeps (1 - phi) / (1 + phi) of the share of one it would grow.
``widths: rank`` sizes layers by their rank count itself; measured on the methods benchmark
(ResNet-20, ranks after 1-3 epochs) it is worse: EVBMF reads the deep layers' weights, still mostly
their random start, as noise (rank ratio 0 to 0.03 in stage 3 and the residual stream), so those
layers are cut hardest (the stream to 4 of 16 channels in stage 1), accuracy right after the step is
20.6% and the run ends at 85.42 (seed 0). With the default on that benchmark every layer's slope
was below delta on seeds 0 and 1, 9 of 10 on seed 2 (rank ratios 0 to 0.13 after 3 of 6 epochs), so
the needs were 0.8 N and the selection a global ranking by each filter's place in its layer's L2
order: CONet's signal needs a longer search
than a short run gives (a step at two thirds, five measurements: the same ratios, and 83.56 instead of
86.40 on seed 0, with one epoch left to recover). Under a ``layer`` budget every group gives up the
same fraction and the rule would only order filters by norm (plain L2), so the plugin refuses it.

What is from where: EVBMF on the mode-3 and mode-4 unfoldings, the rank ratio, the averaging over
a channel's producer and consumer, the slope from the first epoch to the epoch of the highest rank,
the shrink rule with delta (the code recommends 0.01 to 0.025 for ResNets), the condition threshold
mu = 10 and the scaling factor phi = 0.2: the authors' code (mahdihosseini/CONet,
resnet_scaling_algorithm.py, metrics.py). Reconstructed: CONet searches by training the network
again for ~20 epochs per trial over ~25 trials, growing or shrinking each width by phi and halving
phi when the direction flips, with no FLOPs target; a pruning tool only removes channels, in one
run, to a budget. Here one search window (the training before the pruning step) measures the ranks,
the rule's direction scales each layer's need by (1 +- phi), and the budget sets the common factor
c. A layer CONet would widen keeps its width at most.
"""

from __future__ import annotations

import math

import torch

from ..criteria import L2, register_criterion
from ..errors import SoftpruneError, check_choice
from ..graph import ChannelGroup, Role
from . import PLUGINS, Plugin, PruningView, number_option
from .norm_sites import PLUGIN_SCORES, PluginScore


def _evbmf_objective(sigma2: torch.Tensor, s2: torch.Tensor, length: int, width: int) -> torch.Tensor:
    """The free energy to minimize over the noise variance, for each candidate ``sigma2`` (Nakajima
    et al. 2013, with H = L: no residual)."""
    alpha = length / width
    x = s2[None, :] / (width * sigma2[:, None])
    x_bar = _x_bar(alpha)
    tau = 0.5 * (x - (1 + alpha) + torch.sqrt(((x - (1 + alpha)) ** 2 - 4 * alpha).clamp(min=0)))
    below = x - torch.log(x)
    above = x - tau + torch.log((tau + 1) / x) + alpha * torch.log(tau / alpha + 1)
    return torch.where(x > x_bar, above, below).sum(1)


def _x_bar(alpha: float) -> float:
    tau_bar = 2.5129 * math.sqrt(alpha)
    return (1 + tau_bar) * (1 + alpha / tau_bar)


def evbmf(matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The singular values EVBMF keeps (its analytic solution's estimates, largest first) and the
    noise variance it estimated. The variance is the free energy's minimum on Nakajima's bounds,
    found on a log grid and refined by golden-section search (the authors use scipy's bounded Brent
    on the same bounds; a grid first avoids a local minimum)."""
    y = matrix.detach().double()
    if y.shape[0] > y.shape[1]:
        y = y.t()
    length, width = y.shape
    s = torch.linalg.svdvals(y)
    s2 = s**2
    alpha = length / width
    x_bar = _x_bar(alpha)
    edge = min(math.ceil(length / (1 + alpha)) - 1, length) - 1
    tail = s2[edge + 1 :] if edge + 1 < length else s2[-1:]
    lower = max(float(tail[0]) / (width * x_bar), float(tail.mean()) / width)
    upper = float(s2.sum()) / (length * width)
    if not upper > 0:
        return s.new_zeros(0), 0.0
    lower = max(lower, 1e-12 * upper)  # an exactly low-rank matrix has no noise floor
    if lower >= upper:
        sigma2 = upper
    else:
        grid = torch.logspace(math.log10(lower), math.log10(upper), 200, dtype=torch.float64)
        best = int(torch.argmin(_evbmf_objective(grid, s2, length, width)))
        a, b = float(grid[max(best - 1, 0)]), float(grid[min(best + 1, grid.numel() - 1)])
        ratio = (math.sqrt(5) - 1) / 2
        for _ in range(60):
            c, d = b - ratio * (b - a), a + ratio * (b - a)
            fc, fd = _evbmf_objective(torch.tensor([c, d], dtype=torch.float64), s2, length, width)
            a, b = (a, d) if fc < fd else (c, b)
        sigma2 = (a + b) / 2
    kept = s[s > math.sqrt(width * sigma2 * x_bar)]
    q = 1 - (length + width) * sigma2 / kept**2
    estimates = kept / 2 * (q + torch.sqrt((q**2 - 4 * length * width * sigma2**2 / kept**4).clamp(min=0)))
    return estimates.float(), sigma2


def unfolding(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The weight with ``dim`` (the channels) as rows and everything else as columns."""
    return torch.movedim(weight, dim, 0).reshape(weight.shape[dim], -1)


def rank_measures(group: ChannelGroup, model: torch.nn.Module) -> tuple[float, float] | None:
    """The group's rank ratio and mapping condition: means over its producers' output unfoldings and
    consumers' input unfoldings (weights of at least two dimensions, both sides at least 2); None
    when it has none."""
    ratios, conditions = [], []
    for member in [*group.members_with(Role.FILTER), *group.members_with(Role.CONSUMER)]:
        if member.dim is None:
            continue
        weight = member.tensor(model)
        if weight.dim() < 2:
            continue
        matrix = unfolding(weight, member.dim)
        if min(matrix.shape) < 2:
            continue
        kept, _ = evbmf(matrix)
        ratios.append(kept.numel() / matrix.shape[0])
        conditions.append(float(kept[0] / kept[-1]) if kept.numel() else 0.0)
    if not ratios:
        return None
    return sum(ratios) / len(ratios), sum(conditions) / len(conditions)


def rank_slope(history: list[float]) -> float:
    """CONet's rank slope: the rise from the first measurement to the highest, per measurement."""
    top = max(range(len(history)), key=lambda e: (history[e], -e))
    return (history[top] - history[0]) / (top + 1e-4)


WIDTHS = ("step", "rank")


class CONet(Plugin):
    """``delta``: the rank slope (per epoch) below which a layer shrinks; ``condition``: the mapping
    condition at which it shrinks whatever its slope (mu); ``factor``: CONet's scaling step (phi);
    ``widths``: each layer's need from CONet's step on its width, or from its rank count."""

    name = "conet"
    steps_at_epoch_ends = True  # the slope is per epoch, as the authors measure it

    def __init__(
        self, delta: float = 0.02, condition: float = 10.0, factor: float = 0.2, widths: str = "step"
    ) -> None:
        self.widths = check_choice("conet widths", widths, WIDTHS)
        self.delta = number_option("conet", "delta", delta, 0.0)
        self.condition = number_option("conet", "condition", condition, 1.0)
        self.factor = number_option("conet", "factor", factor, 0.0, 1.0)
        self.history: dict[int, list[float]] = {}  # group position -> rank ratio per measurement
        self.conditions: dict[int, float] = {}  # group position -> the last mapping condition
        self._view: PruningView | None = None

    def attach(self, view: PruningView) -> None:
        if view.budget_kind == "layer":
            raise SoftpruneError(
                "method conet sets each layer's width from its rank, so it needs a budget across layers "
                "(macs, params or global), not 'layer'"
            )
        self._view = view
        for i, group in enumerate(view.groups):
            for member in group.members_with(Role.FILTER):
                PLUGIN_SCORES[view.model.get_submodule(member.module)] = self._scorer(i)

    @torch.no_grad()
    def before_pruning_step(self, view: PruningView) -> None:
        for i, (group, mask) in enumerate(zip(view.groups, view.masks)):
            if mask.hard.any() or group.size != view.original_sizes[i]:
                continue  # pruned already: its width is decided
            found = rank_measures(group, view.model)
            if found is not None:
                self.history.setdefault(i, []).append(found[0])
                self.conditions[i] = found[1]

    def direction(self, i: int) -> int:
        """CONet's op for group i: -1 shrink, +1 grow."""
        slope = rank_slope(self.history[i])
        return -1 if slope < self.delta or self.conditions[i] >= self.condition else 1

    def need(self, i: int, size: int) -> float:
        """How many units group i needs: its width (or its rank count) scaled by CONet's step; the
        whole group when it was never measured."""
        if i not in self.history:
            return float(size)
        base = size * (self.history[i][-1] if self.widths == "rank" else 1.0)
        return base * (1 + self.factor * self.direction(i))

    def _scorer(self, i: int):
        def scores(size: int) -> torch.Tensor | None:
            view = self._view
            if view is None or i >= len(view.groups) or view.groups[i].size != size:
                return None
            norms = L2().scores(view.groups[i], view.model)
            order = torch.argsort(norms, descending=True, stable=True)
            out = torch.empty(size)
            out[order] = 1.0 - torch.arange(size, dtype=torch.float32) / max(self.need(i, size), 1.0)
            return out

        return scores

    def summary(self) -> dict:
        measured = sorted(self.history)
        return {
            "measured_layers": len(measured),
            "measurements": max((len(h) for h in self.history.values()), default=0),
            "rank_ratio": [round(self.history[i][-1], 4) for i in measured],
            "shrink": sum(self.direction(i) < 0 for i in measured),
        }

    def state_dict(self) -> dict:
        return {"history": {i: list(h) for i, h in self.history.items()}, "conditions": dict(self.conditions)}

    def load_state_dict(self, state: dict) -> None:
        self.history = {int(i): [float(v) for v in h] for i, h in state.get("history", {}).items()}
        self.conditions = {int(i): float(v) for i, v in state.get("conditions", {}).items()}


PLUGINS.register(CONet.name, CONet)


class RankNeed(PluginScore):
    """CONet's score: 1 - (position by filter norm) / (the group's need), one scale across layers."""

    name = "conet"


register_criterion(RankNeed)
