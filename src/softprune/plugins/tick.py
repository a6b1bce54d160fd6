"""Gate Decorator's Tick (You et al., NeurIPS 2019): before a pruning step, train only the gates.

Only the one-dimensional parameters (BatchNorm scales, which are the gates, and biases) train on a
few batches, convolution and linear weights frozen, while a gradient criterion (taylor) accumulates
its scores from these batches alone. ``Pruner.tick`` runs it; a config's ``prune.tick_batches`` has
the training command call it before each pruning step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..calibrate import calibration_batches
from ..errors import SoftpruneError
from ..modes import training_mode


@torch.no_grad()
def train_gates(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Any,
    lr: float,
    momentum: float,
    device: torch.device,
    after_step: Callable[[], None],
) -> tuple[int, list[torch.Tensor]]:
    """SGD on the gates over ``batches`` of (inputs, targets), ``after_step()`` after each update (the
    hard-zero keeper). Returns the number of batches and the parameters it trained."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    gates = [p for p in params if p.dim() < 2 and p.requires_grad]
    optimizer = torch.optim.SGD(gates, lr=lr, momentum=momentum)
    n = 0
    try:
        for p in params:
            if p.dim() >= 2:
                p.requires_grad_(False)
        with training_mode(model, training=True):
            for x, y in calibration_batches(batches, 1 << 62):
                if y is None:
                    raise SoftpruneError("tick() batches must be (inputs, targets)")
                with torch.enable_grad():
                    loss = loss_fn(model(x.to(device)), y.to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                after_step()
                n += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            if p.dim() >= 2:
                p.grad = None
    return n, gates
