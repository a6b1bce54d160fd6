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
from .compensate import Compensator
from .cost import latency, paper_flops_cifar_resnet, profile
from .criteria import CRITERIA, Criterion, make_criterion, register_criterion
from .errors import SoftpruneError
from .graph import analyze, build_groups
from .handlers import Handler, register_handler
from .io import export_onnx, load, save
from .models import create_model, list_models
from .ops import RULES, register_op
from .policy import METHODS, Policy, make_policy
from .pruner import Pruner
from .regularizers import REGULARIZERS, Regularizer, make_regularizer

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "METHODS",
    "REGULARIZERS",
    "RULES",
    "Budget",
    "Compensator",
    "Criterion",
    "Handler",
    "Policy",
    "Pruner",
    "Regularizer",
    "SoftpruneError",
    "analyze",
    "build_groups",
    "create_model",
    "export_onnx",
    "latency",
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
    "register_op",
    "save",
]
