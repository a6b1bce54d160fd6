"""WHAT can be pruned together: the channel groups of a model, found by running channel ids through
its torch.fx trace.

Import direction inside the package, bottom first: ``groups`` (what a group is) and ``ids`` (channel
ids, the ``Context`` rules see) know nothing of the rest; ``handlers`` (modules with parameters) and
``ops`` (everything else) move ids; ``trace`` runs them over a model and builds the groups.
"""

from .groups import ChannelGroup, Member, Role
from .handlers import HANDLERS, Handler, KeepWhole, register_handler
from .ids import CONST, ZERO, Context
from .ops import RULES, register_op
from .trace import (
    ALL_LAYERS,
    DENSE_LAYERS,
    Analysis,
    analyze,
    build_groups,
    default_layers,
    example_batch1,
    selector,
)

__all__ = [
    "ALL_LAYERS",
    "CONST",
    "HANDLERS",
    "RULES",
    "ZERO",
    "Analysis",
    "ChannelGroup",
    "Context",
    "Handler",
    "KeepWhole",
    "Member",
    "Role",
    "analyze",
    "build_groups",
    "example_batch1",
    "register_handler",
    "register_op",
    "selector",
    "default_layers",
    "DENSE_LAYERS",
]
