"""A folder of image files, one sub-folder per class, loaded into memory at a fixed size.

Layout: ``root/train/<class>/*.{png,jpg,jpeg,bmp}`` and ``root/test/<class>/...`` (``root/val``
is accepted for the test split). Classes are the sub-folders of ``train``, sorted by name, for both
splits. Images are converted to RGB and resized to ``image_size`` x ``image_size`` with bilinear
interpolation; 16-bit greyscale images are scaled to 8 bits (value / 257), not clipped at 255.
Mean/std are those of the train split. ``skip_unreadable=True`` leaves out files that cannot be
decoded instead of stopping at the first one; the dataset's ``skipped`` lists them with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from kdlab.errors import ConfigError, DataError, MissingDataRoot

from .arrays import ArrayDataset, channel_stats

__all__ = ["load_imagefolder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

# (resolved train folder, image_size, fingerprint) -> (mean, std); spares re-reading train for test.
_STATS_CACHE: dict[tuple, tuple[tuple[float, ...], tuple[float, ...]]] = {}


def check_root(root: Path) -> None:
    """A one-line DataError for a root that is not a folder, or one this user cannot list (a permission error
    met later would name some file inside it, or, from ``Path.is_dir``, claim the split folder is missing)."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"{root}: no read permission (the folder and its files must be readable by this user)")


def _split_dir(root: Path, split: str) -> Path:
    candidates = ["train"] if split == "train" else ["test", "val"]
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise DataError(f"{root / candidates[0]}: missing split folder (expected {' or '.join(candidates)}/ under {root})")


def _classes(train_dir: Path) -> list[str]:
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{train_dir}: no class folders")
    return classes


def _files(class_dir: Path) -> list[Path]:
    files = sorted(
        p
        for p in class_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise DataError(f"{class_dir}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} images)")
    return files


# Pillow's modes for 16-bit greyscale PNGs ("I" in older Pillow releases); its convert("RGB") clips them at 255
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _sixteen_bit_to_rgb(im, size: int) -> np.ndarray:
    from PIL import Image

    grey = np.asarray(im, dtype=np.float32) / 257.0  # 65535 -> 255
    plane = Image.fromarray(grey, mode="F")
    if plane.size != (size, size):
        plane = plane.resize((size, size), Image.BILINEAR)
    arr = np.clip(np.rint(np.asarray(plane)), 0, 255).astype(np.uint8)
    return np.repeat(arr[:, :, None], 3, axis=2)


def _read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in SIXTEEN_BIT_MODES:
                arr = _sixteen_bit_to_rgb(im, size)
            else:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, ValueError, ...
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
    return arr.transpose(2, 0, 1)


def _load_split(
    split_dir: Path,
    classes: list[str],
    size: int,
    require_all: bool,
    skip_unreadable: bool = False,
    skipped: list[str] | None = None,
):
    images, labels = [], []
    extra = sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in classes
    )
    if extra:
        raise DataError(f"{split_dir}: class folder(s) {', '.join(extra)} not in the train split")
    for label, cls in enumerate(classes):
        class_dir = split_dir / cls
        if not class_dir.is_dir():
            if require_all:
                raise DataError(f"{class_dir}: missing class folder")
            continue
        for f in _files(class_dir):
            try:
                images.append(_read_image(f, size))
            except DataError as e:
                if not skip_unreadable:
                    raise DataError(
                        f"{e}; skip_unreadable (data.skip_unreadable in a recipe) leaves such files out"
                    ) from None
                if skipped is not None:
                    skipped.append(str(e))
                continue
            labels.append(label)
    if not images:
        raise DataError(f"{split_dir}: no images" + (" that could be read" if skipped else ""))
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _fingerprint(train_dir: Path, classes: list[str]) -> tuple:
    out = []
    for cls in classes:
        for f in _files(train_dir / cls):
            st = f.stat()
            out.append((cls, f.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_imagefolder(
    root=None, split: str = "train", image_size: int = 32, skip_unreadable: bool = False
) -> ArrayDataset:
    if root is None:
        raise MissingDataRoot("imagefolder", "the folder holding train/ and test/")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"imagefolder image_size must be a positive int, got {image_size!r}")
    root = Path(root).expanduser()
    check_root(root)
    train_dir = _split_dir(root, "train")
    split_dir = _split_dir(root, split)
    classes = _classes(train_dir)
    key = (str(train_dir.resolve()), image_size, _fingerprint(train_dir, classes))

    skipped: list[str] = []
    if split == "train":
        images, labels = _load_split(train_dir, classes, image_size, True, skip_unreadable, skipped)
        stats = channel_stats(images)
        _STATS_CACHE.clear()  # keep at most one entry
        _STATS_CACHE[key] = stats
        source = train_dir
    else:
        images, labels = _load_split(split_dir, classes, image_size, False, skip_unreadable, skipped)
        stats = _STATS_CACHE.get(key)
        if stats is None:
            train_images, _ = _load_split(train_dir, classes, image_size, True, skip_unreadable)
            stats = channel_stats(train_images)
            del train_images
            _STATS_CACHE.clear()
            _STATS_CACHE[key] = stats
        source = split_dir
    mean, std = stats
    return ArrayDataset(
        images=images,
        labels=labels,
        num_classes=len(classes),
        mean=mean,
        std=std,
        class_names=classes,
        name="imagefolder",
        source=str(source),
        skipped=skipped,
    )
