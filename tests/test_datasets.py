"""Data sets: fixed documented splits, the IDX reader on fixture files, clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from zoo.datasets import describe_dataset, load_dataset, read_idx
from zoo.errors import ZooError


def test_digits_split_is_fixed_disjoint_and_documented_size():
    data = load_dataset({"name": "digits", "test_fraction": 0.2, "split_seed": 0, "train_size": None})
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    again = load_dataset({"name": "digits", "split_seed": 0, "test_fraction": 0.2, "train_size": None})
    assert torch.equal(data.x_test, again.x_test)
    train_rows = {tuple(r) for r in data.x_train.reshape(len(data.x_train), -1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in data.x_test.reshape(len(data.x_test), -1).tolist())
    assert overlap < 5  # sklearn's digits hold a few exact duplicate images; the split itself is disjoint by index


def test_digits_are_sklearns_digits_read_without_importing_sklearn():
    """The loader reads the digits.csv.gz that scikit-learn ships (importing sklearn costs seconds
    of every job's start-up): the same 1,797 images and labels as `load_digits()`."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from zoo.datasets import _digits_values

    values, bunch = _digits_values(), load_digits()
    assert np.array_equal(values[:, :-1], bunch.data) and np.array_equal(values[:, -1].astype(int), bunch.target)
    data = load_dataset({"name": "digits"})
    x = torch.cat([data.x_train, data.x_test]).reshape(-1, 64) * 16
    assert sorted(map(tuple, x.int().tolist())) == sorted(map(tuple, bunch.data.astype(int).tolist()))
    code = "import sys; from zoo.datasets import load_dataset; load_dataset({'name': 'digits'}); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_train_size_keeps_a_prefix_of_the_fixed_order():
    full = load_dataset({"name": "digits", "train_size": None})
    small = load_dataset({"name": "digits", "train_size": 100})
    assert torch.equal(small.x_train, full.x_train[:100]) and torch.equal(small.x_test, full.x_test)
    with pytest.raises(ZooError, match="train_size 5000 exceeds"):
        load_dataset({"name": "digits", "train_size": 5000})


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_reads_exactly_the_bytes_written(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", images)
    write_idx(tmp_path / "b", images[:, 0, 0], gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "b"), images[:, 0, 0])
    (tmp_path / "c").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(ZooError, match="truncated"):
        read_idx(tmp_path / "c")
    # the first items only (all of them when fewer are stored); a short file is still refused
    assert np.array_equal(read_idx(tmp_path / "a.gz", limit=3), images[:3])
    assert np.array_equal(read_idx(tmp_path / "b", limit=100), images[:, 0, 0])
    assert np.array_equal(read_idx(tmp_path / "c", limit=2), [1, 2])
    with pytest.raises(ZooError, match="truncated"):
        read_idx(tmp_path / "c", limit=3)
    (tmp_path / "d").write_bytes(bytes([0, 0, 8, 2, 0, 0]))
    with pytest.raises(ZooError, match="truncated"):
        read_idx(tmp_path / "d", limit=1)


def test_fashion_mnist_from_a_fixture_folder(tmp_path):
    rng = np.random.default_rng(1)
    train_x, test_x = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test_x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    data = load_dataset({"name": "fashion-mnist", "path": str(tmp_path), "train_size": 10})
    assert data.x_train.shape == (10, 1, 28, 28) and data.x_test.shape == (5, 1, 28, 28)
    fewer = load_dataset({"name": "fashion-mnist", "path": str(tmp_path), "train_size": 4, "test_size": 2})
    assert torch.equal(fewer.x_train, data.x_train[:4]) and torch.equal(fewer.x_test, data.x_test[:2])
    assert fewer.y_train.tolist() == [0, 1, 2, 3] and fewer.y_test.tolist() == [0, 1]
    with pytest.raises(ZooError, match="train_size 13 exceeds"):
        load_dataset({"name": "fashion-mnist", "path": str(tmp_path), "train_size": 13})
    expected = (torch.tensor(train_x[:10], dtype=torch.float32) / 255 - 0.2860) / 0.3530
    assert torch.allclose(data.x_train[:, 0], expected)
    assert data.y_train.tolist() == list(range(10))


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(ZooError, match="apt-get install dataset-fashion-mnist"):
        load_dataset({"name": "fashion-mnist", "path": str(tmp_path / "nowhere"), "train_size": None})


def test_teacher_student_is_deterministic_and_balanced_enough():
    spec = {"name": "teacher-student", "n_features": 16, "n_classes": 5, "teacher_width": 32, "train_size": 3000,
            "test_size": 1000, "label_noise": 0.0, "data_seed": 3}
    a, b = load_dataset(spec), load_dataset(dict(spec))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    counts = torch.bincount(a.y_train, minlength=5)
    assert counts.min() > 0.3 * counts.float().mean()  # centred teacher: no class starves
    assert describe_dataset(spec) == ((16,), 5)
