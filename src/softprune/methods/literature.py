"""The literature's methods beyond the family, as recipes on the presets. Each recipe's schedule is
relative to the run (``at: 0.34`` of the steps), so the same method fits any length; the configs in
configs/methods/ run them on the methods benchmark's 6 epochs. Formulas: docs/literature.md."""

from __future__ import annotations

from . import Method, register_method

_AFTER_A_THIRD = {"kind": "step", "at": 0.34}  # one step a third of the way in (after epoch 3 of 6)

register_method(Method(
    "hrank", "hfp", "filters whose feature maps have a low average rank go, once; then fine-tuning",
    "Lin et al., CVPR 2020: ranks of 5 batches (the paper: 5 x 128 images)",
    settings={"rate_schedule": _AFTER_A_THIRD, "criterion": "hrank", "calibration_batches": 5},
))  # fmt: skip
register_method(Method(
    "ezcrop", "hfp", "HRank's schedule with the FFT energy-zone ratio in place of the rank",
    "Lin et al., WACV 2022: alpha = 1/4 of the distance to the border, the paper's default",
    settings={"rate_schedule": _AFTER_A_THIRD, "criterion": "ezcrop", "criterion_options": {"alpha": 0.25},
              "calibration_batches": 5},
))  # fmt: skip
register_method(Method(
    "similarity", "hfp", "channels with strongly correlated feature maps clustered, one kept per cluster",
    "Zhang et al., arXiv 1908.02620",
    settings={"rate_schedule": _AFTER_A_THIRD, "criterion": "similarity", "calibration_batches": 5},
))  # fmt: skip
register_method(Method(
    "lrf", "hfp", "filters a least-squares combination of the others reproduces go; the next layer "
    "takes over their contribution",
    "Joo et al., AAAI 2021; compensation fitted on activations (the paper's is 'weights', filters only)",
    settings={"rate_schedule": _AFTER_A_THIRD, "criterion": "lrf", "compensate": "activations",
              "calibration_batches": 5},
))  # fmt: skip
register_method(Method(
    "slimming", "hfp", "an L1 penalty on BatchNorm scales, then one global threshold on |gamma|",
    "Liu et al., ICCV 2017 (strength 1e-4 for VGG, 1e-5 for ResNet on CIFAR)",
    settings={"rate_schedule": _AFTER_A_THIRD, "criterion": "bn_scale", "budget": "global", "max_rate": 0.8,
              "regularizer": {"kind": "bn_l1", "strength": 1e-4, "until": "pruned"}},
))  # fmt: skip
register_method(Method(
    "greg1", "sfp", "the smallest filters (L1) chosen once, pushed to zero by a growing L2 penalty, removed",
    "Wang et al., ICLR 2021 (GReg-1): the paper grows delta by 1e-4 up to 1 over tens of thousands of "
    "iterations; the recipe grows faster (chosen at the first step, removed half-way)",
    settings={"rate_schedule": {"kind": "step", "at": 0.0}, "keep_first": True, "decay": 1.0,
              "hardness": {"kind": "step", "value": 1.0, "at": 0.5}, "criterion": "l1",
              "regularizer": {"kind": "greg1", "delta": 0.01, "every": 5, "ceiling": 1.0}},
))  # fmt: skip
register_method(Method(
    "greg2", "sfp", "a uniform growing L2 penalty first, then GReg-1 on the smallest filters",
    "Wang et al., ICLR 2021 (GReg-2): the paper grows the uniform penalty by 1e-5 up to 1e-2; faster here",
    settings={"rate_schedule": _AFTER_A_THIRD, "keep_first": True, "decay": 1.0,
              "hardness": {"kind": "step", "value": 1.0, "at": 0.67}, "criterion": "l1",
              "regularizer": {"kind": "greg2", "uniform_delta": 2e-4, "uniform_ceiling": 0.01, "delta": 0.02,
                              "every": 5, "ceiling": 1.0}},
))  # fmt: skip
register_method(Method(
    "tick_tock", "hfp", "Gate Decorator: channels ranked globally by the Taylor importance of their BN "
    "gate, a Tick (gates only) before each step, L1 on the gates between steps",
    "You et al., NeurIPS 2019; hard steps that grow until the MACs budget is met",
    settings={"keep_first": False, "rate_schedule": {"kind": "linear", "ramp": 0.67}, "criterion": "taylor",
              "budget": "macs", "max_rate": 0.8,
              "regularizer": {"kind": "bn_l1", "strength": 1e-4, "until": "end"},
              "plugins": [{"kind": "tick", "batches": 20, "lr": 0.01}]},
))  # fmt: skip
register_method(Method(
    "random", "ghfp", "the baseline: GHFP's schedule with filters chosen at random (seeded per step)",
    "a control for any criterion",
    settings={"criterion": "random"},
    min_steps=24,
))  # fmt: skip
register_method(Method(
    "resrep", "sfp", "a compactor (1x1, identity at first) after each convolution and BatchNorm; its rows "
    "shrink under a group-lasso penalty, selected rows lose the task gradient, and the compactor merges "
    "into the layer at the end",
    "Ding et al., ICCV 2021 and the authors' code (DingXiaoH/ResRep): compactors on single-producer "
    "layers only, rows ranked globally by norm, strength 1e-4 and momentum 0.99; the recipe's strength "
    "is larger to fit a short run (docs/literature.md)",
    settings={"rate_schedule": {"kind": "linear", "ramp": 0.5}, "decay": 1.0, "hardness": 0.0,
              "criterion": "compactor", "budget": "macs", "max_rate": 0.9,
              "plugins": [{"kind": "resrep", "strength": 1e-4}]},
    min_steps=24,
))  # fmt: skip
register_method(Method(
    "adsc", "hfp", "the lowest filters removed for good at every step while the kept count anneals to "
    "the target by half-way (annealing with direct sparsity control)",
    "Guo, She, Barbu, arXiv 2002.04301: the annealing schedule of Feature Selection with Annealing "
    "(mu = 5, from its implementations); the criterion (filter L2 norm) is reconstructed",
    settings={"rate_schedule": {"kind": "annealing", "mu": 5.0}, "keep_first": False, "criterion": "l2"},
    min_steps=24,
))  # fmt: skip
register_method(Method(
    "pfwt", "hfp", "filters removed for good at fixed intervals during training by the L1 norm (or mean "
    "activation, random), so that training itself gets cheaper (with prune.compact_during_training)",
    "Roy, Panda, Srinivasan, Raghunathan, arXiv 2003.02800 (the abstract: L1 was the best of its three "
    "criteria); interval and per-step count reconstructed (equal steps over the first half)",
    settings={"rate_schedule": {"kind": "linear", "ramp": 0.5}, "keep_first": False, "criterion": "l1"},
))  # fmt: skip
register_method(Method(
    "frs", "hfp", "channels ranked across layers by feature relevance scores (the true class's score "
    "traced back to each channel), the lowest removed at fixed intervals during training",
    "Aketi et al., IEEE Access 2020 and the authors' code (purdue-nrl/Gradual-Channel-Pruning-using-FRS): "
    "global ranking, scores divided by their layer's L2 norm, equal steps until late in training; "
    "relevance first order (activation x gradient) instead of the code's LRP alpha-beta",
    settings={"rate_schedule": {"kind": "linear", "ramp": 0.75}, "keep_first": False, "criterion": "relevance",
              "budget": "global", "normalize": "l2", "calibration_batches": 5},
))  # fmt: skip
register_method(Method(
    "bwcp", "hfp", "each BatchNorm's output whitened across channels and multiplied by a random mask "
    "drawn with the channel's activation probability; a sparsity term lowers the probabilities of "
    "useless channels, the least probable are removed and the whitening merges into the layer",
    "Shao et al., arXiv 2105.06423 (no code released): activation probability, batch whitening in blocks "
    "of 16 by Newton's iteration, Gumbel masks, the sparsity term and its warm-up from the paper; the "
    "iteration count, running average, the mean mask in eval mode and the budget's selection by "
    "probability (one step at two thirds) reconstructed (docs/literature.md)",
    settings={"rate_schedule": {"kind": "step", "at": 0.67}, "criterion": "bwcp", "budget": "macs",
              "plugins": [{"kind": "bwcp"}]},
))  # fmt: skip
register_method(Method(
    "dmcp", "hfp", "each layer's kept width is a Markov chain over chunks of channels, its transition "
    "probabilities trained with a budget loss on the expected MACs while sub-networks of sampled widths "
    "train the weights; the expected widths are kept",
    "Guo et al., CVPR 2020 and the authors' code (zx55/dmcp): chunks, marginals after BatchNorm, sandwich "
    "rule with distillation, piecewise-log FLOPs loss; the architecture step distils instead of using "
    "labels, and the chosen widths are fine-tuned rather than trained again (docs/literature.md)",
    settings={"rate_schedule": {"kind": "step", "at": 0.67}, "criterion": "dmcp", "budget": "macs",
              "plugins": [{"kind": "dmcp", "warmup": 0.34}]},
))  # fmt: skip
register_method(Method(
    "conet", "hfp", "the rank of each layer's weights (EVBMF) is measured every epoch; layers whose "
    "rank stopped rising or whose mapping condition is poor shrink by CONet's step, the others grow, "
    "and one threshold across layers meets the budget, each layer's smallest filters going",
    "Hosseini et al., ICCVW 2021 and the authors' code (mahdihosseini/CONet): EVBMF ranks of the "
    "unfoldings, slope, delta, mu = 10, phi = 0.2; one search window and a budget instead of trials that "
    "grow and shrink widths (docs/literature.md)",
    settings={"rate_schedule": _AFTER_A_THIRD, "criterion": "conet", "budget": "macs",
              "plugins": [{"kind": "conet"}]},
))  # fmt: skip
register_method(Method(
    "c2s2", "hfp", "a pruning layer (one factor per channel, real and binary) after the BatchNorms: the "
    "binary copy masks the channel while the real one trains under a sparsity term weighted by the "
    "channel's MACs, layer after layer; the lowest factors meet the budget",
    "Chiu, Chen, Liu, arXiv 1904.03508: only the abstract could be read, every formula is reconstructed "
    "(docs/literature.md)",
    settings={"rate_schedule": {"kind": "step", "at": 0.67}, "criterion": "c2s2", "budget": "macs",
              "plugins": [{"kind": "c2s2"}]},
))  # fmt: skip
