"""What happens to soft filters after an SFP step, under three ways of making them soft.

Fashion-MNIST, CIFAR ResNet-20 (one input channel), coupled residuals, SGD lr 0.1 with Nesterov
momentum 0.9: one epoch of dense training, an SFP step at 40%, then ``--steps`` training steps.
The three ways:

- ``parameters``: the soft units' parameters zeroed (filter, BatchNorm shift and statistics; the
  BatchNorm scale kept), the optimizer's momentum left as it is: softprune before forward masks;
- ``forward, leaking``: forward masks with a straight-through gradient that flows on through the soft
  filters into the layers before them;
- ``forward``: softprune's soft units (softprune.soft): the same, with the straight-through gradient
  stopped at the soft filters.

Per way: the share of soft filters with a non-zero gradient in the first step after the pruning step;
the largest soft filter's norm over the median kept filter of its layer, after 1, 10 and all steps;
the largest gradient norm of one layer's kept filters in the first step (the "parameters" way gives
the network without the soft units, what kept filters should get); and the training loss.

    python benchmarks/soft_dynamics.py [--steps 40] [--smoke]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import softprune
from common import machine, write
from softprune.criteria import L2
from softprune.data import BatchLoader, load_dataset
from softprune.graph import Role
from softprune.masks import apply

WAYS = ("parameters", "forward, leaking", "forward")


def soft_ratio(pruner, model) -> float:
    worst = 0.0
    for group, mask in zip(pruner.prunable, pruner.masks):
        if not bool(mask.soft.any()):
            continue
        norms = L2().scores(group, model)
        worst = max(worst, float(norms[mask.soft].max() / norms[~mask.pruned].median()))
    return worst


def moving_share(pruner, model) -> float:
    moving = total = 0
    for group, mask in zip(pruner.prunable, pruner.masks):
        for member in group.members_with(Role.FILTER):
            grad = member.tensor(model).grad
            if grad is None:
                continue
            present = torch.zeros(group.size, dtype=torch.bool)
            present[member.unit[member.unit >= 0]] = True
            rows = torch.zeros(group.size)
            rows[member.unit[member.unit >= 0]] = grad.flatten(1).norm(dim=1)[member.unit >= 0]
            moving += int((rows[mask.soft & present] > 0).sum())
            total += int((mask.soft & present).sum())
    return moving / max(total, 1)


def kept_grad_max(pruner, model) -> float:
    """The largest gradient norm over the kept filters of one layer."""
    worst = 0.0
    for group, mask in zip(pruner.prunable, pruner.masks):
        for member in group.members_with(Role.FILTER):
            grad = member.tensor(model).grad
            if grad is None:
                continue
            rows = member.unit >= 0
            kept = torch.zeros_like(rows)
            kept[rows] = ~mask.pruned[member.unit[rows]]
            worst = max(worst, float(grad[kept].norm()))
    return worst


def run(way: str, args, data) -> dict:
    torch.manual_seed(0)
    model = softprune.create_model("resnet20", in_channels=1, input_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    pruner = softprune.Pruner(model, "sfp", 0.4, 2, optimizer=opt, residual="coupled")
    loader = BatchLoader(data, 128, shuffle=True, augment=False, seed=0)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    pruner.step()
    if way == "parameters":  # what softprune did before forward masks
        pruner.soft_masks.remove()
        for group, mask in zip(pruner.prunable, pruner.masks):
            apply(group, mask, model, 0.0, "channel")
    elif way == "forward, leaking":
        masks = pruner.soft_masks
        masks.producers = []
        masks.update([m.soft for m in pruner.masks], 0.0)
    losses, ratios, first = [], {}, {}
    loader.set_epoch(1)
    step = 0
    while step < args.steps:
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if step == 0:
                first = {
                    "moving_share": moving_share(pruner, model),
                    "kept_grad_max": kept_grad_max(pruner, model),
                }
            opt.step()
            step += 1
            losses.append(float(loss))
            if step in (1, 10, args.steps):
                ratios[step] = soft_ratio(pruner, model)
            if step == args.steps:
                break
    return {"way": way, **first, "norm_ratio": ratios, "loss": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--train-limit", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.train_limit = 10, 512
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("fashion_mnist", None, "train", limit=args.train_limit)
    rows = [run(way, args, data) for way in WAYS]
    name = "soft_dynamics_smoke" if args.smoke else "soft_dynamics"
    lines = [
        f"## Soft filters after an SFP step (ResNet-20, Fashion-MNIST, lr 0.1, {args.steps} steps after the step)",
        "",
        "| soft units | soft filters with gradient, 1st step | largest kept-layer gradient, 1st step | "
        f"soft / median kept filter norm after 1, 10, {args.steps} steps | loss, 1st / highest / last step |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = " / ".join(f"{v:.2f}" for v in r["norm_ratio"].values())
        loss = r["loss"]
        lines.append(
            f"| {r['way']} | {100 * r['moving_share']:.0f}% | {r['kept_grad_max']:.2f} | {ratio} | "
            f"{loss[0]:.2f} / {max(loss):.2f} / {loss[-1]:.2f} |"
        )
    payload = {"machine": machine(), "steps": args.steps, "train_images": args.train_limit, "rows": rows}
    write(name, payload, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
