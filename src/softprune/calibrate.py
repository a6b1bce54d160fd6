"""Re-estimating BatchNorm statistics after pruning.

A pruning step removes many input channels of every layer at once; the BatchNorm running statistics
collected before the step then describe a different network, and the model evaluates badly (often
at chance) until training has refreshed them. Training itself uses batch statistics and is not
affected. Running a few batches forward in train mode, with cumulative averaging, gives statistics
of the pruned network, so that evaluation (and the compact model) reflect it. Channels that are
pruned stay exactly zero: their inputs are zero, so their new running mean is zero too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import SoftpruneError
from .modes import training_mode


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable, max_batches: int, device: torch.device | str | None = None
) -> int:
    """Reset and re-estimate every BatchNorm's running statistics from up to ``max_batches`` batches.

    ``batches`` yields inputs, or (inputs, targets) pairs. Returns the number of batches used. The
    global RNG state is restored afterwards, so dropout during calibration does not change training.
    """
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms or max_batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    rng = torch.get_rng_state()
    used = 0
    try:
        with training_mode(model, training=True):
            for batch in batches:
                if used >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device) if device is not None else x)
                used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        torch.set_rng_state(rng)
    return used


def calibration_batches(data: Any, limit: int) -> Iterable:
    """Up to ``limit`` batches of ``data`` (an iterable, or a callable returning one), each as
    (inputs, targets or None): a batch is a tensor, or a tuple/list of inputs and targets."""
    source = data() if callable(data) else data
    for i, batch in enumerate(source):
        if i >= limit:
            break
        if isinstance(batch, (tuple, list)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def example_inputs_for(model: nn.Module, example_inputs: Any) -> tuple:
    if example_inputs is None:
        shape = getattr(model, "example_input_shape", None)
        if shape is None:
            raise SoftpruneError(
                f"{type(model).__name__} needs example_inputs= (a tensor or tuple the model's forward accepts) "
                "so softprune can trace it; models from softprune.create_model carry their own"
            )
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else "cpu"
        example_inputs = torch.randn(*shape, device=device)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise SoftpruneError(
            f"example_inputs must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}"
        )
    return example_inputs


def run_calibration(
    model: nn.Module, data: Any, limit: int, device: torch.device, loss_fn: Any = None
) -> int:
    """Forward passes over up to ``limit`` batches of ``data`` in eval mode (with ``loss_fn``: forward
    and backward, so hooks see gradients); the parameters' .grad are left as they were. Returns the
    number of batches."""
    saved = {p: p.grad for p in model.parameters()}
    n = 0
    try:
        with training_mode(model, training=False):
            for x, y in calibration_batches(data, limit):
                x = x.to(device)
                if loss_fn is not None:
                    if y is None:
                        raise SoftpruneError(
                            "calibration batches for gradient criteria need targets: (inputs, targets)"
                        )
                    for p in saved:
                        p.grad = None
                    with torch.enable_grad():
                        loss_fn(model(x), y.to(device)).backward()
                else:
                    with torch.no_grad():
                        model(x)
                n += 1
    finally:
        for p, g in saved.items():
            p.grad = g
    if n == 0:
        raise SoftpruneError("the calibration data gave no batch")
    return n
