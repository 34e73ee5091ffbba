"""Real image data that needs no download, for the demo and the diagnostics.

* ``digits`` (default): scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes),
  read by :func:`sklearn.datasets.load_digits` from the file shipped inside the scikit-learn wheel,
  so it works offline from a fresh install. Pixels 0..16 are scaled to [0, 1] and standardised
  with the training split's mean and standard deviation; the split is a fixed stratified 80/20
  (1437 train / 360 test images).
* ``cifar10``: CIFAR-10 in its standard python-pickle layout (``data_batch_1`` .. ``data_batch_5``
  and ``test_batch``, in ``DIR`` or ``DIR/cifar-10-batches-py``) when a user has it locally. It is
  never downloaded. Each channel is standardised with the training split's statistics.

Both return a :class:`Dataset` of float32 tensors ``(N, C, H, W)`` and int64 labels.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "load_digits", "load_cifar10", "load_dataset", "CIFAR10_FILES"]

CIFAR10_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@dataclasses.dataclass
class Dataset:
    """A train/test split of images ``(N, C, H, W)`` float32 and labels ``(N,)`` int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    def subset(self, train: int | None = None, test: int | None = None) -> Dataset:
        """The first ``train`` / ``test`` images of each split (for quick runs)."""
        return Dataset(
            self.name,
            self.x_train[:train],
            self.y_train[:train],
            self.x_test[:test],
            self.y_test[:test],
            self.num_classes,
        )

    def describe(self) -> str:
        h, w = self.image_size
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test images, "
            f"{self.in_channels}x{h}x{w}, {self.num_classes} classes"
        )


def load_digits(split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits, a fixed stratified 80/20 split, standardised."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, random_state=split_seed, stratify=y
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr = (x_tr - mean) / std
    x_te = (x_te - mean) / std
    return Dataset(
        "digits",
        torch.from_numpy(np.ascontiguousarray(x_tr)),
        torch.from_numpy(y_tr),
        torch.from_numpy(np.ascontiguousarray(x_te)),
        torch.from_numpy(y_te),
        10,
    )


def load_breast_cancer(split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled breast-cancer table (569 x 30, 2 classes) as 1x3x10 "images".

    Its 30 features are 10 measurements of the cell nuclei (radius, texture, ...) x 3 statistics
    (mean, standard error, worst): row ``i`` of the image holds statistic ``i`` of the 10
    measurements, so a convolution slides along the measurements. Fixed stratified 70/30 split,
    every feature standardised with the training split's mean and std.
    """
    from sklearn.datasets import load_breast_cancer as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.3, random_state=split_seed, stratify=y
    )
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = ((a - mean) / std for a in (x_tr, x_te))
    return Dataset(
        "breast-cancer",
        torch.from_numpy(np.ascontiguousarray(x_tr.reshape(-1, 1, 3, 10))),
        torch.from_numpy(y_tr),
        torch.from_numpy(np.ascontiguousarray(x_te.reshape(-1, 1, 3, 10))),
        torch.from_numpy(y_te),
        2,
    )


def _cifar_root(data_dir: str | Path) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {str(root)!r} is not a directory")
    for cand in (root, root / "cifar-10-batches-py"):
        if all((cand / f).is_file() for f in CIFAR10_FILES):
            return cand
    missing = [f for f in CIFAR10_FILES if not (root / f).is_file()]
    raise FileNotFoundError(
        f"--data-dir {str(root)!r} does not hold CIFAR-10 in its python-pickle layout "
        f"(missing {', '.join(missing)}; expected {', '.join(CIFAR10_FILES)} in it or in its "
        f"cifar-10-batches-py folder). bnrewrite never downloads data."
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = d[b"data"] if b"data" in d else d["data"]
        labels = d[b"labels"] if b"labels" in d else d["labels"]
    except Exception as e:  # a corrupt or foreign file: one clear message
        raise ValueError(f"cannot read CIFAR-10 batch {str(path)!r}: {e}") from None
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"CIFAR-10 batch {str(path)!r} has data of shape {data.shape}, expected (n, 3072)"
        )
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def load_cifar10(data_dir: str | Path) -> Dataset:
    """CIFAR-10 from a local python-pickle copy (never downloaded); per-channel standardised.

    Only the pickle files are read (``pickle.load``), so point ``data_dir`` at a copy you trust.
    """
    root = _cifar_root(data_dir)
    parts = [_read_batch(root / f) for f in CIFAR10_FILES[:-1]]
    x_tr = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_batch(root / CIFAR10_FILES[-1])
    x_te = x_te.astype(np.float32) / 255.0
    mean = x_tr.mean(axis=(0, 2, 3), keepdims=True)
    std = x_tr.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return Dataset(
        "cifar10",
        torch.from_numpy((x_tr - mean) / std),
        torch.from_numpy(y_tr),
        torch.from_numpy((x_te - mean) / std),
        torch.from_numpy(y_te),
        10,
    )


def load_dataset(data_dir: str | Path | None = None) -> Dataset:
    """CIFAR-10 from ``data_dir`` when given, else the embedded digits."""
    if data_dir is None:
        return load_digits()
    return load_cifar10(data_dir)
