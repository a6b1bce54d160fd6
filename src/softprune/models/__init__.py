"""Model registry: softprune's own CIFAR/MNIST networks plus every torchvision classification model.

Every model that :func:`create_model` returns carries ``example_input_shape`` = (1, C, S, S), the input a
pruning engine traces the model with when the user gives no example input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision
from torch import nn

from ..errors import SoftpruneError, choice_error
from ..registry import Registry
from .cifar_resnet import BasicBlock, CifarResNet, ShortcutA, resnet20, resnet32, resnet56, resnet110
from .lenet import LeNet5, lenet5
from .vgg import CifarVGG, vgg16_bn_cifar

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "LeNet5",
    "ShortcutA",
    "create_model",
    "lenet5",
    "list_models",
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
    **kwargs: object,
) -> nn.Module:
    """Build an untrained model by name and set its ``example_input_shape`` to (1, in_channels, S, S)."""
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    if input_size is not None:
        _check_positive("input_size", input_size)
    entry = MODELS.get(name)
    if entry is not None:
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
    else:
        error = choice_error("model", name, list_models())
        raise SoftpruneError(
            f"{error} Any torchvision classification model name (e.g. 'resnet18') is accepted too."
        )
    model.example_input_shape = (1, in_channels, size, size)
    # how to build this model again (softprune.load uses it when no factory is given)
    model.softprune_spec = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": input_size,
        **kwargs,
    }
    return model
