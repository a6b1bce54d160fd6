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

import torch
from torch import nn

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
