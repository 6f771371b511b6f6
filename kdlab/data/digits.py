"""scikit-learn's 8x8 handwritten digits (ships with scikit-learn: no download).

1,797 grey images, values 0..16 mapped to uint8 by round(v * 255 / 16), 10 classes. The split is
fixed: a stratified 80 % / 20 % ``train_test_split`` with ``random_state=0``, each split kept in the
original order. Mean/std are those of the train split, for both splits.
"""

from __future__ import annotations

import numpy as np
import torch

from kdlab.errors import DataError

from .arrays import ArrayDataset, channel_stats

__all__ = ["load_digits_dataset", "digits_split_indices"]


def _raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError(f"digits: scikit-learn is not installed ({exc})") from None
    d = load_digits()
    images = np.rint(d.images.astype(np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images[:, None, :, :], d.target.astype(np.int64)


def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into ``load_digits()``, sorted: stratified 80/20, random_state=0."""
    return _split(_raw()[1])


def _split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=0.2, random_state=0, stratify=y)
    return np.sort(train), np.sort(test)


def load_digits_dataset(root=None, split: str = "train") -> ArrayDataset:
    """``root`` is ignored (the data ship with scikit-learn)."""
    images, labels = _raw()
    train, test = _split(labels)
    imgs = torch.from_numpy(np.ascontiguousarray(images))
    mean, std = channel_stats(imgs[torch.from_numpy(train)])
    idx = torch.from_numpy(train if split == "train" else test)
    return ArrayDataset(
        images=imgs[idx].contiguous(),
        labels=torch.from_numpy(labels)[idx].contiguous(),
        num_classes=10,
        mean=mean,
        std=std,
        class_names=[str(i) for i in range(10)],
        name="digits",
        source="sklearn.datasets.load_digits",
    )
