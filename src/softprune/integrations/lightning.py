"""Pruning inside a Lightning ``Trainer.fit``: a callback that drives a :class:`softprune.Pruner`.

    trainer = lightning.Trainer(max_epochs=30, callbacks=[PruningCallback("ghfp", 0.4, compact_to="small.safetensors")])
    trainer.fit(module, datamodule)

The callback builds the Pruner when fitting starts (Lightning's optimizer is created by then) on the
LightningModule's network (``module=`` names the attribute, e.g. ``"model"``; the whole
LightningModule by default), hooks the optimizer so hard filters stay zero after each of Lightning's
optimizer steps, takes a pruning step every ``every_epochs`` epochs (or every ``every_steps``
optimizer steps), and compacts when fitting ends: ``callback.compact_model`` is the smaller network,
checked against the masked one, and ``compact_to`` saves it with softprune.save on rank 0. The
Pruner's state travels in Lightning's checkpoints, so ``fit(ckpt_path=...)`` resumes it. Under the
DDP strategy every process takes rank 0's pruning decision (softprune.distributed).

Needs ``pip install 'softprune[lightning]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import SoftpruneError
from ..io import save
from ..pruner import Pruner

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise SoftpruneError(
            "softprune.integrations.lightning needs Lightning: pip install 'softprune[lightning]'"
        ) from None


class PruningCallback(pl.Callback):
    """Prune the LightningModule's network while it trains, compact it at the end.

    Args:
        method, rate: as for :class:`softprune.Pruner` (a method name, the fraction of units).
        every_epochs: a pruning step at the end of every k-th training epoch ...
        every_steps: ... or every k optimizer steps instead (the steps are spread over fitting).
        module: the attribute of the LightningModule holding the network to prune (None: the module).
        example_inputs: what the network's forward takes, for tracing; default the LightningModule's
            ``example_input_array``, or the network's ``example_input_shape``.
        compact_to: a path where rank 0 saves the compact model when fitting ends.
        **settings: Pruner settings (criterion, budget, residual, ...), and ``calibration=`` data for
            criteria that score feature maps.
    """

    def __init__(
        self,
        method: str = "ghfp",
        rate: float = 0.4,
        *,
        every_epochs: int = 1,
        every_steps: int | None = None,
        module: str | None = None,
        example_inputs: Any = None,
        compact_to: str | Path | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        if every_epochs < 1 or (every_steps is not None and every_steps < 1):
            raise SoftpruneError("every_epochs and every_steps must be positive")
        self.method, self.rate = method, rate
        self.every_epochs, self.every_steps = every_epochs, every_steps
        self.module, self.example_inputs = module, example_inputs
        self.compact_to = compact_to
        self.settings = settings
        self.pruner: Pruner | None = None
        self.compact_model: nn.Module | None = None
        self._saved: dict | None = None  # a checkpoint's pruner state, applied once the pruner exists

    def network(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        net = getattr(pl_module, self.module, None)
        if not isinstance(net, nn.Module):
            raise SoftpruneError(
                f"PruningCallback(module={self.module!r}): the LightningModule has no network of that name"
            )
        return net

    def total_steps(self, trainer: pl.Trainer) -> int:
        if self.every_steps is not None:
            steps = int(trainer.estimated_stepping_batches) // self.every_steps
        else:
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise SoftpruneError(
                    "PruningCallback needs Trainer(max_epochs=...) to plan its pruning steps"
                )
            steps = trainer.max_epochs // self.every_epochs
        if steps < 1:
            raise SoftpruneError(
                f"PruningCallback: {trainer.max_epochs} epoch(s) leave no pruning step "
                f"(every_epochs={self.every_epochs}, every_steps={self.every_steps})"
            )
        return steps

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise SoftpruneError(
                f"PruningCallback works with one optimizer; configure_optimizers gave {len(trainer.optimizers)}"
            )
        net = self.network(pl_module)
        example = self.example_inputs
        if example is None and getattr(pl_module, "example_input_array", None) is not None:
            example = pl_module.example_input_array
        if example is not None:
            example = _to(example, pl_module.device)
        self.pruner = Pruner(
            net,
            self.method,
            self.rate,
            self.total_steps(trainer),
            trainer.optimizers[0],
            example_inputs=example,
            interval=self.every_steps,
            **self.settings,
        )
        if self._saved is not None:
            self.pruner.load_state_dict(self._saved)
            self._saved = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruner = self.pruner
        if pruner is None or self.every_steps is not None:
            return
        if (trainer.current_epoch + 1) % self.every_epochs == 0 and pruner.t < pruner.total_steps:
            report = pruner.step()
            pl_module.log_dict(
                {
                    "prune/rate": report.rate,
                    "prune/kept": float(report.kept),
                    "prune/hard": float(report.hard),
                },
                on_epoch=True,
                rank_zero_only=True,
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pruner is None:
            return
        self.compact_model = self.pruner.compact()
        if self.compact_to is not None and trainer.is_global_zero:
            save(self.compact_model, self.compact_to)

    def state_dict(self) -> dict[str, Any]:
        return {"pruner": self.pruner.state_dict()} if self.pruner is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("pruner") is not None:
            if self.pruner is not None:
                self.pruner.load_state_dict(state_dict["pruner"])
            else:
                self._saved = state_dict["pruner"]


def _to(value: Any, device) -> Any:
    if hasattr(value, "to"):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value
