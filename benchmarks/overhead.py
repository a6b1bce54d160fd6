"""What pruning costs during training: ResNet-56, CIFAR-sized inputs, batch 128, CPU.

1. A training step with each preset's hooks (hard filters re-zeroed with their optimizer state after
   every optimizer step) against a plain training step: all of them alternate in one run, and each
   ratio is a median over the rounds.
2. A pruning step (rank, select, mask) against an epoch (391 iterations of batch 128: the median
   plain step times 391).

    python benchmarks/overhead.py [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import softprune
from common import machine, write
from softprune.cost import interleaved

METHODS = ("hfp", "sfp", "asfp", "srfp", "asrfp", "ghfp")
NO_STOP = "ghfp-masks-only"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_name, batch, rounds = ("resnet20", 8, 3) if args.smoke else ("resnet56", 128, 15)
    iters_per_epoch = 391  # ceil(50000 / 128)
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def setup(with_pruner: bool, method="ghfp", criterion="l2"):
        model = softprune.create_model(model_name)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
        pruner = None
        if with_pruner:
            pruner = softprune.Pruner(
                model, method, 0.4, total_steps=10, optimizer=opt, criterion=criterion, residual="independent"
            )
            pruner.step()  # hard filters exist, so the hook has work to do
        return model, opt, pruner

    def train_step(model, opt):
        def run():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return run

    plain_model, plain_opt, _ = setup(False)
    fns = {"plain": train_step(plain_model, plain_opt)}
    pruners = {}
    for method in METHODS:
        model, opt, pruner = setup(True, method=method)
        fns[method] = train_step(model, opt)
        pruners[method] = pruner
    # GHFP's soft units broken down: its forward masks with the gradient stop left out
    model, opt, pruner = setup(True, method="ghfp")
    model(x)  # plans the forward masks
    pruner.soft_masks.remove()
    pruner.soft_masks.install(gradient_stop=False)
    fns[NO_STOP] = train_step(model, opt)
    steps = interleaved(fns, rounds)
    ratios = {m: steps[m]["median_ms"] / steps["plain"]["median_ms"] for m in (*METHODS, NO_STOP)}
    # the hook alone, timed directly (the step ratios are within the machine's noise)
    hooked_pruner = pruners["ghfp"]
    hook_alone = interleaved({"hook": hooked_pruner.enforce}, rounds * 4)["hook"]
    hook_ratio = max(ratios[m] for m in METHODS)

    epoch_ms = steps["plain"]["median_ms"] * iters_per_epoch
    step_rows = []
    for criterion in ("l2", "fpgm"):
        model, opt, pruner = setup(True, criterion=criterion)
        pruner_copy = copy.deepcopy(pruner.state_dict())
        times = []
        for _ in range(5 if args.smoke else 9):
            pruner.load_state_dict(copy.deepcopy(pruner_copy))
            start = time.perf_counter()
            pruner.step()
            times.append((time.perf_counter() - start) * 1000.0)
        times.sort()
        median = times[len(times) // 2]
        step_rows.append({"criterion": criterion, "step_ms": median, "fraction_of_epoch": median / epoch_ms})

    payload = {
        "machine": machine(),
        "model": model_name,
        "batch": batch,
        "train_step": steps,
        "preset_ratios": ratios,
        "hook_only": hook_alone,
        "hook_ratio": hook_ratio,
        "hook_fraction_of_step": hook_alone["median_ms"] / steps["plain"]["median_ms"],
        "epoch_ms_estimate": epoch_ms,
        "pruning_step": step_rows,
    }
    lines = [
        f"## Pruning overhead, {model_name}, batch {batch}, CPU",
        "",
        "| what | time | relative to | ratio |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        lines.append(
            f"| training step, {method} hooks | {steps[method]['median_ms']:.1f} ms | plain step {steps['plain']['median_ms']:.1f} ms | {ratios[method]:.3f} |"
        )
    lines.append(
        f"| training step, ghfp forward masks without the gradient stop | {steps[NO_STOP]['median_ms']:.1f} ms | plain step {steps['plain']['median_ms']:.1f} ms | {ratios[NO_STOP]:.3f} |"
    )
    lines.append(
        f"| the hard-zero hook alone (GHFP) | {hook_alone['median_ms']:.3f} ms | plain step | {payload['hook_fraction_of_step']:.4f} |"
    )
    for row in step_rows:
        lines.append(
            f"| pruning step ({row['criterion']}) | {row['step_ms']:.1f} ms | epoch ({iters_per_epoch} steps) {epoch_ms / 1000:.0f} s | {row['fraction_of_epoch']:.5f} |"
        )
    lines += [
        "",
        "Floors: a pruning step < 1% of an epoch; the per-iteration hooks <= 3% of a training step. Each",
        "model is timed after its first pruning step (rate 0.4 of 10 steps). Where that step made soft units",
        "with a decay below 1 (sfp, ghfp; asfp's and the srfp family's first step masks nothing yet), the",
        "training step carries the forward masks of softprune.soft and their gradient stop: that, not the",
        "hard-zero hook, is what costs (docs/methods.md, Soft units).",
    ]
    write("overhead" + ("_smoke" if args.smoke else ""), payload, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
