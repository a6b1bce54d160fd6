"""Train/eval mode for a block of code, with every module's own mode given back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def training_mode(*models: nn.Module, training: bool) -> Iterator[None]:
    """``models`` in train (or eval) mode for the block, as their ``train()`` sets it; afterwards
    every module gets back the mode it had. ``model.train(was_training)`` would give all of them the
    root's mode, unfreezing a BatchNorm that a user keeps in eval inside a training model."""
    every = {id(m): m for model in models for m in model.modules()}
    saved = [(m, m.training) for m in every.values()]
    # Module.train only sets the flag on every submodule; without an override anywhere, setting the
    # flags directly is the same and skips its per-module __setattr__ (~1.5 ms on a MobileNetV2)
    plain = all(type(m).train is nn.Module.train for m in every.values())
    roots = [(model, model.training) for model in models]
    try:
        if plain:
            for m in every.values():
                m.__dict__["training"] = training
        else:
            for model in models:
                model.train(training)
        yield
    finally:
        if not plain:
            for model, mode in roots:
                model.train(mode)  # what the model's own train() does on the way back
        for m, mode in saved:
            m.__dict__["training"] = mode  # then each module's own flag
