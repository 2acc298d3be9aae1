"""Tests for fixnorm_param_groups: which parameter lands in which FixNorm group.

Expectations for the torchvision models are written from the architectures
themselves (layer names, which convs carry a bias), not from the code under test.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fixnorm_ext import fixnorm_param_groups


def role_by_id(groups):
    """id(param) -> role, read from the group dicts themselves (not from .roles)."""
    return {id(p): g["role"] for g in groups for p in g["params"]}


def assert_partition(model, groups):
    """Every trainable parameter is in exactly one group; nothing else is."""
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(grouped) == trainable
    assert all(g["params"] for g in groups), "empty group kept"
    names = dict(model.named_parameters())
    assert set(groups.roles) == {n for n, p in names.items() if p.requires_grad}
    role_of = role_by_id(groups)
    assert all(role_of[id(names[n])] == role for n, role in groups.roles.items())


def names_with_role(groups, role):
    return {name for name, r in groups.roles.items() if r == role}


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18(weights=None)


# ---------------------------------------------------------------- torchvision models

@pytest.mark.parametrize("arch, n_convs", [("resnet18", 20), ("resnet50", 53)])
def test_resnet(arch, n_convs):
    model = getattr(torchvision.models, arch)(weights=None)
    groups = fixnorm_param_groups(model, fc_norm=10.0)
    assert groups.method == "fx"
    assert_partition(model, groups)

    convs = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == n_convs
    assert any(name.endswith("downsample.0.weight") for name in convs)
    assert names_with_role(groups, "fixed") == convs
    assert names_with_role(groups, "classifier") == {"fc.weight"}
    assert names_with_role(groups, "other") == (
        {name for name, _ in model.named_parameters() if ".bn" in name or "downsample.1" in name
         or name.startswith("bn1.")} | {"fc.bias"})

    assert [g["role"] for g in groups] == ["fixed", "classifier", "other"]
    fixed, fc, other = groups
    assert (fixed["norm"], fixed["target_norm"], fixed["norm_dim"]) == ("fixed", None, None)
    assert (fc["norm"], fc["target_norm"], fc["norm_dim"]) == ("max", 10.0, None)
    assert fc["params"] == [model.fc.weight]
    assert other["norm"] is None
    assert all("param_names" not in g for g in groups)


def test_mobilenet_v2():
    model = torchvision.models.mobilenet_v2(weights=None)
    groups = fixnorm_param_groups(model)
    assert_partition(model, groups)
    convs = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 52
    assert any(m.groups > 1 for m in model.modules() if isinstance(m, nn.Conv2d))  # depthwise present
    assert names_with_role(groups, "fixed") == convs
    assert names_with_role(groups, "classifier") == {"classifier.1.weight"}
    assert "classifier.1.bias" in names_with_role(groups, "other")


def test_efficientnet_b0_squeeze_excitation_convs_are_not_fixed():
    model = torchvision.models.efficientnet_b0(weights=None)
    groups = fixnorm_param_groups(model)
    assert_partition(model, groups)

    se_modules = [m for m in model.modules() if isinstance(m, torchvision.ops.SqueezeExcitation)]
    assert len(se_modules) == 16
    se_convs = {f"{name}.weight" for name, m in model.named_modules()
                if isinstance(m, nn.Conv2d) and name.rsplit(".", 1)[-1] in ("fc1", "fc2")}
    assert len(se_convs) == 32
    all_convs = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(all_convs) == 81

    assert names_with_role(groups, "fixed") == all_convs - se_convs
    assert se_convs <= names_with_role(groups, "other")
    assert names_with_role(groups, "classifier") == {"classifier.1.weight"}


# ---------------------------------------------------------------- custom structures

class Mixed(nn.Module):
    """One layer for each rule, in forward order."""

    def __init__(self):
        super().__init__()
        self.conv_with_bias = nn.Conv2d(3, 8, 3, padding=1)              # bias -> other
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_then_relu = nn.Conv2d(8, 8, 3, padding=1, bias=False)  # ReLU next -> other
        self.conv_then_bn = nn.Conv2d(8, 8, 1, bias=False)               # fixed
        self.bn_b = nn.BatchNorm2d(8)
        self.conv_then_gn = nn.Conv2d(8, 8, 1, bias=False)               # fixed (functional norm)
        self.conv_bn_and_skip = nn.Conv2d(8, 8, 1, bias=False)           # also feeds an add -> other
        self.bn_c = nn.BatchNorm2d(8)
        self.proj = nn.Linear(8, 16, bias=False)                         # fixed (LayerNorm next)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)                                     # classifier
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        x = self.bn_a(self.conv_with_bias(x))
        x = F.relu(self.conv_then_relu(x))
        x = self.bn_b(self.conv_then_bn(x))
        x = F.group_norm(self.conv_then_gn(x), 2)
        y = self.conv_bn_and_skip(x)
        x = self.bn_c(y) + y
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        x = self.ln(self.proj(x))
        return self.head(self.dropout(x))


def test_mixed_model_rules():
    model = Mixed()
    groups = fixnorm_param_groups(model, fc_norm=3)
    assert_partition(model, groups)
    assert names_with_role(groups, "fixed") == {
        "conv_then_bn.weight", "conv_then_gn.weight", "proj.weight"}
    assert names_with_role(groups, "classifier") == {"head.weight"}
    assert {"conv_with_bias.weight", "conv_with_bias.bias", "conv_then_relu.weight",
            "conv_bn_and_skip.weight", "head.bias", "ln.weight", "bn_a.weight"} <= names_with_role(groups, "other")
    classifier_group = next(g for g in groups if g["role"] == "classifier")
    assert classifier_group["target_norm"] == 3.0 and isinstance(classifier_group["target_norm"], float)


def test_output_must_be_the_norms_input_and_weight_not_read_elsewhere():
    class Tricky(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Linear(4, 8, bias=False)     # output is the LayerNorm's affine weight
            self.proj = nn.Linear(4, 8, bias=False)     # -> LayerNorm, but weight also read directly
            self.clean = nn.Linear(4, 8, bias=False)    # -> LayerNorm only: fixed
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            g = self.gain(x[0])
            y = F.layer_norm(self.proj(x), (8,), weight=g) + self.proj.weight.sum()
            return self.head(y + F.layer_norm(self.clean(x), (8,)))

    roles = fixnorm_param_groups(Tricky()).roles
    assert roles["gain.weight"] == "other"
    assert roles["proj.weight"] == "other"
    assert roles["clean.weight"] == "fixed"


def test_normalized_last_linear_is_fixed_not_classifier():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.LayerNorm(8))
    groups = fixnorm_param_groups(model)
    assert groups.roles["2.weight"] == "fixed"
    assert groups.roles["0.weight"] == "other"
    assert "classifier" not in [g["role"] for g in groups]


def test_classifier_reached_through_other_ops_and_conv_subclass_is_a_layer():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 1.0

    model = nn.Sequential(MyConv(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 2), nn.Softmax(-1))
    groups = fixnorm_param_groups(model)
    assert groups.roles["0.weight"] == "fixed"
    assert groups.roles["6.weight"] == "classifier"
    assert groups.roles["4.weight"] == "other"


def test_frozen_parameters_are_left_out():
    model = Mixed()
    model.bn_a.requires_grad_(False)
    model.conv_then_bn.weight.requires_grad_(False)
    groups = fixnorm_param_groups(model)
    assert_partition(model, groups)
    assert groups.frozen == ["bn_a.weight", "bn_a.bias", "conv_then_bn.weight"]
    assert "conv_then_bn.weight" not in groups.roles
    assert "bn_a.weight" in groups.summary()


def test_tied_classifier_and_embedding_appear_once():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.body = nn.Linear(6, 6, bias=False)
            self.norm = nn.LayerNorm(6)
            self.decoder = nn.Linear(6, 10)
            self.decoder.weight = self.embed.weight

        def forward(self, idx):
            return self.decoder(self.norm(self.body(self.embed(idx))))

    model = TiedLM()
    groups = fixnorm_param_groups(model)
    assert_partition(model, groups)
    assert "decoder.weight" not in groups.roles  # named_parameters lists a tied tensor once
    assert groups.roles["embed.weight"] == "classifier"
    assert groups.roles["body.weight"] == "fixed"


def test_tied_conv_weight_is_fixed_only_if_every_use_is_normalized():
    class TiedConvs(nn.Module):
        def __init__(self, second_norm):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1, bias=False)
            self.bn_a = nn.BatchNorm2d(4)
            self.b = nn.Conv2d(4, 4, 1, bias=False)
            self.b.weight = self.a.weight
            self.after_b = nn.BatchNorm2d(4) if second_norm else nn.ReLU()

        def forward(self, x):
            return self.after_b(self.b(self.bn_a(self.a(x))))

    assert fixnorm_param_groups(TiedConvs(second_norm=True)).roles["a.weight"] == "fixed"
    assert fixnorm_param_groups(TiedConvs(second_norm=False)).roles["a.weight"] == "other"


class Branchy(nn.Module):
    """forward branches on a tensor value, so torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv_relu = nn.Conv2d(4, 4, 1, bias=False)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.sum() > 0:
            x = self.act(self.conv_relu(x))
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_registration_order():
    model = Branchy()
    with pytest.warns(UserWarning, match=r"could not trace Branchy .*registration order"):
        groups = fixnorm_param_groups(model)
    assert groups.method == "registration-order"
    assert_partition(model, groups)
    assert groups.roles == {"conv.weight": "fixed", "bn.weight": "other", "bn.bias": "other",
                            "conv_relu.weight": "other", "fc.weight": "classifier", "fc.bias": "other"}
    assert "registration order" in groups.summary()


def test_fallback_agrees_with_fx_on_resnet18(resnet18):
    class Gated(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x) if x.mean() > 0 else self.net(-x)

    traced = fixnorm_param_groups(resnet18)
    with pytest.warns(UserWarning, match="could not trace"):
        fallback = fixnorm_param_groups(Gated(resnet18))
    assert fallback.method == "registration-order"
    assert fallback.roles == {f"net.{name}": role for name, role in traced.roles.items()}


# ---------------------------------------------------------------- options

def test_fc_mode_fix_and_norm_dim(resnet18):
    groups = fixnorm_param_groups(resnet18, fc_norm=5.0, fc_mode="fix", norm_dim=0)
    by_role = {g["role"]: g for g in groups}
    assert (by_role["classifier"]["norm"], by_role["classifier"]["target_norm"]) == ("fixed", 5.0)
    assert by_role["classifier"]["norm_dim"] is None
    assert by_role["fixed"]["norm_dim"] == 0


def test_fc_norm_none_means_initial_norm(resnet18):
    groups = fixnorm_param_groups(resnet18)
    classifier = next(g for g in groups if g["role"] == "classifier")
    assert classifier["norm"] == "max" and classifier["target_norm"] is None
    assert "its value when the optimizer is built" in groups.summary()


def test_overrides_beat_automatic_decisions(resnet18):
    groups = fixnorm_param_groups(resnet18, overrides={
        "conv1": None, "layer1.0.conv2": "none", "fc": "fixed", "layer4.1.bn2": "max"})
    assert_partition(resnet18, groups)
    roles = groups.roles
    assert roles["conv1.weight"] == "other"
    assert roles["layer1.0.conv2.weight"] == "other"
    assert roles["fc.weight"] == "fixed"
    assert roles["layer4.1.bn2.weight"] == "classifier"
    assert roles["layer4.1.bn2.bias"] == "other"
    assert names_with_role(groups, "classifier") == {"layer4.1.bn2.weight"}
    assert len(names_with_role(groups, "fixed")) == 20 - 2 + 1


def test_explicit_classifier_replaces_auto_detection(resnet18):
    groups = fixnorm_param_groups(resnet18, classifier="layer4.1.conv2", fc_norm=2.0)
    assert names_with_role(groups, "classifier") == {"layer4.1.conv2.weight"}
    assert groups.roles["fc.weight"] == "other"


@pytest.mark.parametrize("kwargs, message", [
    ({"fc_mode": "bound"}, r"fc_mode must be one of \['clamp', 'fix'\], got 'bound'"),
    ({"fc_norm": 0.0}, "fc_norm must be None .* or a finite number > 0, got 0.0"),
    ({"fc_norm": -1}, "fc_norm .* got -1"),
    ({"fc_norm": math.inf}, "fc_norm .* got inf"),
    ({"fc_norm": math.nan}, "fc_norm .* got nan"),
    ({"fc_norm": True}, "fc_norm .* got True"),
    ({"fc_norm": "10"}, "fc_norm .* got '10'"),
    ({"norm_dim": 1}, "norm_dim must be None .* or 0 .* got 1"),
    ({"overrides": ["conv1"]}, "overrides must be a dict .* got list"),
    ({"overrides": {"layer9": "fixed"}}, r"overrides: ResNet has no module named 'layer9'; .*'conv1'"),
    ({"overrides": {"layer1.0.conv3": "fixed"}}, r"did you mean 'layer1\.0\.conv2', 'layer1\.0\.conv1'"),
    ({"overrides": {"layer1": "fixed"}}, r"module 'layer1' \(Sequential\) has no 'weight' parameter"),
    ({"overrides": {"fc": "fix"}}, r"overrides\['fc'\] must be one of 'fixed', 'max', 'none' or None, got 'fix'"),
    ({"classifier": "head"}, r"classifier: ResNet has no module named 'head'"),
    ({"classifier": "layer1.0.relu"}, r"classifier: module 'layer1.0.relu' \(ReLU\) has no 'weight'"),
])
def test_bad_arguments_raise_clear_errors(resnet18, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fixnorm_param_groups(resnet18, **kwargs)


def test_override_of_frozen_weight_raises():
    model = Mixed()
    model.head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="head.weight has requires_grad=False"):
        fixnorm_param_groups(model, overrides={"head": "max"})


def test_not_a_module_raises():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fixnorm_param_groups([nn.Parameter(torch.ones(2))])


# ---------------------------------------------------------------- output object

def test_summary_lists_every_parameter_and_totals(resnet18, capsys):
    groups = fixnorm_param_groups(resnet18, fc_norm=10.0, verbose=True)
    printed = capsys.readouterr().out
    assert printed.strip() == groups.summary().strip()
    lines = printed.splitlines()
    for name, role in groups.roles.items():
        row = next(line for line in lines if line.split()[1:2] == [name])
        assert row.split()[0] == role
    assert any(line.split()[:3] == ["fixed", "20", "11,166,912"] for line in lines)
    assert any(line.split()[:3] == ["classifier", "1", "512,000"] for line in lines)
    assert "clamped to at most 10" in printed
    assert repr(groups) == "FixNormParamGroups(method='fx', fixed=20, classifier=1, other=41)"


def test_groups_feed_torch_sgd():
    torch.manual_seed(0)
    model = Mixed()
    groups = fixnorm_param_groups(model)
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    assert [g["role"] for g in optimizer.param_groups] == [g["role"] for g in groups]
    before = model.head.weight.detach().clone()
    model(torch.randn(2, 3, 8, 8)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.head.weight, before)
