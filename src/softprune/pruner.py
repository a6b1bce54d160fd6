"""The Pruner: channel groups + criterion + soft-to-hard policy + masks, in an ordinary training loop.

    pruner = softprune.Pruner(model, method="ghfp", rate=0.4, total_steps=epochs, optimizer=opt)
    for epoch in range(epochs):
        train_one_epoch(model, opt)
        pruner.step()                 # pruning step t = epoch
    small = pruner.compact()          # a physically smaller model, same function as the masked one

At step t each group of N units selects S_t (floor(N P_t) lowest-ranked units), of which the
floor(N P_t lambda_t) lowest are hard (zero for good; hard units rank first at every later step, so
they never come back); the rest of S_t are soft and multiplied by alpha_t.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from .budgets import Candidates, CostModel, Quota, layer_counts, most_removable, prioritized
from .calibrate import example_inputs_for, run_calibration
from .check import max_difference
from .compact import compact_model
from .criteria import L2
from .distributed import agree_on_masks, replicated
from .errors import SoftpruneError
from .features import FeatureTap, find_sites
from .graph import Analysis, ChannelGroup, analyze, build_groups, default_layers, selector
from .masks import GroupMask, HardKeeper, apply, dead_inputs, zero_units
from .methods import get_method
from .optim import rebind_scheduler, rebuild_optimizer  # noqa: F401  (rebind_scheduler: part of the API here)
from .plugins import Plugin, PruningView, check_fits, make_plugin
from .plugins.compensation import Compensator
from .plugins.tick import run_tick
from .policy import Policy, StepReport, make_policy
from .settings import PruneSettings, build_dataclass
from .soft import SoftForward, SoftMasks, lifted, revived

log = logging.getLogger(__name__)


class Pruner:
    """Soft-to-hard filter pruning of any traceable model.

    Args:
        model: the network (not a DDP wrapper: pass ``ddp.module``).
        method: a method by name (``softprune.list_methods()``): a preset of the family (hfp, sfp,
            asfp, srfp, asrfp, ghfp) or a literature method built on one (hrank, slimming, ...).
        rate: the fraction to prune, in [0, 1): of each group's filters (budget "layer"), of all
            units ("global"), of the MACs ("macs") or of the parameters ("params").
        total_steps: T, the number of pruning steps (epochs, by default).
        optimizer: hooked so that hard filters stay exactly zero after every step (and a regularizer's
            penalty reaches the gradients before it).
        example_inputs: what the forward takes, for tracing (softprune's models have a default).
        calibration: batches for data-driven criteria and compensation: an iterable (or a callable
            returning one) of input tensors or (inputs, targets) pairs, e.g. a DataLoader.
        loss_fn: loss(outputs, targets), for gradient criteria scored on calibration batches and tick().
        interval: prune every ``interval`` optimizer steps instead of on ``step()`` calls.
        **settings: the pruning settings (softprune.settings.PruneSettings, the same keys as a config's
            prune section): criterion, criterion_options, residual, layers, ignore, mask_scope,
            rate_schedule, decay, hardness, keep_first, budget, max_rate, round_to, normalize,
            calibration_batches, compensate, regularizer, plugins. A method's own settings come
            first; the ones given here override them (plugins add up, and one of a kind the method has sets
            that plugin's options).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "sfp",
        rate: float = 0.4,
        total_steps: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        example_inputs: Any = None,
        calibration: Any = None,
        loss_fn: Any = None,
        interval: int | None = None,
        **settings: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise SoftpruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise SoftpruneError(
                "pass the wrapped network (ddp.module) to Pruner, not the DDP/DataParallel wrapper"
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise SoftpruneError(
                f"total_steps must be an integer >= 1 (the number of pruning steps), got {total_steps!r}"
            )
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int) or interval < 1
        ):
            raise SoftpruneError(f"interval must be a positive number of optimizer steps, got {interval!r}")
        self.method = get_method(method)
        for key in ("layers", "ignore", "plugins"):  # any iterable from Python
            if key in settings and not isinstance(settings[key], (str, list, type(None))):
                settings[key] = list(settings[key])
        self.settings: PruneSettings = build_dataclass(
            PruneSettings, self.method.resolve(settings), noun="Pruner setting"
        )
        s = self.settings
        s.check()
        self.policy: Policy = make_policy(
            self.method.preset, rate, rate_schedule=s.rate_schedule, decay=s.decay, hardness=s.hardness,
            keep_first=s.keep_first,
        )  # fmt: skip
        self.criterion = s.make_criterion(self.method.criterion)
        self.budget = s.make_budget()
        self.calibration = calibration
        self.loss_fn = loss_fn
        if self.criterion.on_calibration and not self.has_calibration:
            raise SoftpruneError(
                f"criterion {self.criterion.name!r} scores feature maps: pass calibration= (a few batches of "
                "training data, e.g. a DataLoader) and calibration_batches >= 1"
            )
        compensate = s.compensation_source(self.has_calibration)
        self.compensator = None if compensate is None else Compensator(compensate)
        self.regularizer = s.make_regularizer()
        # the hard-zero keeper runs first after every optimizer step, then these, in order; the ones
        # the settings build (regularizer, compensate) are saved with the settings, not as plugins
        self._from_settings = [p for p in (self.regularizer, self.compensator) if p is not None]
        self.plugins: list[Plugin] = [*self._from_settings, *(make_plugin(p) for p in s.plugins)]
        self.view = PruningView(self)
        self.model = model
        # how to build the original model again (softprune.load), kept across compact_hard()
        self.model_spec = getattr(model, "softprune_spec", None)
        # a model that was pruned before (softprune.load of a compact file): its plan comes first
        self.base_plan = getattr(model, "softprune_plan", None)
        self.total_steps = total_steps
        self.interval = interval
        self.example_inputs = example_inputs_for(model, example_inputs)
        ignore = self.ignore
        self.analysis: Analysis = analyze(
            model, self.example_inputs, residual=s.residual, leaf_modules=ignore
        )
        # what is selected: the settings' layers, or by default every convolution, with the hidden
        # Linear layers and attention heads of a model whose compute is mostly there (a ViT)
        self.layers = s.layers if s.layers is not None else default_layers(model, self.example_inputs)
        self.groups: list[ChannelGroup] = build_groups(self.analysis, selector(self.layers, ignore), ignore)
        self.prunable = [g for g in self.groups if g.prunable]
        if not self.prunable:
            reasons = sorted(
                {g.excluded or next(iter(g.reasons.values()), "all channels frozen") for g in self.groups}
            )
            raise SoftpruneError(
                f"nothing to prune in {type(model).__name__}: no group of channels is both selected and free "
                f"({'; '.join(reasons[:3]) or 'no convolution found'}). Check layers= and ignore="
            )
        self.masks = [GroupMask(g.size) for g in self.prunable]
        # per group, units a method's plugin keeps out of every selection (PruningView.hold)
        self.held = [torch.zeros(g.size, dtype=torch.bool) for g in self.prunable]
        self._quotas = [Quota.of(g) for g in self.prunable]  # what selection must leave in each layer
        self.first: list[torch.Tensor | None] = [None] * len(self.prunable)
        # after compact_hard(), counts still refer to the original widths: per group, its original size,
        # the original index of every current unit, the original units removed, and per constraint row
        # the units it lost
        self.original_sizes = [g.size for g in self.prunable]
        self.origins = [torch.arange(g.size) for g in self.prunable]
        self._gone: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long) for _ in self.prunable]
        self.compactions: list[dict[str, list[int]]] = []
        self.t = 0
        self.history: list[StepReport] = []
        self._optimizer_steps = 0
        self._keeper = HardKeeper(model, s.mask_scope)
        self._soft = SoftForward(self)  # forward masks of soft units (channel scope), planned lazily
        self.alpha = 1.0  # the soft factor of the latest step
        self._handles: list[Any] = []  # the optimizer's hooks
        self.optimizer: torch.optim.Optimizer | None = None
        self._tap: FeatureTap | None = None
        self._cost_model: CostModel | None = None
        self.dense_cost: dict[str, float] | None = None
        if self.budget.kind in ("macs", "params"):
            self.dense_cost = self._costs().cost(self._classes([]))  # nothing pruned
        self._watch()
        for plugin in self.plugins:
            check_fits(plugin, self.criterion.name, self.criterion.needs, interval is not None)
            plugin.attach(self.view)
        self._check_reachable(rate)
        # last: a pruner refused above must not leave the caller's optimizer calling into it
        self.attach(optimizer)

    def _check_reachable(self, rate: float) -> None:
        """A MACs or parameter target beyond what removing every free unit but one per group would
        cut (the policy's final rate) is an error now, not a warning after training."""
        if self.dense_cost is None:
            return
        kind, final = self.budget.kind, self.policy.values(self.total_steps - 1, self.total_steps)[0]
        best = (
            1.0
            - self._costs().cost(self._classes(most_removable(self.prunable, self.held)))[kind]
            / (self.dense_cost[kind])
        )
        if final > best + 1e-9:
            raise SoftpruneError(
                f"method {self.method.name}: rate={rate} of the {kind} cannot be met on {type(self.model).__name__}; "
                f"removing every unit it may prune cuts at most {100 * best:.1f}%"
            )

    # the settings the rest of the Pruner reads often
    @property
    def mask_scope(self) -> str:
        return self.settings.mask_scope

    @property
    def residual(self) -> str:
        return self.settings.residual

    @property
    def ignore(self) -> list[str]:
        return list(self.settings.ignore)

    @property
    def calibration_batches(self) -> int:
        return self.settings.calibration_batches

    @property
    def has_calibration(self) -> bool:
        """Calibration batches are given and the settings use some."""
        return self.calibration is not None and self.calibration_batches > 0

    # -- optimizer hooks ------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Hook ``optimizer`` (replacing any earlier one): before its steps the plugins' penalties
        reach the gradients; after them hard filters are re-zeroed, then the plugins run."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer = optimizer
        if optimizer is not None:
            self._handles.append(
                optimizer.register_step_pre_hook(lambda opt, a, k: self._before_optimizer_step())
            )
            self._handles.append(
                optimizer.register_step_post_hook(lambda opt, a, k: self._after_optimizer_step())
            )

    def _before_optimizer_step(self) -> None:
        for plugin in self.plugins:
            plugin.before_optimizer_step(self.view)

    def _after_optimizer_step(self) -> None:
        self._keeper.after_optimizer_step(self.view)
        for plugin in self.plugins:
            plugin.after_optimizer_step(self.view)
        if self.interval is not None:
            self._count_step()

    def _watch(self) -> None:
        """Gradient criteria observe every training batch through hooks on the model."""
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        self.criterion.start(self.prunable)
        if self.criterion.needs == "gradients" and not self.criterion.on_calibration:
            sites = find_sites(self.analysis, self.prunable, self.model)
            self._tap = FeatureTap(self.model, sites, self.criterion.observe, gradients=True)

    def _costs(self) -> CostModel:
        if self._cost_model is None:
            from .graph import example_batch1

            self._cost_model = CostModel(self.model, self.analysis, example_batch1(self.example_inputs))
        return self._cost_model

    # -- data ---------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        param = next(iter(self.model.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    def _run_calibration(self, gradients: bool = False) -> int:
        """Forward (and, for gradients, backward) passes over the calibration batches in eval mode;
        the parameters' .grad are left as they were. Returns the number of batches."""
        if self.calibration is None or not self.calibration_batches:
            return 0
        if gradients and self.loss_fn is None and self.criterion.objective is None:
            raise SoftpruneError(
                f"criterion {self.criterion.name!r} needs gradients: train between pruning steps, or give the "
                "pruner loss_fn= to score it on the calibration batches"
            )
        loss_fn = (self.criterion.objective or self.loss_fn) if gradients else None
        self._soft.plan_pending()
        return run_calibration(
            self.model, self.calibration, self.calibration_batches, self._device(), loss_fn
        )

    def _observe(self, gradients: bool = False) -> None:
        """The criterion observes the calibration batches' feature maps (and their gradients)."""
        self._soft.plan_pending()
        self.criterion.start(self.prunable)
        sites = find_sites(self.analysis, self.prunable, self.model)
        tap = FeatureTap(self.model, sites, self.criterion.observe, gradients=gradients)
        try:
            self._run_calibration(gradients=gradients)
        finally:
            tap.remove()

    def tick(self, batches: Iterable, loss_fn: Any = None, lr: float = 0.01, momentum: float = 0.9) -> int:
        """Gate Decorator's Tick by hand (the ``tick`` plugin runs one before every step): train only
        the one-dimensional parameters (BatchNorm scales, the gates, and biases) on ``batches`` of
        (inputs, targets), with convolution and linear weights frozen, while a gradient criterion
        accumulates its scores from these batches alone. Returns the number of batches. Call it right
        before step()."""
        loss_fn = loss_fn or self.loss_fn
        if loss_fn is None:
            raise SoftpruneError("tick() needs loss_fn= (e.g. torch.nn.functional.cross_entropy)")
        return run_tick(self.view, batches, loss_fn, lr, momentum)

    def _count_step(self) -> None:
        self._optimizer_steps += 1
        if self._optimizer_steps % self.interval == 0 and self.t < self.total_steps:
            self.step()

    def enforce(self) -> None:
        """Zero hard filters now (done automatically after each step of the attached optimizer)."""
        self._keeper.enforce(self.optimizer)

    # -- the pruning step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepReport:
        """Pruning step t: rank, select S_t and H_t, mask; then t advances."""
        if self.t >= self.total_steps:
            raise SoftpruneError(
                f"all {self.total_steps} pruning steps are done; Pruner.step() was called once too often"
            )
        for plugin in self.plugins:
            plugin.before_pruning_step(self.view)
        t, T = self.t, self.total_steps
        rate, alpha, hardness = self.policy.values(t, T)
        self.criterion.begin_step(t)
        if self.criterion.on_calibration:
            self._observe(gradients=self.criterion.needs == "gradients")
        elif self.criterion.needs == "gradients" and not self.criterion.observed():
            self._run_calibration(gradients=True)
        old_hard = [m.hard.clone() for m in self.masks]
        old_soft = [m.soft.clone() for m in self.masks]
        for i, (picked, n_hard) in enumerate(self._plan(rate, hardness)):
            mask, n = self.masks[i], self.prunable[i].size
            selected = torch.zeros(n, dtype=torch.bool)
            selected[picked] = True
            hard = torch.zeros(n, dtype=torch.bool)
            hard[picked[: min(n_hard, picked.numel())]] = True
            mask.hard = hard | mask.hard
            mask.soft = selected & ~mask.hard
            if self.policy.keep_first and self.first[i] is None and picked.numel() > 0:
                self.first[i] = selected.clone()
        self._agree()
        for plugin in self.plugins:
            plugin.after_selection(self.view, old_hard)
        self.alpha = alpha
        self._soft.after_step(alpha)
        self._keeper.update(self.prunable, self.masks, self._dead_inputs())
        self._keeper.enforce(self.optimizer)
        if self.criterion.needs == "gradients":
            self.criterion.start(self.prunable)  # the next step scores the batches from here on
        self.t += 1
        report = StepReport(t, rate, alpha, hardness, *self.counts(), *self._revived(old_soft))
        self.history.append(report)
        for plugin in self.plugins:
            plugin.after_pruning_step(self.view, report)
        log.debug("pruning step %d: P=%.4f alpha=%.4g lambda=%.4f kept=%d soft=%d hard=%d", t, rate, alpha,
                  hardness, report.kept, report.soft, report.hard)  # fmt: skip
        return report

    def _revived(self, old_soft: list[torch.Tensor]) -> tuple[int, float | None]:
        return revived(self.prunable, self.masks, old_soft, self.model, L2())

    # -- selection --------------------------------------------------------------------------------
    def _candidates(
        self, order_of: Callable[[int, Candidates], tuple[torch.Tensor, torch.Tensor]]
    ) -> list[Candidates]:
        out = []
        for i, (group, mask) in enumerate(zip(self.prunable, self.masks)):
            first = self.first[i] if self.policy.keep_first else None
            frozen = group.frozen | self.held[i]
            c = Candidates(group.size, self.original_sizes[i], int(self._gone[i].numel()), frozen,
                           mask.hard, first, self._quotas[i], torch.zeros(0, dtype=torch.long), torch.zeros(0))  # fmt: skip
            order, c.score = order_of(i, c)
            c.order = prioritized(order, mask.hard, first, frozen)
            out.append(c)
        return out

    def _plan(self, rate: float, hardness: float) -> list[tuple[torch.Tensor, int]]:
        """Per group: the selected units (hard ones first, in selection order) and how many are hard."""

        def ranked(i: int, c: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
            guess = layer_counts(c, rate, hardness, self.budget.round_to)[0]  # what a layer budget takes
            return self.criterion.order_and_scores(self.prunable[i], self.model, guess)

        def cost(picked: list[torch.Tensor]) -> dict[str, float]:
            return self._costs().cost(self._classes(picked))

        return self.budget.allocation().allocate(
            self._candidates(ranked), rate, hardness, comparable=self.criterion.comparable, cost=cost,
            dense_cost=self.dense_cost,
        )  # fmt: skip

    def _classes(self, masks: list[torch.Tensor]) -> torch.Tensor:
        pruned = torch.zeros(int(self.analysis.ids.label.max()) + 1, dtype=torch.bool)
        for group, units in zip(self.prunable, masks):
            pruned[group.classes[units]] = True
        return pruned

    def _dead_inputs(self) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        if self.mask_scope == "filter":  # the papers' scope masks convolution weights only
            return []
        return dead_inputs(self.analysis, self.pruned_classes(include_soft=False), self.model)

    def _agree(self) -> None:
        """Under torch.distributed, every process takes rank 0's decision (a tie in the scores could
        otherwise break differently on replicas whose weights agree)."""
        if replicated():
            agree_on_masks(self.masks, self.first)

    # -- reporting ------------------------------------------------------------------------------
    @property
    def soft_masks(self) -> SoftMasks | None:
        """The forward masks of soft units (softprune.soft), once a step has made soft units."""
        self._soft.plan_pending()
        return self._soft.masks

    @property
    def soft_fallback(self) -> list[str]:
        """The groups whose soft units are masked in their parameters, not in the forward pass
        (softprune.soft could not place forward masks for them); empty before the first soft step."""
        self._soft.plan_pending()
        if self._soft.masks is None:
            return []
        return [self.prunable[g].name for g in sorted(self._soft.masks.fallback)]

    def counts(self) -> tuple[int, int, int]:
        """(kept, soft, hard) units over all prunable groups."""
        soft = sum(int(m.soft.sum()) for m in self.masks)
        hard = sum(int(m.hard.sum()) for m in self.masks) + sum(int(g.numel()) for g in self._gone)
        total = sum(self.original_sizes)
        return total - soft - hard, soft, hard

    def pruned_classes(self, include_soft: bool = True) -> torch.Tensor:
        return self._classes([m.pruned if include_soft else m.hard for m in self.masks])

    def profile(self) -> dict[str, int]:
        """Parameters and MACs per sample of the model as it would be compacted now."""
        from .cost import profile
        from .graph import example_batch1

        pending = self._soft.drop_pending()  # a copy must not carry the hooks (they fit the full widths)
        with lifted(self._soft.masks), ExitStack() as stack:
            for plugin in self.plugins:
                stack.enter_context(plugin.lifted(self.view))
            small = compact_model(self.model, self.analysis, self.pruned_classes())
        if pending:
            self._soft.sync()
        return profile(small, example_batch1(self.example_inputs))

    def summary(self) -> list[dict]:
        rows = []
        for g in self.groups:
            row = g.summary()
            if g in self.prunable:
                m = self.masks[self.prunable.index(g)]
                row.update(hard=int(m.hard.sum()), soft=int(m.soft.sum()))
            rows.append(row)
        return rows

    # -- compaction during training -----------------------------------------------------------------
    def compact_hard(self, verify: bool = True) -> nn.Module:
        """Remove the hard units physically now and go on pruning on the smaller model.

        Hard units are zero and never come back, so removing them changes nothing but the cost: the
        returned model computes what the masked model computes (checked). The pruner moves to it, and
        the optimizer it hooks is rebuilt over the new parameters with its state (momentum, Adam
        moments) cut to the surviving positions: train ``pruner.model`` with ``pruner.optimizer``
        from here on (``rebind_scheduler`` moves an LR scheduler). Rates and counts keep referring to
        the original widths. Parameters of rebuilt attention blocks start with fresh optimizer state.
        """
        if self.mask_scope == "filter":
            raise SoftpruneError(
                "compact_hard() (prune.compact_during_training) needs mask_scope='channel': in the 'filter' "
                "scope a pruned filter still outputs its BatchNorm's shift, which differs between training "
                "and evaluation, so removing it during training would change what the model computes"
            )
        hard_classes = self.pruned_classes(include_soft=False)
        if not bool(hard_classes.any()):
            return self.model
        for plugin in self.plugins:
            plugin.before_compaction(self.view)
        old_model, old_masks, old_groups = self.model, self.masks, self.prunable
        old_quotas, old_first = self._quotas, self.first
        self._soft.reset()  # soft units are alive in both models; the new one gets new masks
        slices: dict = {}
        small = compact_model(old_model, self.analysis, hard_classes, slices)
        if verify:
            diff, scale = max_difference(old_model, small, self.example_inputs)
            if not diff <= 1e-5 * max(scale, 1e-12):
                raise SoftpruneError(
                    f"internal: removing hard units changed the outputs by {diff:.3g} (scale {scale:.3g})"
                )
        record = {g.name: torch.nonzero(m.hard).view(-1).tolist() for g, m in zip(old_groups, old_masks)}
        optimizer = (
            rebuild_optimizer(self.optimizer, old_model, small, slices)
            if self.optimizer is not None
            else None
        )
        analysis = analyze(small, self.example_inputs, residual=self.residual, leaf_modules=self.ignore)
        groups = build_groups(analysis, selector(self.settings.layers, self.ignore), self.ignore)
        by_name = {g.name: i for i, g in enumerate(old_groups)}
        prunable, masks, first, original, origin, gone, quotas, held = [], [], [], [], [], [], [], []
        for g in groups:
            if not g.prunable:
                continue
            j = by_name.get(g.name)
            if j is None:
                raise SoftpruneError(f"internal: group '{g.name}' of the compacted model has no counterpart")
            keep = ~old_masks[j].hard
            if int(keep.sum()) != g.size:
                raise SoftpruneError(
                    f"internal: group '{g.name}' has {g.size} units after compaction, not {int(keep.sum())}"
                )
            prunable.append(g)
            masks.append(GroupMask(g.size, soft=old_masks[j].soft[keep].clone()))
            first.append(None if old_first[j] is None else old_first[j][keep].clone())
            held.append(self.held[j][keep].clone())
            original.append(self.original_sizes[j])
            origin.append(self.origins[j][keep])
            gone.append(torch.cat([self._gone[j], self.origins[j][old_masks[j].hard]]))
            quotas.append(old_quotas[j].after_compaction(g, old_masks[j].hard))
        self.model, self.analysis, self.groups, self.prunable = small, analysis, groups, prunable
        self.masks, self.first, self.held = masks, first, held
        self.original_sizes, self.origins, self._gone, self._quotas = original, origin, gone, quotas
        self.compactions.append(record)
        self._keeper = HardKeeper(small, self.mask_scope)
        self._soft.sync()
        self._cost_model = None
        self._watch()
        self.attach(optimizer)
        return small

    # -- the end ----------------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> None:
        """Make every selected unit hard and exactly zero (what the last step of training does).

        In the "filter" scope only the filters are zeroed, as the papers' code does: the channels
        then output their BatchNorm's constant, which compact() folds into the next layers."""
        old_hard = [m.hard.clone() for m in self.masks]
        for mask in self.masks:
            mask.hard = mask.pruned.clone()
        for plugin in self.plugins:
            plugin.after_selection(self.view, old_hard)
        self._soft.reset(masked_already=True)  # every soft unit becomes hard: no forward masks
        for group, mask in zip(self.prunable, self.masks):
            mask.hard = mask.pruned.clone()
            mask.soft = torch.zeros_like(mask.soft)
            if self.mask_scope == "filter":
                apply(group, mask, self.model, 0.0, "filter")
            else:
                zero_units(group, mask.hard, self.model)
        self._keeper.update(self.prunable, self.masks, self._dead_inputs())

    def compact(self, verify: bool = True, tolerance: float = 1e-5) -> nn.Module:
        """A physically smaller model computing what the masked model computes.

        Selected units become hard first (``finalize``). The compact model is checked against the
        masked one on the example inputs in eval mode: a max difference above ``tolerance`` times the
        output's scale raises instead of returning a wrong model. In the "filter" scope the pruned
        channels' BatchNorm constants are folded into the next layers first (softprune.fold), keeping
        one pruned channel per group where a convolution reads them; ``last_verification["carriers"]``
        names them.
        """
        from .io import make_plan

        self.finalize()
        for plugin in self.plugins:
            plugin.before_compaction(self.view)
        carriers: dict[int, int] = {}
        if self.mask_scope == "filter":
            from .fold import fold_constants

            carriers = fold_constants(
                self.model, self.analysis, self.prunable, [m.hard for m in self.masks], self.example_inputs
            )
        removed = []
        for i, mask in enumerate(self.masks):
            units = mask.hard.clone()
            if i in carriers:
                units[carriers[i]] = False
            removed.append(units)
        small = compact_model(self.model, self.analysis, self._classes(removed))
        small.softprune_plan = make_plan(self, removed=removed)
        if verify:
            diff, scale = max_difference(self.model, small, self.example_inputs)
            self.last_verification = {"max_abs_diff": diff, "output_scale": scale}
            if carriers:
                self.last_verification["carriers"] = {self.prunable[i].name: u for i, u in carriers.items()}
            if not diff <= tolerance * max(scale, 1e-12):
                raise SoftpruneError(
                    f"the compact model differs from the masked one by {diff:.3g} (output scale {scale:.3g}); "
                    "this is a bug, please report the model"
                )
        return small

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._soft.plan_pending()  # the model's parameters as the masks say, before they are saved
        return {
            "t": self.t,
            "total_steps": self.total_steps,
            "optimizer_steps": self._optimizer_steps,
            "policy": self.policy.to_dict(),
            "criterion": {"name": self.criterion.name, **self.criterion.options()},
            "residual": self.residual,
            "mask_scope": self.mask_scope,
            "groups": [
                {
                    "name": g.name,
                    "size": g.size,
                    "hard": m.hard.clone(),
                    "soft": m.soft.clone(),
                    "first": None if f is None else f.clone(),
                }
                for g, m, f in zip(self.prunable, self.masks, self.first)
            ],
            "history": [r.as_dict() for r in self.history],
            "alpha": self.alpha,
            "compactions": self.compactions,
            "budget": self.budget.to_dict(),
            "criterion_state": self.criterion.state_dict(),
            "regularizer": None
            if self.regularizer is None
            else {
                "kind": self.regularizer.name,
                **self.regularizer.options(),
                "state": self.regularizer.state_dict(),
            },
            "plugins": [
                {"kind": p.name, **p.options(), "state": p.state_dict()}
                for p in self.plugins
                if p not in self._from_settings
            ],
        }

    def load_state_dict(self, state: dict) -> nn.Module:
        """Restore a saved state; returns the model to train from here on.

        A state saved after compact_hard() replays its compactions on this pruner's (original) model
        first, so the returned model has the saved architecture (then load the saved weights into it,
        and the optimizer state into ``pruner.optimizer``).
        """
        for record in state.get("compactions", [])[len(self.compactions) :]:
            for group, mask in zip(self.prunable, self.masks):
                mask.hard = torch.zeros(group.size, dtype=torch.bool)
                mask.hard[torch.tensor(record.get(group.name, []), dtype=torch.long)] = True
                mask.soft = torch.zeros_like(mask.hard)
                zero_units(group, mask.hard, self.model)
            self.compact_hard(verify=False)
        groups = state.get("groups", [])
        if len(groups) != len(self.prunable) or any(
            s["name"] != g.name or s["size"] != g.size for s, g in zip(groups, self.prunable)
        ):
            raise SoftpruneError(
                "this pruner state belongs to a different model or layer selection "
                f"({len(groups)} groups saved, {len(self.prunable)} here)"
            )
        if state.get("residual", self.residual) != self.residual:
            raise SoftpruneError(
                f"the saved state used residual={state['residual']!r}, this pruner {self.residual!r}"
            )
        self.t = int(state["t"])
        self.total_steps = int(state["total_steps"])
        self._optimizer_steps = int(state.get("optimizer_steps", 0))
        for i, s in enumerate(groups):
            self.masks[i].hard = s["hard"].clone().bool()
            self.masks[i].soft = s["soft"].clone().bool()
            self.first[i] = None if s.get("first") is None else s["first"].clone().bool()
        self.history = [StepReport(**r) for r in state.get("history", [])]
        self.alpha = float(state.get("alpha", self.history[-1].alpha if self.history else 1.0))
        self._soft.reset(masked_already=True)  # the saved parameters are masked already
        self._soft.sync()
        self.criterion.load_state_dict(state.get("criterion_state") or {})
        saved_reg = state.get("regularizer")
        if self.regularizer is not None and saved_reg:
            self.regularizer.load_state_dict(saved_reg.get("state", {}))
        others = [p for p in self.plugins if p not in self._from_settings]
        saved = state.get("plugins", [])
        if [p.get("kind") for p in saved] != [p.name for p in others]:
            raise SoftpruneError(
                f"this pruner state was saved with plugins {[p.get('kind') for p in saved]}, this pruner has "
                f"{[p.name for p in others]}: build it with the same plugins"
            )
        for plugin, entry in zip(others, saved):
            plugin.load_state_dict(entry.get("state", {}))
        self._keeper.update(self.prunable, self.masks, self._dead_inputs())
        return self.model
