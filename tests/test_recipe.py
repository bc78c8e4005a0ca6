"""The paper recipe's training options on the reference path: gradient accumulation, rotation
augmentation, bf16 autocast, channels-last layout, OneCycle; and their routing off the stack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generators.plan import shape_key
from generators.training import rotate, rotate_by, train
from zoo.catalog import parse_zoo
from zoo.datasets import load_dataset

from .test_training import ZOO


def spec_with(architecture=None, **training):
    body = dict(ZOO, training=dict(ZOO["training"], epochs=1, **training), checkpoints=[0, 1])
    if architecture:
        body.update(architecture=architecture, load={"name": "width", "values": [architecture["width"]]})
    return parse_zoo("t", body).models()[0]


def test_gradient_accumulation_gives_the_full_batch_step():
    whole = spec_with(batch_size=64)
    chunked = spec_with(batch_size=64, micro_batch_size=16)
    assert whole.model_id != chunked.model_id
    data = load_dataset(whole.dataset)
    a, b = train(whole, data), train(chunked, data)
    assert np.allclose(a.checkpoints[1], b.checkpoints[1], atol=1e-5)  # the same steps, to float rounding
    assert not np.array_equal(a.checkpoints[1], a.checkpoints[0])
    assert abs(a.curves[1]["train_loss"] - b.curves[1]["train_loss"]) < 1e-5


def test_rotation_turns_each_image_by_its_own_angle():
    x = torch.randn(3, 2, 8, 8)
    assert torch.allclose(rotate(x, 0.0, torch.Generator().manual_seed(0)), x, atol=1e-6)
    quarter = rotate_by(x, torch.full((3,), torch.pi / 2))  # grid points land on pixel centres
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    mixed = rotate_by(x, torch.tensor([0.0, torch.pi / 2, torch.pi]))
    assert torch.allclose(mixed[0], x[0], atol=1e-6) and torch.allclose(mixed[2], x[2].flip(1, 2), atol=1e-5)
    a, b = (rotate(x, 15.0, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b) and not torch.allclose(a, x)


def test_a_rotating_cnn_trains_deterministically_off_the_stack():
    spec = spec_with({"name": "cnn", "width": 4}, augmentation="flip-crop-rotate", rotation_degrees=15)
    assert shape_key(spec) is None
    data = load_dataset(spec.dataset)
    a, b = train(spec, data), train(spec, data)
    assert np.array_equal(a.checkpoints[1], b.checkpoints[1])
    plain = train(spec_with({"name": "cnn", "width": 4}, augmentation="flip-crop"), data)
    assert not np.array_equal(a.checkpoints[1], plain.checkpoints[1])


@pytest.mark.parametrize("option", [{"precision": "bf16"}, {"channels_last": True}])
def test_bf16_autocast_and_channels_last_train_close_to_float32(option):
    base = spec_with({"name": "cnn", "width": 4}, schedule="onecycle", lr=0.1)
    other = spec_with({"name": "cnn", "width": 4}, schedule="onecycle", lr=0.1, **option)
    assert shape_key(other) is None
    data = load_dataset(base.dataset)
    a, b = train(base, data), train(other, data)
    gap = abs(a.curves[1]["test_acc"] - b.curves[1]["test_acc"])
    assert np.isfinite(b.checkpoints[1]).all() and gap < 0.1
    if "channels_last" in option:  # the same arithmetic in another memory order
        assert np.allclose(a.checkpoints[1], b.checkpoints[1], atol=1e-4)
    else:  # bfloat16 rounds the forward pass: close, not equal
        assert not np.array_equal(a.checkpoints[1], b.checkpoints[1])
