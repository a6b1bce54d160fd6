"""C2S2 (Chiu, Chen, Liu, arXiv 1904.03508): a pruning layer of channel-wise factors, real and binary,
trained with a cost-aware sparsity term, layer by layer.

Every normalized group (each producer followed by a BatchNorm, a residual stream included) gets a
pruning layer: one 1x1 depthwise kernel per channel, kept in two formats. The real copy w (1 at the
start) multiplies the BatchNorms' outputs and trains with the network, end to end; the binary copy
b = 1[w > ``threshold``] is the mask it points to (the run's summary counts the channels it has off),
and the selection removes the channels of lowest w.

The binary copy is not the forward pass's factor. Measured (methods benchmark, seed 0): with b in the
forward pass and the gradient passed straight through to w, the network fell to 10% accuracy within
the first epoch and never came back: a channel whose b turns 0 outputs 0, where the following ReLU
passes no gradient, so only the sparsity term moves its w, down, and the layers switch off one
channel after another.

The sparsity term pulls w towards 0 with a force proportional to what the channel costs:

    grad_w += ``strength`` * m_c / mean(m),   m_c = d E[MACs] / d keep_c

the MACs that channel c accounts for (as producer and as consumer, from the cost model the MACs
budget uses, softprune.budgets.CostModel.expected), so expensive channels must earn their place more.
The pruning layers start one after another, in the model's order: group k's factors train from
``span`` x k / K of the run (K groups), so the first layers are pruned first and the later ones learn
with them already thinned. The factors train with their own SGD (the hooked optimizer's learning rate,
momentum 0.9, no weight decay) and stay in [0, 1].

The selection (criterion ``c2s2``, one scale across layers) removes the channels of lowest w to meet
the budget; at that step (or before compaction, when no step made channels hard) each factor folds
into the BatchNorms it follows (gamma and beta times w: exact) and the pruning layers go, so the
compact model equals the trained one.

What is from where: only the paper's abstract could be read (its method section was not reachable):
the pruning layer of 1x1 depthwise kernels after the layers, its real and binary formats, the binary
one as the mask, a sparsity criterion, a cost-aware mechanism, the layer-by-layer progression. Every
formula above is reconstructed: the real factor in the forward pass, the threshold 0.5, the cost
weight from the MACs gradient, the staggered start, the strength and the single hard step at the
budget.
"""

from __future__ import annotations

import torch
from torch import nn

from ..criteria import register_criterion
from ..distributed import average_over_processes, replicated
from ..errors import SoftpruneError
from . import PLUGINS, PruningView, number_option
from .norm_sites import (
    PLUGIN_SCORES,
    HookedPlugin,
    PluginScore,
    group_norms,
    position_factors,
    scale_channels,
)


class C2S2(HookedPlugin):
    """``strength``: the sparsity term's factor (per optimizer step, at cost weight 1);
    ``threshold``: where the binary copy turns on; ``span``: the fraction of the run over which
    the pruning layers start, one after another."""

    name = "c2s2"

    def __init__(self, strength: float = 0.005, threshold: float = 0.5, span: float = 0.5) -> None:
        self.strength = number_option("c2s2", "strength", strength, 0.0)
        self.threshold = number_option("c2s2", "threshold", threshold, 0.0, 1.0)
        self.span = number_option("c2s2", "span", span, 0.0, 1.000001)
        self.factors: dict[int, nn.Parameter] = {}  # group position -> the real copy, one per unit
        self.costs: dict[int, torch.Tensor] = {}  # group position -> each unit's cost weight
        self.starts: dict[int, float] = {}  # group position -> fraction of the run it starts at
        self.norms: dict[int, list[tuple[nn.Module, torch.Tensor]]] = {}
        self._optimizer: torch.optim.SGD | None = None
        self._ended = False

    def summary(self) -> dict:
        binary = [self.binary(i) for i in self.factors]
        return {
            "pruning_layers": len(self.factors),
            "binary_copy_off": int(sum(int((b == 0).sum()) for b in binary)),
            "units": int(sum(b.numel() for b in binary)),
        }

    # -- placing ------------------------------------------------------------------------------------
    def attach(self, view: PruningView) -> None:
        self._view = view
        model = view.model
        for i, group in enumerate(view.groups):
            norms = group_norms(group, model)
            if norms is None:
                view.hold(i)
                continue
            self.norms[i] = norms
            self.factors[i] = nn.Parameter(torch.ones(group.size))
            for module, _ in norms:
                PLUGIN_SCORES[module] = self._scorer(i)
        if not self.factors:
            raise SoftpruneError(
                "method c2s2 needs layers whose every producer is followed by a BatchNorm; this model's "
                "selected layers have none"
            )
        self.costs = self._cost_weights(view)
        order = sorted(self.factors)  # groups are numbered in the model's order
        self.starts = {i: self.span * k / len(order) for k, i in enumerate(order)}
        self._optimizer = torch.optim.SGD(list(self.factors.values()), lr=0.0, momentum=0.9)
        self._install(view)

    def _cost_weights(self, view: PruningView) -> dict[int, torch.Tensor]:
        """Each unit's MACs (d E[MACs] / d keep), over the mean of all units."""
        keep = torch.ones(view.class_count, requires_grad=True)
        (grad,) = torch.autograd.grad(view.cost_model.expected(keep)["macs"], keep)
        per_unit = {i: grad[view.groups[i].classes].float().clamp(min=0) for i in self.factors}
        mean = torch.cat(list(per_unit.values())).mean().clamp(min=1e-12)
        return {i: c / mean for i, c in per_unit.items()}

    def binary(self, i: int) -> torch.Tensor:
        return (self.factors[i].detach() > self.threshold).float()

    def _scorer(self, i: int):
        def scores(size: int) -> torch.Tensor | None:
            if self._ended or self.factors[i].numel() != size:
                return None
            return self.factors[i].detach().float().cpu()

        return scores

    def hooks(self, view: PruningView):
        if self._ended:
            return
        for i, norms in self.norms.items():
            for module, units in norms:
                yield module, "forward", self._hook(i, units)

    def _hook(self, i: int, units: torch.Tensor):
        def hook(module, args, output):
            w = self.factors[i]
            if w.device != output.device:  # the model moved after the pruner was built
                w.data = w.data.to(output.device)
            return scale_channels(output, w, units)

        return hook

    # -- training -----------------------------------------------------------------------------------
    def before_pruning_step(self, view: PruningView) -> None:
        if view.optimizer is None and not self._ended:
            raise SoftpruneError(
                "method c2s2 trains its pruning layers on the steps of the pruner's optimizer: pass "
                "optimizer= to the Pruner"
            )

    def active(self, i: int, view: PruningView) -> bool:
        return view.step >= self.starts[i] * view.total_steps

    @torch.no_grad()
    def after_optimizer_step(self, view: PruningView) -> None:
        if self._ended or self._optimizer is None or view.optimizer is None:
            return
        for i, w in self.factors.items():
            if not self.active(i, view):
                w.grad = None  # not started: it stays at 1
                continue
            grad = torch.zeros_like(w) if w.grad is None else w.grad
            if replicated():  # the factors are not the DDP module's parameters: average by hand
                average_over_processes(grad)
            w.grad = grad + self.strength * self.costs[i].to(w.device)
        self._optimizer.param_groups[0]["lr"] = view.optimizer.param_groups[0]["lr"]
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        for w in self.factors.values():
            w.clamp_(0.0, 1.0)

    def after_selection(self, view: PruningView, previous_hard: list[torch.Tensor]) -> None:
        if not self._ended and any(bool(view.masks[i].hard.any()) for i in self.factors):
            self._fold()  # the channels are chosen: the pruning layers go

    def before_compaction(self, view: PruningView) -> None:
        if not self._ended:
            self._fold()

    @torch.no_grad()
    def _fold(self) -> None:
        """BN(x) w = BN'(x) with gamma' = gamma w, beta' = beta w: exact, in train and eval mode."""
        for i, norms in self.norms.items():
            w = self.factors[i].detach()
            for module, units in norms:
                scale = position_factors(w, units)
                module.weight.mul_(scale.to(module.weight.device, module.weight.dtype))
                module.bias.mul_(scale.to(module.bias.device, module.bias.dtype))
        self._ended = True
        self._remove()

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "factors": {i: w.detach().clone() for i, w in self.factors.items()},
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
            "ended": self._ended,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for i, value in state.get("factors", {}).items():
            if int(i) in self.factors:
                self.factors[int(i)].copy_(value)
        if self._optimizer is not None and state.get("optimizer"):
            self._optimizer.load_state_dict(state["optimizer"])
        if state.get("ended") and not self._ended:
            self._ended = True
            self._remove()


PLUGINS.register(C2S2.name, C2S2)


class PruningLayerFactor(PluginScore):
    """C2S2's selection: the real copy of each channel's pruning-layer factor (one scale across layers)."""

    name = "c2s2"


register_criterion(PruningLayerFactor)
