"""The training engine behind ``softprune train``: one readable loop.

    data -> model -> optimizer, LR schedule -> Pruner -> for each epoch: train, prune step, evaluate,
    log, checkpoint -> compact -> evaluate the compact model -> save it and a summary

A run folder (``output/name``) holds: config.yaml, metrics.jsonl (one line per epoch), checkpoint.pt
(the latest, written atomically), model.safetensors (the final full-size weights), compact.safetensors
(the pruned model, loadable with softprune.load) and summary.json.

Under torchrun (``torchrun --nproc_per_node N -m softprune train ...``) every process trains a
DistributedDataParallel replica on its share of each global batch (gloo on CPU, NCCL on GPUs); the
pruning decision is taken on rank 0 and broadcast, and only rank 0 evaluates and writes files.
A checkpoint holds the position inside the epoch, so a run killed at any moment resumes exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from .. import io as sp_io
from ..calibrate import recalibrate_batchnorm
from ..cost import compare_latency, paper_flops_cifar_resnet, profile
from ..data import DATASETS, BatchLoader, ImageFolderSet, check_same_classes, load_dataset
from ..errors import SoftpruneError
from ..models import create_model
from ..modes import training_mode
from ..plugins import make_plugin
from ..pruner import Pruner, rebind_scheduler
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import PruneConfig, RunConfig, config_from_dict, default_min_steps

Echo = Callable[[str], None]


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SoftpruneError(f"train.device={name!r} but CUDA is not available here; use cpu or auto")
    return torch.device(name)


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy in %) over the loader, in eval mode."""
    total, correct, loss_sum = 0, 0, 0.0
    with training_mode(model, training=False):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += y.numel()
    return loss_sum / max(total, 1), 100.0 * correct / max(total, 1)


def _scheduler(config: RunConfig, optimizer: torch.optim.Optimizer):
    t = config.train
    if t.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, t.milestones, t.gamma)
    if t.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, t.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


class Run:
    """Everything one training run holds; built from a config, optionally resumed from its checkpoint.

    ``net`` is the network (what the pruner, evaluation and checkpoints see); ``model`` is what a
    training step calls: ``net`` itself, or its DistributedDataParallel wrapper under torchrun.
    """

    def __init__(
        self, config: RunConfig, *, echo: Echo | None = None, progress: bool = True, resuming: bool = False
    ) -> None:
        self.config = config
        self.dir = config.run_dir
        t, p = config.train, config.prune
        self.rank, self.world, local_rank = distributed_env()
        self.main = self.rank == 0
        self.echo = (echo or (lambda line: None)) if self.main else (lambda line: None)
        self.progress = progress and self.main
        if t.threads is not None:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device, local_rank)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if t.batch_size % self.world:
            raise SoftpruneError(
                f"train.batch_size={t.batch_size} (the global batch) must divide among {self.world} processes"
            )
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(config.seed)
        d = config.data
        spec = DATASETS.get(d.name)
        size = d.image_size or config.model.input_size  # an image folder's side
        self.train_set, self.test_set = (
            load_dataset(d.name, d.root, split, limit=limit, download=d.download, image_size=size)
            for split, limit in (("train", d.train_limit), ("test", d.test_limit))
        )
        if isinstance(self.train_set, ImageFolderSet):
            check_same_classes(self.train_set, self.test_set)
        augment = (spec.augment if spec else True) if d.augment is None else d.augment
        self.train_loader = BatchLoader(
            self.train_set, t.batch_size // self.world, shuffle=True, augment=augment, seed=config.seed,
            rank=self.rank, world_size=self.world, cutout=d.cutout, workers=d.workers,
        )  # fmt: skip
        self.test_loader = BatchLoader(
            self.test_set, t.eval_batch_size, shuffle=False, augment=False, workers=d.workers
        )
        channels, size = self.train_set.channels, self.train_set.image_size
        m = config.model
        self.net = create_model(
            m.name,
            num_classes=self.train_set.num_classes,
            in_channels=channels,
            input_size=m.input_size or size,
            weights=None if resuming else m.weights,
            # a resumed run's checkpoint.pt holds every weight: the starting file may be gone by now
            checkpoint=None
            if resuming and m.checkpoint and not Path(m.checkpoint).exists()
            else m.checkpoint,
        ).to(self.device)
        head = getattr(self.net, "softprune_reset_head", None)
        if head:
            self.echo(f"{m.checkpoint}: the head {head!r} was trained for other classes; it starts fresh")
        self.starts_trained = m.checkpoint is not None or m.weights is not None
        self.start: dict[str, float] | None = None  # the starting model's test numbers, before pruning
        self.example = torch.randn(1, channels, *self.net.example_input_shape[2:], device=self.device)
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=self.memory_format)
        self.optimizer = torch.optim.SGD(
            self.net.parameters(),
            lr=t.lr,
            momentum=t.momentum,
            nesterov=t.nesterov and t.momentum > 0,
            weight_decay=t.weight_decay,
        )
        self.scheduler = _scheduler(config, self.optimizer)
        self.pruner: Pruner | None = None
        if p.method != "dense":
            per_epoch = len(self.train_loader)
            pruning_epochs = t.epochs - p.finetune_epochs  # the rest fine-tune with every unit hard
            self.interval = pruning_interval(p, pruning_epochs, per_epoch)
            if self.interval is not None:
                steps = (pruning_epochs * per_epoch) // self.interval
                if steps < 1 and not p.initial_step:
                    raise SoftpruneError(
                        f"prune.every_iterations={p.every_iterations} leaves no pruning step in "
                        f"{pruning_epochs * per_epoch} iterations"
                    )
            else:
                steps = pruning_epochs // p.every_epochs
            steps += int(p.initial_step)
            self.pruner = Pruner(
                self.net,
                method=p.method,
                rate=p.rate,
                total_steps=steps,
                optimizer=self.optimizer,
                example_inputs=self.example,
                calibration=self.calibration_data,
                loss_fn=F.cross_entropy,
                interval=self.interval,
                **p.pruner_settings(),
            )
        self.model: nn.Module = self.net
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.dense_profile = profile(self.net, self.example)
        self.tensorboard = None
        if config.report.tensorboard and self.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SoftpruneError(
                    "report.tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tensorboard = SummaryWriter(str(self.dir / "tensorboard"))
        self.epoch = 0  # epochs completed
        self.batch = 0  # batches of the current epoch completed
        self.iteration = 0  # optimizer steps in all
        self.epoch_sums = [0, 0, 0.0]  # samples, correct, summed loss of the current epoch
        self.history: list[dict[str, Any]] = []
        self.replicas: dict[str, Any] | None = None
        self.started = time.time()

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "iteration": self.iteration,
            "epoch_sums": list(self.epoch_sums),
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "rng": rng_state(),
            "history": self.history,
            "start": self.start,
            "config": self.config.to_dict(),
            "world_size": self.world,
            "seconds": time.time() - self.started,  # so a resumed run's summary counts all its training
        }

    def save_checkpoint(self) -> None:
        if self.main:
            save_checkpoint(self.checkpoint_state(), self.dir / "checkpoint.pt")

    def resume(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        saved = config_from_dict(state.get("config", {}))
        for section in ("data", "model", "prune"):
            if getattr(saved, section) != getattr(self.config, section):
                raise SoftpruneError(
                    f"the checkpoint in {str(path)!r} was made with a different '{section}' section; "
                    "resume with the run's own config (config.yaml in the run folder)"
                )
        if state.get("batch", 0) and state.get("world_size", 1) != self.world:
            raise SoftpruneError(
                f"this checkpoint was written mid-epoch by {state['world_size']} process(es); resume it with "
                f"the same number (here: {self.world}), or from an end-of-epoch checkpoint"
            )
        if self.pruner is not None:
            # a run compacted during training: replay its compactions, then load the weights
            net = self.pruner.load_state_dict(state["pruner"])
            if net is not self.net:
                self.set_net(net)
        try:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise SoftpruneError(
                f"checkpoint {str(path)!r} does not fit this model: {str(exc).splitlines()[0]}"
            ) from None
        set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.batch = int(state.get("batch", 0))
        self.iteration = int(state.get("iteration", 0))
        self.epoch_sums = list(state.get("epoch_sums", [0, 0, 0.0]))
        self.started = time.time() - float(state.get("seconds", 0.0))
        self.history = list(state["history"])
        self.start = state.get("start")
        # the log may hold epochs done after the checkpoint was written; keep it in step with it
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))

    # -- the loop ---------------------------------------------------------------------------------
    def autocast(self):
        if self.config.train.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_epoch(self) -> tuple[float, float]:
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        every = self.config.checkpoint.every_iterations
        bar = tqdm(
            self.train_loader.iterate(self.batch),
            total=len(self.train_loader),
            initial=self.batch,
            desc=f"epoch {self.epoch + 1}/{self.config.train.epochs}",
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for x, y in bar:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            y = y.to(self.device, non_blocking=True)
            with self.autocast():
                out = self.model(x)
            loss = F.cross_entropy(out.float(), y)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise SoftpruneError(
                    f"the training loss became {value} in epoch {self.epoch + 1}; lower train.lr "
                    "(the last good checkpoint is kept)"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.batch += 1
            self.iteration += 1
            n = y.numel()
            self.epoch_sums[0] += n
            self.epoch_sums[1] += int((out.argmax(1) == y).sum())
            self.epoch_sums[2] += value * n
            total, correct, loss_sum = self.epoch_sums
            bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{100.0 * correct / total:.1f}")
            if every and self.iteration % every == 0 and self.batch < len(self.train_loader):
                self.save_checkpoint()
        total, correct, loss_sum = self.epoch_sums
        return loss_sum / max(total, 1), 100.0 * correct / max(total, 1)

    def _side_loader(self, salt: int) -> BatchLoader:
        """Training batches in an order of their own (seeded by run, epoch and purpose), so the extra
        passes of calibration and Tick leave the training order, and so a resumed run, unchanged."""
        loader = BatchLoader(
            self.train_set, self.train_loader.batch_size, shuffle=True, augment=self.train_loader.augment,
            seed=self.config.seed + salt, rank=self.rank, world_size=self.world,
            workers=self.train_loader.workers,
        )  # fmt: skip
        loader.set_epoch(self.epoch)
        return loader

    def calibration_data(self):
        """The pruner's calibration batches: fresh at every pruning step."""
        for x, y in self._side_loader(104729).iterate(0):
            yield (
                x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format),
                y.to(self.device, non_blocking=True),
            )

    def compact_hard(self) -> None:
        """Remove the hard filters now; train the smaller network from here on (see Pruner.compact_hard)."""
        small = self.pruner.compact_hard()
        if small is not self.net:
            self.set_net(small)

    def set_net(self, net: nn.Module) -> None:
        """A new network (compacted during training): optimizer, scheduler and DDP wrapper follow it."""
        self.net = net.to(memory_format=self.memory_format)
        self.optimizer = self.pruner.optimizer
        self.scheduler = rebind_scheduler(self.scheduler, self.optimizer)
        self.model = self.net
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)

    def recalibrate(self) -> None:
        """Fresh BatchNorm statistics of the pruned network before it is evaluated (see calibrate.py)."""
        n = self.config.prune.recalibrate_bn
        if n <= 0:
            return
        recalibrate_batchnorm(self.net, self._side_loader(7919), n, self.device)

    def run(self) -> dict[str, Any]:
        cfg = self.config
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if self.starts_trained and self.start is None and self.epoch == 0 and self.batch == 0:
            loss, acc = evaluate(self.net, self.test_loader, self.device) if self.main else (0.0, 0.0)
            self.start = {"test_loss": loss, "test_acc": acc}
            self.echo(f"starting model: test {loss:.3f} {acc:5.1f}%")
        if self.pruner is not None and cfg.prune.initial_step and self.pruner.t == 0:
            self.pruner.step()  # before the first epoch, on the model as it starts
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
                    self.interval is None
                    and (self.epoch + 1) % p.every_epochs == 0
                    and self.pruner.t < self.pruner.total_steps
                ):
                    self.pruner.step()
                    if p.compact_during_training:
                        self.compact_hard()
                if p.finetune_epochs and self.pruner.t >= self.pruner.total_steps:
                    self.pruner.finalize()  # the fine-tuning tail: every selected unit hard from here on
                self.recalibrate()
                last = self.pruner.history[-1] if self.pruner.history else None
                # every step since the last row: several per epoch when steps are spread (min_steps)
                since = self.history[-1].get("step", 0) if self.history else 0
                steps = self.pruner.history[since:]
                ratios = [r.revived_norm_ratio for r in steps if r.revived_norm_ratio is not None]
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
                    steps=len(steps),
                    revived=sum(r.revived for r in steps),
                    revived_norm_ratio=max(ratios) if ratios else None,
                    params=cost["params"],
                    macs=cost["macs"],
                )
            else:
                record.update(params=self.dense_profile["params"], macs=self.dense_profile["macs"])
            record["trained_params"] = sum(q.numel() for q in self.net.parameters())
            if self.main:
                record["test_loss"], record["test_acc"] = evaluate(self.net, self.test_loader, self.device)
            record["seconds"] = time.time() - start
            self.history.append(record)
            self.epoch += 1
            self.batch = 0
            self.epoch_sums = [0, 0, 0.0]
            if self.main:
                with open(self.dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if self.tensorboard is not None:
                    for key, value in record.items():
                        if key != "epoch" and isinstance(value, (int, float)):
                            self.tensorboard.add_scalar(key, value, record["epoch"])
                    self.tensorboard.flush()
                self.echo(_epoch_line(record, cfg.train.epochs))
            if self.epoch % cfg.checkpoint.every_epochs == 0 or self.epoch == cfg.train.epochs:
                self.save_checkpoint()
        self.replicas = self.replica_agreement()
        return self.finish()

    def replica_agreement(self) -> dict[str, Any] | None:
        """Under torchrun: do all processes hold rank 0's weights and masks? (They must: gradients
        are averaged and the pruning decision is rank 0's.)"""
        if self.world == 1:
            return None
        flat = torch.cat([p.detach().reshape(-1).float() for p in self.net.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        diff = (flat - reference).abs().max().reshape(1)
        masks = torch.zeros(1, device=flat.device)
        if self.pruner is not None:
            packed = (
                torch.cat([torch.cat([m.hard, m.soft]) for m in self.pruner.masks]).float().to(flat.device)
            )
            mine = packed.clone()
            dist.broadcast(packed, src=0)
            masks = (packed != mine).any().float().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        dist.all_reduce(masks, op=dist.ReduceOp.MAX)
        return {
            "processes": self.world,
            "max_weight_difference": float(diff),
            "masks_agree": bool(masks.item() == 0),
        }

    def finish(self) -> dict[str, Any]:
        """Rank 0 compacts, evaluates, measures and writes the models and the summary."""
        if not self.main:
            return {}
        cfg = self.config
        self.net = self.net.to(memory_format=torch.contiguous_format)
        if self.pruner is not None:
            self.pruner.finalize()  # soft units become hard, so the saved full-size model is the masked one
        removed = self.pruner is not None and bool(self.pruner.compactions)
        plan = sp_io.make_plan(self.pruner, removed_only=True) if removed else None
        sp_io.save(self.net, self.dir / "model.safetensors", plan=plan)
        final = self.history[-1] if self.history else {}
        pruning = cfg.prune.method != "dense"
        summary: dict[str, Any] = {
            "name": cfg.name,
            "model": cfg.model.name,
            "data": cfg.data.name,
            "method": cfg.prune.method,
            "rate": cfg.prune.rate if pruning else 0.0,
            **{  # how it was pruned; nothing for a dense run
                key: getattr(cfg.prune, key) if pruning else None
                for key in ("criterion", "residual", "budget", "regularizer", "compensate")
            },
            "epochs": cfg.train.epochs,
            # how many pruning steps, and how many optimizer steps apart (None: at epoch ends)
            "pruning_steps": self.pruner.total_steps if self.pruner is not None else None,
            "pruning_interval": self.interval if self.pruner is not None else None,
            "processes": self.world,
            "replicas": self.replicas,
            "seconds": round(time.time() - self.started, 1),
            "dense": {**self.dense_profile},
            "start": self.start,  # the trained model it started from (None: random initialization)
            "test_acc_masked": final.get("test_acc"),
            "history_test_acc": [r["test_acc"] for r in self.history],
        }
        timing_input = torch.randn(cfg.report.latency_batch, *self.example.shape[1:], device=self.device)
        summary["latency_batch"] = cfg.report.latency_batch
        if self.pruner is None:
            timed = compare_latency({"dense": self.net}, timing_input, rounds=cfg.report.latency_repeats)
            summary["dense"]["latency"] = timed["dense"]
        else:
            small = self.pruner.compact()
            loss, acc = evaluate(small, self.test_loader, self.device)
            sp_io.save(small, self.dir / "compact.safetensors")
            compact = profile(small, self.example)
            models = {"dense": self.net, "compact": small}
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
            measured = {q.name: q.summary() for q in self.pruner.plugins if q.summary()}
            if measured:
                summary["plugins"] = measured
            summary["layers"] = layer_widths(self.net, small)
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def pruning_interval(p: PruneConfig, pruning_epochs: int, per_epoch: int) -> int | None:
    """Optimizer steps between pruning steps, or None for steps at epoch ends.

    prune.every_iterations when set; otherwise one step per epoch, unless that gives fewer than
    prune.min_steps steps: then the steps are spread evenly over the run's iterations (at least one
    iteration apart)."""
    if p.every_iterations is not None:
        return p.every_iterations
    trains_before_steps = any(make_plugin(spec).steps_at_epoch_ends for spec in p.plugins)
    epoch_end = p.every_epochs > 1 or trains_before_steps or p.compact_during_training
    min_steps = default_min_steps(p.method) if p.min_steps is None else p.min_steps
    if epoch_end or pruning_epochs >= min_steps:
        return None
    return max(1, (pruning_epochs * per_epoch) // min_steps)


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
    checkpoint = config.run_dir / "checkpoint.pt"
    if not resume and checkpoint.exists():
        raise SoftpruneError(
            f"{str(config.run_dir)!r} already holds a run; pass --resume to continue it, or choose another name= "
            "(softprune never overwrites a run)"
        )
    run = Run(config, echo=echo, progress=progress, resuming=resume)
    try:
        if resume:
            run.resume(checkpoint)
            run.echo(f"resumed {checkpoint} at epoch {run.epoch}, batch {run.batch}")
        elif run.main and (config.run_dir / "metrics.jsonl").exists():
            (config.run_dir / "metrics.jsonl").unlink()
        summary = run.run()
        if run.world > 1:
            dist.barrier()
        return summary
    finally:
        if run.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
