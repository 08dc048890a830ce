"""The network, its parameter/MAC counts, the rule checklist and the receptive field."""
from __future__ import annotations

import torch
import torch.nn as nn

import helpers

SMALL = (16, 32, 64, 96)


def _rules(model) -> dict:
    df = helpers.check_rules(model)
    return dict(zip(df["rule"], df["passed"]))


def _failing(model) -> set:
    return {rule for rule, ok in _rules(model).items() if not ok}


def _manual_params(model) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += m.out_channels * (m.in_channels // m.groups) * kh * kw
            total += m.out_channels if m.bias is not None else 0
        elif isinstance(m, nn.BatchNorm2d):
            total += 2 * m.num_features
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features + m.out_features
    return total


# --------------------------------------------------------------------------- model
def test_net_output_shape():
    model = helpers.Net().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert helpers.Net(SMALL, num_classes=3).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_feature_map_is_4x4():
    feats = helpers.Net(SMALL).eval().features(torch.zeros(1, 3, 32, 32))
    assert feats.shape == (1, 96, 4, 4)


def test_default_parameter_count():
    model = helpers.Net()
    n = helpers.count_parameters(model)
    assert n == _manual_params(model)
    assert n == sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 200_000


def test_small_widths_have_fewer_parameters():
    small = helpers.Net(SMALL)
    n = helpers.count_parameters(small)
    assert n == _manual_params(small)
    assert n < 50_000 and n < helpers.count_parameters(helpers.Net())


def test_count_parameters_skips_frozen():
    model = helpers.Net(SMALL)
    for p in model.c1.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.c1.parameters())
    assert helpers.count_parameters(model) == _manual_params(model) - frozen


def test_no_maxpool_in_net():
    assert not any(isinstance(m, nn.MaxPool2d) for m in helpers.Net().modules())


def test_residual_adds_identity():
    block = helpers.Residual(nn.Conv2d(2, 2, 1, bias=False))
    nn.init.zeros_(block.body[0].weight)
    x = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(block(x), x)


def test_depthwise_separable_structure():
    ds = helpers.DepthwiseSeparable(8, 16, stride=2, dilation=2)
    convs = [m for m in ds if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    dw, pw = convs
    assert dw.groups == 8 and dw.kernel_size == (3, 3) and dw.dilation == (2, 2)
    assert pw.kernel_size == (1, 1) and pw.out_channels == 16
    assert ds(torch.randn(1, 8, 8, 8)).shape == (1, 16, 4, 4)


# --------------------------------------------------------------------------- MACs
def test_count_macs_single_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert helpers.count_macs(conv) == 32 * 32 * 8 * 27


def test_count_macs_depthwise_and_linear():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Conv2d(3, 6, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    expected = 32 * 32 * 3 * 9 + 32 * 32 * 6 * 3 + 6 * 5
    assert helpers.count_macs(model) == expected


def test_count_macs_stride_and_input_size():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    assert helpers.count_macs(conv, input_size=16) == 8 * 8 * 4 * 27


# --------------------------------------------------------------------------- rules
def test_default_net_passes_every_rule():
    df = helpers.check_rules(helpers.Net())
    assert list(df.columns) == ["rule", "required", "measured", "passed"]
    assert len(df) == 8
    assert df["passed"].all(), df.to_string()


def test_small_net_passes_every_rule():
    assert _failing(helpers.Net(SMALL)) == set()


def test_maxpool_breaks_only_that_rule():
    model = helpers.Net(SMALL)
    model.c4 = nn.Sequential(model.c4, nn.MaxPool2d(1))  # keeps the size
    assert _failing(model) == {"no MaxPooling"}


def test_maxpool_downsampler_breaks_downsampling_rule():
    model = helpers.Net(SMALL)
    model.c1[2] = nn.Sequential(helpers.ConvBNAct(16, 32), nn.MaxPool2d(2))
    assert _failing(model) == {"no MaxPooling", "downsampling"}


def test_missing_dilation_breaks_only_that_rule():
    model = helpers.Net(SMALL)
    model.c3[0].body[0] = helpers.DepthwiseSeparable(64, 64)
    assert _failing(model) == {"dilated conv"}


def test_too_many_parameters():
    model = helpers.Net((64, 128, 256, 384))
    assert helpers.count_parameters(model) > 200_000
    assert _failing(model) == {"parameters"}


class _Plain(nn.Module):
    """c1..c3 only, plain 3x3 convs: no depthwise, no dilation, tiny receptive field."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.out = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x):
        return self.out(self.gap(self.c3(self.c2(self.c1(x)))))


def test_plain_model_fails_the_right_rules():
    rules = _rules(_Plain())
    assert rules["parameters"] and rules["no MaxPooling"] and rules["global average pooling"]
    assert not rules["C1 C2 C3 C4 then output"]
    assert not rules["depthwise separable conv"]
    assert not rules["dilated conv"]
    assert not rules["receptive field"]  # rf 7
    assert not rules["downsampling"]
    df = helpers.check_rules(_Plain()).set_index("rule")
    assert df.loc["receptive field", "measured"] == "7"


def test_check_rules_does_not_change_training_mode():
    model = helpers.Net(SMALL).train()
    helpers.check_rules(model)
    assert model.training


# --------------------------------------------------------------------------- receptive field
def _final_rf(model, size: int = 32) -> int:
    return int(helpers.receptive_field_table(model, size)["rf"].iloc[-1])


def test_rf_two_3x3_convs():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    table = helpers.receptive_field_table(model)
    assert table["rf"].tolist() == [3, 5]
    assert table["n_out"].tolist() == [32, 32]
    assert helpers.empirical_receptive_field(model) == 5


def test_rf_stride_2_then_3x3():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, padding=1),
                          nn.Conv2d(2, 2, 3, padding=1))
    table = helpers.receptive_field_table(model)
    assert table["rf"].tolist() == [3, 7]
    assert table["jump_in"].tolist() == [1, 2]
    assert table["n_out"].tolist() == [16, 16]
    assert helpers.empirical_receptive_field(model) == 7


def test_rf_dilated_3x3():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=2, dilation=2))
    table = helpers.receptive_field_table(model)
    assert table["rf"].tolist() == [5]
    assert table["dilation"].tolist() == [2]
    assert helpers.empirical_receptive_field(model) == 5


def test_rf_table_n_out_matches_real_sizes():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Conv2d(2, 2, 3, stride=2),
                          nn.Conv2d(2, 2, 3, padding=2, dilation=2))
    table = helpers.receptive_field_table(model)
    sizes, x = [], torch.zeros(1, 3, 32, 32)
    for layer in model:
        x = layer(x)
        sizes.append(x.shape[-1])
    assert table["n_out"].tolist() == sizes == [30, 14, 14]
    # rf: 3, then +2*1 = 5, then +4*2 = 13
    assert table["rf"].tolist() == [3, 5, 13]
    assert helpers.empirical_receptive_field(model) == 13


def test_rf_default_net_table_and_empirical_agree():
    model = helpers.Net()
    table = helpers.receptive_field_table(model)
    # conv rows: c1 3, c2 residual 1+2, c2 down 2, c3 residual 2+2, c3 down 2, c4 2
    assert len(table) == 16
    assert table["n_out"].iloc[0] == 32 and table["n_out"].iloc[-1] == 4
    rf = int(table["rf"].iloc[-1])
    assert rf == 67 and rf > 44
    assert helpers.empirical_receptive_field(model) == 67


def test_rf_small_net_same_as_default():
    assert _final_rf(helpers.Net(SMALL)) == 67


# --------------------------------------------------------------------------- block options
def test_mid_option_sets_the_layers_between_depthwise_and_pointwise():
    def count(model, kind):
        return sum(isinstance(m, kind) for m in model.modules())

    base = helpers.Net(SMALL)
    n_dws = count(base, helpers.DepthwiseSeparable)
    assert n_dws >= 1
    for mid, relus_lost, bns_lost in (("bn", 1, 0), ("none", 1, 1)):
        model = helpers.Net(SMALL, mid=mid)
        assert count(base, nn.ReLU) - count(model, nn.ReLU) == relus_lost * n_dws, mid
        assert count(base, nn.BatchNorm2d) - count(model, nn.BatchNorm2d) == bns_lost * n_dws
        assert _failing(model) == set(), mid
    block = helpers.DepthwiseSeparable(4, 6, mid="none")  # depthwise conv feeds pointwise
    assert isinstance(block[0], nn.Conv2d) and isinstance(block[1], nn.Conv2d)
    assert block[0].groups == 4 and block[1].kernel_size == (1, 1)


def test_zero_init_makes_every_residual_block_the_identity():
    torch.manual_seed(0)
    model = helpers.Net(SMALL, zero_init=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, helpers.Residual)]
    assert len(blocks) >= 3
    x = torch.randn(2, 3, 32, 32)
    seen = {}

    def record(mod, inp, out):
        seen[mod] = (inp[0].clone(), out.clone())

    hooks = [b.register_forward_hook(record) for b in blocks]
    model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == len(blocks)
    assert all(torch.equal(inp, out) for inp, out in seen.values())
    default = helpers.Net(SMALL).eval()  # without zero_init a block changes its input
    b = [m for m in default.modules() if isinstance(m, helpers.Residual)][0]
    z = torch.randn(1, b.body[0][0].in_channels, 16, 16)
    assert not torch.equal(b(z), z)


def test_build_model_follows_the_recipe():
    r = helpers.Recipe(widths=SMALL, mid="none", zero_init=True, dropout=0.3)
    model = helpers.build_model(r, num_classes=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert helpers.count_parameters(model) == helpers.count_parameters(
        helpers.Net(SMALL, num_classes=3, mid="none"))
    assert model.out[1].p == 0.3
