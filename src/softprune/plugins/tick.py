"""Gate Decorator's Tick (You et al., NeurIPS 2019): before a pruning step, train only the gates.

Only the one-dimensional parameters (BatchNorm scales, which are the gates, and biases) train on a
few batches of the calibration data, convolution and linear weights frozen, while a gradient
criterion (taylor) accumulates its scores from these batches alone. The ``tick`` plugin runs it at
the start of every pruning step (``plugins: [{kind: tick, batches: 20, lr: 0.01}]``; the
``tick_tock`` method has it); ``Pruner.tick(batches, loss_fn)`` runs one by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..calibrate import calibration_batches
from ..distributed import broadcast_from_rank0, replicated
from ..errors import SoftpruneError
from ..modes import training_mode
from . import PLUGINS, Plugin, PruningView


class Tick(Plugin):
    """Before each pruning step: ``batches`` calibration batches of SGD (``lr``, ``momentum``) on the
    gates only, with the criterion scoring from these batches alone."""

    name = "tick"
    steps_at_epoch_ends = True  # a Tick per spread-out step would cost a few batches each time
    criterion_needs = "gradients"  # the criterion scores the Tick's batches

    def __init__(self, batches: int = 20, lr: float = 0.01, momentum: float = 0.9) -> None:
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise SoftpruneError(f"tick batches must be a positive integer, got {batches!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
            raise SoftpruneError(f"tick lr must be a positive number, got {lr!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise SoftpruneError(f"tick momentum must be a number in [0, 1), got {momentum!r}")
        self.batches, self.lr, self.momentum = batches, float(lr), float(momentum)

    def attach(self, view: PruningView) -> None:
        if not view.has_calibration or view.loss_fn is None:
            raise SoftpruneError(
                "the tick plugin trains the gates on calibration batches: pass calibration= (batches of "
                "(inputs, targets)) and loss_fn= to the Pruner"
            )

    def before_pruning_step(self, view: PruningView) -> None:
        run_tick(view, view.calibration_data(self.batches), view.loss_fn, self.lr, self.momentum)


def run_tick(view: PruningView, batches: Iterable, loss_fn: Any, lr: float, momentum: float) -> int:
    """One Tick on ``batches``; every process ends with rank 0's gates. Returns the number of batches."""
    view.restart_scores()
    n, gates = train_gates(view.model, batches, loss_fn, lr, momentum, view.device, view.enforce_hard)
    if replicated():
        broadcast_from_rank0(gates + list(view.model.buffers()))
    return n


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


PLUGINS.register(Tick.name, Tick)
