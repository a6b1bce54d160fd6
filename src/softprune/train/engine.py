"""The training engine behind ``softprune train``: one readable loop.

    data -> model -> optimizer, LR schedule -> Pruner -> for each epoch: train, prune step, evaluate,
    log, checkpoint -> compact -> evaluate the compact model -> save it and a summary

A run folder (``output/name``) holds: config.yaml, metrics.jsonl (one line per epoch), checkpoint.pt
(the latest, written atomically), model.safetensors (the final full-size weights), compact.safetensors
(the pruned model, loadable with softprune.load) and summary.json.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from .. import io as sp_io
from ..calibrate import recalibrate_batchnorm
from ..cost import compare_latency, paper_flops_cifar_resnet, profile
from ..data import DATASETS, BatchLoader, load_dataset
from ..errors import SoftpruneError
from ..models import create_model
from ..pruner import Pruner
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig, config_from_dict

Echo = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SoftpruneError(f"train.device={name!r} but CUDA is not available here; use cpu or auto")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy in %) over the loader, in eval mode."""
    was_training = model.training
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += y.numel()
    model.train(was_training)
    return loss_sum / max(total, 1), 100.0 * correct / max(total, 1)


def _scheduler(config: RunConfig, optimizer: torch.optim.Optimizer):
    t = config.train
    if t.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, t.milestones, t.gamma)
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, t.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


class Run:
    """Everything one training run holds; built from a config, optionally resumed from its checkpoint."""

    def __init__(self, config: RunConfig, *, echo: Echo | None = None, progress: bool = True) -> None:
        self.config = config
        self.echo = echo or (lambda line: None)
        self.progress = progress
        self.dir = config.run_dir
        t, p = config.train, config.prune
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        torch.manual_seed(config.seed)
        spec = DATASETS.get(config.data.name)
        self.train_set = load_dataset(
            config.data.name,
            config.data.root,
            "train",
            limit=config.data.train_limit,
            download=config.data.download,
        )
        self.test_set = load_dataset(
            config.data.name,
            config.data.root,
            "test",
            limit=config.data.test_limit,
            download=config.data.download,
        )
        augment = spec.augment if config.data.augment is None else config.data.augment
        self.train_loader = BatchLoader(
            self.train_set, t.batch_size, shuffle=True, augment=augment, seed=config.seed
        )
        self.test_loader = BatchLoader(self.test_set, t.eval_batch_size, shuffle=False, augment=False)
        channels, size = self.train_set.images.shape[1], self.train_set.images.shape[-1]
        self.model = create_model(
            config.model.name,
            num_classes=self.train_set.num_classes,
            in_channels=channels,
            input_size=config.model.input_size or size,
        ).to(self.device)
        self.example = torch.randn(1, channels, *self.model.example_input_shape[2:], device=self.device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=t.lr,
            momentum=t.momentum,
            nesterov=t.nesterov and t.momentum > 0,
            weight_decay=t.weight_decay,
        )
        self.scheduler = _scheduler(config, self.optimizer)
        self.pruner: Pruner | None = None
        if p.method != "dense":
            per_epoch = len(self.train_loader)
            if p.every_iterations is not None:
                steps = (t.epochs * per_epoch) // p.every_iterations
                if steps < 1:
                    raise SoftpruneError(
                        f"prune.every_iterations={p.every_iterations} leaves no pruning step in "
                        f"{t.epochs * per_epoch} iterations"
                    )
            else:
                steps = t.epochs // p.every_epochs
            self.pruner = Pruner(
                self.model,
                method=p.method,
                rate=p.rate,
                total_steps=steps,
                optimizer=self.optimizer,
                criterion=p.criterion,
                criterion_options=p.criterion_options,
                example_inputs=self.example,
                residual=p.residual,
                layers=p.layers,
                ignore=p.ignore,
                interval=p.every_iterations,
                mask_scope=p.mask_scope,
                rate_schedule=p.rate_schedule,
                decay=p.decay,
                hardness=p.hardness,
                keep_first=p.keep_first,
            )
        self.dense_profile = profile(self.model, self.example)
        self.tensorboard = None
        if config.report.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SoftpruneError(
                    "report.tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tensorboard = SummaryWriter(str(self.dir / "tensorboard"))
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.started = time.time()

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "rng": rng_state(),
            "history": self.history,
            "config": self.config.to_dict(),
        }

    def resume(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        saved = config_from_dict(state.get("config", {}))
        for section in ("data", "model", "prune"):
            if getattr(saved, section) != getattr(self.config, section):
                raise SoftpruneError(
                    f"the checkpoint in {str(path)!r} was made with a different '{section}' section; "
                    "resume with the run's own config (config.yaml in the run folder)"
                )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise SoftpruneError(
                f"checkpoint {str(path)!r} does not fit this model: {str(exc).splitlines()[0]}"
            ) from None
        if self.pruner is not None:
            self.pruner.load_state_dict(state["pruner"])
        set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        # the log may hold epochs done after the checkpoint was written; keep it in step with it
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))

    # -- the loop ---------------------------------------------------------------------------------
    def train_epoch(self) -> tuple[float, float]:
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        total, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {self.epoch + 1}/{self.config.train.epochs}",
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for x, y in bar:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SoftpruneError(
                    f"the training loss became {value} in epoch {self.epoch + 1}; lower train.lr "
                    "(the last good checkpoint is kept)"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            n = y.numel()
            total += n
            loss_sum += value * n
            correct += int((out.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{100.0 * correct / total:.1f}")
        return loss_sum / max(total, 1), 100.0 * correct / max(total, 1)

    def recalibrate(self) -> None:
        """Fresh BatchNorm statistics of the pruned network before it is evaluated (see calibrate.py)."""
        n = self.config.prune.recalibrate_bn
        if n <= 0:
            return
        loader = BatchLoader(
            self.train_set,
            self.config.train.batch_size,
            shuffle=True,
            augment=self.train_loader.augment,
            seed=self.config.seed + 7919,
        )
        loader.set_epoch(self.epoch)
        recalibrate_batchnorm(self.model, loader, n, self.device)

    def run(self) -> dict[str, Any]:
        cfg = self.config
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        while self.epoch < cfg.train.epochs:
            start = time.time()
            lr = self.optimizer.param_groups[0]["lr"]
            train_loss, train_acc = self.train_epoch()
            self.scheduler.step()
            record: dict[str, Any] = {
                "epoch": self.epoch + 1,
                "lr": lr,
                "train_loss": train_loss,
                "train_acc": train_acc,
            }
            if self.pruner is not None:
                p = cfg.prune
                if (
                    p.every_iterations is None
                    and (self.epoch + 1) % p.every_epochs == 0
                    and self.pruner.t < self.pruner.total_steps
                ):
                    self.pruner.step()
                self.recalibrate()
                last = self.pruner.history[-1] if self.pruner.history else None
                kept, soft, hard = self.pruner.counts()
                cost = self.pruner.profile()
                record.update(
                    step=self.pruner.t,
                    rate=last.rate if last else 0.0,
                    alpha=last.alpha if last else 1.0,
                    hardness=last.hardness if last else 0.0,
                    kept=kept,
                    soft=soft,
                    hard=hard,
                    params=cost["params"],
                    macs=cost["macs"],
                )
            else:
                record.update(params=self.dense_profile["params"], macs=self.dense_profile["macs"])
            record["test_loss"], record["test_acc"] = evaluate(self.model, self.test_loader, self.device)
            record["seconds"] = time.time() - start
            self.history.append(record)
            self.epoch += 1
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                for key, value in record.items():
                    if key != "epoch" and isinstance(value, (int, float)):
                        self.tensorboard.add_scalar(key, value, record["epoch"])
                self.tensorboard.flush()
            self.echo(_epoch_line(record, cfg.train.epochs))
            if self.epoch % cfg.checkpoint.every_epochs == 0 or self.epoch == cfg.train.epochs:
                save_checkpoint(self.checkpoint_state(), self.dir / "checkpoint.pt")
        return self.finish()

    def finish(self) -> dict[str, Any]:
        cfg = self.config
        sp_io.save(self.model, self.dir / "model.safetensors")
        final = self.history[-1] if self.history else {}
        summary: dict[str, Any] = {
            "name": cfg.name,
            "model": cfg.model.name,
            "data": cfg.data.name,
            "method": cfg.prune.method,
            "rate": cfg.prune.rate if cfg.prune.method != "dense" else 0.0,
            "criterion": cfg.prune.criterion if cfg.prune.method != "dense" else None,
            "residual": cfg.prune.residual if cfg.prune.method != "dense" else None,
            "epochs": cfg.train.epochs,
            "seconds": round(time.time() - self.started, 1),
            "dense": {**self.dense_profile},
            "test_acc_masked": final.get("test_acc"),
            "history_test_acc": [r["test_acc"] for r in self.history],
        }
        timing_input = torch.randn(cfg.report.latency_batch, *self.example.shape[1:], device=self.device)
        summary["latency_batch"] = cfg.report.latency_batch
        if self.pruner is None:
            timed = compare_latency({"dense": self.model}, timing_input, rounds=cfg.report.latency_repeats)
            summary["dense"]["latency"] = timed["dense"]
        else:
            small = self.pruner.compact()
            loss, acc = evaluate(small, self.test_loader, self.device)
            sp_io.save(small, self.dir / "compact.safetensors")
            compact = profile(small, self.example)
            models = {"dense": self.model, "compact": small}
            timed = compare_latency(models, timing_input, rounds=cfg.report.latency_repeats)
            summary["dense"]["latency"], compact["latency"] = timed["dense"], timed["compact"]
            summary["compact"] = {**compact, "test_acc": acc, "test_loss": loss}
            summary["equivalence"] = self.pruner.last_verification
            summary["reduction"] = {
                "params": 1.0 - compact["params"] / self.dense_profile["params"],
                "macs": 1.0 - compact["macs"] / self.dense_profile["macs"],
                "conv_macs": 1.0 - compact["conv_macs"] / max(self.dense_profile["conv_macs"], 1),
                "latency": summary["dense"]["latency"]["median_ms"] / compact["latency"]["median_ms"],
            }
            if cfg.model.name.startswith("resnet") and cfg.model.name[6:].isdigit():
                depth = int(cfg.model.name[6:])
                summary["paper_flops_reduction"] = 1.0 - paper_flops_cifar_resnet(depth, cfg.prune.rate) / (
                    paper_flops_cifar_resnet(depth, 0.0)
                )
            summary["groups"] = self.pruner.summary()
            summary["layers"] = layer_widths(self.model, small)
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def layer_widths(dense: nn.Module, small: nn.Module) -> list[dict[str, Any]]:
    """Output width of every convolution, Linear layer and attention block, before and after."""

    def width(m: nn.Module) -> int | None:
        for attr in ("out_channels", "out_features", "num_heads"):  # attention: heads
            if isinstance(getattr(m, attr, None), int):
                return getattr(m, attr)
        return None

    rows = []
    for name, module in dense.named_modules():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention)):
            continue
        if any(name.startswith(r["name"] + ".") for r in rows):
            continue  # out_proj inside an attention block
        try:
            after = width(small.get_submodule(name))
        except AttributeError:
            continue
        rows.append({"name": name, "dense": width(module), "compact": after})
    return rows


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    line = f"epoch {r['epoch']:>3}/{epochs}  train {r['train_loss']:.3f} {r['train_acc']:5.1f}%  test {r['test_loss']:.3f} {r['test_acc']:5.1f}%"
    if "hard" in r:
        line += f"  P={r['rate']:.3f} a={r['alpha']:.2g} l={r['hardness']:.3f} kept/soft/hard={r['kept']}/{r['soft']}/{r['hard']}"
    line += f"  {r['macs'] / 1e6:.1f}M MACs  {r['seconds']:.0f}s"
    return line


def train(
    config: RunConfig, *, resume: bool = False, echo: Echo | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) a run and return its summary."""
    run = Run(config, echo=echo, progress=progress)
    checkpoint = config.run_dir / "checkpoint.pt"
    if resume:
        run.resume(checkpoint)
        echo and echo(f"resumed {checkpoint} at epoch {run.epoch}")
    elif checkpoint.exists():
        raise SoftpruneError(
            f"{str(config.run_dir)!r} already holds a run; pass --resume to continue it, or choose another name= "
            "(softprune never overwrites a run)"
        )
    elif (config.run_dir / "metrics.jsonl").exists():
        (config.run_dir / "metrics.jsonl").unlink()
    return run.run()
