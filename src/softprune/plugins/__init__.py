"""Plugins: what a method adds to training, with the lifecycle's hooks.

A method of the literature is rarely only a criterion: it adds a penalty to the gradients (Slimming,
GReg), keeps something at zero (every hard step), folds removed channels into the next layers (LRF's
compensation), or trains something of its own between steps. Each such piece is a :class:`Plugin`:
the Pruner calls its hooks at fixed points of training and gives it a :class:`PruningView` (the
model, the groups, their mask state and the step), never the Pruner itself.

| hook                   | when                                                            |
|------------------------|-----------------------------------------------------------------|
| attach(view)           | the Pruner is built, or hooked to another optimizer               |
| before_optimizer_step  | before every step of the hooked optimizer (gradients are there)   |
| after_optimizer_step   | after it                                                        |
| before_pruning_step    | at the start of each pruning step, before scoring (Tick trains the gates here) |
| after_selection        | the step has chosen its masks, the weights are not masked yet (``previous_hard``: each group's hard units before it; compensation folds the new ones here) |
| after_pruning_step     | after each pruning step has set the masks (``report``: its counts) |
| before_compaction      | before the masked model becomes a smaller one                     |
| lifted(view)           | a context in which the plugin's forward hooks are off (copies of the model) |
| state_dict / load_state_dict | saved and restored with the Pruner (checkpoints, resume)     |

Plugins are registered by name (``PLUGINS``) and built from a name or a mapping
``{kind: name, **options}``; ``Pruner(..., plugins=[...])`` adds them after the method's own (one of a
kind the method already has sets that plugin's options instead). Here:
the regularizers (``regularizers.py``), weight compensation (``compensation.py``, built from the
``compensate`` setting), Gate Decorator's Tick (``tick.py``), ResRep's compactors (``resrep.py``), DMCP's
Markov chains (``dmcp.py``), BWCP's whitening and masks (``bwcp.py``), C2S2's pruning layers
(``c2s2.py``) and CONet's rank measurements (``conet.py``); the
hard-zero keeper every Pruner
runs first lives with the masks (``softprune.masks.HardKeeper``).
docs/writing_a_method.md walks through one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..calibrate import calibration_batches
from ..errors import SoftpruneError
from ..registry import Registry

if TYPE_CHECKING:
    from ..graph import Analysis, ChannelGroup
    from ..masks import GroupMask


class PruningView:
    """What a plugin may read: the model, the prunable groups and their masks, and the step.

    Groups and masks are live (the same objects the Pruner uses); after a compaction during training
    the groups are the smaller model's, and ``origins`` map each current unit to its index in the
    model as it was built.
    """

    def __init__(self, owner: Any) -> None:
        self._owner = owner  # the Pruner; plugins use the properties below only

    @property
    def model(self) -> nn.Module:
        return self._owner.model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._owner.optimizer

    @property
    def groups(self) -> list[ChannelGroup]:
        return self._owner.prunable

    @property
    def masks(self) -> list[GroupMask]:
        return self._owner.masks

    @property
    def original_sizes(self) -> list[int]:
        """Each group's width in the model as it was built."""
        return self._owner.original_sizes

    @property
    def origins(self) -> list[torch.Tensor]:
        """Per group, the original index of every current unit."""
        return self._owner.origins

    @property
    def step(self) -> int:
        """Pruning steps taken so far."""
        return self._owner.t

    @property
    def total_steps(self) -> int:
        return self._owner.total_steps

    @property
    def mask_scope(self) -> str:
        return self._owner.mask_scope

    @property
    def analysis(self) -> Analysis:
        """The channel graph of the model (ids, members), for plugins that follow channels to their
        consumers."""
        return self._owner.analysis

    @property
    def loss_fn(self) -> Any:
        return self._owner.loss_fn

    @property
    def criterion_needs(self) -> str:
        """What the criterion scores from: "weights", "activations" or "gradients"."""
        return self._owner.criterion.needs

    @property
    def interval(self) -> int | None:
        """Optimizer steps between pruning steps (None: steps are called by the training loop)."""
        return self._owner.interval

    @property
    def has_calibration(self) -> bool:
        return self._owner.has_calibration

    @property
    def device(self) -> torch.device:
        return self._owner._device()

    @property
    def macs_target(self) -> float | None:
        """The MACs cut the run ends at (the policy's last rate) under a MACs budget, else None."""
        o = self._owner
        return o.policy.values(o.total_steps - 1, o.total_steps)[0] if o.budget.kind == "macs" else None

    @property
    def budget_kind(self) -> str:
        """How a step's rate becomes counts: "layer", "global", "macs" or "params"."""
        return self._owner.budget.kind

    @property
    def class_count(self) -> int:
        """How many channel classes the graph has (the length of a per-class tensor)."""
        return int(self._owner.analysis.ids.label.max()) + 1

    @property
    def cost_model(self) -> Any:
        """The model's MACs and parameters as a function of what is removed (softprune.budgets.CostModel)."""
        return self._owner._costs()

    @property
    def example_inputs(self) -> tuple:
        """What the model's forward takes (the tracing example), for checks on the model."""
        return self._owner.example_inputs

    def hold(self, group: int, units: torch.Tensor | None = None) -> None:
        """Keep these units of group ``group`` (all of them by default) out of every selection: a
        method that can only prune some places (ResRep: where a compactor sits) holds the others."""
        held = self._owner.held[group]
        if units is None:
            held[:] = True
        else:
            held[units] = True

    def counts(self) -> tuple[int, int, int]:
        """Units kept, soft and hard, over all groups."""
        return self._owner.counts()

    def alive(self, removed: list[torch.Tensor]) -> torch.Tensor:
        """Per channel id of the graph, whether it survives removing these units (one boolean mask
        per group)."""
        return self._owner.analysis.ids.alive(self._owner._classes(removed))

    def calibration_data(self, limit: int) -> Iterable:
        """Up to ``limit`` calibration batches as (inputs, targets or None)."""
        return calibration_batches(self._owner.calibration, limit)

    def run_calibration(self, gradients: bool = False) -> int:
        """Forward (and, with ``gradients``, backward) passes over the calibration batches in eval mode;
        returns the number of batches."""
        return self._owner._run_calibration(gradients=gradients)

    def restart_scores(self) -> None:
        """A gradient criterion forgets what it accumulated and scores the batches from here on."""
        self._owner.criterion.start(self._owner.prunable)

    def enforce_hard(self) -> None:
        """Zero the hard units now (as after every step of the hooked optimizer)."""
        self._owner.enforce()


class Plugin:
    """Base class: every hook does nothing; a plugin overrides the ones it needs."""

    name = "plugin"
    # a plugin that trains on batches of its own before each pruning step asks for the steps at epoch
    # ends: the training command then does not spread them over the iterations (prune.min_steps)
    steps_at_epoch_ends = False
    # what the criterion must score from for the plugin to make sense (None: any)
    criterion_needs: str | None = None

    def attach(self, view: PruningView) -> None:
        pass

    def before_optimizer_step(self, view: PruningView) -> None:
        pass

    def after_optimizer_step(self, view: PruningView) -> None:
        pass

    def before_pruning_step(self, view: PruningView) -> None:
        pass

    def after_selection(self, view: PruningView, previous_hard: list[torch.Tensor]) -> None:
        pass

    def after_pruning_step(self, view: PruningView, report: Any) -> None:
        pass

    def before_compaction(self, view: PruningView) -> None:
        pass

    def lifted(self, view: PruningView) -> AbstractContextManager:
        """A block in which the plugin's changes to the forward pass (hooks) are off, so that a copy
        of the model made in it carries none (the Pruner's cost profile copies the model)."""
        return nullcontext()

    def options(self) -> dict:
        """The options it was built with (saved beside its state, so a checkpoint says what ran): by
        default each argument of ``__init__`` read back from the attribute of the same name."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    def summary(self) -> dict:
        """What the plugin measured, for the run's summary.json (numbers; empty: nothing to say)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


PLUGINS: Registry[type[Plugin]] = Registry("plugin", instance_of=Plugin)


def number_option(owner: str, name: str, value: object, low: float, high: float | None = None,
                  integer: bool = False) -> float:  # fmt: skip
    """A plugin's numeric option, checked: ``low <= value`` (``< high`` when given), an integer when
    asked; otherwise a one-line error naming the plugin (``owner``) and the option."""
    kind = int if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kind) and value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise SoftpruneError(
            f"{owner} {name} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}"
        )
    return int(value) if integer else float(value)


def register_plugin(cls: type[Plugin], *, replace: bool = False) -> type[Plugin]:
    """Make a plugin class available by its ``name`` (usable as a decorator)."""
    return PLUGINS.register(cls.name, cls, replace=replace)


def make_plugin(spec: str | dict | Plugin) -> Plugin:
    return PLUGINS.build(spec)


def check_fits(plugin: Plugin, criterion: str, criterion_needs: str, per_iterations: bool) -> None:
    """The plugin can run with this criterion (its name and what it scores from) and with pruning
    steps every k iterations (``per_iterations``) or not."""
    if plugin.criterion_needs is not None and criterion_needs != plugin.criterion_needs:
        raise SoftpruneError(
            f"the {plugin.name} plugin needs a criterion that scores {plugin.criterion_needs}; criterion "
            f"{criterion!r} does not use them"
        )
    if plugin.steps_at_epoch_ends and per_iterations:
        raise SoftpruneError(
            f"the {plugin.name} plugin runs before pruning steps at epoch ends, not with steps every k "
            "iterations (every_iterations, interval)"
        )


from . import bwcp, c2s2, compensation, conet, dmcp, regularizers, resrep, tick  # noqa: E402,F401  (registers their plugins)
