"""Data sets a zoo trains on, registered by name, each with a fixed and documented train/test split.

Every data set declares its options (a pydantic model, unknown options are errors), can say its
input shape and class count without loading anything (so a stored model is rebuilt without its
data), and loads as float32 / int64 tensors. Nothing downloads: each source exists offline.

| name            | source                                   | split                                     |
|-----------------|------------------------------------------|-------------------------------------------|
| digits          | sklearn's bundled 8x8 digits (1797)      | one permutation with `split_seed` (default 0): first 20% test (360), the rest train (1437) |
| fashion-mnist   | IDX files of Debian's dataset-fashion-mnist | the published 60k train / 10k test   |
| teacher-student | generated: Gaussian inputs, a random centred 2-layer ReLU teacher, label = argmax | `test_size` fresh samples after the training ones, all from `data_seed` |

`train_size` (every data set) keeps the first n training samples of the fixed order, so a smaller
training set is always a subset of a larger one.
"""

from __future__ import annotations

import functools
import math
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import ZooError

if TYPE_CHECKING:
    import torch


class Options(BaseModel):
    """Options common to every data set."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    train_size: int | None = Field(None, ge=1, description="keep the first n training samples")


@dataclass(frozen=True)
class Data:
    """A loaded data set: inputs (N, *input_shape) float32, labels (N,) int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class DatasetType:
    name: str
    options: type[Options]
    describe: Callable[[Options], tuple[tuple[int, ...], int]]  # -> (input_shape, n_classes)
    load: Callable[[Options], Data]
    is_image: bool


DATASETS: dict[str, DatasetType] = {}


def register_dataset(name: str, options: type[Options], describe, is_image: bool):
    """Register a loader under `name`: `@register_dataset("digits", DigitsOptions, ...)`."""

    def wrap(load):
        DATASETS[name] = DatasetType(name, options, describe, load, is_image)
        return load

    return wrap


def get_dataset_type(name: str) -> DatasetType:
    try:
        return DATASETS[name]
    except KeyError:
        raise ZooError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def load_dataset(spec: dict) -> Data:
    """Load the data set that a resolved spec ({"name": ..., **options}) names, cached per process."""
    return _load_cached(json.dumps(spec, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _load_cached(key: str) -> Data:
    spec = dict(json.loads(key))
    kind = get_dataset_type(spec.pop("name"))
    return kind.load(kind.options(**spec))


def describe_dataset(spec: dict) -> tuple[tuple[int, ...], int]:
    """(input_shape, n_classes) of a resolved dataset spec, without loading the data."""
    spec = dict(spec)
    kind = get_dataset_type(spec.pop("name"))
    return kind.describe(kind.options(**spec))


def _subset(x: torch.Tensor, y: torch.Tensor, n: int | None, name: str):
    if n is None:
        return x, y
    if n > len(x):
        raise ZooError(f"dataset {name}: train_size {n} exceeds the {len(x)} training samples")
    return x[:n], y[:n]


# --- sklearn digits -----------------------------------------------------------------------


class DigitsOptions(Options):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0


@register_dataset("digits", DigitsOptions, lambda o: ((1, 8, 8), 10), is_image=True)
def load_digits(o: DigitsOptions) -> Data:
    import torch

    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.tensor(np.random.default_rng(o.split_seed).permutation(len(x)))
    n_test = math.ceil(o.test_fraction * len(x))  # as sklearn rounds a test fraction: 360 of 1797
    test, train = order[:n_test], order[n_test:]
    x_train, y_train = _subset(x[train], y[train], o.train_size, "digits")
    return Data("digits", x_train, y_train, x[test], y[test], 10)


# --- Fashion-MNIST from Debian's dataset-fashion-mnist -------------------------------------

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # published training-set statistics


class FashionMnistOptions(Options):
    path: str | None = Field(None, description="folder of the four IDX .gz files")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or plain): the MNIST family's format, big-endian dims then uint8 data.

    Written here because it is ten lines and no maintained library reads IDX without also
    downloading things."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ZooError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ZooError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


@register_dataset("fashion-mnist", FashionMnistOptions, lambda o: ((1, 28, 28), 10), is_image=True)
def load_fashion_mnist(o: FashionMnistOptions) -> Data:
    import torch

    folder = Path(o.path or os.environ.get("ZOO_FASHION_MNIST", FASHION_MNIST_DIR))
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    files = []
    for name in names:
        found = [folder / f"{name}{ext}" for ext in (".gz", "") if (folder / f"{name}{ext}").exists()]
        if not found:
            raise ZooError(
                f"fashion-mnist: {folder / name}.gz not found; install it with "
                "`apt-get install dataset-fashion-mnist`, or set the dataset option `path` "
                "(or env ZOO_FASHION_MNIST) to a folder holding the four IDX files"
            )
        files.append(found[0])
    xs_train, ys_train, xs_test, ys_test = (read_idx(f) for f in files)

    def images(a):
        x = torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 255.0
        return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD

    x_train, y_train = _subset(images(xs_train), torch.tensor(ys_train, dtype=torch.int64), o.train_size, "fashion-mnist")
    return Data("fashion-mnist", x_train, y_train, images(xs_test), torch.tensor(ys_test, dtype=torch.int64), 10)


# --- teacher-student ------------------------------------------------------------------------


class TeacherStudentOptions(Options):
    n_features: int = Field(32, ge=1)
    n_classes: int = Field(10, ge=2)
    teacher_width: int = Field(64, ge=1)
    train_size: int | None = Field(4096, ge=1)
    test_size: int = Field(2048, ge=1)
    label_noise: float = Field(0.0, ge=0, le=1, description="fraction of training labels replaced at random")
    data_seed: int = 0


@register_dataset(
    "teacher-student", TeacherStudentOptions, lambda o: ((o.n_features,), o.n_classes), is_image=False
)
def load_teacher_student(o: TeacherStudentOptions) -> Data:
    import torch

    rng = np.random.default_rng(o.data_seed)
    w1 = rng.standard_normal((o.n_features, o.teacher_width)) / np.sqrt(o.n_features)
    w2 = rng.standard_normal((o.teacher_width, o.n_classes)) / np.sqrt(o.teacher_width)
    n_train = o.train_size or 4096
    x = rng.standard_normal((n_train + o.test_size, o.n_features))
    pre = x @ w1
    # Centre the hidden units: E[relu(z)] = sigma / sqrt(2 pi) for z ~ N(0, sigma^2); without
    # this every unit's mean pushes all samples toward a few classes (badly unbalanced labels).
    sigma = np.linalg.norm(w1, axis=0)
    hidden = np.maximum(pre, 0.0) - sigma / np.sqrt(2 * np.pi)
    y = np.argmax(hidden @ w2, axis=1)
    if o.label_noise > 0:
        flip = rng.random(n_train) < o.label_noise
        y[:n_train][flip] = rng.integers(0, o.n_classes, int(flip.sum()))
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.int64)
    return Data("teacher-student", xt[:n_train], yt[:n_train], xt[n_train:], yt[n_train:], o.n_classes)
