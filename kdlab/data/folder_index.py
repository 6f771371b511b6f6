"""The file index of an image folder: classes, files, their sizes and dimensions, listed once and cached.

The streaming loader (:mod:`kdlab.data.stream`) decodes images as it goes, so it needs to know up front
which files there are, their labels and their pixel dimensions (the random-resized crop is drawn in the
main process, which needs each image's width and height; the image header gives them without decoding).
Listing and reading the headers of ImageNet's 1.28 million files takes minutes, so the index is written
as JSON beside the data (``root/.kdlab-index-<split>.json``), or, when the data folder cannot be written
(a read-only mount), under the user's cache folder (``$XDG_CACHE_HOME/kdlab/folder-index/``, default
``~/.cache``), named by a hash of the folder's resolved path.

The layout rules are those of :mod:`kdlab.data.imagefolder`: ``root/train/<class>/*`` and
``root/test/<class>/*`` (or ``root/val``), classes the sorted sub-folders of ``train``, files with one of
:data:`~kdlab.data.imagefolder.IMAGE_EXTENSIONS`.

Staleness: the cache holds a fingerprint of the folder listing (the name, size and modification time of
the split folder and of every class folder). Adding, removing or renaming a file changes its class
folder's modification time, so a cache whose fingerprint differs from the folder's is rebuilt; checking it
costs one listing of the split folder and one ``stat`` per class, not one per file. A file overwritten in
place (same name) leaves the folder's time unchanged; delete the index file after such an edit. A cache
that cannot be parsed or does not hold what an index holds is rebuilt with a notice, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdlab.errors import DataError, MissingDataRoot

from . import imagefolder

__all__ = ["FolderIndex", "folder_index", "index_paths"]

FORMAT = "kdlab-folder-index"
VERSION = 1


@dataclass
class FolderIndex:
    """One split of an image folder: ``paths`` relative to ``split_dir``, int64 ``labels``, and per file
    its size in bytes and its pixel ``widths`` / ``heights``. ``skipped`` lists the files left out as
    unreadable (``skip_unreadable``), with the reason; ``from_cache`` says whether it was read back."""

    root: Path
    split: str
    split_dir: Path
    classes: list[str]
    paths: list[str]
    labels: torch.Tensor
    nbytes: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    skipped: list[str] = field(default_factory=list)
    from_cache: bool = False
    cache_path: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kdlab" / "folder-index"


def index_paths(root: Path, split: str) -> list[Path]:
    """Where the index of ``split`` is looked for, in order: beside the data, then the user's cache."""
    root = Path(root)
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / f".kdlab-index-{split}.json", _user_cache_dir() / f"{digest}-{split}.json"]


def _fingerprint(split_dir: Path) -> list[list]:
    st = split_dir.stat()
    out = [[".", st.st_size, st.st_mtime_ns]]
    with os.scandir(split_dir) as it:
        entries = sorted((e for e in it if not e.name.startswith(".") and e.is_dir()), key=lambda e: e.name)
    for e in entries:
        st = e.stat()
        out.append([e.name, st.st_size, st.st_mtime_ns])
    return out


# the listing of one class folder; a module attribute so that a test can count the calls
_list_files = imagefolder._files


def _header_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only; the pixels are decoded later, in a worker
            w, h = im.size
    except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, ValueError, ...
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
    if w < 1 or h < 1:
        raise DataError(f"{path}: unreadable image (size {w}x{h})")
    return int(w), int(h)


def _build(root: Path, split: str, split_dir: Path, classes: list[str], skip_unreadable: bool) -> dict:
    extra = sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in classes
    )
    if extra:
        raise DataError(f"{split_dir}: class folder(s) {', '.join(extra)} not in the train split")
    fingerprint = _fingerprint(split_dir)
    files, skipped = [], []
    for label, cls in enumerate(classes):
        class_dir = split_dir / cls
        if not class_dir.is_dir():
            if split == "train":
                raise DataError(f"{class_dir}: missing class folder")
            continue
        for f in _list_files(class_dir):
            try:
                w, h = _header_size(f)
            except DataError as e:
                if not skip_unreadable:
                    raise DataError(
                        f"{e}; skip_unreadable (data.skip_unreadable in a recipe) leaves such files out"
                    ) from None
                skipped.append(str(e))
                continue
            files.append([f"{cls}/{f.name}", label, int(f.stat().st_size), w, h])
    if not files:
        raise DataError(f"{split_dir}: no images" + (" that could be read" if skipped else ""))
    return {
        "format": FORMAT,
        "version": VERSION,
        "split": split,
        "fingerprint": fingerprint,
        "classes": classes,
        "files": files,
        "skipped": skipped,
    }


def _damage(doc, split: str, classes: list[str]) -> str | None:
    """What makes ``doc`` not an index of this split, or None."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return "not a kdlab folder index"
    if doc.get("version") != VERSION:
        return f"index version {doc.get('version')!r}, expected {VERSION}"
    if doc.get("split") != split:
        return f"index of split {doc.get('split')!r}"
    files, skipped = doc.get("files"), doc.get("skipped")
    if not isinstance(files, list) or not files or not isinstance(skipped, list):
        return "no file list"
    if not isinstance(doc.get("fingerprint"), list) or not isinstance(doc.get("classes"), list):
        return "no fingerprint"
    n = len(classes)
    for row in files:
        ok = (
            isinstance(row, list)
            and len(row) == 5
            and isinstance(row[0], str)
            and "/" in row[0]
            and ".." not in row[0].split("/")
            and all(isinstance(v, int) and not isinstance(v, bool) for v in row[1:])
            and 0 <= row[1] < n
            and row[0].split("/", 1)[0] == classes[row[1]]
            and row[2] >= 0
            and row[3] >= 1
            and row[4] >= 1
        )
        if not ok:
            return f"malformed entry {str(row)[:80]}"
    return None


def _notice(msg: str) -> None:
    sys.stderr.write(f"kdlab: {msg}\n")


def _read(path: Path, split: str, classes: list[str], fingerprint: list, notice) -> dict | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        notice(f"{path}: unreadable file index ({type(e).__name__}), rebuilt")
        return None
    try:
        doc = json.loads(text)
    except ValueError as e:
        notice(f"{path}: damaged file index ({e}), rebuilt")
        return None
    problem = _damage(doc, split, classes)
    if problem:
        notice(f"{path}: damaged file index ({problem}), rebuilt")
        return None
    if doc["classes"] != classes or doc["fingerprint"] != fingerprint:
        return None  # stale: the folder changed since it was written
    return doc


def _write(paths: list[Path], doc: dict) -> Path | None:
    text = json.dumps(doc, separators=(",", ":"))
    for path in paths:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)  # several ranks may write at once: each replaces the file whole
            return path
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
    return None


def folder_index(
    root,
    split: str = "train",
    skip_unreadable: bool = False,
    notice: Callable[[str], None] | None = None,
) -> FolderIndex:
    """The index of ``root``'s ``split`` (train or test), read from its cache when that is current, else built
    (every class folder listed, every header read) and cached. ``notice`` receives the one-line messages
    about a damaged cache or one that could not be written (default: stderr)."""
    notice = notice or _notice
    if root is None:
        raise MissingDataRoot("imagefolder", "the folder holding train/ and test/")
    root = Path(root).expanduser()
    imagefolder.check_root(root)
    train_dir = imagefolder._split_dir(root, "train")
    split_dir = imagefolder._split_dir(root, split)
    classes = imagefolder._classes(train_dir)
    fingerprint = _fingerprint(split_dir)
    locations = index_paths(root, split)
    doc, where, from_cache = None, None, False
    for path in locations:
        doc = _read(path, split, classes, fingerprint, notice)
        if doc is not None:
            where, from_cache = path, True
            break
    if doc is None:
        doc = _build(root, split, split_dir, classes, skip_unreadable)
        where = _write(locations, doc)
        if where is None:
            notice(f"{split_dir}: the file index could not be written beside the data nor in {locations[1].parent}")
    if doc["skipped"] and not skip_unreadable:
        first = doc["skipped"][0]
        raise DataError(f"{first}; skip_unreadable (data.skip_unreadable in a recipe) leaves such files out")
    files = doc["files"]
    return FolderIndex(
        root=root,
        split=split,
        split_dir=split_dir,
        classes=list(classes),
        paths=[row[0] for row in files],
        labels=torch.tensor([row[1] for row in files], dtype=torch.int64),
        nbytes=np.array([row[2] for row in files], dtype=np.int64),
        widths=np.array([row[3] for row in files], dtype=np.int64),
        heights=np.array([row[4] for row in files], dtype=np.int64),
        skipped=list(doc["skipped"]),
        from_cache=from_cache,
        cache_path=where,
    )
