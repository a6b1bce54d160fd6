"""The model's torch.fx graph, for the channel analysis: plain fx tracing with softprune's leaves, and
a second tracer that reads sizes from the example input when plain fx stops on control flow."""

from __future__ import annotations

import operator
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import SoftpruneError
from ..modes import training_mode
from .handlers import HANDLERS
from .ids import Rule, fetch_attr
from .module_rules import MODULE_RULES


class Tracer(torch.fx.Tracer):
    """fx tracer whose leaves are the modules softprune has a handler or rule for."""

    def __init__(
        self, handlers: dict[type, Any], module_rules: dict[type, Rule], leaf_modules: Iterable[str] = ()
    ):
        super().__init__()
        self.handlers = handlers
        self.module_rules = module_rules
        self.extra_leaves = set(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.extra_leaves or type(m) in self.handlers or type(m) in self.module_rules:
            return True
        return super().is_leaf_module(m, qualname)


class ConcreteTracer(Tracer):
    """A :class:`Tracer` that also runs every traced call on the example input, so that Python control
    flow on sizes (``if H != self.window_size``) takes the branch the example takes, instead of
    stopping the trace. Control flow on a tensor's values (``if x.sum() > 0``) is still refused: another
    input could take the other branch.

    timm's hybrid models branch on feature-map sizes (MobileViT, TinyViT, non-local attention);
    plain torch.fx refuses them. Tracing them needs concrete values, and torch.export would give an
    aten-level graph that none of the rules speak; this keeps fx's graph and makes only the decisions
    concrete. Each one is recorded in ``decisions`` (where, and the value taken): the graph is the model
    at the example's input size.
    """

    def __init__(self, handlers, module_rules, leaf_modules, example_inputs: tuple) -> None:
        super().__init__(handlers, module_rules, leaf_modules)
        self.inputs = list(example_inputs)
        self.values: dict[torch.fx.Node, Any] = {}
        self.decisions: list[str] = []
        self.evaluating = False  # fx's patched Module.__call__ and __getattr__ pass real calls through

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ConcreteProxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        if self.evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self.evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values[proxy.node] = self._evaluate(kind, target, args, kwargs)
        return proxy

    @contextmanager
    def _running(self) -> Iterator[None]:
        """Real calls inside: fx's patched Module.__call__ and __getattr__ let them through."""
        self.evaluating = True
        try:
            yield
        finally:
            self.evaluating = False

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            taken = sum(node.op == "placeholder" for node in self.values)
            return self.inputs[taken] if taken < len(self.inputs) else (args[0] if args else _UNKNOWN)
        if kind == "output":
            return None
        if kind == "get_attr":
            with self._running():
                return fetch_attr(self.root, target)
        missing: Any = None  # the first input not computed; an error raised by one wins

        def value(a):
            nonlocal missing
            if not isinstance(a, torch.fx.Proxy):
                return a
            got = self.values.get(a.node, _UNKNOWN)
            if (got is _UNKNOWN or isinstance(got, _Failed)) and not isinstance(missing, _Failed):
                missing = got
            return got

        args = torch.fx.node.map_aggregate(args, value)
        kwargs = torch.fx.node.map_aggregate(kwargs, value)
        if missing is not None:
            return missing
        try:
            with self._running(), torch.no_grad():
                if kind == "call_module":
                    module = self.root.get_submodule(target)
                    with training_mode(module, training=False):
                        return module(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                return target(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (only a problem if a decision needs the value)
            return _Failed(exc)

    def _known(self, obj: torch.fx.Proxy, what: str) -> Any:
        got = self.values.get(obj.node, _UNKNOWN)
        if isinstance(got, _Failed):
            raise torch.fx.proxy.TraceError(
                f"{what} at {_user_frame()} needs a value that the example input fails to compute "
                f"({type(got.error).__name__}: {str(got.error)[:120]})"
            )
        if got is _UNKNOWN:
            raise torch.fx.proxy.TraceError(
                f"{what} at {_user_frame()} on a value that could not be computed"
            )
        return got

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        value = self._known(obj, "control flow")
        if isinstance(value, torch.Tensor):  # on the data, not on sizes: another input may branch otherwise
            raise torch.fx.proxy.TraceError(
                f"control flow on the values of a tensor at {_user_frame()} (not on its size)"
            )
        taken = bool(value)
        self.decisions.append(f"{_user_frame()}: {taken}")
        return taken

    def iter(self, obj: torch.fx.Proxy):
        count = len(self._known(obj, "iteration"))
        self.decisions.append(f"{_user_frame()}: {count} items")
        return iter([obj[i] for i in range(count)])


_UNKNOWN = object()
# read from the example instead of traced: code passes them to Python APIs (torch.autocast(device_type=
# x.device.type)) that cannot take a proxy, and they do not depend on the input's size
_CONCRETE_ATTRIBUTES = frozenset({"device", "dtype", "is_cuda", "layout"})


class _ConcreteProxy(torch.fx.Proxy):
    def _number(self, kind: type) -> Any:
        """int(), float(), an index: sizes are taken as the example's (a decision); tensor values refused."""
        value = self.tracer._known(self, f"{kind.__name__}()")
        if isinstance(value, torch.Tensor):
            raise torch.fx.proxy.TraceError(f"{kind.__name__}() of a tensor's values at {_user_frame()}")
        self.tracer.decisions.append(f"{_user_frame()}: {kind.__name__} {value}")
        return kind(value)

    def __int__(self) -> int:
        return self._number(int)

    def __index__(self) -> int:
        return self._number(int)

    def __float__(self) -> float:
        return self._number(float)

    def __setitem__(self, index: Any, value: Any) -> None:  # attn[:, :, 1:, 1:] = ... (MViTv2)
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})

    def __getattr__(self, name: str) -> Any:
        if name in _CONCRETE_ATTRIBUTES:
            value = self.tracer.values.get(self.node, _UNKNOWN)
            if isinstance(value, torch.Tensor):
                return getattr(value, name)
        return super().__getattr__(name)


class _Failed:
    """The error a traced call raised on the example input."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _user_frame() -> str:
    """file:line of the model code that made a decision on a traced value."""
    frame = sys._getframe(2)  # the frames themselves: inspect.stack() would read every file's source
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/" not in path and "/softprune/graph/" not in path:
            return f"{path.rsplit('/', 1)[-1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _trace_graph(
    model: nn.Module,
    handlers=None,
    module_rules=None,
    leaf_modules: Iterable[str] = (),
    example_inputs: tuple | None = None,
) -> tuple[torch.fx.Graph, list[str]]:
    """The model's fx graph, and the control-flow decisions made concrete on ``example_inputs`` when
    plain tracing stops on one (an empty list when it did not)."""
    handlers = HANDLERS if handlers is None else handlers
    module_rules = MODULE_RULES if module_rules is None else module_rules
    try:
        return Tracer(handlers, module_rules, leaf_modules).trace(model), []
    except Exception as exc:  # fx raises many types; the user needs the cause and the way out
        first = exc
        if example_inputs is None:
            raise _trace_failure(model, exc) from exc
    tracer = ConcreteTracer(handlers, module_rules, leaf_modules, example_inputs)
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # a functional batch_norm updates them
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001
        raise _trace_failure(model, exc if isinstance(exc, torch.fx.proxy.TraceError) else first) from exc
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])
    return graph, tracer.decisions


def _trace_failure(model: nn.Module, exc: Exception) -> SoftpruneError:
    return SoftpruneError(
        f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
        "softprune needs a traceable forward; move data-dependent Python control flow into a "
        "submodule and list it in ignore= (it is then kept whole), or register a handler for it"
    )
