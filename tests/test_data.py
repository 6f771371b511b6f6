"""Tests of kdlab.data: readers (CIFAR pickles, ImageFolder, digits), augmentation and DeviceLoader, and data
faults named at the command line."""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ok, refused, sets

from kdlab.cli import main
from kdlab.data import (
    DATASETS,
    ArrayDataset,
    AugmentSpec,
    DeviceLoader,
    apply_views,
    default_augment,
    load_dataset,
    num_views,
    rotate_batch,
    sample_views,
    view_from_index,
    view_index,
)
from kdlab.data.cifar import CIFAR10_MEAN, CIFAR100_MEAN, CIFAR100_STD
from kdlab.data.digits import digits_split_indices
from kdlab.errors import ConfigError, DataError

CIFAR100_DIR = Path(__file__).resolve().parents[2] / "shared/data/cifar100"
ROOT = Path(__file__).resolve().parents[1]
VANILLA = str(ROOT / "recipes" / "digits" / "vanilla.yaml")
TINY = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1", "--quiet"]


# --------------------------------------------------------------------------------------------
# Official-format fixtures
# --------------------------------------------------------------------------------------------


def _dumps(obj, legacy_numpy: bool = False) -> bytes:
    """Pickle like the official files (bytes keys; protocol 3 so that globals are text lines)."""
    data = pickle.dumps(obj, protocol=3)
    if legacy_numpy:  # the official files name numpy 1.x's module
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    return data


def _c100_objects(n_train=150, n_test=60, seed=0):
    rng = np.random.default_rng(seed)
    objs = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        fine[0], fine[1] = 0, 99
        objs[split] = {
            b"filenames": [f"{split}_{i:05d}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [v // 5 for v in fine],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
    objs["meta"] = {
        b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"super{i:02d}".encode() for i in range(20)],
    }
    return objs


def _c10_objects(per_batch=12, seed=1):
    rng = np.random.default_rng(seed)
    objs = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        objs[name] = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
    objs["batches.meta"] = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [
            n.encode()
            for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
        ],
        b"num_vis": 3072,
    }
    return objs


def _write_folder(parent: Path, folder: str, objs: dict, raw: dict | None = None, legacy=False) -> Path:
    d = parent / folder
    d.mkdir(parents=True, exist_ok=True)
    for name, obj in objs.items():
        (d / name).write_bytes(_dumps(obj, legacy))
    for name, data in (raw or {}).items():
        (d / name).write_bytes(data)
    return d


def _write_tar(path: Path, folder: str, objs: dict, raw: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    members = {name: _dumps(obj) for name, obj in objs.items()}
    members.update(raw or {})
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _expected_images(data: np.ndarray) -> torch.Tensor:
    # Explicit R, G, B planes of 32 x 32: pixel (c, h, w) is column c*1024 + h*32 + w.
    n = data.shape[0]
    out = np.zeros((n, 3, 32, 32), np.uint8)
    for c in range(3):
        for h in range(32):
            out[:, c, h, :] = data[:, c * 1024 + h * 32 : c * 1024 + h * 32 + 32]
    return torch.from_numpy(out)


def _c100_root(tmp_path: Path, form: str, objs: dict) -> Path:
    if form == "folder":
        return _write_folder(tmp_path, "cifar-100-python", objs)
    if form == "parent":
        _write_folder(tmp_path / "data", "cifar-100-python", objs)
        return tmp_path / "data"
    if form == "tarball":
        return _write_tar(tmp_path / "dl" / "cifar-100-python.tar.gz", "cifar-100-python", objs)
    if form == "tar_dir":
        _write_tar(tmp_path / "dl" / "cifar-100-python.tar.gz", "cifar-100-python", objs)
        return tmp_path / "dl"
    raise AssertionError(form)


# --------------------------------------------------------------------------------------------
# CIFAR readers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "parent", "tarball", "tar_dir"])
def test_cifar100_root_forms(tmp_path, form):
    objs = _c100_objects()
    root = _c100_root(tmp_path, form, objs)
    for split in ("train", "test"):
        ds = load_dataset("cifar100", root=root, split=split)
        src = objs[split]
        assert ds.name == "cifar100" and ds.num_classes == 100
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(src[b"data"]), 3, 32, 32)
        assert torch.equal(ds.images, _expected_images(src[b"data"]))
        assert ds.labels.dtype == torch.int64
        assert ds.labels.tolist() == src[b"fine_labels"]
        assert ds.class_names == [f"class{i:02d}" for i in range(100)]
        assert ds.mean == CIFAR100_MEAN and ds.std == CIFAR100_STD


@pytest.mark.parametrize("form", ["folder", "parent", "tarball", "tar_dir"])
def test_cifar10_root_forms(tmp_path, form):
    objs = _c10_objects()
    folder, archive = "cifar-10-batches-py", "cifar-10-python.tar.gz"
    if form == "folder":
        root = _write_folder(tmp_path, folder, objs)
    elif form == "parent":
        _write_folder(tmp_path, folder, objs)
        root = tmp_path
    elif form == "tarball":
        root = _write_tar(tmp_path / archive, folder, objs)
    else:
        _write_tar(tmp_path / archive, folder, objs)
        root = tmp_path
    train = load_dataset("cifar10", root=root, split="train")
    batches = [objs[f"data_batch_{i}"] for i in range(1, 6)]
    assert torch.equal(train.images, _expected_images(np.concatenate([b[b"data"] for b in batches])))
    assert train.labels.tolist() == sum((b[b"labels"] for b in batches), [])
    assert train.class_names[0] == "airplane" and train.class_names[9] == "truck"
    assert train.mean == CIFAR10_MEAN and train.num_classes == 10
    test = load_dataset("cifar10", root=root, split="test")
    assert torch.equal(test.images, _expected_images(objs["test_batch"][b"data"]))
    assert test.labels.tolist() == objs["test_batch"][b"labels"]


def test_cifar_str_keys_and_legacy_numpy_module(tmp_path):
    objs = _c100_objects(n_train=20, n_test=10)
    objs["train"] = {k.decode(): v for k, v in objs["train"].items()}  # str keys also accepted
    root = _write_folder(tmp_path, "cifar-100-python", objs, legacy=True)
    assert b"numpy.core.multiarray\n_reconstruct" in (root / "train").read_bytes()
    ds = load_dataset("cifar100", root=root, split="train")
    assert torch.equal(ds.images, _expected_images(objs["train"]["data"]))


def _raises_data_error(match: str, fn, *args, **kwargs) -> DataError:
    with pytest.raises(DataError, match=re.escape(match)) as info:
        fn(*args, **kwargs)
    err = info.value
    # a clean message: no chained pickle/tarfile/PIL traceback behind it
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return err


def test_cifar_missing_root_and_files(tmp_path):
    _raises_data_error("nowhere", load_dataset, "cifar100", root=tmp_path / "nowhere")
    _raises_data_error(str(tmp_path), load_dataset, "cifar100", root=tmp_path)  # empty folder
    objs = _c100_objects(20, 10)
    del objs["meta"]
    root = _write_folder(tmp_path, "cifar-100-python", objs)
    _raises_data_error(str(root / "meta"), load_dataset, "cifar100", root=root)
    tar = _write_tar(tmp_path / "t" / "cifar-100-python.tar.gz", "cifar-100-python", objs)
    err = _raises_data_error(str(tar), load_dataset, "cifar100", root=tar)
    assert "cifar-100-python/meta" in str(err)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_cifar_truncated_archive(tmp_path, keep):
    tar = _write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", _c100_objects())
    data = tar.read_bytes()
    tar.write_bytes(data[: int(len(data) * keep)])
    for split in ("train", "test"):
        _raises_data_error(str(tar), load_dataset, "cifar100", root=tmp_path, split=split)


def test_cifar_not_an_archive(tmp_path):
    bogus = tmp_path / "cifar-100-python.tar.gz"
    bogus.write_bytes(b"this is not a tar file at all" * 10)
    _raises_data_error(str(bogus), load_dataset, "cifar100", root=bogus)


def test_cifar_garbage_pickle(tmp_path):
    objs = _c100_objects(20, 10)
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    del objs["train"]
    root = _write_folder(tmp_path, "cifar-100-python", objs, raw={"train": garbage})
    _raises_data_error(str(root / "train"), load_dataset, "cifar100", root=root)
    tar = _write_tar(tmp_path / "t" / "cifar-100-python.tar.gz", "cifar-100-python", objs, raw={"train": garbage})
    err = _raises_data_error(str(tar), load_dataset, "cifar100", root=tar)
    assert "cifar-100-python/train" in str(err)
    # A valid pickle cut short is also reported, not raised as EOFError/UnpicklingError.
    good = _dumps(_c100_objects(20, 10)["train"])
    root2 = _write_folder(tmp_path / "b", "cifar-100-python", objs, raw={"train": good[: len(good) // 2]})
    _raises_data_error(str(root2 / "train"), load_dataset, "cifar100", root=root2)


class _SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _evil_payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('owned')"
    return {
        # protocol 0, the classic "cos\nsystem" payload, as the whole file
        "os.system": b"cos\nsystem\n(V" + touch.encode() + b"\ntR.",
        # a dict shaped like the official file, with the payload as its data entry (posix.system)
        "posix.system": _dumps({b"data": _SystemCall(touch), b"fine_labels": [0]}),
        "builtins.exec": b"cbuiltins\nexec\n(V" + code.encode() + b"\ntR.",
    }


def test_evil_payloads_are_live_with_plain_pickle(tmp_path):
    """Control: each payload does run under plain pickle, so the refusal test below can fail."""
    for i, (_, payload) in enumerate(_evil_payloads(tmp_path / "control").items()):
        marker = tmp_path / "control"
        if marker.exists():
            marker.unlink()
        pickle.loads(payload, encoding="bytes")
        assert marker.exists(), i


@pytest.mark.parametrize("which", ["os.system", "posix.system", "builtins.exec"])
@pytest.mark.parametrize("container", ["folder", "tar"])
def test_cifar_forbidden_global_refused(tmp_path, which, container):
    marker = tmp_path / "pwned"
    payload = _evil_payloads(marker)[which]
    objs = _c100_objects(20, 10)
    del objs["train"]
    if container == "folder":
        root = _write_folder(tmp_path, "cifar-100-python", objs, raw={"train": payload})
        name = str(root / "train")
    else:
        root = _write_tar(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", objs, raw={"train": payload})
        name = f"{root}:cifar-100-python/train"
    err = _raises_data_error(name, load_dataset, "cifar100", root=root)
    assert which in str(err)
    assert not marker.exists()


def _c100_with_train(tmp_path, train_obj):
    objs = _c100_objects(20, 10)
    objs["train"] = train_obj
    return _write_folder(tmp_path, "cifar-100-python", objs)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda d: d.update({b"data": d[b"data"][:, :3071]}), "N x 3072"),
        (lambda d: d.update({b"data": d[b"data"].reshape(-1, 3, 32, 32)}), "N x 3072"),
        (lambda d: d.update({b"data": d[b"data"].astype(np.int64)}), "uint8"),
        (lambda d: d.update({b"data": b"not an array"}), "N x 3072"),
        (lambda d: d[b"fine_labels"].__setitem__(3, 100), "label 100 out of range"),
        (lambda d: d[b"fine_labels"].__setitem__(3, -1), "label -1 out of range"),
        (lambda d: d[b"fine_labels"].pop(), "20 images but 19"),
        (lambda d: d.pop(b"fine_labels"), "fine_labels"),
        (lambda d: d.update({b"fine_labels": [b"x"] * 20}), "fine_labels"),
    ],
)
def test_cifar_malformed_contents(tmp_path, mutate, words):
    train = _c100_objects(20, 10)["train"]
    mutate(train)
    root = _c100_with_train(tmp_path, train)
    err = _raises_data_error(str(root / "train"), load_dataset, "cifar100", root=root)
    assert words in str(err)


def test_cifar_malformed_meta_and_not_a_dict(tmp_path):
    objs = _c100_objects(20, 10)
    objs["meta"][b"fine_label_names"] = objs["meta"][b"fine_label_names"][:99]
    root = _write_folder(tmp_path, "cifar-100-python", objs)
    _raises_data_error(str(root / "meta"), load_dataset, "cifar100", root=root)
    root2 = _c100_with_train(tmp_path / "x", [1, 2, 3])
    _raises_data_error(str(root2 / "train"), load_dataset, "cifar100", root=root2)


# --------------------------------------------------------------------------------------------
# ArrayDataset, registry
# --------------------------------------------------------------------------------------------


def _tiny(n=10, c=3, h=4, w=5, k=3, **kw):
    g = torch.Generator().manual_seed(0)
    args = dict(
        images=torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8),
        labels=torch.arange(n) % k,
        num_classes=k,
        mean=(0.5,) * c,
        std=(0.25,) * c,
        class_names=[f"c{i}" for i in range(k)],
        name="tiny",
        source="/data/tiny.bin",
    )
    args.update(kw)
    return args


def test_array_dataset_validation():
    ds = ArrayDataset(**_tiny())
    assert len(ds) == 10 and ds.image_shape == (3, 4, 5)
    bad = [
        dict(images=torch.zeros(10, 4, 5, dtype=torch.uint8)),
        dict(images=torch.zeros(10, 3, 4, 5)),
        dict(labels=torch.zeros(9, dtype=torch.int64)),
        dict(labels=torch.zeros(10, dtype=torch.int32)),
        dict(labels=torch.full((10,), 3)),
        dict(labels=torch.full((10,), -1)),
        dict(mean=(0.5, 0.5)),
        dict(std=(0.2, 0.0, 0.2)),
        dict(class_names=["a"]),
    ]
    for change in bad:
        with pytest.raises(DataError, match="/data/tiny.bin"):
            ArrayDataset(**_tiny(**change))
    sub = ds.subset([1, 3])
    assert torch.equal(sub.images, ds.images[[1, 3]]) and sub.mean == ds.mean


def test_load_dataset_errors():
    with pytest.raises(ConfigError) as info:
        load_dataset("mnist")
    for name in DATASETS:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="train"):
        load_dataset("digits", split="validation")
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=8)
    with pytest.raises(ConfigError, match="cifar100"):
        default_augment("mnist")


def test_default_augment_and_spec_validation():
    for name in ("cifar10", "cifar100"):
        assert default_augment(name) == AugmentSpec(crop_pad=4, flip=True, rotation=0.0)
    assert default_augment("digits") == AugmentSpec(crop_pad=1, flip=False, rotation=0.0)
    assert default_augment("imagefolder") == AugmentSpec(4, True, 0.0)
    assert default_augment("imagefolder", image_size=64).crop_pad == 8
    for kw in (dict(crop_pad=-1), dict(crop_pad=1.5), dict(flip="yes"), dict(rotation=-3), dict(rotation=400)):
        with pytest.raises(ConfigError):
            AugmentSpec(**kw)
        spec = default_augment("cifar10")  # a recipe overrides single fields: also validated
        with pytest.raises(ConfigError):
            setattr(spec, *next(iter(kw.items())))
    spec = default_augment("cifar100")
    spec.rotation = 15
    assert spec == AugmentSpec(4, True, 15.0) and isinstance(spec.rotation, float)
    assert default_augment("cifar100").rotation == 0.0  # the default is a fresh object
    with pytest.raises(ConfigError):
        spec.scale = 2


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------


def _image_tree(root: Path, test_name="test"):
    from PIL import Image

    rng = np.random.default_rng(3)
    spec = {
        "b_cat": [(".png", (20, 12)), (".jpg", (9, 9))],
        "a_dog": [(".PNG", (16, 16))],
        "c_fish": [(".bmp", (30, 18)), (".jpeg", (16, 16)), (".png", (5, 7))],
    }
    arrays = {}
    for split in ("train", test_name):
        for cls, files in spec.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i, (ext, (w, h)) in enumerate(files):
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                p = d / f"img{i}{ext}"
                Image.fromarray(arr).save(p, format={".jpg": "JPEG", ".jpeg": "JPEG"}.get(ext.lower(), None))
                arrays[p] = arr
            (d / "notes.txt").write_text("not an image")
    # one grey-scale image: converted to RGB
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(
        root / "train" / "a_dog" / "grey.png"
    )
    return arrays


def test_imagefolder_loads_sorted_classes_resized(tmp_path):
    from PIL import Image

    arrays = _image_tree(tmp_path)
    ds = load_dataset("imagefolder", root=tmp_path, split="train", image_size=16)
    assert ds.class_names == ["a_dog", "b_cat", "c_fish"] and ds.num_classes == 3
    assert ds.images.shape == (7, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    # a_dog/grey.png then a_dog/img0.PNG (16x16: not resized, lossless)
    assert torch.equal(ds.images[1], torch.from_numpy(arrays[tmp_path / "train/a_dog/img0.PNG"]).permute(2, 0, 1))
    grey = np.asarray(Image.open(tmp_path / "train/a_dog/grey.png"))
    assert torch.equal(ds.images[0], torch.from_numpy(np.stack([grey] * 3)))
    # b_cat/img0.png is 20x12, resized bilinearly to 16x16
    ref = np.array(Image.fromarray(arrays[tmp_path / "train/b_cat/img0.png"]).resize((16, 16), Image.BILINEAR))
    assert torch.equal(ds.images[2], torch.from_numpy(ref).permute(2, 0, 1))
    mean = ds.images.double().div(255).mean(dim=(0, 2, 3))
    assert np.allclose(ds.mean, mean.numpy(), atol=1e-9)
    assert np.allclose(
        ds.std, ds.images.double().div(255).permute(1, 0, 2, 3).reshape(3, -1).std(1, correction=0).numpy()
    )
    test = load_dataset("imagefolder", root=tmp_path, split="test", image_size=16)
    assert test.images.shape == (6, 3, 16, 16) and test.mean == ds.mean and test.std == ds.std
    assert test.labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert load_dataset("imagefolder", root=tmp_path).images.shape[-1] == 32  # default size


def test_imagefolder_val_and_errors(tmp_path):
    from PIL import Image

    _image_tree(tmp_path / "a", test_name="val")
    assert len(load_dataset("imagefolder", root=tmp_path / "a", split="test", image_size=8)) == 6
    # missing split
    (tmp_path / "b" / "train" / "x").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "b" / "train" / "x" / "a.png")
    assert len(load_dataset("imagefolder", root=tmp_path / "b", image_size=4)) == 1
    _raises_data_error(str(tmp_path / "b" / "test"), load_dataset, "imagefolder", root=tmp_path / "b", split="test")
    # empty class folder
    _image_tree(tmp_path / "c")
    (tmp_path / "c" / "train" / "d_empty").mkdir()
    (tmp_path / "c" / "train" / "d_empty" / "readme.txt").write_text("no images")
    _raises_data_error(str(tmp_path / "c" / "train" / "d_empty"), load_dataset, "imagefolder", root=tmp_path / "c")
    # unreadable image
    _image_tree(tmp_path / "d")
    bad = tmp_path / "d" / "train" / "b_cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _raises_data_error(str(bad), load_dataset, "imagefolder", root=tmp_path / "d")
    _raises_data_error("nothing", load_dataset, "imagefolder", root=tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_split():
    from sklearn.datasets import load_digits

    raw = load_digits()
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.num_classes == 10 and train.class_names[3] == "3"
    tr, te = digits_split_indices()
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 1797
    expected = np.array([[round(v * 255 / 16) for v in img.ravel()] for img in raw.images[te]], np.uint8)
    assert np.array_equal(test.images.reshape(360, 64).numpy(), expected)
    assert np.array_equal(train.labels.numpy(), raw.target[tr])
    counts_all = np.bincount(raw.target, minlength=10)
    counts_test = np.bincount(test.labels.numpy(), minlength=10)
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)  # stratified
    assert train.images.max() == 255 and train.images.min() == 0
    m = train.images.double().div(255).mean().item()
    s = train.images.double().div(255).std(correction=0).item()
    assert abs(train.mean[0] - m) < 1e-9 and abs(train.std[0] - s) < 1e-9
    assert test.mean == train.mean and test.std == train.std
    assert np.array_equal(digits_split_indices()[1], te)  # deterministic


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def _naive_views(images: np.ndarray, dx, dy, flip, p: int) -> np.ndarray:
    n, c, h, w = images.shape
    out = np.zeros_like(images)
    for i in range(n):
        padded = np.zeros((c, h + 2 * p, w + 2 * p), images.dtype)
        for y in range(h):
            for x in range(w):
                padded[:, y + p, x + p] = images[i, :, y, x]
        crop = padded[:, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        if flip[i]:
            crop = np.stack([crop[:, :, w - 1 - x] for x in range(w)], axis=2)
        out[i] = crop
    return out


@pytest.mark.parametrize("p", [0, 1, 3])
def test_apply_views_matches_naive(p):
    g = torch.Generator().manual_seed(p)
    imgs = torch.randint(1, 256, (40, 3, 5, 7), generator=g, dtype=torch.uint8)
    dx = torch.randint(0, 2 * p + 1, (40,), generator=g)
    dy = torch.randint(0, 2 * p + 1, (40,), generator=g)
    flip = torch.randint(0, 2, (40,), generator=g)
    dx[:4] = torch.tensor([0, 2 * p, 0, 2 * p])
    dy[:4] = torch.tensor([0, 0, 2 * p, 2 * p])
    got = apply_views(imgs, dx, dy, flip, p)
    want = _naive_views(imgs.numpy(), dx.tolist(), dy.tolist(), flip.tolist(), p)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), want)
    # the centre view without flip is the identity
    c = torch.full((40,), p)
    assert torch.equal(apply_views(imgs, c, c, torch.zeros(40, dtype=torch.int64), p), imgs)


def test_view_index_roundtrip():
    for p in (0, 1, 4):
        seen = []
        for dy in range(2 * p + 1):
            for dx in range(2 * p + 1):
                for f in (0, 1):
                    v = view_index(dx, dy, f, p)
                    assert view_from_index(v, p) == (dx, dy, f)
                    seen.append(v)
        assert sorted(seen) == list(range(num_views(p)))
    assert num_views(4) == 162 and view_index(8, 8, 1, 4) == 161
    dx, dy, f = torch.tensor([0, 3, 8]), torch.tensor([8, 2, 0]), torch.tensor([1, 0, 1])
    v = view_index(dx, dy, f, 4)
    assert v.tolist() == [view_index(a, b, c, 4) for a, b, c in zip(dx.tolist(), dy.tolist(), f.tolist())]
    assert all(torch.equal(a, b) for a, b in zip(view_from_index(v, 4), (dx, dy, f)))


def test_view_distribution_uniform():
    from scipy.stats import chisquare

    p, n = 4, 162 * 250
    spec = AugmentSpec(crop_pad=p, flip=True)
    dx, dy, flip = spec.sample_views(n, torch.Generator().manual_seed(123))
    assert dx.dtype == torch.int64 and int(dx.min()) == 0 and int(dx.max()) == 2 * p
    assert int(dy.min()) == 0 and int(dy.max()) == 2 * p and set(flip.unique().tolist()) == {0, 1}
    for values, bins in ((dx, 2 * p + 1), (dy, 2 * p + 1), (flip, 2), (view_index(dx, dy, flip, p), 162)):
        counts = torch.bincount(values, minlength=bins).numpy()
        assert len(counts) == bins
        assert chisquare(counts).pvalue > 1e-4, counts
    assert abs(flip.double().mean().item() - 0.5) < 0.01
    # disabled parts draw constants
    dx, dy, flip = sample_views(1000, torch.Generator().manual_seed(0), crop_pad=0, flip=False)
    assert dx.abs().sum() == 0 and dy.abs().sum() == 0 and flip.sum() == 0
    _, _, flip = AugmentSpec(crop_pad=2, flip=False).sample_views(1000, torch.Generator().manual_seed(0))
    assert flip.sum() == 0


def _naive_rotate(img: np.ndarray, angle: float):
    """Nearest-neighbour CCW rotation about the centre, zero fill; also a mask of near-ties."""
    c, h, w = img.shape
    a = math.radians(angle)
    out = np.zeros_like(img)
    tie = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            x, y = j - (w - 1) / 2, i - (h - 1) / 2
            xs = math.cos(a) * x - math.sin(a) * y + (w - 1) / 2
            ys = math.sin(a) * x + math.cos(a) * y + (h - 1) / 2
            tie[i, j] = min(abs(xs - math.floor(xs) - 0.5), abs(ys - math.floor(ys) - 0.5)) < 1e-3
            r, s = int(np.rint(ys)), int(np.rint(xs))
            if 0 <= r < h and 0 <= s < w:
                out[:, i, j] = img[:, r, s]
    return out, tie


def test_rotation_special_angles():
    g = torch.Generator().manual_seed(0)
    for size in (6, 7):
        x = torch.randint(1, 256, (4, 3, size, size), generator=g).float()
        assert torch.equal(rotate_batch(x, torch.zeros(4)), x)
        # np.rot90 / torch.rot90 over (H, W) turn counter-clockwise, like a positive angle.
        got = rotate_batch(x, torch.tensor([90.0, 180.0, -90.0, 270.0]))
        for i, k in enumerate((1, 2, -1, 3)):
            assert torch.equal(got[i], torch.rot90(x[i], k, dims=(-2, -1))), (size, k)
    # a pixel right of the centre goes above it under +90 degrees
    one = torch.zeros(1, 1, 5, 5)
    one[0, 0, 2, 4] = 1.0
    assert rotate_batch(one, torch.tensor([90.0]))[0, 0, 0, 2] == 1.0


def test_rotation_matches_naive_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 256, (6, 2, 9, 13), generator=g).float()
    angles = torch.tensor([12.5, -33.0, 45.0, 7.0, -150.0, 0.3])
    got = rotate_batch(x, angles).numpy()
    checked = 0
    for i in range(6):
        want, tie = _naive_rotate(x[i].numpy(), float(angles[i]))
        ok = ~tie
        assert np.array_equal(got[i][:, ok], want[:, ok]), i
        checked += ok.sum()
    assert checked > 0.9 * 6 * 9 * 13
    assert (got == 0).any()  # corners filled with zeros


def test_sampled_angles_range():
    spec = AugmentSpec(rotation=20.0)
    v = spec.sample(20000, torch.Generator().manual_seed(0))
    assert v.angle.dtype == torch.float32
    assert v.angle.min() >= -20 and v.angle.max() <= 20
    assert v.angle.min() < -19.5 and v.angle.max() > 19.5 and abs(v.angle.mean()) < 0.5
    hist = torch.histc(v.angle, bins=10, min=-20, max=20)
    assert (hist - 2000).abs().max() < 250


# --------------------------------------------------------------------------------------------
# DeviceLoader
# --------------------------------------------------------------------------------------------


def _random_ds(n=103, c=3, h=6, w=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(
        images=torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8),
        labels=torch.randint(0, k, (n,), generator=g),
        num_classes=k,
        mean=(0.3, 0.5, 0.6)[:c],
        std=(0.2, 0.25, 0.3)[:c],
        class_names=[str(i) for i in range(k)],
        name="random",
    )


def _naive_normalise(imgs: np.ndarray, mean, std) -> np.ndarray:
    m = np.asarray(mean, np.float64)[None, :, None, None]
    s = np.asarray(std, np.float64)[None, :, None, None]
    return (imgs.astype(np.float64) / 255.0 - m) / s


def test_eval_loader_in_order_and_normalised():
    ds = load_dataset("digits", split="test")
    loader = DeviceLoader(ds, batch_size=100, train=False, augment=default_augment("digits"))
    assert len(loader) == 4
    xs, ys = [], []
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.device.type == "cpu"
        xs.append(x)
        ys.append(y)
    assert [len(y) for y in ys] == [100, 100, 100, 60]
    x = torch.cat(xs)
    assert torch.equal(torch.cat(ys), ds.labels)
    want = _naive_normalise(ds.images.numpy(), ds.mean, ds.std)
    assert np.allclose(x.numpy(), want, atol=1e-5, rtol=0)
    # eval ignores augmentation and the epoch
    loader.set_epoch(5)
    assert torch.equal(torch.cat([x for x, _ in loader]), x)


def test_train_loader_batches_and_drop_last():
    ds = _random_ds()
    loader = DeviceLoader(ds, batch_size=10, train=True)
    assert loader.drop_last and len(loader) == 10
    assert len(DeviceLoader(ds, batch_size=10, train=True, drop_last=False)) == 11
    assert len(DeviceLoader(ds, batch_size=10, train=False)) == 11
    assert len(DeviceLoader(ds, batch_size=10, train=False, drop_last=True)) == 10
    seen = []
    for x, y, idx, view in loader.iter_batches(with_meta=True):
        assert x.shape == (10, 3, 6, 6) and y.shape == (10,)
        assert torch.equal(y, ds.labels[idx]) and view.eq(0).all()
        want = _naive_normalise(ds.images[idx].numpy(), ds.mean, ds.std)
        assert np.allclose(x.numpy(), want, atol=1e-5)
        seen.append(idx)
    seen = torch.cat(seen)
    assert len(seen.unique()) == 100  # a permutation, minus the dropped tail
    assert not torch.equal(seen, torch.arange(100))  # shuffled
    with pytest.raises(ConfigError):
        DeviceLoader(ds, batch_size=200, train=True)
    for bad in (dict(batch_size=0), dict(shard=(2, 2)), dict(seed=-1), dict(augment="crop")):
        with pytest.raises(ConfigError):
            DeviceLoader(ds, **{"batch_size": 4, "train": True, **bad})


def test_augmented_batches_match_naive_views():
    ds = _random_ds(n=64, h=5, w=7)
    spec = AugmentSpec(crop_pad=2, flip=True)
    loader = DeviceLoader(ds, batch_size=16, train=True, augment=spec, seed=7)
    loader.set_epoch(2)
    views_seen = []
    for x, _y, idx, view in loader.iter_batches(with_meta=True):
        dx, dy, flip = view_from_index(view, 2)
        crops = _naive_views(ds.images[idx].numpy(), dx.tolist(), dy.tolist(), flip.tolist(), 2)
        assert np.allclose(x.numpy(), _naive_normalise(crops, ds.mean, ds.std), atol=1e-5)
        views_seen.append(view)
    views_seen = torch.cat(views_seen)
    assert len(views_seen.unique()) > 20 and views_seen.max() < num_views(2)


def _batches(loader, epoch, **kw):
    loader.set_epoch(epoch)
    return list(loader.iter_batches(with_meta=True, **kw))


def _same(a, b):
    return len(a) == len(b) and all(all(torch.equal(u, v) for u, v in zip(p, q)) for p, q in zip(a, b))


def test_loader_deterministic_per_seed_and_epoch():
    ds = _random_ds()
    spec = AugmentSpec(crop_pad=2, flip=True, rotation=10.0)
    a = DeviceLoader(ds, batch_size=8, train=True, augment=spec, seed=3)
    mutable = AugmentSpec(crop_pad=2, flip=True, rotation=10.0)
    b = DeviceLoader(ds, batch_size=8, train=True, augment=mutable, seed=3)
    mutable.crop_pad, mutable.rotation = 0, 0.0  # the loader took a snapshot
    for e in range(3):  # "crash" after epoch 2, then a fresh loader resumes at epoch 3
        _batches(a, e)
    assert _same(_batches(a, 3), _batches(b, 3))
    assert _same(_batches(a, 3), _batches(a, 3))  # re-iterating an epoch repeats it
    e3, e4 = _batches(a, 3), _batches(a, 4)
    assert not torch.equal(e3[0][2], e4[0][2]) and not torch.equal(e3[0][0], e4[0][0])
    c = DeviceLoader(ds, batch_size=8, train=True, augment=spec, seed=4)
    assert not torch.equal(_batches(c, 3)[0][2], e3[0][2])
    assert _same(_batches(b, 3, start=5), e3[5:])  # mid-epoch resume


def test_shards_disjoint_equal_and_cover_the_epoch():
    ds = _random_ds(n=103)
    spec = AugmentSpec(crop_pad=1, flip=True)
    full = DeviceLoader(ds, batch_size=5, train=True, augment=spec, seed=1, drop_last=False)
    full.set_epoch(2)
    order, views = full.epoch_plan()
    full_view = dict(zip(order.tolist(), view_index(views.dx, views.dy, views.flip, 1).tolist()))
    world, per_rank = 4, 5
    glob = per_rank * world
    single = _batches(DeviceLoader(ds, batch_size=glob, train=True, augment=spec, seed=1), 2)  # one process, batch 20
    shards = []
    for rank in range(world):
        ld = DeviceLoader(ds, batch_size=per_rank, train=True, augment=spec, seed=1, shard=(rank, world))
        assert len(ld) == 103 // glob == 5
        got = _batches(ld, 2)
        idx = torch.cat([m[2] for m in got])
        vi = torch.cat([m[3] for m in got])
        assert len(idx) == 25
        # a sample's view does not depend on the sharding
        assert all(full_view[i] == v for i, v in zip(idx.tolist(), vi.tolist()))
        # strided per step: rank r's step-i batch is positions [i*G + r*B, i*G + (r+1)*B) of the permutation
        for step, (_, _, bidx, _) in enumerate(got):
            lo = step * glob + rank * per_rank
            assert bidx.tolist() == order[lo : lo + per_rank].tolist(), (rank, step)
        shards.append(got)
    allidx = torch.cat([m[2] for got in shards for m in got])
    assert len(allidx.unique()) == 100  # disjoint
    assert set(allidx.tolist()) == set(order[:100].tolist())  # the epoch's permutation, less its tail
    # the ranks' step-i batches, side by side, are one process's step-i batch of 20: same samples, same pixels
    for step, (x, _y, idx, vi) in enumerate(single):
        assert torch.equal(torch.cat([shards[r][step][2] for r in range(world)]), idx)
        assert torch.equal(torch.cat([shards[r][step][0] for r in range(world)]), x)
        assert torch.equal(torch.cat([shards[r][step][3] for r in range(world)]), vi)
    with pytest.raises(ConfigError, match="drop_last"):
        DeviceLoader(ds, batch_size=5, train=True, shard=(0, 2), drop_last=False)
    with pytest.raises(ConfigError, match="global batch of 120"):
        DeviceLoader(ds, batch_size=30, train=True, shard=(1, 4))
    # eval shards: contiguous, in order, every sample exactly once
    ev = [torch.cat([y for _, y in DeviceLoader(ds, 10, train=False, shard=(r, world))]) for r in range(world)]
    assert torch.equal(torch.cat(ev), ds.labels)


def test_loader_rotation_applied():
    ds = _random_ds(n=32)
    spec = AugmentSpec(rotation=30.0)
    loader = DeviceLoader(ds, batch_size=32, train=True, augment=spec, seed=0)
    order, views = loader.epoch_plan()
    ((x, _),) = list(loader)
    want = rotate_batch(ds.images[order].float(), views.angle)
    want = (want / 255 - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    assert torch.allclose(x, want, atol=1e-5)
    plain = (ds.images[order].float() / 255 - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(
        1, 3, 1, 1
    )
    assert not torch.allclose(x, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    ds = _random_ds()
    spec = AugmentSpec(crop_pad=2, flip=True)
    cpu = DeviceLoader(ds, 16, train=True, augment=spec, seed=5)
    gpu = DeviceLoader(ds, 16, train=True, augment=spec, seed=5, device="cuda")
    for (xc, yc, ic, vc), (xg, yg, ig, vg) in zip(_batches(cpu, 1), _batches(gpu, 1)):
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(ic, ig.cpu()) and torch.equal(vc, vg.cpu()) and torch.equal(yc, yg.cpu())
        assert torch.allclose(xc, xg.cpu(), atol=1e-6)


# --------------------------------------------------------------------------------------------
# The real CIFAR-100 (slow)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_cifar100(tmp_path):
    env = os.environ.get("KDLAB_CIFAR100")
    if env:
        root = Path(env)
        if not root.exists():
            pytest.skip(f"KDLAB_CIFAR100={env} does not exist")
    else:
        parts = sorted(CIFAR100_DIR.glob("cifar-100-python.tar.gz.part*"))
        if not parts:
            pytest.skip(f"no CIFAR-100 at {CIFAR100_DIR}")
        root = tmp_path / "cifar-100-python.tar.gz"
        with open(root, "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
    train = load_dataset("cifar100", root=root, split="train")
    test = load_dataset("cifar100", root=root, split="test")
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(train.labels, minlength=100).eq(500).all()
    assert torch.bincount(test.labels, minlength=100).eq(100).all()
    assert len(train.class_names) == 100 and train.class_names[0] == "apple"
    mean = train.images.double().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(CIFAR100_MEAN, dtype=torch.float64), atol=1e-3)


# --------------------------------------------------------------------------------------------
# Data faults named at the command line
# --------------------------------------------------------------------------------------------


def _cifar100_objects(n_train=40, n_test=20):
    rng = np.random.default_rng(0)
    objs = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        objs[split] = {
            b"fine_labels": fine,
            b"coarse_labels": [v // 5 for v in fine],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"batch_label": b"x",
        }
    objs["meta"] = {
        b"fine_label_names": [f"c{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"s{i}".encode() for i in range(20)],
    }
    return objs


def _cifar_folder(parent: Path, objs: dict) -> Path:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, obj in objs.items():
        (folder / name).write_bytes(pickle.dumps(obj, protocol=3))
    return folder


def _cifar_tar(path: Path, objs: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, obj in objs.items():
            data = pickle.dumps(obj, protocol=3)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_cifar_faults_are_named_at_the_cli(tmp_path, capsys):
    def train_on(root, *names):
        out = tmp_path / f"out_{uuid.uuid4().hex[:6]}"
        refused(
            capsys,
            [
                "train",
                VANILLA,
                "--out",
                str(out),
                *TINY,
                *sets("data.name=cifar100", f"data.root={root}", "train.batch_size=16"),
            ],
            *names,
        )
        assert not (out / "result.json").exists()

    good = _cifar100_objects()
    assert (
        main(
            [
                "train",
                VANILLA,
                "--out",
                str(tmp_path / "control"),
                *TINY,
                *sets(
                    "data.name=cifar100", f"data.root={_cifar_folder(tmp_path / 'good', good)}", "train.batch_size=16"
                ),
            ]
        )
        == 0
    )  # control
    capsys.readouterr()
    tar = _cifar_tar(tmp_path / "cut" / "cifar-100-python.tar.gz", good)
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    train_on(tar, tar)
    shapes = _cifar100_objects()
    shapes["train"][b"data"] = shapes["train"][b"data"][:, :3000]
    train_on(_cifar_folder(tmp_path / "shape", shapes), tmp_path / "shape" / "cifar-100-python" / "train", "3072")
    labels = _cifar100_objects()
    labels["test"][b"fine_labels"][3] = 100
    train_on(_cifar_folder(tmp_path / "labels", labels), tmp_path / "labels" / "cifar-100-python" / "test", "label 100")
    train_on(tmp_path / "nowhere", tmp_path / "nowhere")


def test_empty_class_folder_is_named_at_the_cli(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / cls / f"{i}.png")
    (root / "train" / "emu").mkdir()
    out = tmp_path / "out"
    refused(
        capsys,
        [
            "train",
            VANILLA,
            "--out",
            str(out),
            *TINY,
            *sets("data.name=imagefolder", f"data.root={root}", "data.image_size=8", "train.batch_size=2"),
        ],
        root / "train" / "emu",
    )
    assert not (out / "result.json").exists()


# --------------------------------------------------------------------------------------------
# ImageFolder: unreadable files skipped and counted on request; 16-bit PNGs scaled
# --------------------------------------------------------------------------------------------


def _folder(root: Path, broken: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    for i in range(broken):
        (root / "train" / "a" / f"broken{i}.png").write_bytes(b"not a png")
    return root


def test_unreadable_images_are_skipped_and_counted_when_asked(tmp_path, capsys):
    from kdlab.data import load_dataset
    from kdlab.errors import DataError

    root = _folder(tmp_path / "imgs", broken=2)
    with pytest.raises(DataError, match="broken0.png: unreadable.*skip_unreadable"):
        load_dataset("imagefolder", root, split="train", image_size=8)
    ds = load_dataset("imagefolder", root, split="train", image_size=8, skip_unreadable=True)
    assert len(ds.labels) == 6 and len(ds.skipped) == 2 and "broken0.png" in ds.skipped[0]
    ok(
        capsys,
        [
            "train",
            VANILLA,
            "--out",
            str(tmp_path / "run"),
            "--set",
            "train.epochs=1",
            "--set",
            "train.batch_size=2",
            *sets("data.name=imagefolder", f"data.root={root}", "data.image_size=8", "data.skip_unreadable=true"),
        ],
    )
    assert "2 unreadable file(s) left out of train" in (tmp_path / "run" / "log.txt").read_text()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    from kdlab.data.imagefolder import _read_image

    values = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    arr = _read_image(path, 8)
    assert arr.shape == (3, 8, 8) and (arr[0] == arr[1]).all() and (arr[0] == arr[2]).all()
    assert np.abs(arr[0].astype(float) - values / 257.0).max() <= 0.5  # 63000 -> 245, not 255 from 256 up
    assert arr.reshape(-1).tolist().count(255) == 0
