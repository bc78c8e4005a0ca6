"""CIFAR-10/100, SVHN and TinyImageNet read from local folders in their standard formats; the
tests write tiny fixture files in those formats and check the loaders read exactly what was written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from zoo.datasets import IMAGE_STATS, describe_dataset, load_dataset
from zoo.errors import ZooError


def normalised(raw: np.ndarray, name: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in IMAGE_STATS[name])
    return (torch.tensor(raw, dtype=torch.float32) / 255.0 - mean) / std


def write_cifar(path, images, labels) -> None:
    """CIFAR's binary records: the label byte(s), then R, G, B planes."""
    records = np.concatenate([labels.reshape(len(images), -1).astype(np.uint8), images.reshape(len(images), -1)], axis=1)
    path.write_bytes(records.astype(np.uint8).tobytes())


def test_cifar10_binary_batches_are_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (17, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 17)
    for i in range(5):
        write_cifar(tmp_path / f"data_batch_{i + 1}.bin", images[3 * i:3 * i + 3], labels[3 * i:3 * i + 3])
    write_cifar(tmp_path / "test_batch.bin", images[15:], labels[15:])
    data = load_dataset({"name": "cifar10", "path": str(tmp_path)})
    assert torch.equal(data.x_train, normalised(images[:15], "cifar10")) and data.y_train.tolist() == labels[:15].tolist()
    assert torch.equal(data.x_test, normalised(images[15:], "cifar10")) and data.y_test.tolist() == labels[15:].tolist()
    assert data.input_shape == (3, 32, 32) and data.n_classes == 10
    assert len(load_dataset({"name": "cifar10", "path": str(tmp_path), "train_size": 4}).x_train) == 4


@pytest.mark.parametrize("labels, n_classes", [("fine", 100), ("coarse", 20)])
def test_cifar100_fine_and_coarse_labels(tmp_path, labels, n_classes):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    pairs = np.stack([rng.integers(0, 20, 6), rng.integers(0, 100, 6)], axis=1)  # coarse, fine
    write_cifar(tmp_path / "train.bin", images[:4], pairs[:4])
    write_cifar(tmp_path / "test.bin", images[4:], pairs[4:])
    data = load_dataset({"name": "cifar100", "path": str(tmp_path), "labels": labels})
    column = 1 if labels == "fine" else 0
    assert torch.equal(data.x_train, normalised(images[:4], "cifar100"))
    assert data.y_train.tolist() == pairs[:4, column].tolist() and data.y_test.tolist() == pairs[4:, column].tolist()
    assert data.n_classes == n_classes == describe_dataset({"name": "cifar100", "labels": labels})[1]


def test_svhn_mat_files_with_ten_for_zero(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    digits = np.array([10, 1, 9, 10, 3])
    for name, rows in (("train_32x32.mat", slice(0, 3)), ("test_32x32.mat", slice(3, 5))):
        savemat(tmp_path / name, {"X": images[rows].transpose(2, 3, 1, 0), "y": digits[rows].reshape(-1, 1)})
    data = load_dataset({"name": "svhn", "path": str(tmp_path)})
    assert torch.equal(data.x_train, normalised(images[:3], "svhn")) and torch.equal(data.x_test, normalised(images[3:], "svhn"))
    assert data.y_train.tolist() == [0, 1, 9] and data.y_test.tolist() == [0, 3]


def test_tiny_imagenet_folders(tmp_path):
    rng = np.random.default_rng(3)
    wnids = ["n01443537", "n01629819"]
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    expected_train = []
    for c, wnid in enumerate(wnids):
        folder = tmp_path / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for k in range(2):
            path = folder / f"{wnid}_{k}.JPEG"
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, format="JPEG")
            expected_train.append((path, c))
    (tmp_path / "val" / "images").mkdir(parents=True)
    lines = []
    for k, c in enumerate([1, 0, 1]):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "val" / "images" / f"val_{k}.JPEG", format="JPEG")
        lines.append(f"val_{k}.JPEG\t{wnids[c]}\t0\t0\t63\t63")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    data = load_dataset({"name": "tiny-imagenet", "path": str(tmp_path)})
    decoded = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p, _ in expected_train])
    assert torch.equal(data.x_train, normalised(decoded, "tiny-imagenet"))
    assert data.y_train.tolist() == [c for _, c in expected_train] and data.y_test.tolist() == [1, 0, 1]
    assert data.input_shape == (3, 64, 64) and data.n_classes == 200


def test_a_wrong_or_missing_folder_says_what_is_expected_where(tmp_path):
    with pytest.raises(ZooError, match=r"cifar10: no folder .*nowhere; expected CIFAR-10's binary version .*env ZOO_CIFAR10"):
        load_dataset({"name": "cifar10", "path": str(tmp_path / "nowhere")})
    with pytest.raises(ZooError, match=r"cifar10: .*data_batch_1.bin not found; expected CIFAR-10's binary version"):
        load_dataset({"name": "cifar10", "path": str(tmp_path)})
    (tmp_path / "train.bin").write_bytes(bytes(3074 + 5))
    (tmp_path / "test.bin").write_bytes(bytes(3074))
    with pytest.raises(ZooError, match=r"train.bin: 3079 bytes is not a whole number of 3074-byte CIFAR records"):
        load_dataset({"name": "cifar100", "path": str(tmp_path)})
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file")
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(ZooError, match=r"train_32x32.mat: not a readable SVHN .mat file"):
        load_dataset({"name": "svhn", "path": str(tmp_path)})
    with pytest.raises(ZooError, match=r"tiny-imagenet: .*wnids.txt not found; expected TinyImageNet's folders"):
        load_dataset({"name": "tiny-imagenet", "path": str(tmp_path)})
