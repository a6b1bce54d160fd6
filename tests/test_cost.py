"""FLOPs and MACs: the papers' convention (METHODS.md's table) and flop_counter measurements."""

import math

import pytest
import torch
from torch import nn

import softprune
from softprune.cost import latency, measure_macs, paper_flops_cifar_resnet, profile
from softprune.errors import SoftpruneError

# METHODS.md, "FLOPs as the papers count them": FLOPs cut in % by rate, per depth.
TABLE = {
    20: [15.2, 29.3, 42.2, 54.0],
    32: [14.9, 28.8, 41.5, 53.2],
    56: [14.7, 28.4, 41.1, 52.6],
    110: [14.6, 28.2, 40.8, 52.3],
}
BASELINES = {20: 4.06e7, 32: 6.89e7, 56: 1.25e8, 110: 2.53e8}


@pytest.mark.parametrize("depth", sorted(TABLE))
def test_papers_flops_table_to_a_tenth_of_a_point(depth):
    base = paper_flops_cifar_resnet(depth, 0.0)
    assert float(f"{base:.3g}") == BASELINES[depth]
    for rate, expected in zip((0.1, 0.2, 0.3, 0.4), TABLE[depth]):
        cut = 100 * (1 - paper_flops_cifar_resnet(depth, rate) / base)
        assert round(cut, 1) == expected, (depth, rate, cut)


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_measured_conv_macs_of_dense_resnet_equal_the_papers_baseline(depth):
    model = softprune.create_model(f"resnet{depth}")
    measured = measure_macs(model, torch.randn(1, 3, 32, 32))
    assert measured["conv_macs"] == paper_flops_cifar_resnet(depth, 0.0)
    assert measured["macs"] == measured["conv_macs"] + 64 * 10  # plus the FC layer


def test_profile_matches_hand_computed_macs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    result = profile(model, torch.randn(2, 3, 8, 8))
    conv = 4 * 3 * 9 * 8 * 8
    assert result == {"params": 4 * 3 * 9 + 4 + 256 * 5 + 5, "macs": conv + 256 * 5, "conv_macs": conv}


def test_grouped_and_depthwise_macs():
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert measure_macs(dw, torch.randn(1, 8, 6, 6))["conv_macs"] == 8 * 9 * 36
    grouped = nn.Conv2d(8, 16, 1, groups=4, bias=False)
    assert measure_macs(grouped, torch.randn(1, 8, 6, 6))["conv_macs"] == 16 * 2 * 36


def test_latency_gives_finite_medians():
    result = latency(nn.Conv2d(3, 8, 3), torch.randn(2, 3, 16, 16), warmup=1, repeats=5)
    assert result["repeats"] == 5
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["max_ms"] < math.inf


def test_profile_of_a_non_module_is_an_error():
    with pytest.raises(SoftpruneError, match="takes a torch.nn.Module"):
        profile("resnet20", torch.randn(1, 3, 32, 32))


def test_paper_flops_of_a_non_cifar_depth_is_an_error():
    with pytest.raises(SoftpruneError, match="depth 6n\\+2"):
        paper_flops_cifar_resnet(18, 0.4)


def test_peak_memory_counts_live_activations():
    from softprune.cost import peak_memory

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    result = peak_memory(model, torch.randn(2, 3, 16, 16))
    conv1 = 2 * 8 * 16 * 16 * 4  # bytes of one float32 activation of the first conv
    assert result["peak_activation_bytes"] == 2 * conv1  # the conv output and the ReLU output, both alive
    assert result["weights_bytes"] == 4 * (8 * 3 * 9 + 8 + 4 * 8 + 4)


def test_profile_command_numbers_are_hand_computed(tmp_path, capsys):
    from softprune.cli import main

    out = tmp_path / "lenet.json"
    code = main(
        [
            "profile",
            "lenet5",
            "--in-channels",
            "1",
            "--batch-sizes",
            "1",
            "4",
            "--repeats",
            "2",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = __import__("json").loads(out.read_text())
    conv = 6 * 1 * 25 * 28 * 28 + 16 * 6 * 25 * 10 * 10  # conv1 at 28x28 (padding 2), conv2 at 10x10
    fc = 400 * 120 + 120 * 84 + 84 * 10
    assert report["conv_macs"] == conv and report["macs"] == conv + fc
    assert report["params"] == 61706 and report["weights_bytes"] == 61706 * 4
    assert report["peak_activation_bytes"] >= 2 * 6 * 28 * 28 * 4
    rows = report["latency"]["cpu"]
    assert set(rows) == {"1", "4"}
    for row in rows.values():
        assert 0 < row["median_ms"] < math.inf and row["best_format"] in ("contiguous", "channels_last")
    assert rows["4"]["peak_activation_bytes"] > rows["1"]["peak_activation_bytes"]
    printed = capsys.readouterr().out
    assert "MACs per image" in printed and f"{conv + fc:,}" in printed


def test_profile_of_a_saved_compact_model(tmp_path):
    from softprune.cli import main

    model = softprune.create_model("resnet20")
    pruner = softprune.Pruner(model, "sfp", 0.5, 1)
    pruner.step()
    small = pruner.compact()
    softprune.save(small, tmp_path / "small.safetensors")
    out = tmp_path / "p.json"
    assert (
        main(
            [
                "profile",
                str(tmp_path / "small.safetensors"),
                "--batch-sizes",
                "2",
                "--repeats",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = __import__("json").loads(out.read_text())
    assert report["params"] == sum(p.numel() for p in small.parameters())
    assert report["macs"] == softprune.profile(small, torch.randn(1, 3, 32, 32))["macs"]


def test_profile_of_an_unknown_target_is_an_error(capsys):
    from softprune.cli import main

    assert main(["profile", "resnet21"]) == 2
    assert "unknown model 'resnet21'" in capsys.readouterr().err


def test_attention_macs_are_counted_in_nn_multiheadattention():
    attn = nn.MultiheadAttention(16, 4, batch_first=True).eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    x = torch.randn(1, 5, 16)
    macs = measure_macs(Wrap(), x)["macs"]
    projections = 5 * 16 * 48 + 5 * 16 * 16  # q, k, v in one product, and out_proj
    attention = 2 * 4 * 5 * 5 * 4  # q k^T and attn v, per head
    assert macs == projections + attention
    assert torch.backends.mha.get_fastpath_enabled()  # restored after counting


class _TokenUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, pair):
        x, token = pair
        return self.fc(torch.cat([token, x], 1))


class _ClassToken(nn.Module):
    """A parameter's view handed to a submodule (PiT's class token): made without grad, it has
    requires_grad and no grad_fn, which the FLOP counter's module tracker cannot hook."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, 4))
        self.user = _TokenUser()

    def forward(self, x):
        return self.user((x, self.token.expand(x.shape[0], -1, -1)))


def test_macs_of_a_model_handing_a_parameter_view_to_a_submodule():
    # 4 tokens (3 + the class token) x 4 x 4 multiply-accumulates per sample
    assert measure_macs(_ClassToken(), torch.randn(2, 3, 4)) == {"macs": 64, "conv_macs": 0}
