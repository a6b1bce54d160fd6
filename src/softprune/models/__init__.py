"""Model registry: softprune's own CIFAR/MNIST networks, every torchvision classification model, timm's
models (``timm:NAME``) and a user's own factory (``package.module:function``).

Every model that :func:`create_model` returns carries ``example_input_shape`` = (1, C, S, S), the input a
pruning engine traces the model with when the user gives no example input.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torchvision
from torch import nn

from ..errors import SoftpruneError, choice_error
from ..registry import Registry
from .cifar_resnet import BasicBlock, CifarResNet, ShortcutA, resnet20, resnet32, resnet56, resnet110
from .lenet import LeNet5, lenet5
from .vgg import CifarVGG, vgg16_bn_cifar
from .weights import load_weights, read_state_dict

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "LeNet5",
    "ShortcutA",
    "create_model",
    "lenet5",
    "list_models",
    "load",
    "load_weights",
    "read_state_dict",
    "user_factory",
    "register_model",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "torchvision_models",
    "vgg16_bn_cifar",
]

TORCHVISION_INPUT_SIZE = 224


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    default_input_size: int
    # A model with a flatten into a fixed-size Linear (LeNet-5) works only at its default size.
    fixed_input_size: bool


MODELS: Registry[_Entry] = Registry("model")  # softprune's own; torchvision's names are looked up there


def register_model(
    name: str, default_input_size: int, *, fixed_input_size: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers ``builder(num_classes, in_channels, **kwargs)`` under ``name``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.register(name, _Entry(builder, default_input_size, fixed_input_size))
        return builder

    return decorate


for _builder in (resnet20, resnet32, resnet56, resnet110, vgg16_bn_cifar):
    register_model(_builder.__name__, 32)(_builder)
register_model("lenet5", 28, fixed_input_size=True)(lenet5)


def list_models() -> list[str]:
    """Names of softprune's own models (torchvision classification names are accepted too)."""
    return MODELS.names()


def torchvision_models() -> list[str]:
    """torchvision's classification model names (detection, segmentation and video models excluded)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_positive(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SoftpruneError(f"{what} must be a positive integer, got {value!r}")
    return value


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int | None = None,
    *,
    weights: str | None = None,
    checkpoint: str | Path | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build a model by name and set its ``example_input_shape`` to (1, in_channels, S, S).

    ``name`` is one of softprune's models, a torchvision classification name, ``timm:NAME`` (timm
    installed) or ``package.module:function``, a user's factory called with ``num_classes=`` (and
    ``in_channels=`` when it takes it). ``weights`` names torchvision's published weights (``DEFAULT``,
    ``IMAGENET1K_V2``, ...; for timm, ``pretrained``), downloaded where a network exists;
    ``checkpoint`` is a weights file (softprune.models.weights) or a softprune model file. A head
    trained for another number of classes starts fresh; any other mismatch is an error.
    """
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    if input_size is not None:
        _check_positive("input_size", input_size)
    if weights is not None and checkpoint is not None:
        raise SoftpruneError("give the starting weights once: model weights or a checkpoint file, not both")
    entry = MODELS.get(name)
    if entry is not None:
        if weights is not None:
            raise SoftpruneError(
                f"model {name!r} has no published weights; start from your own with checkpoint="
            )
        size = entry.default_input_size if input_size is None else input_size
        if entry.fixed_input_size and size != entry.default_input_size:
            raise SoftpruneError(
                f"model {name!r} only accepts {entry.default_input_size}x{entry.default_input_size} inputs, "
                f"got input_size={size}; resize the data or leave input_size unset"
            )
        try:
            model = entry.builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
        except TypeError as exc:
            raise SoftpruneError(
                f"model {name!r} does not accept the options {sorted(kwargs)}: {exc}"
            ) from exc
    elif name.startswith("timm:"):
        model, size = _timm_model(name[5:], num_classes, in_channels, input_size, weights, kwargs)
    elif ":" in name:
        if weights is not None:
            raise SoftpruneError(f"weights= applies to torchvision and timm models, not to {name!r}")
        model, size = _user_model(name, num_classes, in_channels, input_size, kwargs)
    elif name in torchvision_models():
        if in_channels != 3:
            raise SoftpruneError(
                f"torchvision model {name!r} with in_channels={in_channels} is not supported yet; "
                "use in_channels=3 or one of softprune's models: " + ", ".join(list_models())
            )
        size = TORCHVISION_INPUT_SIZE if input_size is None else input_size
        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except (TypeError, ValueError) as exc:
            raise SoftpruneError(
                f"torchvision model {name!r} rejected the options {sorted(kwargs)}: {exc}"
            ) from exc
        if weights is not None:
            load_weights(model, _torchvision_state(name, weights), f"torchvision weights {weights!r}")
    else:
        error = choice_error("model", name, list_models())
        raise SoftpruneError(
            f"{error} Any torchvision classification model name (e.g. 'resnet18'), timm:NAME or "
            "package.module:function (your own factory) is accepted too."
        )
    model.example_input_shape = (1, in_channels, size, size)
    # how to build this model again (softprune.load uses it when no factory is given)
    spec = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    model.softprune_spec = {**spec, **kwargs}
    if checkpoint is not None:
        model = _from_checkpoint(model, Path(checkpoint), spec, kwargs)
    return model


def _timm_model(
    name: str, num_classes: int, in_channels: int, input_size: int | None, weights: str | None, kwargs: dict
) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise SoftpruneError(
            f"model 'timm:{name}' needs timm, an optional dependency: pip install 'softprune[timm]'"
        ) from None
    if weights not in (None, "pretrained"):
        raise SoftpruneError(f"timm models take weights='pretrained' (timm's default tag), got {weights!r}")
    if not timm.list_models(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('.')[0]}*")[:5]
        raise SoftpruneError(
            f"timm has no model {name!r}" + (f"; close names: {', '.join(close)}" if close else "")
        )
    try:
        model = timm.create_model(
            name, pretrained=weights == "pretrained", num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except (TypeError, ValueError) as exc:
        raise SoftpruneError(f"timm model {name!r} rejected the options {sorted(kwargs)}: {exc}") from None
    except (OSError, RuntimeError) as exc:  # no network, no cached file
        raise SoftpruneError(
            f"timm could not fetch the pretrained weights of {name!r} ({str(exc).splitlines()[0][:160]}); "
            "without a network, save them where one exists and pass the file as the checkpoint"
        ) from None
    default = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
    return model, input_size or default


def _user_model(
    name: str, num_classes: int, in_channels: int, input_size: int | None, kwargs: dict
) -> tuple[nn.Module, int]:
    """``package.module:function``: the user's own factory, imported from the Python path."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise SoftpruneError(f"a model factory is written package.module:function, got {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SoftpruneError(
            f"cannot import {module_name!r} for model {name!r} ({exc}); is its folder on PYTHONPATH?"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SoftpruneError(f"{module_name!r} has no function {attr!r} (model {name!r})")
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    options = {**kwargs, "num_classes": num_classes}
    if "in_channels" in params or takes_any:
        options["in_channels"] = in_channels
    try:
        model = factory(**options)
    except TypeError as exc:
        raise SoftpruneError(f"model factory {name!r} rejected {sorted(options)}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SoftpruneError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    shape = getattr(model, "example_input_shape", None)
    size = input_size or (shape[-1] if shape else TORCHVISION_INPUT_SIZE)
    return model, size


def _torchvision_state(name: str, weights: str) -> dict:
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise SoftpruneError(f"torchvision publishes no weights for {name!r}") from None
    choice = weights.split(".")[-1]
    if choice not in enum.__members__:
        raise SoftpruneError(
            f"torchvision's {name} weights are {', '.join(enum.__members__)}; got {weights!r}"
        )
    try:
        return enum[choice].get_state_dict(progress=False)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise SoftpruneError(
            f"cannot download torchvision's {name} weights {choice} ({str(exc).splitlines()[0][:160]}); "
            "without a network, save them with torch.save(model.state_dict(), PATH) where one exists and "
            "start from that file (model.checkpoint)"
        ) from None


def _from_checkpoint(model: nn.Module, path: Path, spec: dict, kwargs: dict) -> nn.Module:
    """The model with a file's weights: a state_dict, or a softprune file (a pruned model is
    rebuilt at its pruned size, and pruning it again records both prunings)."""
    from ..io import read_plan

    if path.suffix == ".safetensors" and path.is_file():
        plan = read_plan(path, required=False) or {}
        if plan.get("groups") or plan.get("base"):  # a pruned model: rebuilt at its pruned size
            small = load(path, lambda: create_model(**spec, **kwargs))
            small.softprune_reset_head = None
            small.example_input_shape = model.example_input_shape
            small.softprune_spec = model.softprune_spec
            return small
    reset = load_weights(model, read_state_dict(path), f"model checkpoint {str(path)!r}")
    model.softprune_reset_head = reset
    return model


def load(
    path: str | Path, model_factory: Callable[[], nn.Module] | None = None, map_location: str = "cpu"
) -> nn.Module:
    """Rebuild a model saved by softprune.save (a pruned one at its pruned size; nothing unpickled).

    ``model_factory()`` gives the original, unpruned architecture; it may be omitted for the models
    create_model builds by name (the file records the arguments). A file built by a user's factory
    names it, but softprune does not import code a file names: pass ``model_factory=``.
    """
    from .. import io

    if model_factory is None:
        spec = io.read_plan(path).get("model")
        if not spec:
            raise SoftpruneError(f"{str(path)!r} does not say how to build its model; pass model_factory=")
        factory = user_factory(spec)
        if factory is not None:
            raise SoftpruneError(
                f"{str(path)!r} was built by your factory {factory!r}; pass model_factory= to rebuild it"
            )
        model_factory = lambda: create_model(**spec)  # noqa: E731
    return io.load(path, model_factory, map_location)


def user_factory(spec: dict) -> str | None:
    """The ``package.module:function`` a saved model's record names, if a user's factory built it:
    softprune imports such code only when the user names it too."""
    name = str(spec.get("name", ""))
    return name if ":" in name and not name.startswith("timm:") else None
