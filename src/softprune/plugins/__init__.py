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
| after_pruning_step     | after each pruning step has set the masks (``report``: its counts) |
| before_compaction      | before the masked model becomes a smaller one                     |
| state_dict / load_state_dict | saved and restored with the Pruner (checkpoints, resume)     |

Plugins are registered by name (``PLUGINS``) and built from a name or a mapping
``{kind: name, **options}``; ``Pruner(..., plugins=[...])`` adds them after the method's own.
docs/writing_a_method.md walks through one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..registry import Registry

if TYPE_CHECKING:
    from ..graph import ChannelGroup
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
        return self._owner.settings.mask_scope

    def counts(self) -> tuple[int, int, int]:
        """Units kept, soft and hard, over all groups."""
        return self._owner.counts()


class Plugin:
    """Base class: every hook does nothing; a plugin overrides the ones it needs."""

    name = "plugin"

    def attach(self, view: PruningView) -> None:
        pass

    def before_optimizer_step(self, view: PruningView) -> None:
        pass

    def after_optimizer_step(self, view: PruningView) -> None:
        pass

    def after_pruning_step(self, view: PruningView, report: Any) -> None:
        pass

    def before_compaction(self, view: PruningView) -> None:
        pass

    def options(self) -> dict:
        """The options it was built with (saved beside its state, so a checkpoint says what ran)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


PLUGINS: Registry[type[Plugin]] = Registry("plugin", instance_of=Plugin)


def register_plugin(cls: type[Plugin], *, replace: bool = False) -> type[Plugin]:
    """Make a plugin class available by its ``name`` (usable as a decorator)."""
    return PLUGINS.register(cls.name, cls, replace=replace)


def make_plugin(spec: str | dict | Plugin) -> Plugin:
    return PLUGINS.build(spec)


from . import regularizers  # noqa: E402,F401  (registers the regularizers)
