"""Methods by name: the soft-to-hard presets and the literature's methods, each a named recipe.

A method is a preset (the policy: rate, decay and hardness schedules, softprune.policy) plus the
settings it needs (criterion, budget, regularizer, compensation, plugins such as Tick, ...;
softprune.settings). ``Pruner(model, method="hrank")``
and a config's ``prune: {method: hrank}`` resolve a method the same way: its settings first, then
whatever the caller set. Where a method comes from (paper, code, reconstructed) is in its ``source``.

To add one: a ``Method(...)`` registered in this package (``presets.py`` for the family,
``literature.py`` for the rest), see docs/writing_a_method.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..registry import Registry


@dataclass(frozen=True)
class Method:
    name: str
    preset: str  # the policy (softprune.policy.PRESETS)
    summary: str  # one line: what it does
    source: str = ""  # paper and code, and what softprune reconstructed
    settings: dict[str, Any] = field(default_factory=dict)  # PruneSettings keys
    # pruning steps a training run takes at least (a short run spreads them over its iterations)
    min_steps: int = 1
    # the last epochs of a training run that take no pruning step, so the network it ends with trains
    # on (prune.finetune_epochs; a run of fewer epochs than this plus one keeps none)
    finetune_epochs: int = 0

    @property
    def criterion(self) -> str:
        return self.settings.get("criterion", "l2")

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """The method's settings under the ``given`` ones; plugins add up: the method's first, then
        the given ones of other kinds. A given plugin of a kind the method has sets options of the
        method's one ({kind: resrep, strength: 0.004}), so settings resolved once, such as a saved
        run config's, resolve to themselves."""
        merged = {**self.settings, **given}
        own, extra = self.settings.get("plugins") or [], given.get("plugins") or []
        if own and extra:
            out = [_spec(p) for p in own]
            for p in extra:
                same = [i for i, o in enumerate(out) if o["kind"] == _kind(p)]
                if same:
                    out[same[0]] = {**out[same[0]], **_spec(p)}
                else:
                    out.append(p)
            # an own plugin no given one changed keeps its form (a name or a mapping), so that
            # resolving a resolved config gives it back unchanged
            kept = [o if _spec(o) == n else n for o, n in zip(own, out)]
            merged["plugins"] = kept + out[len(own) :]
        return merged


def _kind(spec: Any) -> Any:
    return spec.get("kind") if isinstance(spec, dict) else spec


def _spec(spec: Any) -> dict[str, Any]:
    return dict(spec) if isinstance(spec, dict) else {"kind": spec}


METHODS: Registry[Method] = Registry("method", instance_of=Method)


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Make ``method`` available by its name to the Pruner and to configs."""
    return METHODS.register(method.name, method, replace=replace)


def list_methods() -> list[str]:
    """Every method by name: the six presets and the literature's methods."""
    return METHODS.names()


def get_method(name: str) -> Method:
    return METHODS[name]


from . import literature, presets  # noqa: E402,F401  (they register themselves)
