"""Criteria: how important each unit of a group is.

A criterion maps a group (and the model holding its weights) to one score per unit; lower scores are
pruned first. ``rank`` orders the units for a selection of ``n`` units; most criteria rank by score,
FPGM-mix splits the selection between norm and distance as the paper's code does, and the greedy
criteria (LRF, similarity) remove one unit at a time.

Scores of a group with several producers (a coupled residual stream) aggregate the per-layer scores
of the units: ``mean`` (default), ``sum``, ``max``, or ``first`` (the first producer only). A unit
absent from a layer does not count in that layer's aggregate. Data-driven criteria aggregate over
the places where a unit's feature maps are read (docs/criteria.md).

``needs`` says what a criterion reads: "weights"; "activations" (feature maps on calibration
batches, gathered by the pruner before each step); or "gradients" (activations and the loss's
gradient, accumulated over the training batches between steps, or over calibration batches).

| name       | paper                                  | needs       | score of a unit                                     |
|------------|----------------------------------------|-------------|-----------------------------------------------------|
| l1         | Li et al., ICLR 2017 (PFEC)            | weights     | sum of absolute filter weights                      |
| l2         | He et al., IJCAI 2018 (SFP)            | weights     | Euclidean norm of the filter weights                |
| l2_bn      | GHFP's code (Cai et al.)               | weights     | norm of the filter scaled by its BatchNorm's gamma  |
| fpgm       | He et al., CVPR 2019 (FPGM)            | weights     | sum of distances to the other filters               |
| fpgm_mix   | He et al., CVPR 2019 (FPGM code)       | weights     | a share of the selection by L2, the rest by FPGM    |
| bn_scale   | Liu et al., ICCV 2017 (Slimming)       | weights     | abs of the BatchNorm scale gamma                    |
| lrf        | Joo et al., AAAI 2021 (LRF)            | weights     | residual of the filter's least-squares fit by the others |
| random     | the baseline                           | nothing     | uniform random, seeded per step                     |
| hrank      | Lin et al., CVPR 2020 (HRank)          | activations | mean rank of the unit's feature maps                |
| ezcrop     | Lin et al., WACV 2022 (EZCrop)         | activations | share of FFT energy outside the low-frequency zone  |
| similarity | Zhang et al., arXiv 1908.02620         | activations | distance at which clustering merges it into a similar channel |
| taylor     | You et al., NeurIPS 2019 (Gate Decorator) | gradients | sum over batches of abs(sum of activation x gradient) |
| activation | Roy et al., arXiv 2003.02800 (PFWT)    | activations | mean absolute value of the unit's feature maps      |
| relevance  | Aketi et al., IEEE Access 2020 (FRS)   | gradients   | abs of the mean over images of (activation x gradient of the true class's score) |

A criterion with an ``objective`` (relevance) scores calibration batches only, backpropagating
``objective(outputs, targets)`` instead of the training loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .errors import SoftpruneError, choice_error
from .graph import ChannelGroup, Member, Role
from .registry import Registry

AGGREGATES = ("mean", "sum", "max", "first")


def ridged(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """gram + ridge * (its mean diagonal) * I: a ridge that scales with the data, so the same
    ``ridge`` suits activations of any magnitude (float64 in, float64 out)."""
    n = gram.shape[0]
    scale = float(gram.diagonal().mean()) if n else 1.0
    return gram + ridge * max(scale, 1e-30) * torch.eye(n, dtype=gram.dtype)


class Criterion:
    """Base class. ``needs``: "weights", "activations" or "gradients" (see the module docstring).
    ``comparable``: scores of different layers are on one scale, so a global ranking may compare
    them raw (BN scales, Taylor); otherwise global budgets normalize per group."""

    name = "criterion"
    needs = "weights"
    comparable = False
    # objective(outputs, targets): what a gradient criterion backpropagates on calibration batches
    # instead of the training loss (relevance); such a criterion scores calibration batches only
    objective: Callable | None = None

    @property
    def on_calibration(self) -> bool:
        """Scores come from calibration batches the pruner runs before each step."""
        return self.needs == "activations" or self.objective is not None

    def __init__(self, aggregate: str = "mean") -> None:
        if aggregate not in AGGREGATES:
            raise choice_error("aggregate", aggregate, AGGREGATES)
        self.aggregate = aggregate

    def scores(self, group: ChannelGroup, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def rank(self, group: ChannelGroup, model: nn.Module, n: int) -> torch.Tensor:
        """Unit indices, least important first (only the first ``n`` are used by the caller)."""
        return torch.argsort(self.scores(group, model), stable=True)

    def order_and_scores(
        self, group: ChannelGroup, model: nn.Module, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranking and the scores behind it (global budgets compare the scores across groups)."""
        scores = self.scores(group, model)
        return torch.argsort(scores, stable=True), scores

    def begin_step(self, t: int) -> None:
        """Called before the pruner scores the groups at pruning step t."""

    def options(self) -> dict:
        return {"aggregate": self.aggregate}

    # -- data: only criteria that need activations or gradients use these --------------------------
    def start(self, groups: list[ChannelGroup]) -> None:
        """Forget what was observed; get ready to observe these groups."""

    def observe(self, g: int, units: torch.Tensor, maps: torch.Tensor, grads: torch.Tensor | None) -> None:
        """Feature maps [k, N, *map] of ``units`` of group position ``g`` (and their gradients)."""

    def observed(self) -> bool:
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- helpers shared by weight criteria ------------------------------------------------------
    def _per_member(
        self,
        group: ChannelGroup,
        model: nn.Module,
        fn: Callable[..., torch.Tensor],
        among_present: bool = False,
    ) -> torch.Tensor:
        """``fn`` of each filter member's rows, aggregated over the members that have the unit.
        ``among_present``: ``fn(rows, found)`` sees only the rows of the units the member has
        (``found``, a mask over the group), for criteria that compare a filter with the others of its
        layer: a zero-padded shortcut's units absent from a layer are not zero filters of it."""
        members = group.members_with(Role.FILTER)
        if not members:
            raise SoftpruneError(f"group '{group.name}' has no filters to score")
        if self.aggregate == "first":
            members = members[:1]
        values, present = [], []
        for member in members:
            rows = group.unit_matrix(model, member).float()
            found = _present(group, member)
            if among_present:  # the units this member has (a zero-padded shortcut has fewer)
                value = torch.zeros(group.size)
                value[found] = fn(rows[found], found)
                values.append(value)
            else:
                values.append(fn(rows))
            present.append(found)
        v = torch.stack(values)
        p = torch.stack(present)
        if self.aggregate == "max":
            return v.masked_fill(~p, -math.inf).amax(0)
        total = (v * p).sum(0)
        if self.aggregate == "sum":
            return total
        return total / p.sum(0).clamp(min=1)


def _present(group: ChannelGroup, member: Member) -> torch.Tensor:
    found = torch.zeros(group.size, dtype=torch.bool)
    unit = member.unit[member.unit >= 0]
    found[unit] = True
    return found


class L1(Criterion):
    name = "l1"

    def scores(self, group, model):
        return self._per_member(group, model, lambda rows: rows.abs().sum(1))


class L2(Criterion):
    name = "l2"

    def scores(self, group, model):
        return self._per_member(group, model, lambda rows: rows.norm(dim=1))


def _relative_distances(rows: torch.Tensor, metric: str) -> torch.Tensor:
    """Each row's distance sum to the other rows over the layer's mean of them: FPGM's order within
    a layer, on a scale shared by the members of a coupled group whatever their width and the size
    of their weights (a layer's filters are compared with each other, not with another layer's)."""
    sums = _distance_sums(rows, metric)
    return sums / sums.mean().clamp(min=1e-12) if sums.numel() else sums


def _distance_sums(rows: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "l2":
        d = torch.cdist(rows[None], rows[None])[0]
    elif metric == "l1":
        d = torch.cdist(rows[None], rows[None], p=1)[0]
    else:  # cosine distance
        unit = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
        d = 1 - unit @ unit.T
    return d.sum(1)


METRICS = ("l2", "l1", "cosine")


class FPGM(Criterion):
    """Filters near the geometric median of their layer are the most replaceable: g(F_i) = sum_j ||F_i - F_j||
    over the filters F_j of the layer, divided by the layer's mean of g (the same order within a
    layer; the members of a coupled group, of different widths behind zero-padded shortcuts and of
    different weight scales, each compare their own filters and weigh the same)."""

    name = "fpgm"

    def __init__(self, aggregate: str = "mean", metric: str = "l2") -> None:
        super().__init__(aggregate)
        if metric not in METRICS:
            raise choice_error("fpgm metric", metric, METRICS)
        self.metric = metric

    def scores(self, group, model):
        return self._per_member(
            group, model, lambda rows, found: _relative_distances(rows, self.metric), among_present=True
        )

    def options(self) -> dict:
        return {**super().options(), "metric": self.metric}


class FPGMMix(FPGM):
    """The FPGM code's two stages: ``norm_fraction`` of the selection by smallest L2 norm, then the
    rest by smallest distance sum among the remaining filters. FPGM-mix 40% (10% by norm and 30% by
    distance) is norm_fraction = 0.25."""

    name = "fpgm_mix"

    def __init__(self, aggregate: str = "mean", metric: str = "l2", norm_fraction: float = 0.25) -> None:
        super().__init__(aggregate, metric)
        if not 0.0 <= norm_fraction <= 1.0:
            raise SoftpruneError(f"norm_fraction must lie in [0, 1], got {norm_fraction}")
        self.norm_fraction = norm_fraction

    def rank(self, group, model, n):
        norms = L2(self.aggregate).scores(group, model)
        n_norm = int(math.floor(n * self.norm_fraction + 1e-9))
        by_norm = torch.argsort(norms, stable=True)
        first = by_norm[:n_norm]
        rest = by_norm[n_norm:]
        keep = torch.ones(group.size, dtype=torch.bool)
        keep[first] = False

        def among_rest(rows: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
            out = torch.full((rows.shape[0],), math.inf)
            rest_here = keep[found]
            out[rest_here] = _relative_distances(rows[rest_here], self.metric)
            return out

        dist = self._per_member(group, model, among_rest, among_present=True)
        rest = rest[torch.argsort(dist[rest], stable=True)]
        return torch.cat([first, rest])

    def scores(self, group, model):
        order = self.rank(group, model, group.size)
        scores = torch.empty(group.size)
        scores[order] = torch.arange(group.size, dtype=torch.float)
        return scores

    def options(self) -> dict:
        return {**super().options(), "norm_fraction": self.norm_fraction}

    def order_and_scores(self, group, model, n):
        order = self.rank(group, model, n)
        scores = torch.empty(group.size)
        scores[order] = torch.arange(group.size, dtype=torch.float)
        return order, scores


class BNScale(Criterion):
    """Network Slimming: a channel's BatchNorm scale |gamma| is its importance. Trained with an L1
    penalty on gamma (regularizer "bn_l1"), unimportant channels' scales go to zero; one global
    threshold then compares every layer (a global budget), since scales share one scale."""

    name = "bn_scale"
    comparable = True

    def scores(self, group, model):
        members = [
            m
            for m in group.members_with(Role.SCALE)
            if m.param == "weight"
            and isinstance(model.get_submodule(m.module), nn.modules.batchnorm._BatchNorm)
        ]
        if not members:
            raise SoftpruneError(
                f"criterion 'bn_scale' needs a BatchNorm after the filters of group '{group.name}', and it has "
                "none; keep that layer whole with ignore=[...] or choose another criterion"
            )
        if self.aggregate == "first":
            members = members[:1]
        values = torch.stack([group.unit_matrix(model, m).float().abs()[:, 0] for m in members])
        present = torch.stack([_present(group, m) for m in members])
        if self.aggregate == "max":
            return values.masked_fill(~present, -math.inf).amax(0)
        total = (values * present).sum(0)
        return total if self.aggregate == "sum" else total / present.sum(0).clamp(min=1)


class L2BN(Criterion):
    """GHFP's released code scores a filter by the L2 norm of the filter scaled by the BatchNorm that
    follows it, ||gamma_i * F_i|| = |gamma_i| * ||F_i||: a conv-BN pair is scale-free in F, so the
    filter's norm alone says little about what the channel contributes. Units without a BatchNorm
    after their filter are scored by ||F_i|| alone."""

    name = "l2_bn"

    def scores(self, group, model):
        norms = L2(self.aggregate).scores(group, model)
        gammas = [
            m
            for m in group.members_with(Role.SCALE)
            if m.param == "weight"
            and isinstance(model.get_submodule(m.module), nn.modules.batchnorm._BatchNorm)
        ]
        if not gammas:
            return norms
        scale = torch.zeros(group.size)
        count = torch.zeros(group.size)
        for m in gammas:
            scale += group.unit_matrix(model, m).float().abs()[:, 0] * _present(group, m)
            count += _present(group, m)
        return norms * torch.where(count > 0, scale / count.clamp(min=1), torch.ones(group.size))


class Random(Criterion):
    """Uniform random scores: the baseline every criterion should beat. Seeded by (seed, step, group),
    so every process and every resumed run draws the same."""

    name = "random"
    needs = "weights"

    def __init__(self, aggregate: str = "mean", seed: int = 0) -> None:
        super().__init__(aggregate)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SoftpruneError(f"random criterion seed must be an integer, got {seed!r}")
        self.seed = seed
        self.t = 0

    def begin_step(self, t):
        self.t = t

    def scores(self, group, model):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.t * 10_007 + group.index)
        return torch.rand(group.size, generator=generator)

    def options(self):
        return {**super().options(), "seed": self.seed}


def _filter_rows(group: ChannelGroup, model: nn.Module) -> torch.Tensor:
    """Every producer's filter of each unit, side by side: [size, features]."""
    members = group.members_with(Role.FILTER)
    if not members:
        raise SoftpruneError(f"group '{group.name}' has no filters to score")
    return torch.cat([group.unit_matrix(model, m).float() for m in members], dim=1)


def _consumer_norms(group: ChannelGroup, model: nn.Module) -> torch.Tensor:
    """Per unit, the norm of the input weights that read it in the next layers (1 where none do)."""
    members = group.members_with(Role.CONSUMER)
    if not members:
        return torch.ones(group.size)
    total = torch.zeros(group.size)
    for m in members:
        total += group.unit_matrix(model, m).float().pow(2).sum(1)
    return total.sqrt()


class SequentialCriterion(Criterion):
    """A criterion whose ranking is built one removal at a time (each choice changes the others'
    scores): order_and_scores is the primitive, and rank and scores come from it."""

    def rank(self, group, model, n):
        return self.order_and_scores(group, model, n)[0]

    def scores(self, group, model):
        return self.order_and_scores(group, model, group.size)[1]


class LRF(SequentialCriterion):
    """Linearly replaceable filters: a filter that a linear combination of the other filters of its
    layer reproduces is redundant. Score: the residual norm of that least-squares fit, times the
    norm of the next layer's weights that read the channel (the paper's code); units are removed one
    at a time, refitting the others after each removal. Pair it with the compensator, which moves a
    removed channel's contribution onto the kept ones."""

    name = "lrf"

    def __init__(self, aggregate: str = "mean", ridge: float = 1e-6) -> None:
        super().__init__(aggregate)
        if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or ridge < 0:
            raise SoftpruneError(f"lrf ridge must be a number >= 0, got {ridge!r}")
        self.ridge = float(ridge)

    def order_and_scores(self, group, model, n):
        rows = _filter_rows(group, model).double()
        weight = _consumer_norms(group, model).double()
        size = rows.shape[0]
        inv = torch.linalg.inv(ridged(rows @ rows.T, self.ridge))
        alive = torch.ones(size, dtype=torch.bool)
        order, scores = [], torch.zeros(size)
        for _ in range(size):
            idx = torch.nonzero(alive).view(-1)
            diag = inv.diagonal()[idx].clamp(min=1e-300)
            residual = (1.0 / diag).clamp(min=0).sqrt() * weight[idx]
            j = int(torch.argmin(residual))
            u = int(idx[j])
            order.append(u)
            scores[u] = float(residual[j])
            # remove u from the inverse of the remaining units' Gram matrix
            col = inv[:, u].clone()
            inv -= torch.outer(col, col) / max(float(col[u]), 1e-300)
            alive[u] = False
            inv[u, :] = 0
            inv[:, u] = 0
        return torch.tensor(order, dtype=torch.long), scores

    def options(self):
        return {**super().options(), "ridge": self.ridge}


class DataCriterion(Criterion):
    """Base of criteria that observe feature maps: per unit, a sum of per-map values and a count."""

    needs = "activations"

    def __init__(self, aggregate: str = "mean") -> None:
        super().__init__(aggregate)
        self._sums: list[torch.Tensor] = []
        self._counts: list[torch.Tensor] = []
        self._position: dict[int, int] = {}

    def start(self, groups):
        self._position = {g.index: i for i, g in enumerate(groups)}
        self._sums = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
        self._counts = [torch.zeros(g.size, dtype=torch.float64) for g in groups]

    def per_map(self, maps: torch.Tensor, grads: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """Per unit, the sum over this batch of the per-map statistic, and the number of maps."""
        raise NotImplementedError

    def observe(self, g, units, maps, grads):
        values, count = self.per_map(maps, grads)
        self._sums[g].index_add_(0, units, values.double().cpu())
        self._counts[g].index_add_(0, units, torch.full((units.numel(),), float(count), dtype=torch.float64))

    def observed(self):
        return bool(self._counts) and any(bool((c > 0).any()) for c in self._counts)

    def _observed_position(self, group: ChannelGroup) -> int:
        """The group's position in what was observed; an error if none of its maps were seen."""
        i = self._position.get(group.index)
        if i is None or not bool((self._counts[i] > 0).any()):
            raise SoftpruneError(
                f"criterion {self.name!r} has seen no feature maps of group '{group.name}'; give the pruner "
                "calibration batches (calibration=...)"
                + (" with loss_fn=, or train between steps" if self.needs == "gradients" else "")
            )
        return i

    def scores(self, group, model):
        i = self._observed_position(group)
        counts = self._counts[i]
        if self.aggregate == "sum":
            return self._sums[i].float()
        return (self._sums[i] / counts.clamp(min=1)).float()

    def state_dict(self):
        return {"sums": [s.clone() for s in self._sums], "counts": [c.clone() for c in self._counts]}

    def load_state_dict(self, state):
        if not state:
            return
        sums, counts = state.get("sums", []), state.get("counts", [])
        if len(sums) == len(self._sums) and all(a.shape == b.shape for a, b in zip(sums, self._sums)):
            self._sums = [s.clone().double() for s in sums]
            self._counts = [c.clone().double() for c in counts]


def _tie_break(maps: torch.Tensor) -> torch.Tensor:
    """A value below 1e-6 that orders maps by energy: breaks ties between equal ranks or ratios (all
    1x1 maps have rank 1) without reordering distinct ones."""
    energy = maps.reshape(maps.shape[0], maps.shape[1], -1).pow(2).mean(-1)
    return 1e-6 * energy / (1.0 + energy)


class HRank(DataCriterion):
    """HRank: the average rank of a unit's feature maps (each sample's H x W map) over calibration
    batches; low-rank maps carry little information. 1-D maps count as rank 0 or 1."""

    name = "hrank"

    def per_map(self, maps, grads):
        k, n = maps.shape[:2]
        if maps.dim() >= 4:
            mats = maps.reshape(k * n, maps.shape[-2], maps.shape[-1])
        else:
            mats = maps.reshape(k * n, 1, -1)
        ranks = torch.linalg.matrix_rank(mats).reshape(k, n).double()
        return (ranks + _tie_break(maps).double()).sum(1), n


class EZCrop(DataCriterion):
    """EZCrop: the share of a feature map's (log-magnitude) FFT energy outside a central low-frequency
    square whose half-width is ``alpha`` of the distance to the border; high is important. A cheap
    stand-in for HRank's ranks (the paper shows the two agree)."""

    name = "ezcrop"

    def __init__(self, aggregate: str = "mean", alpha: float = 0.25) -> None:
        super().__init__(aggregate)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise SoftpruneError(f"ezcrop alpha must lie in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def per_map(self, maps, grads):
        k, n = maps.shape[:2]
        mats = (
            maps.reshape(k, n, maps.shape[-2], maps.shape[-1])
            if maps.dim() >= 4
            else maps.reshape(k, n, 1, -1)
        )
        h, w = mats.shape[-2:]
        energy = torch.log(torch.fft.fftshift(torch.fft.fft2(mats), dim=(-2, -1)).abs() + 1.0)
        if h % 2 == 0 and w % 2 == 0:
            xc, yc = h // 2, w // 2
        else:
            xc, yc = (h - 1) // 2, (w - 1) // 2
        step = (
            0
            if xc - 1 <= 0
            else min(math.ceil((h - xc - 1) * self.alpha), math.ceil((w - yc - 1) * self.alpha))
        )
        zone = energy[..., max(xc - step, 0) : xc + step + 1, max(yc - step, 0) : yc + step + 1].sum((-2, -1))
        total = energy.sum((-2, -1))
        ratio = torch.nan_to_num(1.0 - zone / total, nan=0.0)
        ratio = torch.where(total > 0, ratio, torch.zeros_like(ratio))
        return (ratio.double() + _tie_break(maps).double()).sum(1), n

    def options(self):
        return {**super().options(), "alpha": self.alpha}


class Taylor(DataCriterion):
    """First-order Taylor importance of a channel gate (Gate Decorator): removing channel c changes the
    loss by about |sum over the batch and positions of a * dL/da|; per batch, summed over batches
    (``square=True``: the square, as Molchanov et al. 2019 accumulate it). Taken at the consumers'
    input, after the activation: for a ReLU after the gate the product is the same as at the gate.
    A residual stream read in several places sums its terms (the paper's group pruning)."""

    name = "taylor"
    needs = "gradients"
    comparable = True

    def __init__(self, aggregate: str = "sum", square: bool = False) -> None:
        super().__init__(aggregate)
        if not isinstance(square, bool):
            raise SoftpruneError(f"taylor square must be true or false, got {square!r}")
        self.square = square

    def per_map(self, maps, grads):
        contribution = (maps * grads).reshape(maps.shape[0], -1).sum(1)
        value = contribution.pow(2) if self.square else contribution.abs()
        return value, 1

    def options(self):
        return {**super().options(), "square": self.square}


class ActivationMean(DataCriterion):
    """PFWT's activation criterion: the mean absolute activation of a unit's feature maps, read where
    its consumers read them (after the activation function)."""

    name = "activation"

    def per_map(self, maps, grads):
        return maps.abs().reshape(maps.shape[0], maps.shape[1], -1).mean(-1).sum(1), maps.shape[1]


class Relevance(DataCriterion):
    """FRS's feature relevance, first order: the relevance of channel c for the true class y is
    a_c * d(score_y)/d(a_c) summed over positions (LRP's z-rule for a ReLU network equals this product
    of activation and gradient); per unit, the absolute mean over the calibration images. The
    authors' code uses LRP's alpha-beta rule (alpha 2, beta 1) and weights classes by accuracy: not
    reproduced here (docs/literature.md)."""

    name = "relevance"
    needs = "gradients"

    @staticmethod
    def objective(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The true class's score, summed over the batch."""
        return outputs.gather(1, targets.view(-1, 1)).sum()

    def per_map(self, maps, grads):
        return (maps * grads).reshape(maps.shape[0], maps.shape[1], -1).sum(-1).sum(1), maps.shape[1]

    def scores(self, group, model):
        return super().scores(group, model).abs()


class Similarity(SequentialCriterion, DataCriterion):
    """Channel similarity: channels whose feature maps are strongly correlated carry the same
    information. Units are clustered hierarchically (average linkage on 1 - |correlation| of their
    maps over calibration data); each merge drops the cluster member with the lower activation
    energy. A unit's score is the distance at which it was dropped, so pruning n units keeps one
    representative of each of the N - n clusters."""

    name = "similarity"
    comparable = True  # distances lie in [0, 1] in every layer

    def start(self, groups):
        super().start(groups)
        self._gram = [torch.zeros(g.size, g.size, dtype=torch.float64) for g in groups]
        self._mean = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
        self._n = [torch.zeros(g.size, dtype=torch.float64) for g in groups]

    def observe(self, g, units, maps, grads):
        x = maps.reshape(maps.shape[0], -1).double().cpu()
        idx = units.view(-1)
        self._gram[g][idx.unsqueeze(1), idx.unsqueeze(0)] += x @ x.T
        self._mean[g].index_add_(0, idx, x.sum(1))
        self._n[g].index_add_(0, idx, torch.full((idx.numel(),), float(x.shape[1]), dtype=torch.float64))
        self._counts[g].index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))

    def order_and_scores(self, group, model, n):
        i = self._observed_position(group)
        count = self._n[i].clamp(min=1)
        # every unit is observed over the same positions, so one n per unit is enough
        mean = self._mean[i] / count
        energy = self._gram[i].diagonal() / count
        cov = self._gram[i] / count.sqrt().outer(count.sqrt()) - mean.outer(mean)
        std = cov.diagonal().clamp(min=0).sqrt()
        corr = cov / std.outer(std).clamp(min=1e-30)
        dist = (1.0 - corr.abs()).clamp(min=0.0, max=1.0)
        dead = std <= 1e-12  # a constant map: it says nothing, like a perfect duplicate
        dist[dead, :] = 0.0
        dist[:, dead] = 0.0
        return agglomerate(dist, energy)

    def state_dict(self):
        return {**super().state_dict(), "gram": self._gram, "mean": self._mean, "n": self._n}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state and "gram" in state and len(state["gram"]) == len(self._gram):
            self._gram, self._mean, self._n = state["gram"], state["mean"], state["n"]


def agglomerate(dist: torch.Tensor, energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-linkage clustering: (units in the order they are dropped, the distance of each drop).

    Each merge keeps the higher-energy representative of the two clusters; the last representative
    standing is never dropped and scores 2 (above every distance).
    """
    size = dist.shape[0]
    d = dist.double().clone()
    d.fill_diagonal_(math.inf)
    weight = torch.ones(size, dtype=torch.float64)
    rep = torch.arange(size)
    scores = torch.full((size,), 2.0)
    order = []
    for _ in range(size - 1):
        flat = int(torch.argmin(d))
        a, b = divmod(flat, size)
        value = float(d[a, b])
        ra, rb = int(rep[a]), int(rep[b])
        keep, drop = (ra, rb) if float(energy[ra]) >= float(energy[rb]) else (rb, ra)
        scores[drop] = value
        order.append(drop)
        merged = (weight[a] * d[a] + weight[b] * d[b]) / (weight[a] + weight[b])
        d[a], d[:, a] = merged, merged
        d[a, a] = math.inf
        d[b, :], d[:, b] = math.inf, math.inf
        weight[a] += weight[b]
        rep[a] = keep
    survivors = [u for u in range(size) if u not in set(order)]
    return torch.tensor(order + survivors, dtype=torch.long), scores


CRITERIA: Registry[type[Criterion]] = Registry("criterion", instance_of=Criterion)
for _cls in (L1, L2, L2BN, FPGM, FPGMMix, BNScale, LRF, Random, HRank, EZCrop, Similarity, Taylor,
             ActivationMean, Relevance):  # fmt: skip
    CRITERIA.register(_cls.name, _cls)


def make_criterion(name: str | dict | Criterion, **options) -> Criterion:
    """A criterion by name with its options (aggregate=, metric=, norm_fraction=), from a mapping
    {"kind": name, **options}, or one already built."""
    return CRITERIA.build(name, **options)


def register_criterion(cls: type[Criterion], *, replace: bool = False) -> type[Criterion]:
    """Add a criterion class (usable as a decorator); it is then available by ``cls.name``. A name
    already taken is an error unless ``replace=True``."""
    return CRITERIA.register(cls.name, cls, replace=replace)
