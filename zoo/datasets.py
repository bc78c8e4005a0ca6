"""Data sets a zoo trains on, registered by name, each with a fixed and documented train/test split.

Every data set declares its options (a pydantic model, unknown options are errors), can say its
input shape and class count without loading anything (so a stored model is rebuilt without its
data), and loads as float32 / int64 tensors. Nothing downloads: each source exists offline.

| name            | source                                   | split                                     |
|-----------------|------------------------------------------|-------------------------------------------|
| digits          | sklearn's bundled 8x8 digits (1797)      | one permutation with `split_seed` (default 0): first 20% test (360), the rest train (1437) |
| fashion-mnist   | IDX files of Debian's dataset-fashion-mnist | the published 60k train / 10k test   |
| teacher-student | generated: Gaussian inputs, a random centred 2-layer ReLU teacher, label = argmax | `test_size` fresh samples after the training ones, all from `data_seed` |
| cifar10         | CIFAR-10's binary version in a local folder (`path`, env ZOO_CIFAR10) | the published 50k train / 10k test |
| cifar100        | CIFAR-100's binary version (env ZOO_CIFAR100); `labels` fine (100) or coarse (20) | the published 50k / 10k |
| svhn            | SVHN's `train_32x32.mat` / `test_32x32.mat` (env ZOO_SVHN), read by scipy | the published 73,257 / 26,032 |
| tiny-imagenet   | TinyImageNet's JPEG folders (env ZOO_TINY_IMAGENET), read by Pillow | the 100k train / the labelled 10k validation set as test |

`train_size` (every data set) keeps the first n training samples of the fixed order, so a smaller
training set is always a subset of a larger one.

A stored config comes from whoever made the zoo, so every numeric option has bounds, and a data
set generated from its options (teacher-student) says how many values it would generate: over
the data budget (env ZOO_MAX_DATA_VALUES, default 2.5e8, about 2 GB as float64) it is refused in
one line before anything is allocated. Data sets read from files are as large as their files;
the API never follows a `path` stored in a zoo (`Root.data`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from pydantic import Field

from .errors import ZooError, limit_from_env
from .registry import Registry
from .settings import Settings

if TYPE_CHECKING:
    import torch

MAX_SEED = 2**63 - 1  # seeds are stored as int64 and seed numpy's and torch's generators
MAX_SAMPLES = 10**8  # the bound of a sample-count option
MAX_DATA_VALUES = 250_000_000  # the default data budget (env ZOO_MAX_DATA_VALUES)


class Options(Settings):
    """Options common to every data set (see zoo.settings)."""

    train_size: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="keep the first n training samples")


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
    size: Callable[[Options], int] | None = None  # values a generated data set makes (None: read from files)


DATASETS: Registry[DatasetType] = Registry("dataset")


def register_dataset(name: str, options: type[Options], describe, is_image: bool, size=None):
    """Register a loader under `name`: `@register_dataset("digits", DigitsOptions, ...)`; a data
    set generated from its options gives `size`, options -> the number of values it generates."""

    def wrap(load):
        DATASETS.add(name, DatasetType(name, options, describe, load, is_image, size), load)
        return load

    return wrap


def get_dataset_type(name: str) -> DatasetType:
    return DATASETS.find(name)


def load_dataset(spec: dict) -> Data:
    """Load the data set that a resolved spec ({"name": ..., **options}) names, cached per process."""
    return _load_cached(json.dumps(spec, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _load_cached(key: str) -> Data:
    spec = dict(json.loads(key))
    kind = get_dataset_type(spec.pop("name"))
    options = kind.options(**spec)
    check_data_size(kind, options)
    return kind.load(options)


def check_data_size(kind: DatasetType, options: Options) -> None:
    """A ZooError when a generated data set would be over the data budget."""
    n, budget = (kind.size(options) if kind.size else 0), limit_from_env("ZOO_MAX_DATA_VALUES", MAX_DATA_VALUES)
    if n > budget:
        raise ZooError(f"{kind.name} would generate {n:,} values, over the budget of {budget:,} (env ZOO_MAX_DATA_VALUES)")


def with_path(spec: dict, path: str | os.PathLike | None) -> dict:
    """The dataset spec with its `path` option replaced by `path` (None: the data set's default
    location). For a spec read from a zoo, whose stored `path` is never followed."""
    if "path" in get_dataset_type(spec["name"]).options.model_fields:
        return {**spec, "path": None if path is None else os.fspath(path)}
    if path is not None:
        raise ZooError(f"dataset {spec['name']} is not read from a folder: it takes no path")
    return dict(spec)


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
    split_seed: int = Field(0, ge=0, le=MAX_SEED)


def _digits_values() -> np.ndarray:
    """sklearn's digits as its own data file holds them: 1797 rows of 64 pixel values (0-16) and
    the label. Read from the file sklearn ships (what `sklearn.datasets.load_digits` reads), found
    without importing sklearn: that import costs about 2.5 s, most of a small training job's
    start-up. A test checks these values against `load_digits()`."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ZooError("dataset digits needs scikit-learn installed (its digits.csv.gz)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise ZooError(f"dataset digits: {path} is missing from the scikit-learn installation")
    return np.loadtxt(path, delimiter=",", dtype=np.float64)


@register_dataset("digits", DigitsOptions, lambda o: ((1, 8, 8), 10), is_image=True)
def load_digits(o: DigitsOptions) -> Data:
    import torch

    values = _digits_values()
    x = torch.tensor(values[:, :-1], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(values[:, -1], dtype=torch.int64)
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
    test_size: int | None = Field(None, ge=1, le=10000, description="keep the first n test images (default all 10,000)")


def read_idx(path: Path, limit: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip or plain): the MNIST family's format, big-endian dims then uint8 data.
    With `limit`, only its first `limit` items are read (and decompressed): a zoo of the first
    2,000 Fashion-MNIST images took 0.7 s per job to decompress and scale all 60,000 (now 0.03 s).

    Written here because it is ten lines and no maintained library reads IDX without also
    downloading things."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
            raise ZooError(f"{path}: not an IDX file of unsigned bytes")
        ndim = head[3]
        raw_dims = f.read(4 * ndim)
        if len(raw_dims) < 4 * ndim:
            raise ZooError(f"{path}: truncated IDX file (its header)")
        dims = np.frombuffer(raw_dims, dtype=">u4").astype(np.int64)
        items = int(dims[0]) if ndim else 1
        if limit is not None and ndim:
            items = min(items, limit)
        wanted = items * int(np.prod(dims[1:]))
        raw = f.read(wanted) if limit is not None else f.read()
    data = np.frombuffer(raw, dtype=np.uint8)
    if data.size != wanted:
        raise ZooError(f"{path}: truncated IDX file ({data.size} of {wanted} values)")
    return data.reshape((items, *dims[1:]) if ndim else ())


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
    limits = (o.train_size, o.train_size, o.test_size, o.test_size)  # (a file with fewer: `_subset` says so)
    xs_train, ys_train, xs_test, ys_test = (read_idx(f, n) for f, n in zip(files, limits))

    def images(a):
        x = torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 255.0
        return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD

    x_train, y_train = _subset(images(xs_train), torch.tensor(ys_train, dtype=torch.int64), o.train_size, "fashion-mnist")
    n_test = o.test_size or len(xs_test)
    return Data("fashion-mnist", x_train, y_train, images(xs_test[:n_test]), torch.tensor(ys_test[:n_test], dtype=torch.int64), 10)


# --- teacher-student ------------------------------------------------------------------------


class TeacherStudentOptions(Options):
    n_features: int = Field(32, ge=1, le=100_000)
    n_classes: int = Field(10, ge=2, le=100_000)
    teacher_width: int = Field(64, ge=1, le=100_000)
    train_size: int | None = Field(4096, ge=1, le=MAX_SAMPLES)
    test_size: int = Field(2048, ge=1, le=MAX_SAMPLES)
    label_noise: float = Field(0.0, ge=0, le=1, description="fraction of training labels replaced at random")
    data_seed: int = Field(0, ge=0, le=MAX_SEED)


def teacher_student_size(o: TeacherStudentOptions) -> int:
    """The values it generates: the teacher's weights, and per sample its inputs, the teacher's
    hidden units and its class scores."""
    samples = (o.train_size or 4096) + o.test_size
    return o.teacher_width * (o.n_features + o.n_classes) + samples * (o.n_features + o.teacher_width + o.n_classes)


@register_dataset(
    "teacher-student", TeacherStudentOptions, lambda o: ((o.n_features,), o.n_classes), is_image=False,
    size=teacher_student_size,
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


# --- CIFAR-10/100, SVHN, TinyImageNet from a local folder, in their standard formats ---------
# (None downloads; none is read with pickle: CIFAR's binary version, SVHN's MATLAB files through
# scipy, TinyImageNet's JPEG folders through Pillow. Inputs are normalised per channel with the
# published training-set statistics.)

IMAGE_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


class FolderOptions(Options):
    path: str | None = Field(None, description="the data set's folder (default: env ZOO_<NAME>, then ./data/<folder>)")


class Cifar100Options(FolderOptions):
    labels: str = Field("fine", pattern="^(fine|coarse)$", description="fine (100 classes) or coarse (20 superclasses)")


def _folder(o: FolderOptions, name: str, env: str, default: str, expected: str) -> Path:
    folder = Path(o.path or os.environ.get(env) or Path("data") / default)
    if not folder.is_dir():
        raise ZooError(f"{name}: no folder {folder}; expected {expected} there "
                       f"(set the dataset option `path`, or env {env})")
    return folder


def _need(folder: Path, name: str, files: list[str], expected: str) -> list[Path]:
    for file in files:
        if not (folder / file).is_file():
            raise ZooError(f"{name}: {folder / file} not found; expected {expected}")
    return [folder / f for f in files]


def _images(raw: np.ndarray, name: str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32, normalised with the data set's published statistics."""
    import torch

    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in IMAGE_STATS[name])
    return (torch.from_numpy(np.ascontiguousarray(raw)).to(torch.float32) / 255.0 - mean) / std


def read_cifar_binary(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of `label_bytes` label bytes then 3,072 image bytes (R, G, B planes of 32x32):
    CIFAR's binary version. Returns images (N, 3, 32, 32) uint8 and labels (N, label_bytes)."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + 3072
    if raw.size == 0 or raw.size % record:
        raise ZooError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), rows[:, :label_bytes]


CIFAR10_EXPECTED = "CIFAR-10's binary version (cifar-10-batches-bin: data_batch_1.bin ... data_batch_5.bin, test_batch.bin)"


@register_dataset("cifar10", FolderOptions, lambda o: ((3, 32, 32), 10), is_image=True)
def load_cifar10(o: FolderOptions) -> Data:
    import torch

    folder = _folder(o, "cifar10", "ZOO_CIFAR10", "cifar-10-batches-bin", CIFAR10_EXPECTED)
    files = _need(folder, "cifar10", [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"], CIFAR10_EXPECTED)
    parts = [read_cifar_binary(f, 1) for f in files]
    x_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1][:, 0] for p in parts[:5]])
    x, y = _subset(_images(x_train, "cifar10"), torch.from_numpy(y_train.astype(np.int64)), o.train_size, "cifar10")
    return Data("cifar10", x, y, _images(parts[5][0], "cifar10"), torch.from_numpy(parts[5][1][:, 0].astype(np.int64)), 10)


CIFAR100_EXPECTED = "CIFAR-100's binary version (cifar-100-binary: train.bin, test.bin)"


@register_dataset("cifar100", Cifar100Options, lambda o: ((3, 32, 32), 100 if o.labels == "fine" else 20), is_image=True)
def load_cifar100(o: Cifar100Options) -> Data:
    import torch

    folder = _folder(o, "cifar100", "ZOO_CIFAR100", "cifar-100-binary", CIFAR100_EXPECTED)
    (xs, ys), (xt, yt) = (read_cifar_binary(f, 2) for f in _need(folder, "cifar100", ["train.bin", "test.bin"], CIFAR100_EXPECTED))
    column = 1 if o.labels == "fine" else 0  # each record: coarse label, fine label, image
    x, y = _subset(_images(xs, "cifar100"), torch.from_numpy(ys[:, column].astype(np.int64)), o.train_size, "cifar100")
    return Data("cifar100", x, y, _images(xt, "cifar100"), torch.from_numpy(yt[:, column].astype(np.int64)),
                100 if o.labels == "fine" else 20)


SVHN_EXPECTED = "SVHN's cropped digits (train_32x32.mat, test_32x32.mat)"


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN's MATLAB file: X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0. Returns
    images (N, 3, 32, 32) and labels 0-9."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises several types for a malformed file
        raise ZooError(f"{path}: not a readable SVHN .mat file ({type(e).__name__}: {e})") from None
    if "X" not in mat or "y" not in mat or mat["X"].ndim != 4 or mat["X"].shape[3] != mat["y"].size:
        raise ZooError(f"{path}: expected X (32, 32, 3, N) and y (N, 1)")
    return mat["X"].transpose(3, 2, 0, 1), mat["y"].reshape(-1).astype(np.int64) % 10


@register_dataset("svhn", FolderOptions, lambda o: ((3, 32, 32), 10), is_image=True)
def load_svhn(o: FolderOptions) -> Data:
    import torch

    folder = _folder(o, "svhn", "ZOO_SVHN", "svhn", SVHN_EXPECTED)
    (xs, ys), (xt, yt) = (read_svhn_mat(f) for f in _need(folder, "svhn", ["train_32x32.mat", "test_32x32.mat"], SVHN_EXPECTED))
    x, y = _subset(_images(xs, "svhn"), torch.from_numpy(ys), o.train_size, "svhn")
    return Data("svhn", x, y, _images(xt, "svhn"), torch.from_numpy(yt), 10)


TINY_EXPECTED = ("TinyImageNet's folders (tiny-imagenet-200: wnids.txt, train/<wnid>/images/*.JPEG, "
                 "val/images/*.JPEG with val/val_annotations.txt)")


def read_tiny_imagenet(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): images (N, 3, 64, 64) uint8; classes in wnids.txt order,
    training images in sorted file order; the labelled validation split serves as the test set."""
    from PIL import Image

    wnids_file, annotations = _need(folder, "tiny-imagenet", ["wnids.txt", "val/val_annotations.txt"], TINY_EXPECTED)
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    classes = {w: i for i, w in enumerate(wnids)}

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
        except OSError as e:
            raise ZooError(f"tiny-imagenet: cannot read image {path}: {e}") from None

    train = [(p, classes[w]) for w in wnids for p in sorted((folder / "train" / w / "images").glob("*.JPEG"))]
    val = []
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            if fields[1] not in classes:
                raise ZooError(f"tiny-imagenet: {annotations} names class {fields[1]!r}, not in wnids.txt")
            val.append((folder / "val" / "images" / fields[0], classes[fields[1]]))
    if not train or not val:
        raise ZooError(f"tiny-imagenet: no {'training' if not train else 'validation'} images under {folder}; expected {TINY_EXPECTED}")
    stack = lambda items: (np.stack([read(p) for p, _ in items]), np.array([c for _, c in items], dtype=np.int64))  # noqa: E731
    return (*stack(train), *stack(val))


@register_dataset("tiny-imagenet", FolderOptions, lambda o: ((3, 64, 64), 200), is_image=True)
def load_tiny_imagenet(o: FolderOptions) -> Data:
    import torch

    folder = _folder(o, "tiny-imagenet", "ZOO_TINY_IMAGENET", "tiny-imagenet-200", TINY_EXPECTED)
    xs, ys, xt, yt = read_tiny_imagenet(folder)
    x, y = _subset(_images(xs, "tiny-imagenet"), torch.from_numpy(ys), o.train_size, "tiny-imagenet")
    return Data("tiny-imagenet", x, y, _images(xt, "tiny-imagenet"), torch.from_numpy(yt), 200)
