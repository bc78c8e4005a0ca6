"""The paper-scale architectures: width-parameterised ResNet-18/50 and a ViT whose embedding
dimension is the load axis, built as the phase-zoo papers define them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zoo.architectures import build_model
from zoo.errors import ZooError
from zoo.weights import flatten, tensor_index, unflatten


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnets_at_width_64_have_the_standard_parameter_counts():
    assert n_params(build_model({"name": "resnet", "width": 64, "depth": 18}, (3, 32, 32), 10)) == 11_173_962
    assert n_params(build_model({"name": "resnet", "width": 64, "depth": 50}, (3, 32, 32), 10)) == 23_520_842


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_layout_stem_stages_no_bias_no_max_pool(depth):
    w = 4
    model = build_model({"name": "resnet", "width": w, "depth": depth}, (3, 32, 32), 10, seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    stem = convs[0]
    assert (stem.kernel_size, stem.stride, stem.out_channels) == ((3, 3), (1, 1), w)
    assert all(c.bias is None for c in convs) and not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    expansion = 4 if depth == 50 else 1
    assert model[-1].in_features == 8 * w * expansion  # stages w, 2w, 4w, 8w
    stages = {w * k for k in (1, 2, 4, 8)}
    assert {c.out_channels for c in convs} == stages | {expansion * s for s in stages}
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    features = nn.Sequential(*list(model)[:-3])(x)
    assert features.shape == (2, 8 * w * expansion, 4, 4)  # three stride-2 stages: 32 -> 4


@pytest.mark.parametrize("spec", [{"name": "resnet", "width": 2, "depth": 18},
                                  {"name": "vit", "width": 32, "depth": 2, "heads": 4, "patch_size": 8}])
def test_initialisation_depends_on_the_seed_alone_and_round_trips(spec):
    torch.manual_seed(1)
    a = build_model(spec, (3, 32, 32), 10, seed=5)
    torch.manual_seed(2)  # the global RNG plays no part
    b = build_model(spec, (3, 32, 32), 10, seed=5)
    c = build_model(spec, (3, 32, 32), 10, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].std() > 0)
    vector, index = flatten(a), tensor_index(a)  # stored and rebuilt as any zoo model is
    rebuilt = build_model(spec, (3, 32, 32), 10)
    rebuilt.load_state_dict(unflatten(vector, index))
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(rebuilt.eval()(x), a.eval()(x))


def test_vit_width_is_the_embedding_dimension_and_bad_shapes_are_named():
    small = build_model({"name": "vit", "width": 32, "depth": 2, "heads": 4}, (3, 32, 32), 10)
    large = build_model({"name": "vit", "width": 128, "depth": 2, "heads": 4}, (3, 32, 32), 10)
    assert small.embed.out_channels == 32 and large.head.in_features == 128 and n_params(large) > 10 * n_params(small)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ZooError, match="width 30 is not divisible by heads 4"):
        build_model({"name": "vit", "width": 30, "heads": 4}, (3, 32, 32), 10)
    with pytest.raises(ZooError, match="patch size 5 does not tile"):
        build_model({"name": "vit", "width": 32, "patch_size": 5}, (3, 32, 32), 10)
    with pytest.raises(ZooError, match="needs image inputs"):
        build_model({"name": "resnet", "width": 4}, (64,), 10)
