"""BWCP (Shao et al., arXiv 2105.06423): batch whitening and stochastic channel masks by activation
probability, pruning while the network trains.

After a BatchNorm, a channel's pre-activation is y_c = gamma_c xbar_c + beta_c with xbar_c ~ N(0, 1),
so it is positive with probability Phi(beta_c / |gamma_c|). BWCP whitens the BatchNorm's output
across channels, in blocks of ``group_size``: xhat = S y, S = Sigma_N^(-1/2), Sigma_N = Sigma / tr(Sigma)
the block's covariance of y over the batch and positions (plus eps I), its inverse square root from
``iterations`` Newton steps P_k = (3 P_{k-1} - P_{k-1}^3 Sigma_N) / 2 from P_0 = I (IterNorm's
iteration, computed in its coupled form, which stays stable). A channel's activation probability
after whitening is

    p_c = Phi((betahat_c - delta) / |gammahat_c|),   gammahat = S gamma,  betahat = S beta

and the channel is multiplied by a relaxed Bernoulli sample of it while training (logistic noise,
temperature ``tau``), and in eval mode by p_c, the mask's mean (``eval_mask: mean``), or by the
paper's 1[p_c > 0.5] (``eval_mask: threshold``). The paper's test mask assumes probabilities near 0 or
1, where both agree; on a short run they are not there: on the methods benchmark's ResNet-20 after
2 epochs, 98% of the probabilities lay in (0.2, 0.8), and the eval accuracy was 17% with the
threshold against 74% with the mean (the training accuracy ~77%). A sparsity term lambda1 |gamma_c| + lambda2 beta_c
(``l1``, ``l2``; beta without absolute value: it pushes shifts negative, so probabilities fall) is
added to the BatchNorms' gradients after the first ``warmup`` of the pruning steps. In eval mode S is
a running average of the batches' S (``momentum``), as BatchNorm's statistics.

The channels with the lowest probability are removed (criterion ``bwcp``, one scale across layers)
to meet the budget; at that step the whitening of every site, times the eval mask, with the removed
channels' rows set to zero, merges exactly into its convolution and BatchNorm (softprune.plugins.norm_sites), so the
compact model equals the trained one and has no whitening module.

What is from where (all from the paper; no code was released): the activation probability with
delta = 0.05, whitening after BatchNorm's affine step normalised by its trace, the Newton iteration,
blocks of 16, Gumbel masks with tau = 0.5, the sparsity term and its warm-up (the first 20 of 160
epochs), the test-time mask 1[p > 0.5] (an option; the default mean mask is softprune's, measured
above). Reconstructed: the number of Newton steps (5, IterNorm's default), the running average's momentum (0.1, BatchNorm's), the relaxed Bernoulli form of the mask
(the paper gives its gradient only), and how the budget is met: the paper tunes lambda1 and lambda2
until the FLOPs fall; here the MACs target removes the channels of lowest probability, so the same
recipe meets any target. Whitening sits where one convolution feeds a BatchNorm (conv sites); a
residual stream, which the paper masks jointly, is held whole.
"""

from __future__ import annotations

import math

import torch

from ..criteria import register_criterion
from ..distributed import average_over_processes, replicated
from ..errors import check_choice
from . import PLUGINS, PruningView, number_option
from .norm_sites import PLUGIN_SCORES, ConvSitePlugin, PluginScore, apply_channels


def newton_inverse_sqrt(sigma: torch.Tensor, iterations: int) -> torch.Tensor:
    """Sigma_N^(-1/2) by Newton's iteration, Sigma_N = sigma / tr(sigma) (eigenvalues in (0, 1], where
    the iteration converges). The coupled form (Y_0 = Sigma_N, Z_0 = I, T = (3 I - Z Y) / 2,
    Y <- Y T, Z <- T Z) has the same iterates Z_k as P_k = (3 P - P^3 Sigma_N) / 2 in exact
    arithmetic, and stays there in floating point: the uncoupled form, on a 5 x 5 block with
    eigenvalues from 0.02 to 0.52, reaches 2e-10 of the exact root at 10 steps, then 42 at 20 and NaN
    at 30 (tests/test_methods_while_training.py checks 60 steps of this one)."""
    y = sigma / sigma.diagonal().sum()
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    z = eye
    for _ in range(iterations):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return z


def activation_probability(
    s: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, delta: float
) -> torch.Tensor:
    """Phi((S beta - delta) / |S gamma|): the probability that each whitened channel exceeds delta."""
    gamma_hat, beta_hat = s @ gamma, s @ beta
    z = (beta_hat - delta) / gamma_hat.abs().clamp(min=1e-12)
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


EVAL_MASKS = ("mean", "threshold")
TRAIN_MASKS = ("sample", "mean")


class BWCP(ConvSitePlugin):
    """``group_size``: channels whitened together; ``iterations``: Newton steps; ``tau``: the masks'
    temperature; ``delta``: the activation threshold; ``l1``, ``l2``: the sparsity term's factors on
    |gamma| and beta; ``warmup``: the fraction of pruning steps before the sparsity term starts;
    ``momentum``: of the running whitening; ``seed``: of the masks' noise; ``eval_mask``: in eval mode
    and at the merge, each channel times its probability p (``mean``, the mask's expectation) or
    1[p > 0.5] (``threshold``, the paper's); ``train_mask``: while training, a relaxed Bernoulli
    sample of p (``sample``, the paper's) or p itself (``mean``, no noise)."""

    name = "bwcp"

    def __init__(
        self,
        group_size: int = 16,
        iterations: int = 5,
        tau: float = 0.5,
        delta: float = 0.05,
        l1: float = 4e-5,
        l2: float = 8e-5,
        warmup: float = 0.125,
        momentum: float = 0.1,
        seed: int = 0,
        eval_mask: str = "mean",
        train_mask: str = "sample",
    ) -> None:
        self.group_size = number_option("bwcp", "group_size", group_size, 1, integer=True)
        self.iterations = number_option("bwcp", "iterations", iterations, 1, integer=True)
        self.tau = number_option("bwcp", "tau", tau, 1e-6)
        self.delta = number_option("bwcp", "delta", delta, 0.0)
        self.l1 = number_option("bwcp", "l1", l1, 0.0)
        self.l2 = number_option("bwcp", "l2", l2, 0.0)
        self.warmup = number_option("bwcp", "warmup", warmup, 0.0, 1.0)
        self.momentum = number_option("bwcp", "momentum", momentum, 1e-6, 1.000001)
        self.seed = number_option("bwcp", "seed", seed, 0, integer=True)
        self.eval_mask = check_choice("bwcp eval_mask", eval_mask, EVAL_MASKS)
        self.train_mask = check_choice("bwcp train_mask", train_mask, TRAIN_MASKS)
        super().__init__()
        self.running: dict[int, torch.Tensor] = {}  # group position -> running S (C x C, block diagonal)
        self.final: dict[int, torch.Tensor] = {}  # the matrices being merged (eval mode uses them)
        self.cut_below_half: float | None = None  # of the removed channels, the share with p <= 0.5
        self._generator = torch.Generator().manual_seed(self.seed)

    def summary(self) -> dict:
        return {
            "whitened_layers": len(self.sites),
            "merged": len(self.merged),
            "held_groups": list(self.held_groups),
            "removed_with_probability_at_most_half": self.cut_below_half,
        }

    # -- placing the whitening ------------------------------------------------------------------------
    def attach(self, view: PruningView) -> None:
        self._place(view)
        for i, (_, bn_name) in self.sites.items():
            bn = view.model.get_submodule(bn_name)
            self.running[i] = torch.eye(bn.num_features, dtype=torch.float32, device=bn.weight.device)
            PLUGIN_SCORES[bn] = self._scorer(i)
        self._install(view)

    def _blocks(self, channels: int) -> list[slice]:
        return [slice(a, min(a + self.group_size, channels)) for a in range(0, channels, self.group_size)]

    def _batch_whitening(self, y: torch.Tensor) -> torch.Tensor:
        channels = y.shape[1]
        flat = torch.movedim(y, 1, 0).reshape(channels, -1).float()
        centred = flat - flat.mean(dim=1, keepdim=True)
        s = y.new_zeros(channels, channels, dtype=torch.float32)
        for block in self._blocks(channels):
            part = centred[block]
            sigma = part @ part.t() / max(part.shape[1] - 1, 1)
            sigma = sigma + 1e-5 * torch.eye(sigma.shape[0], device=y.device)
            s[block, block] = newton_inverse_sqrt(sigma, self.iterations)
        return s

    def _hook(self, i: int):
        def hook(module, args, output):
            if i in self.final:
                return apply_channels(self.final[i].to(output.device, output.dtype), output)
            if module.training:
                s = self._batch_whitening(output)
                with torch.no_grad():
                    run = self.running[i].to(output.device)
                    self.running[i] = (1 - self.momentum) * run + self.momentum * s.detach()
            else:
                s = self.running[i].to(output.device)
            p = activation_probability(s, module.weight.float(), module.bias.float(), self.delta)
            if module.training and self.train_mask == "mean":
                mask = p
            elif module.training:
                u = torch.rand(p.shape, generator=self._generator).to(p.device).clamp(1e-6, 1 - 1e-6)
                p = p.clamp(1e-6, 1 - 1e-6)
                logits = torch.log(p) - torch.log1p(-p) + torch.log(u) - torch.log1p(-u)
                mask = torch.sigmoid(logits / self.tau)
            else:
                mask = self._eval_mask(p)
            return apply_channels(mask.unsqueeze(1) * s, output.float()).to(output.dtype)

        return hook

    def _eval_mask(self, p: torch.Tensor) -> torch.Tensor:
        return p if self.eval_mask == "mean" else (p > 0.5).float()

    def _scorer(self, i: int):
        def scores(size: int) -> torch.Tensor | None:
            if i in self.merged or self.running[i].shape[0] != size:
                return None
            bn = self._view.model.get_submodule(self.sites[i][1])
            with torch.no_grad():
                return activation_probability(
                    self.running[i].to(bn.weight.device), bn.weight.float(), bn.bias.float(), self.delta
                )

        return scores

    # -- training -----------------------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self, view: PruningView) -> None:
        if view.step < self.warmup * view.total_steps or not (self.l1 or self.l2):
            return
        for i, (_, bn_name) in self.sites.items():
            if i in self.merged:
                continue
            bn = view.model.get_submodule(bn_name)
            if bn.weight.grad is not None:
                bn.weight.grad.add_(self.l1 * torch.sign(bn.weight))
            if bn.bias.grad is not None:
                bn.bias.grad.add_(self.l2)

    # -- the end: merging ---------------------------------------------------------------------------
    @torch.no_grad()
    def _merge_all(self, view: PruningView) -> None:
        due = self._due()
        if replicated():  # each process kept its own running whitening: merge the same one everywhere
            for i in due:
                average_over_processes(self.running[i])
        cut = below = 0
        for i in due:
            hard = view.masks[i].hard.to(self.running[i].device)
            p = self._scorer(i)(self.running[i].shape[0])
            cut, below = cut + int(hard.sum()), below + int((p[hard.to(p.device)] <= 0.5).sum())
            kept = self._eval_mask(p.to(hard.device)) * (~hard).float()
            self.final[i] = kept.unsqueeze(1) * self.running[i]
        try:  # eval mode (the check's reference output) applies the matrices being merged
            self._merge_sites(view, self.final)
        finally:
            self.final.clear()
        if cut:
            self.cut_below_half = below / cut

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "running": {i: s.detach().clone() for i, s in self.running.items()},
            "merged": sorted(self.merged),
            "generator": self._generator.get_state(),
            "cut_below_half": self.cut_below_half,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for i, value in state.get("running", {}).items():
            if int(i) in self.running:
                self.running[int(i)] = value.clone().to(self.running[int(i)].device)
        self._load_merged(state)
        if state.get("generator") is not None:
            self._generator.set_state(state["generator"])
        self.cut_below_half = state.get("cut_below_half")


class ActivationProbability(PluginScore):
    """BWCP's selection: each channel's activation probability after whitening (one scale across
    layers). Groups without whitening (held, or merged) are scored by their filters' L2 norm."""

    name = "bwcp"


PLUGINS.register(BWCP.name, BWCP)
register_criterion(ActivationProbability)
