"""CIFAR-10 / CIFAR-100 from the official python-pickle files, read safely.

``root`` may be the official ``.tar.gz`` itself, a folder holding it, the extracted folder
(``cifar-100-python/`` or ``cifar-10-batches-py/``) or the folder holding that. Archives are read
member by member with :mod:`tarfile` (streamed, nothing is extracted to disk). The pickles are
loaded with :class:`RestrictedUnpickler`, which refuses every global except numpy's array
reconstruction, so a tampered file cannot run code. Every problem is a :class:`DataError` that
names the file.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from kdlab.errors import DataError, MissingDataRoot

from .arrays import ArrayDataset

__all__ = [
    "RestrictedUnpickler",
    "restricted_loads",
    "load_cifar",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy's array-reconstruction globals.

    The official CIFAR pickles contain dicts, lists, byte strings and numpy arrays; an array is
    rebuilt through ``numpy.core.multiarray._reconstruct`` (``numpy._core`` in numpy 2),
    ``numpy.ndarray`` and ``numpy.dtype``. Any other global (``os.system``, ``builtins.eval``, ...)
    raises instead of being imported. Persistent ids are refused by the base class.
    """

    def find_class(self, module: str, name: str):
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
        }
        get = allowed.get((module, name))
        if get is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return get()


def restricted_loads(data: bytes, source: str):
    """Unpickle ``data`` (``encoding="bytes"``) with :class:`RestrictedUnpickler`; DataError on any failure."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataError(
            f"{source}: refused to unpickle: it references the global '{exc}', and a CIFAR file "
            "holds only dicts, lists, strings and numpy arrays (tampered or not a CIFAR file)"
        ) from None
    except Exception as exc:  # corrupt bytes surface as many exception types
        raise DataError(
            f"{source}: not a readable CIFAR pickle ({type(exc).__name__}: {exc}); the file is corrupt or truncated"
        ) from None


@dataclass(frozen=True)
class _Layout:
    name: str
    folder: str
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    env: str


_LAYOUTS = {
    "cifar10": _Layout(
        name="cifar10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        env="KDLAB_CIFAR10",
    ),
    "cifar100": _Layout(
        name="cifar100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        env="KDLAB_CIFAR100",
    ),
}


def _get(d: dict, key: str, source: str):
    for k in (key.encode("ascii"), key):
        if k in d:
            return d[k]
    keys = ", ".join(sorted(k.decode("ascii", "replace") if isinstance(k, bytes) else str(k) for k in d))
    raise DataError(f"{source}: no '{key}' entry (found: {keys or 'none'})")


def _as_dict(obj, source: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _parse_batch(obj, source: str, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    d = _as_dict(obj, source)
    data = _get(d, "data", source)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = (
            f"{type(data).__name__} of shape {tuple(data.shape)} dtype {data.dtype}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(f"{source}: 'data' must be an N x 3072 uint8 array (32x32 RGB planes), got {got}")
    n = data.shape[0]
    if n == 0:
        raise DataError(f"{source}: 'data' holds no images")
    raw = _get(d, layout.label_key, source)
    try:
        labels = np.asarray(raw)
    except Exception as exc:
        raise DataError(f"{source}: '{layout.label_key}' is not a list of ints ({exc})") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{source}: '{layout.label_key}' must be a flat list of ints, got shape {labels.shape} dtype {labels.dtype}"
        )
    if labels.shape[0] != n:
        raise DataError(f"{source}: {n} images but {labels.shape[0]} '{layout.label_key}'")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= layout.num_classes:
        bad = lo if lo < 0 else hi
        raise DataError(f"{source}: label {bad} out of range [0, {layout.num_classes}) in '{layout.label_key}'")
    return data, labels.astype(np.int64)


def _parse_meta(obj, source: str, layout: _Layout) -> list[str]:
    d = _as_dict(obj, source)
    names = _get(d, layout.names_key, source)
    if not isinstance(names, (list, tuple)) or len(names) != layout.num_classes:
        count = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise DataError(f"{source}: '{layout.names_key}' must list {layout.num_classes} names, got {count}")
    out = []
    for v in names:
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        if not isinstance(v, str):
            raise DataError(f"{source}: '{layout.names_key}' holds a {type(v).__name__}, not a name")
        out.append(v)
    return out


def _resolve(root: Path, layout: _Layout, members: tuple[str, ...]) -> tuple[str, Path]:
    """('dir', extracted folder) or ('tar', archive) for any accepted form of ``root``."""
    if not root.exists():
        raise DataError(
            f"{root}: no such file or folder (expected {layout.archive}, a folder holding it, "
            f"or the extracted {layout.folder}/)"
        )
    if root.is_file():
        return "tar", root
    if root.name == layout.folder or any((root / m).exists() for m in members):
        return "dir", root
    if (root / layout.folder).is_dir():
        return "dir", root / layout.folder
    if (root / layout.archive).is_file():
        return "tar", root / layout.archive
    raise DataError(
        f"{root}: found neither {layout.archive}, nor the extracted {layout.folder}/, "
        f"nor its files ({', '.join(members)})"
    )


def _read_dir(folder: Path, names: tuple[str, ...]):
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing file (the {folder.name}/ folder must hold {', '.join(names)})")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc})") from None
        yield name, str(path), data


def _read_tar(archive: Path, layout: _Layout, names: tuple[str, ...]):
    wanted = set(names)
    try:
        with tarfile.open(archive, "r|*") as tf:
            for member in tf:
                parts = [p for p in PurePosixPath(member.name).parts if p not in (".", "/")]
                if not parts or parts[-1] not in wanted:
                    continue
                if len(parts) > 1 and parts[-2] != layout.folder:
                    continue
                if not member.isfile():
                    continue
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise DataError(f"{archive}: member {member.name} is truncated")
                wanted.discard(parts[-1])
                yield parts[-1], f"{archive}:{member.name}", data
                if not wanted:
                    return
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{archive}: cannot read the archive ({type(exc).__name__}: {exc}); truncated or not a tar.gz"
        ) from None
    if wanted:
        missing = ", ".join(f"{layout.folder}/{n}" for n in names if n in wanted)
        raise DataError(f"{archive}: the archive has no member {missing}")


def load_cifar(name: str, root=None, split: str = "train") -> ArrayDataset:
    """Load CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels)."""
    layout = _LAYOUTS[name]
    if root is None:
        env = os.environ.get(layout.env)
        if not env:
            raise MissingDataRoot(name, f"the {layout.archive} or the folder holding it", layout.env)
        root = env
    root = Path(root).expanduser()
    batches = layout.train if split == "train" else layout.test
    members = batches + (layout.meta,)
    kind, where = _resolve(root, layout, members)
    reader = _read_dir(where, members) if kind == "dir" else _read_tar(where, layout, members)

    parsed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    class_names: list[str] | None = None
    with contextlib.closing(reader):  # closes the archive even when a member is rejected
        for member, source, data in reader:
            obj = restricted_loads(data, source)
            del data
            if member == layout.meta:
                class_names = _parse_meta(obj, source, layout)
            else:
                parsed[member] = _parse_batch(obj, source, layout)
            del obj
    assert class_names is not None and len(parsed) == len(batches)

    images = np.concatenate([parsed[b][0] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([parsed[b][1] for b in batches])
    parsed.clear()
    return ArrayDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        num_classes=layout.num_classes,
        mean=layout.mean,
        std=layout.std,
        class_names=class_names,
        name=name,
        source=str(where),
    )
