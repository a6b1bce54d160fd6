"""The schedule formulas of METHODS.md at t = 0, T/8, T/2 and T-1, and the presets' knobs."""

import math

import pytest

from softprune.errors import SoftpruneError
from softprune.policy import PRESETS, make_policy
from softprune.schedules import (
    AsymptoticRate,
    Constant,
    CubicRamp,
    ExponentialDecay,
    PolyRate,
    schedule_from_dict,
)

T = 200
POINTS = [0, T // 8, T // 2, T - 1]


def test_constant_rate_is_p_everywhere():
    assert [Constant(0.4)(t, T) for t in POINTS] == [0.4] * 4


def test_asymptotic_rate_reaches_three_quarters_at_t_over_8_and_p_at_the_end():
    p = 0.4
    values = [AsymptoticRate(p)(t, T) for t in POINTS]
    k = math.log(4) / (T / 8)
    assert values[0] == 0.0
    assert values[1] == pytest.approx(0.75 * p, abs=1e-12)  # 1 - exp(-ln 4) = 3/4
    assert values[2] == pytest.approx(p * (1 - math.exp(-k * T / 2)), abs=1e-12)
    assert values[2] == pytest.approx(p * (1 - 4.0**-4), abs=1e-12)
    assert values[3] == p  # held at P from 0.95 T on
    assert AsymptoticRate(p)(int(0.95 * T) - 1, T) < p


def test_srfp_decay_formula_and_cutoff():
    sigma = 1e-5
    beta = -math.log(sigma / (1 + 0.01 * sigma)) / T
    values = [ExponentialDecay()(t, T) for t in POINTS]
    assert values[0] == 1.0
    assert values[1] == pytest.approx(math.exp(-beta * T / 8), rel=1e-12)
    assert values[2] == pytest.approx(math.exp(-beta * T / 2), rel=1e-12)
    assert values[2] == pytest.approx((sigma / (1 + 0.01 * sigma)) ** 0.5, rel=1e-9)
    assert values[3] == 0.0  # zero from 0.9 T (CIFAR)
    assert ExponentialDecay()(int(0.9 * T) - 1, T) > 0.0
    assert ExponentialDecay()(int(0.9 * T), T) == 0.0
    imagenet = ExponentialDecay(sigma=1e-3, cutoff=0.8)
    assert imagenet(int(0.8 * T), T) == 0.0 and imagenet(int(0.8 * T) - 1, T) > 0.0


def test_srfp_with_alpha0_zero_is_always_zero():
    assert [ExponentialDecay(alpha0=0.0)(t, T) for t in range(T)] == [0.0] * T


def test_ghfp_cubic_hardness():
    values = [CubicRamp()(t, T) for t in POINTS]
    expected = [1 - (1 - (t + 1) / T) ** 3 for t in POINTS]
    assert values == pytest.approx(expected, abs=1e-15)
    assert values[0] == pytest.approx(3 / T - 3 / T**2 + 1 / T**3)
    assert values[3] == 1.0
    assert all(a < b for a, b in zip(values, values[1:]))


def test_the_ghfp_codes_schedules_at_0_t8_t2_095t_and_the_end():
    """GHFP's released code (its soft-to-hard mode): P_t = P [1 - (1 - (t+1)/T)^3], held at P from
    0.95 T; lambda_t = 1 - (1 - (t+1)/T)^3; alpha_t = alpha0 exp(-beta t), sigma 1e-5, 0 from 0.9 T."""
    p, points = 0.4, [0, T // 8, T // 2, int(0.95 * T) - 1, int(0.95 * T), T - 1]
    cube = [1 - (1 - (t + 1) / T) ** 3 for t in points]
    rate = [PolyRate(p)(t, T) for t in points]
    assert rate[:4] == pytest.approx([p * c for c in cube[:4]], abs=1e-15)
    assert rate[0] == pytest.approx(p * (3 / T - 3 / T**2 + 1 / T**3))
    assert rate[1] == pytest.approx(p * (1 - (1 - 26 / 200) ** 3))  # 0.137 at T/8
    assert rate[2] == pytest.approx(p * (1 - (1 - 101 / 200) ** 3))  # 0.352 at T/2
    assert rate[3] < p and rate[4] == p and rate[5] == p  # held at P from 0.95 T
    assert [CubicRamp()(t, T) for t in points] == pytest.approx(cube, abs=1e-15)
    beta = -math.log(1e-5 / (1 + 0.01 * 1e-5)) / T
    decay = [ExponentialDecay()(t, T) for t in points]
    assert decay[:3] == pytest.approx([math.exp(-beta * t) for t in points[:3]], rel=1e-12)
    assert decay[3:] == [0.0, 0.0, 0.0]  # 0.9 T and later
    assert make_policy("ghfp", p, rate_schedule="poly").rate(T // 2, T) == rate[2]


@pytest.mark.parametrize("t,T_", [(-1, 10), (10, 10)])
def test_step_outside_range_is_an_error(t, T_):
    with pytest.raises(SoftpruneError, match="outside"):
        Constant(0.4)(t, T_)


def test_schedules_round_trip_through_dicts():
    for s in (
        Constant(0.3),
        AsymptoticRate(0.4, D=0.25),
        ExponentialDecay(sigma=1e-3, cutoff=0.8),
        CubicRamp(2.0),
    ):
        assert schedule_from_dict(s.to_dict()) == s
    assert schedule_from_dict(0.5) == Constant(0.5)


def test_bad_schedule_dicts_are_clear_errors():
    with pytest.raises(SoftpruneError, match="unknown schedule kind 'cubik'.*Did you mean 'cubic'"):
        schedule_from_dict({"kind": "cubik"})
    with pytest.raises(SoftpruneError, match="has no option 'sigmaa'"):
        schedule_from_dict({"kind": "exponential", "sigmaa": 1})
    with pytest.raises(SoftpruneError, match="must be a number"):
        schedule_from_dict({"kind": "cubic", "power": "three"})


@pytest.mark.parametrize(
    "method,rate_kind,decay_kind,hardness,keep_first",
    [
        ("hfp", "constant", 0.0, 1.0, True),
        ("sfp", "constant", 0.0, 0.0, False),
        ("asfp", "asymptotic", 0.0, 0.0, False),
        ("srfp", "constant", "exponential", 0.0, False),
        ("asrfp", "asymptotic", "exponential", 0.0, False),
        ("ghfp", "poly", 0.0, "cubic", False),
    ],
)
def test_presets_bundle_the_papers_knobs(method, rate_kind, decay_kind, hardness, keep_first):
    policy = make_policy(method, 0.3)
    assert policy.name == method and policy.keep_first is keep_first
    assert policy.rate.kind == rate_kind and policy.rate.value == 0.3
    assert policy.decay.kind == ("constant" if decay_kind == 0.0 else decay_kind)
    if decay_kind == 0.0:
        assert policy.decay(5, 10) == 0.0
    assert (policy.hardness.kind == "cubic") if hardness == "cubic" else policy.hardness(3, 10) == hardness


def test_every_knob_is_overridable():
    p = make_policy(
        "ghfp", 0.4, rate_schedule="asymptotic", decay="exponential", hardness={"kind": "cubic", "power": 2}
    )
    assert p.rate.kind == "asymptotic" and p.decay.kind == "exponential" and p.hardness.power == 2.0
    assert make_policy("sfp", 0.4, decay=0.5).decay(3, 10) == 0.5
    assert make_policy("sfp", 0.4, hardness="one").hardness(0, 10) == 1.0
    assert make_policy("hfp", 0.4, keep_first=False).keep_first is False
    p = make_policy("asfp", 0.4, rate_schedule={"kind": "asymptotic", "D": 0.25})
    assert p.rate(25, 100) == pytest.approx(0.3)  # 3P/4 at D*T


def test_policy_round_trips():
    p = make_policy("asrfp", 0.35, decay={"kind": "exponential", "sigma": 1e-3, "cutoff": 0.8})
    assert type(p).from_dict(p.to_dict()) == p


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, "0.4", None, True])
def test_rate_outside_zero_one_is_an_error(rate):
    with pytest.raises(SoftpruneError, match="rate must"):
        make_policy("sfp", rate)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(SoftpruneError) as info:
        make_policy("gfhp", 0.4)
    message = str(info.value)
    assert message.startswith("unknown preset 'gfhp'") and "Did you mean 'ghfp'" in message
    assert all(m in message for m in PRESETS) and len(PRESETS) == 6


def test_override_that_leaves_the_range_is_an_error():
    with pytest.raises(SoftpruneError, match="decay must lie in"):
        make_policy("sfp", 0.4, decay=1.5)
    with pytest.raises(SoftpruneError, match="unknown hardness 'linear'"):
        make_policy("sfp", 0.4, hardness="linear")
