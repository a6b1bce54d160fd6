"""The soft-to-hard family as methods: each is its preset's policy with the criterion it scores by.
Formulas and sources: docs/methods.md and METHODS.md."""

from __future__ import annotations

from . import Method, register_method

register_method(Method(
    "hfp", "hfp", "hard filter pruning: prune once, keep that selection, hard (zero and frozen)",
    "PFEC's rule (Li et al., ICLR 2017) as the policy with hardness 1 and the L2 norm",
))  # fmt: skip
register_method(Method(
    "sfp", "sfp", "soft filter pruning: the lowest P of every layer zeroed at each step, free to come back",
    "He et al., IJCAI 2018 and its released code: rule, L2 criterion, a step per epoch",
))  # fmt: skip
register_method(Method(
    "asfp", "asfp", "SFP with an asymptotic rate that reaches 3P/4 at T/8",
    "He et al., IEEE TCYB 2020: the rate formula with D = 1/8",
))  # fmt: skip
register_method(Method(
    "srfp", "srfp", "softer filter pruning: soft filters decay by alpha_t instead of being zeroed",
    "Cai et al., ICPR 2020 and the first author's code: alpha_0 in {0, 1}, sigma = 1e-5, zero from 0.9 T",
))  # fmt: skip
register_method(Method(
    "asrfp", "asrfp", "SRFP with ASFP's asymptotic rate",
    "Cai et al., ICPR 2020, as SRFP",
))  # fmt: skip
# min_steps: GHFP's rate and hardness ramp, so a run of fewer epochs takes small steps within epochs
# (on the 6-epoch methods benchmark: 87.11 against 86.47 with one step per epoch, 3 seeds); the
# others prune all of P at their first step, and more steps would only take it earlier (SFP: no gain).
register_method(Method(
    "ghfp", "ghfp", "gradually hard filter pruning: rate and hardness ramp from soft to hard",
    "Cai et al., the first author's code (cailinhang/PGMPF, soft-to-hard mode): poly rate ramp, cubic "
    "hardness, the BN-scaled L2 norm; docs/methods.md says what is from the code and what the paper",
    settings={"criterion": "l2_bn"},
    min_steps=24,
    finetune_epochs=1,
))  # fmt: skip
