"""Is a compact model the masked one? The comparison compact() runs before it returns a model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import SoftpruneError
from .graph.ids import collect_tensors
from .modes import training_mode


def max_difference(reference: nn.Module, candidate: nn.Module, example_inputs: tuple) -> tuple[float, float]:
    """(max |reference - candidate|, max |reference|) over every output tensor, in eval mode.

    A candidate that cannot run (a width the analysis got wrong) raises SoftpruneError naming the
    innermost module that failed and its error, instead of the raw exception from inside it."""
    with training_mode(reference, candidate, training=False), torch.no_grad():
        ref = collect_tensors(reference(*example_inputs))
        got = collect_tensors(run_naming_failure(candidate, example_inputs))
    if len(ref) != len(got):
        return float("inf"), 0.0
    diff, scale = 0.0, 0.0
    for r, g in zip(ref, got):
        if r.shape != g.shape:
            return float("inf"), 0.0
        diff = max(diff, float((r.float() - g.float()).abs().max()) if r.numel() else 0.0)
        scale = max(scale, float(r.float().abs().max()) if r.numel() else 0.0)
    return diff, scale


def run_naming_failure(model: nn.Module, example_inputs: tuple) -> Any:
    """``model(*example_inputs)``; if it raises, a SoftpruneError naming the innermost module that was
    running (its qualified name and type) with the first line of the original error."""
    names = {m: n for n, m in model.named_modules()}
    running: list[nn.Module] = []

    def enter(module: nn.Module, args: Any) -> None:
        running.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:  # returns None: output unchanged
        running.pop()

    handles = [m.register_forward_pre_hook(enter) for m in names]
    handles += [m.register_forward_hook(leave) for m in names]
    try:
        return model(*example_inputs)
    except SoftpruneError:
        raise
    except Exception as exc:  # a wrong width fails inside torch with any of several types
        module = running[-1] if running else model
        where = names.get(module) or "the top module"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SoftpruneError(
            f"the compact model fails in {where!r} ({type(module).__name__}): {first[:200]}; the channel "
            "analysis missed a dependency there (please report the model)"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
