"""Checkpoints that are written atomically and loaded without running code.

A checkpoint is a dict of tensors and plain values saved with ``torch.save``; it is written to a
temporary file in the same folder, flushed to disk and renamed over the old one, so a crash while
writing leaves the previous checkpoint intact. Loading uses ``torch.load(weights_only=True)``: a file
holding a pickled object that would run code is refused, and a truncated or corrupt file gives a
one-line error instead of a traceback from inside torch.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import SoftpruneError

FORMAT = "softprune-checkpoint-1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SoftpruneError(f"checkpoint {str(path)!r} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing them
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling refused"
        if "unsupported global" in str(exc).lower():  # names a class or function, not a tensor
            raise SoftpruneError(
                f"refusing to load {str(path)!r}: it holds Python objects that could run code when loaded "
                f"({first[:160]}). Only trusted files should be opened with plain torch.load"
            ) from None
        raise SoftpruneError(f"checkpoint {str(path)!r} is corrupt: {first[:160]}") from None
    except Exception as exc:  # corrupt bytes make the unpickler fail in many ways: one line for all
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SoftpruneError(f"checkpoint {str(path)!r} is truncated or corrupt ({msg[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SoftpruneError(f"{str(path)!r} is not a softprune checkpoint")
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
