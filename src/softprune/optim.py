"""An optimizer and its LR scheduler moved to a model compacted during training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer, old_model: nn.Module, new_model: nn.Module, slices: dict
) -> torch.optim.Optimizer:
    """The same optimizer over ``new_model``'s parameters, matched to the old ones by name, with its
    per-parameter state (momentum, Adam moments) cut like the parameters were (``slices``:
    name -> {dim: kept indices}, from compact_model). Parameters without a match start fresh."""
    old_params = dict(old_model.named_parameters())
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in optimizer.param_groups]
    for name, param in new_model.named_parameters():
        old = old_params.get(name)
        groups[group_of.get(id(old), 0) if old is not None else 0]["params"].append(param)
    new = type(optimizer)([g for g in groups if g["params"]], **optimizer.defaults)
    for name, param in new_model.named_parameters():
        old = old_params.get(name)
        if old is None or old not in optimizer.state:
            continue
        cut = slices.get(name, {})
        state = {}
        for key, value in optimizer.state[old].items():
            if isinstance(value, torch.Tensor) and value.shape == old.shape:
                for dim, index in cut.items():
                    value = value.index_select(dim, index.to(value.device))
            state[key] = value.clone() if isinstance(value, torch.Tensor) else value
        new.state[param] = state
    return new


def rebind_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> Any:
    """Point an LR scheduler at a rebuilt optimizer (its groups carry the scheduler's initial_lr)."""
    scheduler.optimizer = optimizer
    return scheduler
