"""The network (its layers, defaults from Recipe, build_model), its parameter and MAC
counts, the exercise's rule checklist and the receptive field, table against gradient."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

import helpers

SMALL = (16, 32, 48, 64)


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
    assert feats.shape == (1, 64, 4, 4)


def test_net_takes_raw_pixels():
    model = helpers.Net(SMALL).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(model(x), model(x.float()))


def test_depths_add_residual_blocks():
    def blocks(model):
        return sum(isinstance(m, helpers.Residual) for m in model.modules())

    assert blocks(helpers.Net(SMALL, depths=(0, 1, 1, 1))) == 3
    assert blocks(helpers.Net(SMALL, depths=(2, 1, 2, 3))) == 8
    assert blocks(helpers.Net(SMALL, depths=(1, 0, 1, 1))) == 3


def test_net_without_c2_blocks_has_no_dilated_conv_and_fails_that_rule():
    """Net builds D2 = 0 (C2 is then its downsampler alone); check_rules says what is lost."""
    model = helpers.Net(SMALL, depths=(1, 0, 1, 1)).eval()
    assert len(model.c2) == 1
    assert not any(max(m.dilation) > 1 for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert _failing(model) == {"dilated conv"}
    df = helpers.check_rules(model).set_index("rule")
    assert df.loc["dilated conv", "measured"] == "0"
    # RF by hand: stem 3, C1 block 7, C2 downsample 9 (jump 2), C3 downsample 13 (jump 4),
    # block 29, C4 downsample 37 (jump 8), block 69: still > 44 without the dilation
    assert _final_rf(model) == helpers.empirical_receptive_field(model) == 69
    assert df.loc["receptive field", "measured"] == "69"


def test_recipe_refuses_the_d2_that_net_allows():
    with pytest.raises(ValueError) as e:
        helpers.Recipe(depths=(1, 0, 1, 1))
    assert str(e.value) == ("Recipe.depths: expected four integers in [0, 64] with D2 >= 1, "
                            "got (1, 0, 1, 1)")


def test_net_defaults_are_the_recipes():
    params = inspect.signature(helpers.Net).parameters
    recipe = helpers.Recipe()
    assert params["widths"].default == recipe.widths == (32, 64, 96, 128)
    assert params["depths"].default == recipe.depths == (1, 1, 1, 1)
    assert params["act"].default == recipe.act == "gelu"
    assert params["dilated_downs"].default == recipe.dilated_downs == 0
    default, built = helpers.Net(), helpers.build_model(recipe)
    assert {k: v.shape for k, v in default.state_dict().items()} == \
        {k: v.shape for k, v in built.state_dict().items()}
    assert any(isinstance(m, nn.GELU) for m in default.modules())
    for part in (helpers.ConvBNAct, helpers.DepthwiseSeparable):
        assert inspect.signature(part).parameters["act"].default == recipe.act


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


def test_count_parameters_counts_frozen_ones_too():
    model = helpers.Net(SMALL)
    for p in model.c1.parameters():
        p.requires_grad_(False)
    assert helpers.count_parameters(model) == _manual_params(model)


def test_no_maxpool_in_net():
    assert not any(isinstance(m, nn.MaxPool2d) for m in helpers.Net().modules())


def test_residual_adds_identity():
    block = helpers.Residual(nn.Conv2d(2, 2, 1, bias=False))
    nn.init.zeros_(block.body[0].weight)
    x = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(block(x), x)


def test_depthwise_separable_structure():
    ds = helpers.DepthwiseSeparable(8, 16, stride=2)
    dw, pw = ds[0], ds[1]  # nothing between the depthwise and the pointwise conv
    assert isinstance(dw, nn.Conv2d) and isinstance(pw, nn.Conv2d)
    assert dw.groups == 8 and dw.kernel_size == (3, 3) and dw.stride == (2, 2)
    assert pw.kernel_size == (1, 1) and pw.out_channels == 16 and pw.groups == 1
    assert ds(torch.randn(1, 8, 8, 8)).shape == (1, 16, 4, 4)
    assert sum(p.numel() for p in ds.parameters()) == 8 * 9 + 8 * 16 + 2 * 16


@pytest.mark.parametrize("act, kind", [("relu", nn.ReLU), ("gelu", nn.GELU)])
def test_activation_option(act, kind):
    model = helpers.Net(SMALL, act=act)
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.GELU))]
    assert acts and all(isinstance(m, kind) for m in acts)


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
    assert len(df) == 8 + 3  # seven rules, the count of downsamplers, one row per downsampler
    assert df["passed"].all(), df.to_string()


def test_each_downsampler_has_its_own_row():
    df = helpers.check_rules(helpers.Net(SMALL)).set_index("rule")
    rows = [r for r in df.index if r.startswith("downsampling: ")]
    assert rows == ["downsampling: C2 downsample", "downsampling: C3 downsample, depthwise",
                    "downsampling: C4 downsample, depthwise"]
    assert df.loc["downsampling layers", "measured"] == "3"
    assert "conv 3x3, stride 2" in df.loc[rows[0], "measured"]
    assert "32x32 -> 16x16" in df.loc[rows[0], "measured"]
    assert "depthwise conv 3x3, stride 2" in df.loc[rows[2], "measured"]
    assert "8x8 -> 4x4" in df.loc[rows[2], "measured"]


def test_dilated_downsampler_is_named_and_allowed():
    """The extra credit: C4 shrinks 8x8 -> 4x4 by a 3x3 depthwise conv of dilation 2, no padding,
    the same net as the default's with that conv's stride, dilation and padding changed."""
    torch.manual_seed(0)
    by_hand = helpers.Net(SMALL).eval()
    down = by_hand.c4[0][0]
    down.stride, down.dilation, down.padding = (1, 1), (2, 2), (0, 0)
    torch.manual_seed(0)
    model = helpers.Net(SMALL, dilated_downs=1).eval()
    x = torch.randn(2, 3, 32, 32) * 60 + 120
    with torch.no_grad():
        assert torch.equal(model(x), by_hand(x))
    df = helpers.check_rules(model).set_index("rule")
    assert df["passed"].all(), df.to_string()
    row = df.loc["downsampling: C4 downsample, depthwise", "measured"]
    assert "stride 1, dilation 2: 8x8 -> 4x4" in row
    assert helpers.count_macs(model) == helpers.count_macs(helpers.Net(SMALL))


def test_two_dilated_downsamplers_keep_larger_maps():
    """dilated_downs=2: C3 16x16 -> 12x12 and C4 12x12 -> 8x8, same parameters, more
    multiply-adds, every rule holding; the receptive field as the gradient measures it."""
    model, default = helpers.Net(dilated_downs=2), helpers.Net()
    df = helpers.check_rules(model).set_index("rule")
    assert df["passed"].all(), df.to_string()
    assert "16x16 -> 12x12" in df.loc["downsampling: C3 downsample, depthwise", "measured"]
    assert "12x12 -> 8x8" in df.loc["downsampling: C4 downsample, depthwise", "measured"]
    assert model.features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (8, 8)
    assert helpers.count_parameters(model) == helpers.count_parameters(default) == 189_770
    assert helpers.count_macs(model) > helpers.count_macs(default)
    assert _final_rf(model) == helpers.empirical_receptive_field(model) == 53
    assert helpers.build_model(helpers.Recipe(dilated_downs=2)).c3[0][0].dilation == (2, 2)


def test_small_net_passes_every_rule():
    assert _failing(helpers.Net(SMALL)) == set()


def test_maxpool_breaks_only_that_rule():
    model = helpers.Net(SMALL)
    model.c4 = nn.Sequential(model.c4, nn.MaxPool2d(1))  # keeps the size
    assert _failing(model) == {"no MaxPooling"}


def test_maxpool_downsampler_breaks_downsampling_rule():
    model = helpers.Net(SMALL)
    model.c2[0] = nn.Sequential(helpers.ConvBNAct(16, 32), nn.MaxPool2d(2))
    assert _failing(model) == {"no MaxPooling", "downsampling layers", "downsampling: C2 c2.0.1"}
    df = helpers.check_rules(model).set_index("rule")
    assert df.loc["downsampling: C2 c2.0.1", "measured"].startswith("MaxPool2d 2x2, stride 2")


def test_a_fourth_downsampler_breaks_the_count_only():
    model = helpers.Net(SMALL)
    model.c4[0] = nn.Sequential(model.c4[0], helpers.ConvBNAct(64, 64, stride=2))
    assert _failing(model) == {"downsampling layers"}
    df = helpers.check_rules(model).set_index("rule")
    assert df.loc["downsampling layers", "measured"] == "4"


def test_a_downsampler_must_be_a_3x3_kernel_strided_or_dilated():
    model = helpers.Net(SMALL)  # C4 shrinks 8x8 to 4x4 with a dilated 5x5 (spanning 9x9)
    model.c4[0][0] = nn.Conv2d(48, 48, 5, dilation=2, padding=2, groups=48, bias=False)
    assert _failing(model) == {"downsampling layers", "downsampling: C4 downsample, depthwise"}
    model.c4[0][0] = nn.Conv2d(48, 48, 3, dilation=2, groups=48, bias=False)  # 8x8 -> 4x4
    assert _failing(model) == set()


def test_missing_dilation_breaks_only_that_rule():
    model = helpers.Net(SMALL)
    model.c2[1].body[0] = helpers.ConvBNAct(32, 32)
    assert _failing(model) == {"dilated conv"}


def test_too_many_parameters():
    model = helpers.Net((64, 128, 256, 384), (0, 1, 1, 1))
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
    assert not rules["downsampling layers"]
    df = helpers.check_rules(_Plain()).set_index("rule")
    assert df.loc["downsampling layers", "measured"] == "0"
    assert df.loc["receptive field", "measured"] == "7"


@pytest.mark.parametrize("pool, counts", [
    (nn.AvgPool2d(32), True),                # its window is the whole 32x32 map
    (nn.AvgPool2d(2, stride=32), False),     # 1x1 out, but from the top-left 2x2 pixels only
    (nn.AdaptiveAvgPool2d(2), False)])
def test_global_average_pooling_is_any_pool_that_averages_the_whole_map(pool, counts):
    model = _Plain()
    model.gap = pool
    model.out = nn.Sequential(nn.Flatten(), nn.LazyLinear(10))
    assert _rules(model)["global average pooling"] == counts


def test_check_rules_does_not_change_training_mode():
    model = helpers.Net(SMALL).train()
    helpers.check_rules(model)
    assert model.training


# --------------------------------------------------------------------------- receptive field
def _final_rf(model, size: int = 32) -> int:
    return int(helpers.receptive_field_table(model, size)["rf_out"].iloc[-1])


def test_rf_two_3x3_convs():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    table = helpers.receptive_field_table(model)
    assert table["rf_out"].tolist() == [3, 5]
    assert table["n_out"].tolist() == [32, 32]
    assert helpers.empirical_receptive_field(model) == 5


def test_rf_stride_2_then_3x3():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, stride=2, padding=1),
                          nn.Conv2d(2, 2, 3, padding=1))
    table = helpers.receptive_field_table(model)
    assert table["rf_out"].tolist() == [3, 7]
    assert table["rf_in"].tolist() == [1, 3]
    assert table["jump_in"].tolist() == [1, 2]
    assert table["jump_out"].tolist() == [2, 2]
    assert table["n_out"].tolist() == [16, 16]
    assert helpers.empirical_receptive_field(model) == 7


def test_rf_dilated_3x3():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=2, dilation=2))
    table = helpers.receptive_field_table(model)
    assert table["rf_out"].tolist() == [5]
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
    assert table["rf_out"].tolist() == [3, 5, 13]
    assert helpers.empirical_receptive_field(model) == 13


def test_empirical_receptive_field_of_a_net_blind_to_its_input_says_so():
    blind = nn.Conv2d(3, 4, 3, padding=1)
    nn.init.zeros_(blind.weight)
    with pytest.raises(ValueError, match="gradient is zero everywhere"):
        helpers.empirical_receptive_field(blind, 16)


def test_rf_default_net_table_and_empirical_agree():
    model = helpers.Net()
    table = helpers.receptive_field_table(model)
    # conv rows: c1 stem 1 + block 2; c2 down 1 + block 2; c3 down 2 + block 4; c4 down 2 +
    # block 4. RF by hand: stem 3, C1 block +2 +2 = 7; C2 stride-2 conv +2 = 9 (jump 2);
    # dilated 3x3 (k_eff 5) +4*2 = 17, 3x3 +2*2 = 21; C3 depthwise stride 2 +2*2 = 25 (jump 4),
    # block +8 +8 = 41; C4 depthwise stride 2 +8 = 49 (jump 8), block +16 +16 = 81.
    assert len(table) == 18
    assert table["n_out"].iloc[0] == 32 and table["n_out"].iloc[-1] == 4
    assert table["dilation"].max() == 2
    rf = int(table["rf_out"].iloc[-1])
    assert rf == 81 > 44
    assert helpers.empirical_receptive_field(model) == rf


def test_rf_table_columns_and_readable_names():
    table = helpers.receptive_field_table(helpers.Net(SMALL, depths=(1, 1, 1, 1)))
    assert list(table.columns) == ["block", "layer", "kind", "kernel", "stride", "dilation",
                                   "padding", "n_in", "n_out", "jump_in", "jump_out", "rf_in",
                                   "rf_out", "module"]
    assert table["block"].tolist() == ["C1"] * 3 + ["C2"] * 3 + ["C3"] * 6 + ["C4"] * 6
    rows = dict(zip(table["module"], table["layer"]))
    assert rows["c1.0.0"] == "stem"
    assert rows["c1.1.body.1.0"] == "residual 1, conv 2"
    assert rows["c2.0.0"] == "downsample"
    assert rows["c3.0.0"] == "downsample, depthwise"
    assert rows["c3.0.1"] == "downsample, pointwise"
    assert rows["c4.1.body.1.0"] == "residual 1, separable 2, depthwise"
    # each row starts where the previous one ended
    assert table["rf_in"].tolist()[1:] == table["rf_out"].tolist()[:-1]
    assert table["jump_in"].tolist()[1:] == table["jump_out"].tolist()[:-1]
    assert table["n_in"].tolist()[1:] == table["n_out"].tolist()[:-1]
    assert (table["jump_out"] == table["jump_in"] * table["stride"]).all()


def test_rf_table_without_the_skips_names_one_stem():
    model = helpers.Net(SMALL, depths=(1, 1, 1, 1))
    for block in (model.c1, model.c2, model.c3, model.c4):  # the notebook's exercise 5
        for i in range(1, len(block)):
            block[i] = block[i].body
    rows = dict(zip(*[helpers.receptive_field_table(model)[c] for c in ("module", "layer")]))
    assert list(rows.values()).count("stem") == 1 and rows["c1.0.0"] == "stem"
    assert rows["c1.1.0.0"] == rows["c1.1.1.0"] == "conv"


def test_rf_table_of_other_models_keeps_module_paths():
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1))
    table = helpers.receptive_field_table(model)
    assert table["block"].tolist() == ["-"] and table["layer"].tolist() == ["0"]


def test_rf_wider_than_the_measuring_input_is_measured_whole():
    """A net whose field exceeds 128 pixels: the gradient's extent was cut at 128."""
    model = helpers.Net(SMALL, depths=(3, 3, 3, 3))
    assert _final_rf(model) > 128
    assert helpers.empirical_receptive_field(model) == _final_rf(model)


def test_rf_grows_with_depth():
    base = _final_rf(helpers.Net(SMALL, depths=(0, 1, 1, 1)))
    # one more residual block of two 3x3 convs at 32x32 (jump 1) adds 2 + 2
    assert _final_rf(helpers.Net(SMALL, depths=(1, 1, 1, 1))) == base + 4


def test_build_model_follows_the_recipe():
    r = helpers.Recipe(widths=SMALL, depths=(1, 1, 2, 1), act="relu")
    model = helpers.build_model(r, num_classes=3, mean=(0.5,) * 3, std=(0.2,) * 3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    ref = helpers.Net(SMALL, (1, 1, 2, 1), 3, act="relu")
    assert helpers.count_parameters(model) == helpers.count_parameters(ref)
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    torch.testing.assert_close(model.norm.shift.flatten(), torch.full((3,), -2.5))


def test_build_model_takes_a_recipe_made_from_lists():
    """A recipe read back from JSON holds lists: they become tuples and build the same net."""
    r = helpers.Recipe(widths=list(SMALL), depths=[1, 1, 2, 1])
    assert r.widths == SMALL and r.depths == (1, 1, 2, 1)
    assert r == helpers.Recipe(widths=SMALL, depths=(1, 1, 2, 1))
    model = helpers.build_model(r)
    assert helpers.count_parameters(model) == helpers.count_parameters(
        helpers.Net(SMALL, (1, 1, 2, 1)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_model_is_measured_where_it_lives_on_the_gpu():
    """The notebook moves the net to the GPU before measuring it; each measure works there and
    leaves it there."""
    model = helpers.Net().cuda()
    assert helpers.empirical_receptive_field(model) == _final_rf(model) == 81
    assert helpers.check_rules(model)["passed"].all()
    assert helpers.count_macs(model) == helpers.count_macs(helpers.Net())
    assert next(model.parameters()).is_cuda
