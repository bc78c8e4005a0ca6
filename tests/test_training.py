"""Training: deterministic, curves every epoch, checkpoints where declared, step budgets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from generators.training import BatchOrder, augment, batch_sizes, derive_seed, epoch_indices, train
from zoo.architectures import build_model
from zoo.catalog import Training, parse_zoo
from zoo.datasets import load_dataset
from zoo.evaluation import evaluate
from zoo.weights import flatten, sha256, unflatten

ZOO = {
    "description": "t",
    "dataset": {"name": "digits", "train_size": 300},
    "architecture": {"name": "mlp", "width": 16},
    "load": {"name": "width", "values": [16]},
    "temperature": {"name": "batch_size", "values": [32]},
    "seeds": [0, 1],
    "training": {"lr": 0.05, "momentum": 0.9, "epochs": 3},
    "checkpoints": [0, 2, 3],
}


def test_same_spec_gives_bitwise_identical_weights_and_seeds_differ():
    spec_a, spec_b = parse_zoo("t", ZOO).models()
    data = load_dataset(spec_a.dataset)
    first, second, other = train(spec_a, data), train(spec_a, data), train(spec_b, data)
    for epoch in (0, 2, 3):
        assert sha256(first.checkpoints[epoch]) == sha256(second.checkpoints[epoch])
    assert not np.array_equal(first.checkpoints[3], other.checkpoints[3])
    assert not np.array_equal(first.checkpoints[0], first.checkpoints[3])


def test_curves_cover_every_epoch_and_match_the_checkpoint():
    spec = parse_zoo("t", ZOO).models()[0]
    data = load_dataset(spec.dataset)
    result = train(spec, data)
    assert [row["epoch"] for row in result.curves] == [0, 1, 2, 3]
    assert sorted(result.checkpoints) == [0, 2, 3]
    assert result.curves[-1]["train_loss"] < result.curves[0]["train_loss"]
    from zoo.architectures import build_model

    model = build_model(spec.architecture, spec.input_shape, spec.n_classes)
    model.load_state_dict(unflatten(result.checkpoints[3], result.index))
    loss, acc = evaluate(model, data.x_test, data.y_test, spec.training.eval_batch_size)
    assert (loss, acc) == (result.curves[-1]["test_loss"], result.curves[-1]["test_acc"])


def test_cnn_with_batchnorm_and_augmentation_trains_deterministically():
    body = dict(ZOO, architecture={"name": "cnn", "width": 4}, load={"name": "width", "values": [4]})
    body["training"] = dict(ZOO["training"], augmentation="flip-crop", epochs=1)
    body["checkpoints"] = [0, 1]
    spec = parse_zoo("t", body).models()[0]
    data = load_dataset(spec.dataset)
    a, b = train(spec, data), train(spec, data)
    assert sha256(a.checkpoints[1]) == sha256(b.checkpoints[1])
    buffers = [e for e in a.index if e.kind == "buffer"]
    assert any(e.name.endswith("running_mean") for e in buffers)


def test_batch_order_without_and_with_a_step_budget():
    t = Training(epochs=2, batch_size=32)
    epoch = BatchOrder(100, t, torch.Generator().manual_seed(0)).next_epoch()
    assert [len(b) for b in epoch] == [32, 32, 32, 4] == batch_sizes(100, t)
    assert sorted(torch.cat(epoch).tolist()) == list(range(100))
    budget = Training(epochs=2, batch_size=32, steps_per_epoch=7)
    for n in (50, 1000):
        order = BatchOrder(n, budget, torch.Generator().manual_seed(0))
        first, second = order.next_epoch(), order.next_epoch()
        assert len(first) == len(second) == 7 and all(len(b) == 32 for b in first + second)
        assert batch_sizes(n, budget) == [32] * 7


@pytest.mark.parametrize("steps", [None, 7])
def test_an_epochs_indices_are_its_batches_one_after_another(steps):
    """The stacked engine reads each epoch as one index tensor (`epoch_indices`): the same
    batches, in the same order, leaving the generator and the stream where `next_epoch` does."""
    t = Training(epochs=3, batch_size=32, steps_per_epoch=steps)
    for n in (50, 100, 1000):
        generator = torch.Generator().manual_seed(3)
        order, stream = BatchOrder(n, t, torch.Generator().manual_seed(3)), epoch_indices(n, t, generator)
        for _ in range(3):
            indices, batches = next(stream), order.next_epoch()
            assert torch.equal(torch.cat(batches), indices) and [len(b) for b in batches] == batch_sizes(n, t)
            assert torch.equal(order.generator.get_state(), generator.get_state())


def test_augment_flips_and_crops_per_sample():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    assert torch.equal(augment(x, 0, torch.Generator().manual_seed(0)).flip(3).abs().sum(), x.abs().sum())
    out = augment(x, 1, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    for i in range(2):  # each output is a window of the padded (maybe flipped) input
        padded = [torch.nn.functional.pad(v, (1, 1, 1, 1)) for v in (x[i, 0], x[i, 0].flip(1))]
        windows = [p[r : r + 4, c : c + 4] for p in padded for r in range(3) for c in range(3)]
        assert any(torch.equal(out[i, 0], w) for w in windows)


def test_derived_seeds_are_distinct_streams():
    assert derive_seed(0, "init") != derive_seed(0, "data") != derive_seed(1, "init")
    assert derive_seed(5, "data") == derive_seed(5, "data")


def test_flatten_puts_parameters_first():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    vector = flatten(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert np.array_equal(vector[:6], model[0].weight.detach().reshape(-1).numpy())
    assert vector.size == n_params + 2 + 2 + 1


STACK_ZOO = {
    "description": "stack",
    "dataset": {"name": "digits", "train_size": 250},
    "architecture": {"name": "mlp", "width": 24, "activation": "tanh"},
    "load": {"name": "momentum", "values": [0.0, 0.9]},
    "temperature": {"name": "lr", "values": [0.02, 0.1]},
    "seeds": [0, 1],
    "training": {"lr": 0.05, "epochs": 2, "batch_size": 32, "weight_decay": 5e-4, "nesterov": False, "schedule": "onecycle"},
    "checkpoints": [0, 1, 2],
}


def test_stacked_training_equals_the_reference_path():
    from generators.plan import group_into_stacks
    from generators.stacked import train_stack

    specs = parse_zoo("stack", STACK_ZOO).models()
    stacks = group_into_stacks(specs)
    assert len(stacks) == 1 and len(stacks[0]) == 8  # lr, momentum and seed vary inside one stack
    data = load_dataset(specs[0].dataset)
    stacked = train_stack(specs, data)
    for spec, result in zip(specs, stacked):
        reference = train(spec, data)
        assert np.array_equal(result.checkpoints[0], reference.checkpoints[0])  # same initialisation
        assert np.abs(result.checkpoints[1] - reference.checkpoints[1]).max() < 1e-5
        assert abs(result.curves[-1]["test_acc"] - reference.curves[-1]["test_acc"]) <= 2 / len(data.y_test)
        assert [e.name for e in result.index] == [e.name for e in reference.index]
        # the stack's own evaluation equals the one-model evaluation of the stored weights
        model = build_model(spec.architecture, spec.input_shape, spec.n_classes)
        model.load_state_dict(unflatten(result.checkpoints[2], result.index))
        for split, (x, y) in {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}.items():
            loss, acc = evaluate(model, x, y)
            assert abs(result.curves[-1][f"{split}_loss"] - loss) < 1e-6 * max(1.0, loss)
            assert result.curves[-1][f"{split}_acc"] == acc


RELU_STACK_ZOO = dict(STACK_ZOO, architecture={"name": "mlp", "width": 20, "depth": 3},
                      load={"name": "weight_decay", "values": [0.0, 1e-3]},
                      training=dict(STACK_ZOO["training"], weight_decay=0.0, nesterov=True, schedule="constant",
                                    augmentation="flip-crop", crop_padding=1, momentum=0.9, steps_per_epoch=5))


def test_a_relu_stack_with_nesterov_augmentation_and_a_step_budget_equals_the_reference_path():
    from generators.stacked import train_stack

    specs = parse_zoo("relu", RELU_STACK_ZOO).models()
    data = load_dataset(specs[0].dataset)
    for spec, result in zip(specs, train_stack(specs, data)):
        reference = train(spec, data)
        assert np.array_equal(result.checkpoints[0], reference.checkpoints[0])
        assert np.abs(result.checkpoints[2] - reference.checkpoints[2]).max() < 1e-5
        for key in ("train_loss", "test_loss"):
            assert abs(result.curves[-1][key] - reference.curves[-1][key]) < 1e-5


@pytest.mark.parametrize("activation,depth,classes", [("relu", 2, 10), ("tanh", 1, 3), ("relu", 1, 16), ("tanh", 3, 17)])
def test_the_mlp_engines_written_out_gradients_equal_autograd(activation, depth, classes):
    """`_MLPStack.gradients` (hand-written backward, last layer padded to a multiple of 16) against
    torch.autograd on each model alone, as an nn.Module: every parameter's gradient."""
    from torch.nn import functional as F

    from generators.stacked import _MLPStack

    specs = parse_zoo("g", dict(STACK_ZOO, architecture={"name": "mlp", "width": 12, "depth": depth, "activation": activation},
                                dataset={"name": "teacher-student", "n_classes": classes, "n_features": 7, "train_size": 64, "test_size": 16})).models()
    stack = _MLPStack(specs, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(specs), 9, 7, generator=generator)
    y = torch.randint(0, classes, (len(specs), 9), generator=generator)
    grads = stack.gradients(x, y)
    for m, spec in enumerate(specs):
        model = stack.module(m)
        model.zero_grad()
        F.cross_entropy(model(x[m]), y[m]).backward()
        linears = [layer for layer in model if isinstance(layer, torch.nn.Linear)]
        assert len(grads) == 2 * len(linears)
        for k, layer in enumerate(linears):
            weight, bias = grads[2 * k][m, :, : layer.out_features].T, grads[2 * k + 1][m, 0, : layer.out_features]
            torch.testing.assert_close(weight, layer.weight.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bias, layer.bias.grad, rtol=1e-5, atol=1e-6)
        assert not grads[-2][m, :, classes:].any() and not grads[-1][m, 0, classes:].any()  # the padding stays zero


@pytest.mark.parametrize("architecture", [{"name": "cnn", "width": 3, "depth": 2},
                                          {"name": "cnn", "width": 2, "depth": 3, "batchnorm": False},
                                          {"name": "cnn", "width": 4, "depth": 1, "kernel_size": 5}])
def test_the_cnn_engines_written_out_gradients_equal_autograd(architecture):
    """`_CNNStack.gradients` (forward and backward kernels called directly, channels-last) against
    torch.autograd on each model alone, as an nn.Module in training mode: every parameter's
    gradient, BatchNorm's running statistics after the step, and the step counter."""
    from torch.nn import functional as F

    from generators.stacked import _CNNStack

    specs = parse_zoo("c", dict(CNN_STACK_ZOO, architecture=architecture)).models()
    stack = _CNNStack(specs, torch.device("cpu"))
    assert _CNNStack.fits(stack.layers)
    models = [copy.deepcopy(stack.module(m)).train() for m in range(len(specs))]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(specs), 9, *specs[0].input_shape, generator=generator)
    y = torch.randint(0, 10, (len(specs), 9), generator=generator)
    grads = stack.gradients(x, y)
    assert stack.steps == 1 and len(grads) == len(stack.params)
    for m, model in enumerate(models):
        F.cross_entropy(model(x[m]), y[m]).backward()
        named = dict(model.named_parameters())
        for name, grad, p in zip(stack.names, grads, stack.params):
            expected = named[name].grad
            got = grad[m].T if stack._is_linear_weight(name) else grad[m]
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        after = stack.module(m)
        for name, buffer in model.named_buffers():
            torch.testing.assert_close(dict(after.named_buffers())[name], buffer, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 1, 6, 4), (4, 6, 28, 28)])
def test_the_engines_max_pool_equals_max_pool2d_with_ties_nan_and_odd_sizes(shape):
    from torch.nn import functional as F

    from generators.stacked import as_channels_last, max_pool_2x2

    images = torch.randn(shape, generator=torch.Generator().manual_seed(0)).round()  # whole numbers: many ties
    images[0, 0, 0, :3] = float("nan")
    pooled = max_pool_2x2(as_channels_last(images))
    expected = F.max_pool2d(images, 2)  # a last odd row or column dropped
    assert pooled.shape == expected.shape and pooled.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(pooled.isnan(), expected.isnan()) and pooled.isnan().any()
    assert torch.equal(pooled.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("architecture", [{"name": "cnn", "width": 3, "depth": 2},
                                          {"name": "cnn", "width": 2, "depth": 3, "kernel_size": 4, "batchnorm": False}])
def test_a_cnn_stacks_evaluation_forward_gives_the_values_of_the_plain_layer_by_layer_one(architecture, monkeypatch):
    """Evaluation (no gradient) takes each ReLU after its max-pool, on `max_pool_2x2`; with
    gradients on, the same forward runs layer by layer with max_pool2d. Both give the same values,
    on digits (flat regions: tied windows) and on odd sizes (kernel 4 grows 8 x 8 images to 9 x 9)."""
    from generators import stacked

    pools, pool = [], stacked.max_pool_2x2
    monkeypatch.setattr(stacked, "max_pool_2x2", lambda images: pools.append(1) or pool(images))  # counted
    specs = parse_zoo("c", dict(CNN_STACK_ZOO, architecture=architecture)).models()
    stack = stacked._CNNStack(specs, torch.device("cpu"))
    data = load_dataset(specs[0].dataset)
    x = data.x_test[:50]
    with torch.no_grad():
        fast = stack.logits(x, training=False)
    assert len(pools) == architecture["depth"] - 1  # (the pool of each block but the last: the fast path ran)
    with torch.enable_grad():
        plain = stack.logits(x, training=False)
    assert len(pools) == architecture["depth"] - 1 and plain.requires_grad is False
    assert torch.equal(fast, plain)
    for m in range(len(specs)):  # and each model alone, as an nn.Module in eval mode, to float rounding
        torch.testing.assert_close(fast[m], stack.module(m).eval()(x), rtol=1e-5, atol=1e-5)


def test_gelu_mlps_stack_on_the_autograd_engine():
    from generators.stacked import _MLPStack, _Stack, train_stack

    specs = parse_zoo("gelu", dict(STACK_ZOO, architecture={"name": "mlp", "width": 8, "activation": "gelu"},
                                   training=dict(STACK_ZOO["training"], epochs=1), checkpoints=[0, 1])).models()[:2]
    assert not _MLPStack.fits(list(_Stack(specs, torch.device("cpu")).layers))
    data = load_dataset(specs[0].dataset)
    for spec, result in zip(specs, train_stack(specs, data)):
        assert np.abs(result.checkpoints[1] - train(spec, data).checkpoints[1]).max() < 1e-5


CNN_STACK_ZOO = {
    "description": "cnn stack",
    "dataset": {"name": "digits", "train_size": 200},
    "architecture": {"name": "cnn", "width": 3, "depth": 2},
    "load": {"name": "weight_decay", "values": [0.0, 5e-4]},
    "temperature": {"name": "lr", "values": [0.02, 0.1]},
    "seeds": [0],
    "training": {"lr": 0.05, "epochs": 2, "batch_size": 16, "schedule": "cosine", "augmentation": "flip-crop", "crop_padding": 1},
    "checkpoints": [0, 1, 2],
}


def test_stacked_cnns_with_batchnorm_and_augmentation_equal_the_reference_path():
    from generators.plan import group_into_stacks
    from generators.stacked import train_stack

    specs = parse_zoo("cnn", CNN_STACK_ZOO).models()
    assert [len(s) for s in group_into_stacks(specs)] == [4]  # small images and batches: stacked
    data = load_dataset(specs[0].dataset)
    for spec, result in zip(specs, train_stack(specs, data)):
        reference = train(spec, data)
        assert np.array_equal(result.checkpoints[0], reference.checkpoints[0])
        # parameters, BatchNorm running statistics and its step counter, after each epoch
        assert np.abs(result.checkpoints[1] - reference.checkpoints[1]).max() < 1e-5
        assert np.abs(result.checkpoints[2] - reference.checkpoints[2]).max() < 1e-5
        assert result.checkpoints[2][-1] == reference.checkpoints[2][-1] == 2 * 13  # num_batches_tracked
        assert abs(result.curves[-1]["test_acc"] - reference.curves[-1]["test_acc"]) <= 2 / len(data.y_test)
        model = build_model(spec.architecture, spec.input_shape, spec.n_classes)
        model.load_state_dict(unflatten(result.checkpoints[2], result.index))
        loss, acc = evaluate(model, data.x_test, data.y_test)  # eval mode: BatchNorm's running statistics
        assert abs(result.curves[-1]["test_loss"] - loss) < 1e-6 * max(1.0, loss) and result.curves[-1]["test_acc"] == acc


def test_large_convolutions_take_the_reference_path_on_a_cpu():
    from generators.plan import shape_key, stack_key

    from generators.plan import CNN_STACK_VALUES, group_into_stacks

    def zoo(width, batch):
        return parse_zoo("cnn", dict(CNN_STACK_ZOO, architecture={"name": "cnn", "width": width, "depth": 2},
                                     training=dict(CNN_STACK_ZOO["training"], batch_size=batch))).models()

    big = zoo(64, 512)[0]  # 512 x 64 x 8 x 8 values in the first feature map: two would leave the cache
    assert shape_key(big) is not None and 2 * 512 * 64 * 64 > CNN_STACK_VALUES
    assert stack_key(big) is None or torch.cuda.is_available()
    # smaller ones stack, as many models as fit within CNN_STACK_VALUES
    assert [len(s) for s in group_into_stacks(zoo(64, 128))] == [4]  # 524,288 values each
    assert [len(s) for s in group_into_stacks(zoo(64, 256))] == [2, 2]


def test_stacks_are_cut_from_the_whole_zoo_so_reruns_give_the_same_bits(tmp_path):
    from generators import jobs

    specs = parse_zoo("stack", dict(STACK_ZOO, training=dict(STACK_ZOO["training"], epochs=1), checkpoints=[0, 1])).models()
    everything = {s.model_id for s in specs}
    full = jobs.train_and_store(str(tmp_path / "a"), jobs.work_items(specs, everything))
    # a second root that first stores two models, then the rest (as after a kill)
    some = {specs[1].model_id, specs[5].model_id}
    items = jobs.work_items(specs, some)
    assert [list(i.store) for i in items] == [[specs[1].model_id, specs[5].model_id]]
    jobs.train_and_store(str(tmp_path / "b"), items)
    jobs.train_and_store(str(tmp_path / "b"), jobs.work_items(specs, everything - some))
    assert sorted(full.trained) == sorted(everything)

    from zoo.storage import Store

    for root in ("a", "b"):
        Store(tmp_path / root).write_index()
    import zoo

    prints = [dict(zoo.open(tmp_path / r).sql("select model_id || epoch k, sha256 from checkpoints").itertuples(index=False)) for r in "ab"]
    assert prints[0] == prints[1] and len(prints[0]) == 16


def test_reference_path_is_kept_when_asked(tmp_path):
    from generators import jobs

    specs = parse_zoo("t", ZOO).models()
    items = jobs.work_items(specs, {s.model_id for s in specs}, stacked=False)
    assert [len(i.models) for i in items] == [1, 1]
    report = jobs.train_and_store(str(tmp_path / "r"), items)
    data = load_dataset(specs[0].dataset)
    import zoo
    from zoo.storage import Store

    Store(tmp_path / "r").write_index()
    stored = zoo.open(tmp_path / "r").sql("select model_id, sha256 from checkpoints where epoch = 3").set_index("model_id")["sha256"]
    assert len(report.trained) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as jobs train: float sums, hence bits, depend on the thread count
    try:
        for spec in specs:
            assert stored[spec.model_id] == sha256(train(spec, data).checkpoints[3])
    finally:
        torch.set_num_threads(threads)


HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _host_reads_of_training(monkeypatch, batch_size: int, epochs: int, augmentation: str = "none") -> int:
    """How many times training reads a tensor's value back into Python (each such read waits for
    a GPU): every Tensor method that does, counted while `train` runs."""
    counted = [0]
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            counted[0] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    body = dict(ZOO, temperature={"name": "batch_size", "values": [batch_size]}, seeds=[0],
                training=dict(ZOO["training"], epochs=epochs), checkpoints=[0, epochs])
    if augmentation != "none":
        body = dict(body, architecture={"name": "cnn", "depth": 1, "width": 2},
                    training=dict(body["training"], augmentation=augmentation, crop_padding=1))
    spec = parse_zoo("t", body).models()[0]
    data = load_dataset(spec.dataset)
    counted[0] = 0
    train(spec, data)
    monkeypatch.undo()
    return counted[0]


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch):
    """GPU readiness, checked on the CPU: the number of host reads of a run depends on its epochs
    (one evaluation each) and not on its steps: 10 steps an epoch read as much as 1."""
    for augmentation in ("none", "flip-crop"):
        many = _host_reads_of_training(monkeypatch, 30, 2, augmentation)  # 10 steps an epoch
        few = _host_reads_of_training(monkeypatch, 300, 2, augmentation)  # 1 step an epoch
        longer = _host_reads_of_training(monkeypatch, 30, 4, augmentation)
        assert many == few, augmentation
        assert 0 < longer - many <= 2 * 4, augmentation  # two more epochs: their evaluations only
