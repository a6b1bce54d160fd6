"""DMCP (Guo et al., CVPR 2020): channel retention as a Markov chain, searched while the weights train.

Each group's units, in position order, are split into ``chunks`` equal chunks; the first is always
kept, and chunk k+1 is kept given chunk k with probability sigmoid(alpha_k). Chunk k's marginal is the
product p_k = sigmoid(alpha_1) ... sigmoid(alpha_k), so kept widths are prefixes and the expected
width is the sum of the marginals. The expected MACs (each class kept independently with its
marginal: E[c_in] E[c_out] per layer, softprune.budgets.CostModel.expected) enter a budget loss

    L_flops = log(T - E)        when E < 0.95 T
              0                 when 0.95 T <= E <= T
              log(E - 0.95 T)   when E > T          (E and T as fractions of the dense MACs)

After every step of the hooked optimizer (whose gradients come from the caller's full-width
batch), the plugin runs, on that batch's inputs (captured by a forward pre-hook):

- the sandwich rule: the narrowest network (first chunks only) and ``random_widths`` networks of
  random prefix widths per group, each distilled towards the full network's output (KL divergence),
  their weight gradients divided by the number of passes (the full one included) and added to the
  caller's before the step (``sandwich: mean``; the authors' code adds them whole, ``sandwich:
  sum``). Measured on the methods benchmark's ResNet-20, one epoch at lr 0.1: summed, the training
  accuracy was 28.4% against dense's 61.2%; with the sub-networks' gradients divided by the number
  of passes, 58.8%. The summed gradients are about four steps in one: too large a step at this
  learning rate;
- after ``warmup`` of the pruning steps: an architecture step, the full network with every channel
  scaled by its marginal (after its BatchNorm), loss = KL to the full output + ``flops_weight`` x
  L_flops, on the alphas only (SGD, ``arch_lr``, momentum 0.9, nesterov, no weight decay).

The selection scores each unit by its marginal (criterion ``dmcp``), so a MACs budget removes the
chunks with the lowest marginals first: the widths the chain expects. Once channels are hard, the
hooks go and the model trains as a plain one.

What is from where: chunks of about 10% of a layer, the first always kept, alphas starting at 0
(p = 0.5), marginals after BatchNorm, the sandwich of full + narrowest + 2 random widths with
distillation, the piecewise-log FLOPs loss with weight 0.1, SGD lr 0.5 with nesterov momentum for the
alphas, warm-up for the first half: the authors' code (zx55/dmcp). Reconstructed: the architecture
step's task term is the distillation towards the full network (a plugin does not see the labels;
the code uses cross-entropy with them), the step's ordering inside the caller's optimizer step, and
the end: the code trains the chosen widths again from scratch, the recipe fine-tunes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..criteria import register_criterion
from ..distributed import replicated
from ..errors import SoftpruneError, check_choice
from ..graph.ids import collect_tensors
from . import PLUGINS, PruningView, number_option
from .norm_sites import PLUGIN_SCORES, HookedPlugin, PluginScore, group_norms, scale_channels

SANDWICH = ("mean", "sum")


def markov_marginals(alpha: torch.Tensor) -> torch.Tensor:
    """[1, s(a_1), s(a_1) s(a_2), ...]: the probability that each chunk is kept (the first always)."""
    return torch.cat([alpha.new_ones(1), torch.cumprod(torch.sigmoid(alpha), 0)])


def flops_loss(expected: torch.Tensor, target: float) -> torch.Tensor:
    """DMCP's piecewise-log budget loss on the expected cost (fractions of the dense cost)."""
    value = float(expected.detach())
    if value < 0.95 * target:
        return torch.log(target - expected)
    if value > target:
        return torch.log(expected - 0.95 * target)
    return expected * 0.0


class DMCP(HookedPlugin):
    name = "dmcp"

    def __init__(
        self,
        chunks: int = 10,
        flops_weight: float = 0.1,
        arch_lr: float = 0.5,
        warmup: float = 0.5,
        random_widths: int = 2,
        seed: int = 0,
        sandwich: str = "mean",
    ) -> None:
        self.chunks = number_option("dmcp", "chunks", chunks, 2, integer=True)
        self.flops_weight = number_option("dmcp", "flops_weight", flops_weight, 0.0)
        self.arch_lr = number_option("dmcp", "arch_lr", arch_lr, 0.0)
        self.warmup = number_option("dmcp", "warmup", warmup, 0.0)
        self.random_widths = number_option("dmcp", "random_widths", random_widths, 0, integer=True)
        self.seed = number_option("dmcp", "seed", seed, 0, integer=True)
        self.sandwich = check_choice("dmcp sandwich", sandwich, SANDWICH)
        self.alphas: dict[int, nn.Parameter] = {}  # group position -> one alpha per chunk after the first
        self.chunk_of: dict[int, torch.Tensor] = {}  # group position -> each unit's chunk
        self.norms: dict[int, list[tuple[nn.Module, torch.Tensor]]] = {}  # BatchNorms and their units
        self.target: float | None = None
        self.arch_steps = 0
        self._factors: dict[int, torch.Tensor] | None = None  # per group, the factor per unit now
        self._inputs: tuple | None = None  # the caller's latest training batch and its output
        self._teacher: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(self.seed)
        self._optimizer: torch.optim.SGD | None = None
        self._ended = False

    @torch.no_grad()
    def summary(self) -> dict:
        return {
            "chains": len(self.alphas),
            "arch_steps": self.arch_steps,
            "expected_macs_fraction": None if not self.alphas else float(self._expected(self._view)),
        }

    # -- the chains ---------------------------------------------------------------------------------
    def attach(self, view: PruningView) -> None:
        if replicated():
            raise SoftpruneError(
                "method dmcp does not run under torch.distributed yet (its extra passes are local)"
            )
        self._view = view
        with torch.no_grad():
            _logits(view.model(*view.example_inputs))  # a classifier's logits, or a clear error now
        if view.macs_target is None:
            raise SoftpruneError("method dmcp searches widths for a MACs target: use budget='macs'")
        self.target = 1.0 - view.macs_target
        model = view.model
        for i, group in enumerate(view.groups):
            norms = group_norms(group, model)
            if norms is None or group.size < self.chunks:
                view.hold(i)
                continue
            self.norms[i] = norms
            self.alphas[i] = nn.Parameter(torch.zeros(self.chunks - 1))
            self.chunk_of[i] = torch.div(
                torch.arange(group.size) * self.chunks, group.size, rounding_mode="floor"
            )
            for module, _ in norms:
                PLUGIN_SCORES[module] = self._scorer(i)
        if not self.alphas:
            raise SoftpruneError(
                f"method dmcp needs layers of at least {self.chunks} channels whose every producer is followed "
                "by a BatchNorm; this model's selected layers have none"
            )
        self._optimizer = torch.optim.SGD(
            list(self.alphas.values()), lr=self.arch_lr, momentum=0.9, nesterov=True
        )
        self._install(view)

    def marginals(self, i: int) -> torch.Tensor:
        """Per unit of group i: the probability that the chain keeps it."""
        return markov_marginals(self.alphas[i])[self.chunk_of[i]]

    def _scorer(self, i: int):
        def scores(size: int) -> torch.Tensor | None:
            if self._ended or self.chunk_of[i].numel() != size:
                return None
            tie = 1e-6 * (1.0 - torch.arange(size, dtype=torch.float32) / size)
            return self.marginals(i).detach().float().cpu() + tie

        return scores

    def _expected(self, view: PruningView) -> torch.Tensor:
        keep = torch.ones(view.class_count)
        for i in self.alphas:
            keep = keep.index_put((view.groups[i].classes,), self.marginals(i))
        costs = view.cost_model
        return costs.expected(keep)["macs"] / costs.dense_macs

    def hooks(self, view: PruningView):
        yield view.model, "pre", self._capture
        yield view.model, "forward", self._capture_output
        for i, norms in self.norms.items():
            for module, units in norms:
                yield module, "forward", self._hook(i, units)

    def _capture(self, module, args):
        if self._factors is None and torch.is_grad_enabled() and module.training:
            self._inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

    def _capture_output(self, module, args, output):
        if self._factors is None and torch.is_grad_enabled() and module.training:
            self._teacher = F.softmax(_logits(output).detach(), dim=1)

    def _hook(self, i: int, units: torch.Tensor):
        def hook(module, args, output):
            if self._factors is None:
                return None
            return scale_channels(output, self._factors[i], units)

        return hook

    # -- training -----------------------------------------------------------------------------------
    def before_optimizer_step(self, view: PruningView) -> None:
        if self._ended or self._inputs is None:
            return
        model, inputs, teacher = view.model, self._inputs, self._teacher
        widths = [self._narrowest()] + [self._random_widths() for _ in range(self.random_widths)]
        params = [p for p in model.parameters() if p.grad is not None]
        full = [p.grad.clone() for p in params] if self.sandwich == "mean" else None
        if full is not None:
            for p in params:
                p.grad.zero_()
        for factors in widths:
            self._factors = factors
            try:
                student = F.log_softmax(_logits(model(*inputs)), dim=1)
                F.kl_div(student, teacher, reduction="batchmean").backward()
            finally:
                self._factors = None
        if full is not None:  # the caller's gradient plus the sub-networks' over the number of passes
            with torch.no_grad():
                for p, g in zip(params, full):
                    p.grad.div_(len(widths) + 1).add_(g)
        if view.step >= self.warmup * view.total_steps:
            self._arch_step(view, inputs, teacher)
        self._inputs = self._teacher = None

    def _narrowest(self) -> dict[int, torch.Tensor]:
        return {i: (c == 0).float() for i, c in self.chunk_of.items()}

    def _random_widths(self) -> dict[int, torch.Tensor]:
        out = {}
        for i, c in self.chunk_of.items():
            kept = int(torch.randint(1, self.chunks + 1, (1,), generator=self._generator))
            out[i] = (c < kept).float()
        return out

    def _arch_step(self, view: PruningView, inputs: tuple, teacher: torch.Tensor) -> None:
        model = view.model
        self._factors = {i: self.marginals(i) for i in self.alphas}
        try:
            student = F.log_softmax(_logits(model(*inputs)), dim=1)
            loss = F.kl_div(student, teacher, reduction="batchmean")
            loss = loss + self.flops_weight * flops_loss(self._expected(view), self.target)
            alphas = list(self.alphas.values())
            grads = torch.autograd.grad(loss, alphas, allow_unused=True)
        finally:
            self._factors = None
        for alpha, grad in zip(alphas, grads):
            alpha.grad = grad
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self.arch_steps += 1

    def after_selection(self, view: PruningView, previous_hard: list[torch.Tensor]) -> None:
        if not self._ended and any(bool(view.masks[i].hard.any()) for i in self.alphas):
            self._ended = True  # the widths are chosen: the model trains as a plain one from here on
            self._remove()

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "alphas": {i: a.detach().clone() for i, a in self.alphas.items()},
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
            "arch_steps": self.arch_steps,
            "ended": self._ended,
            "generator": self._generator.get_state(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for i, value in state.get("alphas", {}).items():
            if int(i) in self.alphas:
                self.alphas[int(i)].copy_(value)
        if self._optimizer is not None and state.get("optimizer"):
            self._optimizer.load_state_dict(state["optimizer"])
        self.arch_steps = int(state.get("arch_steps", 0))
        if state.get("generator") is not None:
            self._generator.set_state(state["generator"])
        if state.get("ended") and not self._ended:
            self._ended = True
            self._remove()


def _logits(output) -> torch.Tensor:
    tensors = collect_tensors(output)
    if not tensors or tensors[0].dim() != 2:
        raise SoftpruneError(
            "method dmcp distils classifier outputs: the model must return [batch, classes] logits"
        )
    return tensors[0]


class MarkovMarginal(PluginScore):
    """DMCP's selection: each unit's marginal probability of being kept by its layer's chain (later
    positions lower within a chunk, so ties break towards the prefix). Groups without a chain (held)
    or whose chain has ended fall back to the filters' L2 norm."""

    name = "dmcp"


PLUGINS.register(DMCP.name, DMCP)
register_criterion(MarkovMarginal)
