"""softprune: soft-to-hard filter pruning for PyTorch CNNs, with exact compaction to a smaller model.

import softprune
model = softprune.create_model("resnet56")
pruner = softprune.Pruner(model, method="ghfp", rate=0.4, total_steps=epochs, optimizer=opt)
...  # train; call pruner.step() at the end of each epoch
small = pruner.compact()
softprune.profile(small, torch.randn(1, 3, 32, 32))
"""

from .budgets import Budget, make_budget
from .calibrate import recalibrate_batchnorm
from .cost import latency, paper_flops_cifar_resnet, profile
from .criteria import CRITERIA, Criterion, make_criterion, register_criterion
from .errors import SoftpruneError
from .graph import RULES, Handler, analyze, build_groups, register_handler, register_op
from .io import export_onnx, save
from .methods import METHODS, Method, get_method, list_methods, register_method
from .models import create_model, list_models, load
from .plugins.compensation import Compensator
from .plugins.regularizers import REGULARIZERS, Regularizer, make_regularizer
from .policy import PRESETS, Policy, make_policy, register_preset
from .pruner import Pruner
from .schedules import SCHEDULES, register_schedule
from .settings import PruneSettings

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "METHODS",
    "PRESETS",
    "REGULARIZERS",
    "SCHEDULES",
    "RULES",
    "Budget",
    "Compensator",
    "Criterion",
    "Handler",
    "Method",
    "Policy",
    "PruneSettings",
    "Pruner",
    "Regularizer",
    "SoftpruneError",
    "analyze",
    "build_groups",
    "create_model",
    "export_onnx",
    "get_method",
    "latency",
    "list_methods",
    "list_models",
    "load",
    "make_budget",
    "make_criterion",
    "make_policy",
    "make_regularizer",
    "paper_flops_cifar_resnet",
    "profile",
    "recalibrate_batchnorm",
    "register_criterion",
    "register_handler",
    "register_method",
    "register_op",
    "register_preset",
    "register_schedule",
    "save",
]
