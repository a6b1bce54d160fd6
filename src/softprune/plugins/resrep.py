"""ResRep (Ding et al., ICCV 2021): a compactor after each convolution and BatchNorm, trained with a
group-lasso penalty; channels leave by their compactor rows, and the compactor merges into the layer.

A compactor is a C x C matrix Q, identity at the start, applied to the BatchNorm's output (a 1x1
convolution). Its gradient is the task's, except on the rows of channels selected for removal, where
the task gradient is reset to zero ("gradient resetting"), plus ``strength * q / ||q||`` on every row
q (the group lasso's gradient): selected rows shrink towards zero while the others keep learning.
Channels are selected by the norms of their rows (criterion ``compactor``, on one scale across
layers) at each pruning step, a few more each time, until the budget is met. When a group's channels
become hard, their rows are set to zero and Q merges into the convolution and BatchNorm before it
(softprune.plugins.norm_sites: exact, checked on the example input before it is kept); the zero rows
give zero filters, which compaction removes like any hard channel.

Compactors sit where a group's channels are made by one ungrouped convolution read directly by a
BatchNorm (ResNet's inner layers, VGG's layers); the other groups (a residual stream written by
several convolutions) are held: ResRep leaves them whole, as the paper does for ResNets.

The compactors train with their own SGD (the hooked optimizer's learning rate, momentum 0.99 by
default, no weight decay: the penalty takes its place), so the caller's optimizer and its checkpoint are
unchanged; their values and momentum are saved with the Pruner's state.
"""

from __future__ import annotations

import torch
from torch import nn

from ..criteria import register_criterion
from ..distributed import average_over_processes, replicated
from ..errors import SoftpruneError
from . import PLUGINS, PruningView, number_option
from .norm_sites import PLUGIN_SCORES, ConvSitePlugin, PluginScore, apply_channels


class ResRep(ConvSitePlugin):
    """``strength``: the group-lasso factor lambda (the authors' code: 1e-4). ``momentum``: the
    compactors' SGD (the authors' code: 0.99)."""

    name = "resrep"

    def __init__(self, strength: float = 1e-4, momentum: float = 0.99) -> None:
        self.strength = number_option("resrep", "strength", strength, 0.0)
        self.momentum = number_option("resrep", "momentum", momentum, 0.0, 1.0)
        super().__init__()
        self.compactors: dict[int, nn.Parameter] = {}
        self.zeroed_norm: float | None = None  # largest norm of a row set to zero by a merge, / median kept
        self._optimizer: torch.optim.SGD | None = None

    def summary(self) -> dict:
        """How close to zero the rows were when the merge cut them (1.0: as large as a kept row)."""
        return {
            "compactors": len(self.sites),
            "merged": len(self.merged),
            "held_groups": list(self.held_groups),
            "largest_cut_row_over_median_kept_row": self.zeroed_norm,
        }

    # -- placing the compactors ---------------------------------------------------------------------
    def attach(self, view: PruningView) -> None:
        self._place(view)  # the other groups are held: ResRep leaves them whole
        for i, (_, bn_name) in self.sites.items():
            bn = view.model.get_submodule(bn_name)
            n = view.groups[i].size
            self.compactors[i] = nn.Parameter(torch.eye(n, device=bn.weight.device, dtype=bn.weight.dtype))
            PLUGIN_SCORES[bn] = self._scorer(i)
        self._optimizer = torch.optim.SGD(list(self.compactors.values()), lr=0.0, momentum=self.momentum)
        self._install(view)

    def _scorer(self, i: int):
        def scores(size: int) -> torch.Tensor | None:
            q = self.compactors[i]
            return q.detach().norm(dim=1) if i not in self.merged and q.shape[0] == size else None

        return scores

    def _hook(self, i: int):
        def hook(module, args, output):
            q = self.compactors[i]
            if q.device != output.device:  # the model moved after the pruner was built (before training)
                q.data = q.data.to(output.device)
            return apply_channels(q, output)

        return hook

    # -- training -----------------------------------------------------------------------------------
    def before_pruning_step(self, view: PruningView) -> None:
        if view.optimizer is None:
            raise SoftpruneError(
                "method resrep trains its compactors on the steps of the pruner's optimizer: pass optimizer= "
                "to the Pruner"
            )

    @torch.no_grad()
    def after_optimizer_step(self, view: PruningView) -> None:
        if self._optimizer is None or view.optimizer is None:
            return
        live = [i for i in self.compactors if i not in self.merged]
        for i in live:
            q = self.compactors[i]
            if q.grad is None:
                continue
            if replicated():  # the compactors are not the DDP module's parameters: average by hand
                average_over_processes(q.grad)
            selected = view.masks[i].pruned.to(q.device)
            q.grad[selected] = 0.0  # gradient resetting: selected rows follow the penalty only
            q.grad.add_(self.strength * q / q.norm(dim=1, keepdim=True).clamp(min=1e-12))
        for group in self._optimizer.param_groups:
            group["lr"] = view.optimizer.param_groups[0]["lr"]
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    # -- the end: merging ---------------------------------------------------------------------------
    @torch.no_grad()
    def _merge_all(self, view: PruningView) -> None:
        due = self._due()
        ratios = []
        for i in due:
            q, hard = self.compactors[i], view.masks[i].hard.to(self.compactors[i].device)
            norms = q.norm(dim=1)
            if bool(hard.any()) and bool((~hard).any()):
                ratios.append(float(norms[hard].max() / norms[~hard].median().clamp(min=1e-12)))
            q[hard] = 0.0
        self._merge_sites(view, {i: self.compactors[i] for i in due})
        if ratios:
            self.zeroed_norm = max(ratios + ([self.zeroed_norm] if self.zeroed_norm is not None else []))

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "compactors": {i: q.detach().clone() for i, q in self.compactors.items()},
            "merged": sorted(self.merged),
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for i, value in state.get("compactors", {}).items():
            if int(i) in self.compactors:
                self.compactors[int(i)].copy_(value)
        self._load_merged(state)
        if self._optimizer is not None and state.get("optimizer"):
            self._optimizer.load_state_dict(state["optimizer"])


class CompactorNorm(PluginScore):
    """ResRep's selection: the L2 norm of each channel's compactor row (on one scale across layers).
    A group without a compactor (held by ResRep, or merged already) is scored by its filters' L2 norm."""

    name = "compactor"


PLUGINS.register(ResRep.name, ResRep)
register_criterion(CompactorNorm)
