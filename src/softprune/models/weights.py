"""Starting weights: a user's saved state_dict, a softprune file, or torchvision's published weights.

A run that prunes a trained model starts here. Files are read without running code: ``.pt``/``.pth``
with ``torch.load(weights_only=True)`` (a pickle that names Python objects is refused), ``.safetensors``
with safetensors. The usual wrappings of a state_dict are undone: a dict holding it under
``state_dict``, ``model``, ``model_state_dict``, ``net`` or ``module`` (training scripts, Lightning
checkpoints), and key prefixes ``module.`` (DataParallel/DDP), ``_orig_mod.`` (torch.compile) and
``model.`` (a LightningModule holding the network as ``self.model``). Every mismatch is one line that
names the first key that does not fit.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import SoftpruneError

NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
PREFIXES = ("module.", "_orig_mod.", "model.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (.pt, .pth, .bin, .ckpt or .safetensors), unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise SoftpruneError(f"model checkpoint {str(path)!r} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise SoftpruneError(
                f"model checkpoint {str(path)!r} is not a readable safetensors file ({_first_line(exc)})"
            ) from None
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "unsupported global" in str(exc).lower():  # names a class or function, not a tensor
                raise SoftpruneError(
                    f"refusing to load {str(path)!r}: it holds Python objects that could run code when "
                    "loaded (a whole pickled model?). Save the weights with torch.save(model.state_dict(), "
                    "PATH) and point model.checkpoint at that file"
                ) from None
            raise SoftpruneError(f"model checkpoint {str(path)!r} is corrupt ({_first_line(exc)})") from None
        except Exception as exc:  # torn or foreign bytes fail in many ways inside torch: one line for all
            raise SoftpruneError(
                f"model checkpoint {str(path)!r} is truncated or not a PyTorch file ({_first_line(exc)})"
            ) from None
    return unwrap_state_dict(state, str(path))


def unwrap_state_dict(state: object, where: str) -> dict[str, torch.Tensor]:
    """The state_dict inside a training checkpoint's dict, with wrapper prefixes removed."""
    for _ in range(3):  # e.g. {"state_dict": {"model": {...}}}
        if not isinstance(state, dict):
            break
        inner = next((state[k] for k in NESTED_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None or all(isinstance(v, torch.Tensor) for v in state.values()):
            break
        state = inner
    if not isinstance(state, dict) or not state:
        raise SoftpruneError(f"{where} holds no state_dict (a mapping of parameter names to tensors)")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SoftpruneError(
            f"{where} holds no tensors; found keys {sorted(map(str, state))[:6]} (expected a state_dict)"
        )
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def classifier(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The last Linear (or 1x1 convolution, SqueezeNet) in module order: the classification head."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and name.startswith("classifier")
        ):
            last = (name, module)
    return last


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> str | None:
    """Load ``state`` into ``model`` (strict); returns the head's name when only the classification
    head differs in its number of outputs (a model trained on other classes): that head starts fresh.
    Any other mismatch is an error naming the first key that does not fit."""
    own = model.state_dict()
    head = classifier(model)
    head_keys = {f"{head[0]}.weight", f"{head[0]}.bias"} if head else set()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    reset = None
    if wrong and set(wrong) <= head_keys and not missing and not unexpected:
        w = state[f"{head[0]}.weight"]
        if w.shape[1:] == own[f"{head[0]}.weight"].shape[1:]:  # same inputs, other classes
            reset = head[0]  # the model's own fresh head stays; every other key is in the file
            state = {k: v for k, v in state.items() if k not in head_keys}
            wrong = []
    if unexpected:
        raise SoftpruneError(
            f"{where} does not fit {type(model).__name__}: it has {len(unexpected)} key(s) the model lacks, "
            f"first {unexpected[0]!r} (is it a checkpoint of another architecture?)"
        )
    if wrong:
        key = wrong[0]
        raise SoftpruneError(
            f"{where} does not fit {type(model).__name__}: {key!r} has shape {tuple(state[key].shape)} in the "
            f"file and {tuple(own[key].shape)} in the model"
        )
    if missing:
        raise SoftpruneError(
            f"{where} does not fit {type(model).__name__}: {len(missing)} key(s) missing from the file, "
            f"first {missing[0]!r}"
        )
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))
    return reset
