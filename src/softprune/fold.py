"""BatchNorm's constant output of pruned filters, folded exactly (``mask_scope="filter"``).

The papers' code zeroes a pruned filter and leaves the BatchNorm after it alone, so in evaluation the
channel outputs a constant, act(beta - gamma * mean / sqrt(var + eps)), and the next layers read it.
Removing the channel would drop that constant and change the model (the "BN constant" problem users of
the SFP code reported). softprune removes it exactly instead:

- at every place a pruned unit is read (softprune.soft plans the same places as for soft masks), its
  values are measured on the example input and random inputs; they must be one number c per unit,
  the same for every sample and every position;
- a linear layer reading constants gets W[:, p] * c_p added to its bias;
- a convolution cannot take them into its bias (zero padding makes the border differ), so one pruned
  unit of the group, one that is non-zero wherever the others are, stays as a *carrier*: its column
  takes (c_p / c_carrier) * W[:, p] of every other pruned unit, which is exact at every position
  because all these channels are constant maps with the same zero padding around them;
- every other pruned unit is then zeroed whole (filter, BatchNorm, statistics) and compaction
  removes it; the carrier's channel is kept (one channel more than the rate asks, per group that
  needs one).

What cannot be folded is refused with a message that names the layer: a constant summed into a
residual stream together with live units (``residual="independent"``), a value that depends on the
input, or no unit able to carry the others. The fold is checked: the model must compute what it
computed before, on the example input and on random inputs, or it is put back as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import SoftpruneError
from .graph import ChannelGroup, Role
from .masks import zero_units
from .modes import training_mode
from .soft import SoftMasks, flat_outputs

_TOL = 1e-5


def _probe_inputs(example_inputs: tuple, n: int = 4) -> tuple:
    """The example input and random inputs of its shape, as one batch."""
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0:
            g = torch.Generator().manual_seed(0)
            noise = torch.randn((n - 1, *x.shape[1:]), generator=g).to(x.device, x.dtype)
            out.append(torch.cat([x[:1], noise]))
        else:
            out.append(x)
    return tuple(out)


@torch.no_grad()
def fold_constants(
    model: nn.Module,
    analysis: Any,
    groups: list[ChannelGroup],
    pruned: list[torch.Tensor],
    example_inputs: tuple,
) -> dict[int, int]:
    """Make ``pruned`` units (bool [size] per group; zero filters, BatchNorm intact) exactly removable
    without changing the model; returns the carrier unit per group position that needs one."""
    if not any(bool(p.any()) for p in pruned):
        return {}
    probe = _probe_inputs(example_inputs)
    plan = SoftMasks(model, analysis, groups)
    values = _read_points(model, plan, probe)
    constants: dict[int, dict[int, list[tuple[int, float]]]] = {}  # point -> group -> [(unit, c)]
    for k, point in enumerate(plan.points):
        low, high = values[k]
        for g, rows, units in point.owners:
            flags = pruned[g][units]
            if not bool(flags.any()):
                continue
            lo, hi = low[rows[flags]], high[rows[flags]]
            scale = max(float(high.abs().max()), float(low.abs().max()), 1e-12)
            if bool(((hi - lo).abs() > _TOL * scale).any()):
                raise SoftpruneError(
                    f"mask_scope='filter': a pruned channel of group '{groups[g].name}' reaches '{point.module}' "
                    "with a value that depends on the input, so compact() cannot fold it exactly; use "
                    "mask_scope='channel'"
                )
            if point.where == "output":
                if bool((hi.abs() > _TOL * scale).any()):
                    raise SoftpruneError(
                        f"mask_scope='filter': the pruned filters of group '{groups[g].name}' leave their "
                        f"BatchNorm's constant in a sum after '{point.module}' (a residual add of independent "
                        "branches), where no layer can absorb it; compact() would change the model. Use "
                        "mask_scope='channel' or residual='coupled'"
                    )
                continue
            entries = [(int(u), float(c)) for u, c in zip(units[flags].tolist(), lo.tolist())]
            if len({u for u, _ in entries}) != len(entries):
                raise SoftpruneError(
                    f"mask_scope='filter': a pruned unit of group '{groups[g].name}' reaches '{point.module}' "
                    "at several places with different values; compact() cannot fold it; use mask_scope='channel'"
                )
            constants.setdefault(k, {})[g] = entries
    reference = _outputs(model, probe)
    saved = {
        id(t): (t, t.detach().clone())
        for g in range(len(groups))
        for m in groups[g].members
        for t in [m.tensor(model)]
    }
    try:
        carriers = _fold(model, plan, groups, pruned, constants)
        for g, group in enumerate(groups):
            units = pruned[g].clone()
            if g in carriers:
                units[carriers[g]] = False
            zero_units(group, units, model)
        after = _outputs(model, probe)
        scale = float(reference.abs().max()) if reference.numel() else 0.0
        if not bool((after - reference).abs().max() <= _TOL * max(scale, 1e-12)):
            raise SoftpruneError(
                "mask_scope='filter': folding the pruned filters' BatchNorm constants changed the model's "
                f"outputs by {float((after - reference).abs().max()):.3g}; compact() refuses; use mask_scope='channel'"
            )
    except BaseException:
        for t, value in saved.values():
            t.copy_(value)
        raise
    return carriers


def _read_points(model: nn.Module, plan: SoftMasks, probe: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per point, the smallest and largest value each of its ids takes on the probe batch."""
    seen: dict[str, list[Any]] = {}
    handles = []
    for name in {p.module for p in plan.points}:
        module = model.get_submodule(name)

        def pre(mod, args, kwargs, name=name):
            seen.setdefault(name, []).append(("in", args, kwargs))

        def post(mod, args, output, name=name):
            seen[name][-1] = (*seen[name][-1], output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        with training_mode(model, training=False):
            model(*probe)
    finally:
        for h in handles:
            h.remove()
    out = []
    for point in plan.points:
        calls = seen.get(point.module, [])
        if point.call >= len(calls) or len(calls[point.call]) < 4:
            raise SoftpruneError(f"internal: '{point.module}' was not called as traced")
        _, args, kwargs, output = calls[point.call]
        if point.where == "output":
            x = output
        elif isinstance(point.arg, int):
            x = args[point.arg]
        else:
            x = kwargs[point.arg]
        x = x.detach().float()
        index = point.inverse.expand(x.shape).reshape(-1)
        flat = x.reshape(-1)
        n = point.ids.numel()
        low = torch.full((n,), float("inf")).scatter_reduce(0, index, flat, "amin")
        high = torch.full((n,), float("-inf")).scatter_reduce(0, index, flat, "amax")
        out.append((low, high))
    return out


def _fold(model, plan, groups, pruned, constants) -> dict[int, int]:
    carriers: dict[int, int] = {}
    # per group: which conv sites need a carrier, and each pruned unit's constant there
    needs: dict[int, list[dict[int, float]]] = {}
    for k, by_group in constants.items():
        module = model.get_submodule(plan.points[k].module)
        if isinstance(module, nn.Linear) and module.bias is not None:
            continue
        for g, entries in by_group.items():
            if any(abs(c) > 0 for _, c in entries):
                needs.setdefault(g, []).append(dict(entries))
    for g, sites in needs.items():
        candidates = [int(u) for u in torch.nonzero(pruned[g]).view(-1).tolist()]

        def strength(u: int, sites: list[dict[int, float]] = sites) -> float:
            return min(abs(site.get(u, 0.0)) for site in sites)

        best = max(candidates, key=strength)
        if strength(best) <= 1e-6:
            raise SoftpruneError(
                f"mask_scope='filter': the pruned filters of group '{groups[g].name}' output BatchNorm constants "
                "that no pruned channel can carry into the next layers exactly (each is zero somewhere the "
                "others are not); use mask_scope='channel'"
            )
        carriers[g] = best
    for k, by_group in constants.items():
        name = plan.points[k].module
        module = model.get_submodule(name)
        for g, entries in by_group.items():
            members = [
                m for m in groups[g].members_with(Role.CONSUMER) if m.module == name and m.param == "weight"
            ]
            if len(members) != 1 or members[0].dim is None:
                raise SoftpruneError(
                    f"mask_scope='filter': cannot fold the pruned channels of group '{groups[g].name}' into "
                    f"'{name}'; use mask_scope='channel'"
                )
            member = members[0]
            weight = member.tensor(model)
            into_bias = isinstance(module, nn.Linear) and module.bias is not None
            carrier = carriers.get(g)
            c_carrier = dict(entries).get(carrier, 0.0) if carrier is not None else 0.0
            target = None
            if not into_bias and carrier is not None:
                target = torch.nonzero(member.unit == carrier).view(-1)
            for u, c in entries:
                if c == 0.0 or u == carrier:  # the carrier stays: its own column goes on reading it
                    continue
                cols = torch.nonzero(member.unit == u).view(-1)
                part = weight.index_select(member.dim, cols.to(weight.device))
                if into_bias:
                    module.bias.add_((part * c).reshape(part.shape[0], -1).sum(1))
                else:
                    if target is None or target.numel() != cols.numel() or c_carrier == 0.0:
                        raise SoftpruneError(
                            f"mask_scope='filter': cannot fold the pruned channels of group '{groups[g].name}' "
                            f"into '{name}' exactly; use mask_scope='channel'"
                        )
                    weight.index_add_(member.dim, target.to(weight.device), part * (c / c_carrier))
    return carriers


def _outputs(model: nn.Module, probe: tuple) -> torch.Tensor:
    with training_mode(model, training=False):
        return flat_outputs(model(*probe))
