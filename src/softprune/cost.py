"""Cost: parameters, MACs (measured and the papers' convention) and latency.

MACs are measured with ``torch.utils.flop_counter.FlopCounterMode`` on a real forward pass (it counts
2 FLOPs per multiply-accumulate of convolutions and matrix products; softprune reports MACs = FLOPs/2).
``conv_macs`` keeps only convolutions, the papers' convention (FC layers ignored), so a compact model's
``conv_macs`` is the papers' FLOPs figure realized in a real model.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .errors import SoftpruneError
from .modes import training_mode

_CONV_OPS = ("convolution", "conv2d", "conv1d", "conv3d", "_convolution")


def _register_cpu_attention_flops() -> None:
    """torch.utils.flop_counter knows the CUDA attention kernels but not the CPU flash kernel that
    scaled_dot_product_attention dispatches to on CPU; count it like the others (q k^T and attn v)."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry or not hasattr(flop_counter, "sdpa_flop_count"):
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_attention_flops()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _as_tuple(example_inputs: Any) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def count_flops(model: nn.Module, inputs: tuple) -> FlopCounterMode:
    """torch.utils.flop_counter's counts (total, per module, per op) of one forward pass in eval mode."""
    # nn.MultiheadAttention's fused inference kernel has no FLOP formula: count its unfused ops
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        try:
            return _count(model, inputs, grad=False)
        except AssertionError:
            # the counter's module tracker hooks autograd, and a view of a parameter made without
            # grad (PiT's class token passed to a submodule) has requires_grad but no grad_fn: count
            # again with grad on (one forward, nothing kept)
            return _count(model, inputs, grad=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _count(model: nn.Module, inputs: tuple, grad: bool) -> FlopCounterMode:
    with torch.set_grad_enabled(grad), training_mode(model, training=False):
        with FlopCounterMode(display=False) as counter:
            model(*inputs)
    return counter


def measure_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """{"macs": all multiply-accumulates, "conv_macs": convolutions only} for one forward pass,
    divided by the batch size of the first input (MACs per sample)."""
    inputs = _as_tuple(example_inputs)
    batch = inputs[0].shape[0] if isinstance(inputs[0], torch.Tensor) and inputs[0].dim() > 0 else 1
    counter = count_flops(model, inputs)
    total = counter.get_total_flops()
    conv = sum(
        flops
        for op, flops in counter.get_flop_counts().get("Global", {}).items()
        if any(c in str(op) for c in _CONV_OPS)
    )
    return {"macs": int(total // 2 // batch), "conv_macs": int(conv // 2 // batch)}


def profile(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Parameters and MACs per sample: {"params", "macs", "conv_macs"}."""
    if not isinstance(model, nn.Module):
        raise SoftpruneError(f"profile() takes a torch.nn.Module, got {type(model).__name__}")
    return {"params": count_parameters(model), **measure_macs(model, example_inputs)}


@torch.no_grad()
def latency(
    model: nn.Module, example_inputs: Any, *, warmup: int = 5, repeats: int = 20, threads: int | None = None
) -> dict[str, float]:
    """Median, min and max wall time of a forward pass in eval mode, in milliseconds.

    CUDA inputs are synchronized around each run. ``threads`` sets torch's intra-op threads for the
    measurement and restores them after.
    """
    inputs = _as_tuple(example_inputs)
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    times = []
    try:
        with training_mode(model, training=False):
            for i in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(*inputs)
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(old_threads)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "repeats": repeats,
    }


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, dict]:
    """Time each function ``rounds`` times, alternating between them, so that a slow phase of a
    shared machine hits all of them alike. Returns min and median milliseconds per function."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1000.0)
    return {
        k: {"min_ms": min(v), "median_ms": statistics.median(v), "rounds": len(v)} for k, v in times.items()
    }


FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@torch.no_grad()
def compare_latency(
    models: dict[str, nn.Module], example_inputs: Any, *, rounds: int = 20
) -> dict[str, dict]:
    """Latency of several models on the same input, in both memory formats, measured in alternation.

    Which format is faster depends on the model and its widths (oneDNN favours channels_last, most of
    all at pruned, odd channel counts), so a fair comparison takes each model at its best: the result
    gives, per model, the median in each format, the faster format (``best``) and its ``median_ms``.
    The models are copied; yours keep their format and mode.
    """
    import copy

    inputs = _as_tuple(example_inputs)
    out: dict[str, dict] = {name: {} for name in models}
    for fmt_name, fmt in FORMATS.items():
        moved = {name: copy.deepcopy(m).eval().to(memory_format=fmt) for name, m in models.items()}
        xs = tuple(
            x.contiguous(memory_format=fmt) if isinstance(x, torch.Tensor) and x.dim() == 4 else x
            for x in inputs
        )
        timed = interleaved({name: (lambda m=m, xs=xs: m(*xs)) for name, m in moved.items()}, rounds)
        for name in models:
            out[name][fmt_name] = timed[name]
    for result in out.values():
        result["best"] = min(FORMATS, key=lambda f: result[f]["median_ms"])
        result["median_ms"] = result[result["best"]]["median_ms"]
    return out


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensors created during a forward pass and still alive, and their peak.

    Each new storage is added when an op returns it and subtracted when Python frees it; views add
    nothing. This is the activation memory the framework holds, independent of the allocator's caching.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _collect(out):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self._seen:
                nbytes = storage.nbytes()
                self._seen.add(key)
                self.live += nbytes
                weakref.finalize(t, self._release, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def _collect(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _collect(v)]
    return []


@torch.no_grad()
def peak_memory(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Bytes of the parameters and buffers, and the peak bytes of activations alive during one
    forward pass in eval mode (inference: no autograd graph is kept)."""
    inputs = _as_tuple(example_inputs)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    with training_mode(model, training=False), _LiveBytes() as counter:
        out = model(*inputs)
        del out
    return {"weights_bytes": weights, "peak_activation_bytes": counter.peak}


def profile_report(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_sizes: tuple[int, ...] = (1, 32, 128),
    repeats: int = 20,
    devices: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Everything ``softprune profile`` prints: parameters, MACs (whole model and convolutions only,
    the papers' convention), weight and peak activation memory, and latency per device and batch size
    (median of ``repeats`` after warm-up, each in its faster memory format)."""
    if devices is None:
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    one = torch.randn(1, *input_shape[1:])
    report: dict[str, Any] = {"input_shape": list(input_shape[1:]), **profile(model, one)}
    report.update(peak_memory(model, one))
    report["latency"] = {}
    for device in devices:
        moved = model.to(device)
        rows = {}
        for batch in batch_sizes:
            x = torch.randn(batch, *input_shape[1:], device=device)
            timed = compare_latency({"model": moved}, x, rounds=repeats)["model"]
            rows[str(batch)] = {
                "median_ms": timed["median_ms"],
                "best_format": timed["best"],
                "per_image_ms": timed["median_ms"] / batch,
                "peak_activation_bytes": peak_memory(moved, x)["peak_activation_bytes"],
            }
        report["latency"][device] = rows
    model.to("cpu")
    return report


def paper_flops_cifar_resnet(depth: int, rate: float) -> float:
    """The papers' FLOPs count of a CIFAR ResNet-(6n+2) with every conv pruned at ``rate``
    (FPGM/SFP code; METHODS.md): conv multiply-accumulates only, with k = 1 - rate,

        27*16*32^2*k + sum over blocks [C_in*C*9*HW*f_a + C^2*9*HW*k^2],

    f_a = k^2 for the first block of stage 1 (its input is the pruned stem) and k otherwise.
    """
    if (depth - 2) % 6 != 0 or depth < 8:
        raise SoftpruneError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 56, 110, ...), got {depth}")
    n, k = (depth - 2) // 6, 1.0 - rate
    widths, sides = (16, 32, 64), (32, 16, 8)
    total = 27 * 16 * 32**2 * k
    for stage, (c, side) in enumerate(zip(widths, sides)):
        hw = side * side
        for block in range(n):
            c_in = widths[stage - 1] if block == 0 and stage > 0 else c
            f_a = k * k if stage == 0 and block == 0 else k
            total += c_in * c * 9 * hw * f_a + c * c * 9 * hw * k * k
    return total
