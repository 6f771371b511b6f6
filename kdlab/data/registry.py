"""Data sets by name: ``load_dataset(name, root=None, split="train", **kwargs)``."""

from __future__ import annotations

from kdlab.data_names import DATASETS
from kdlab.errors import ConfigError

from .arrays import ArrayDataset

__all__ = ["DATASETS", "SPLITS", "load_dataset"]

SPLITS = ("train", "test")
_KWARGS = {"cifar10": (), "cifar100": (), "digits": (), "imagefolder": ("image_size", "skip_unreadable")}


def load_dataset(name: str, root=None, split: str = "train", **kwargs) -> ArrayDataset:
    """Load a whole split into memory.

    ``name``: cifar10 / cifar100 (official python files; ``root`` = the .tar.gz, its folder, the
    extracted folder or its parent), digits (scikit-learn, ``root`` ignored) or imagefolder
    (``root/train/<class>/*``; keywords ``image_size``, default 32, and ``skip_unreadable``, default
    False). ``split``: train or test.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}: valid names are {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} for {key}: valid splits are {', '.join(SPLITS)}")
    unknown = sorted(set(kwargs) - set(_KWARGS[key]))
    if unknown:
        allowed = ", ".join(_KWARGS[key]) or "none"
        raise ConfigError(f"{key} takes no option {', '.join(unknown)} (options: {allowed})")
    if key in ("cifar10", "cifar100"):
        from .cifar import load_cifar

        return load_cifar(key, root, split)
    if key == "digits":
        from .digits import load_digits_dataset

        return load_digits_dataset(root, split)
    from .imagefolder import load_imagefolder

    return load_imagefolder(root, split, **kwargs)
