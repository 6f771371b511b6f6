"""The streaming image-folder loader (data.loader: stream): its file index, its transforms, its determinism,
its sharding and its wiring into a run. Tiny generated folders; every check is against a reference written
here (torchvision's RandomResizedCrop rule in float64 Python, PIL's resize and crop called directly)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdlab import pipeline
from kdlab.cli import main
from kdlab.data import folder_index as fi
from kdlab.data.loader import epoch_seed
from kdlab.data.stream import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    StreamLoader,
    choose_loader,
    eval_view,
    open_rgb,
    open_stream,
    resized_crop_boxes,
    train_view,
)
from kdlab.errors import ConfigError, DataError
from kdlab.recipe_files import validate
from kdlab.student import load_data, resolve_weights

CLASSES = ("ant", "bee", "cat")


def make_folder(root: Path, per_class: int = 6, splits=("train", "test")) -> Path:
    """Images of varied sizes and aspect ratios, PNG and JPEG, RGB and greyscale."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                h, w = 18 + 5 * i + c, 40 - 3 * i
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                img = Image.fromarray(arr) if i % 3 else Image.fromarray(arr[:, :, 0], mode="L")
                img.save(root / split / cls / f"{i}.{'jpg' if i % 2 else 'png'}", quality=90)
    return root


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    return make_folder(tmp_path / "data")


# ----------------------------------------------------------------------------------------------
# The file index


def test_index_lists_the_folder_once_and_is_read_back(folder, monkeypatch):
    first = fi.folder_index(folder, "train")
    assert not first.from_cache and first.cache_path == folder / ".kdlab-index-train.json"
    assert first.classes == list(CLASSES)
    assert first.paths[:2] == ["ant/0.png", "ant/1.jpg"] and len(first) == 18
    for rel, w, h, n in zip(first.paths, first.widths, first.heights, first.nbytes):
        with Image.open(first.split_dir / rel) as im:
            assert im.size == (w, h)
        assert (first.split_dir / rel).stat().st_size == n
    assert first.labels.tolist() == [k for k in range(3) for _ in range(6)]

    def no_listing(class_dir):
        raise AssertionError(f"listed {class_dir}")

    monkeypatch.setattr(fi, "_list_files", no_listing)
    second = fi.folder_index(folder, "train")
    assert second.from_cache
    assert second.paths == first.paths and torch.equal(second.labels, first.labels)
    assert (second.widths == first.widths).all() and (second.heights == first.heights).all()


def test_a_stale_index_is_rebuilt(folder):
    fi.folder_index(folder, "train")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(folder / "train" / "bee" / "new.png")
    again = fi.folder_index(folder, "train")
    assert not again.from_cache and "bee/new.png" in again.paths and len(again) == 19
    (folder / "train" / "cat" / "0.png").unlink()
    third = fi.folder_index(folder, "train")
    assert not third.from_cache and "cat/0.png" not in third.paths
    assert fi.folder_index(folder, "train").from_cache


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc: "{not json",
        lambda doc: json.dumps({**doc, "files": [["ant/0.png", 7, 10, 5, 5]]}),  # label outside the classes
        lambda doc: json.dumps({**doc, "files": [["../../etc/x.png", 0, 10, 5, 5]]}),
        lambda doc: json.dumps({**doc, "version": 99}),
    ],
)
def test_a_damaged_index_is_rebuilt_with_a_notice(folder, damage):
    fi.folder_index(folder, "train")
    path = folder / ".kdlab-index-train.json"
    path.write_text(damage(json.loads(path.read_text())))
    notices = []
    again = fi.folder_index(folder, "train", notice=notices.append)
    assert not again.from_cache and len(again) == 18
    assert len(notices) == 1 and "damaged file index" in notices[0] and str(path) in notices[0]
    assert fi.folder_index(folder, "train").from_cache  # the rebuilt one was written back


def test_an_unwritable_data_folder_keeps_the_index_in_the_user_cache(folder, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    real = fi.index_paths
    monkeypatch.setattr(fi, "index_paths", lambda root, split: [blocker / "x.json", real(root, split)[1]])
    built = fi.folder_index(folder, "train")
    assert built.cache_path == real(folder, "train")[1] and str(tmp_path / "user-cache") in str(built.cache_path)
    assert fi.folder_index(folder, "train").from_cache


def test_unreadable_headers_stop_or_are_skipped(folder):
    (folder / "train" / "ant" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"broken.png: unreadable image.*skip_unreadable"):
        fi.folder_index(folder, "train")
    ix = fi.folder_index(folder, "train", skip_unreadable=True)
    assert len(ix) == 18 and len(ix.skipped) == 1 and "broken.png" in ix.skipped[0]
    with pytest.raises(DataError, match="broken.png"):  # the cached index remembers what it left out
        fi.folder_index(folder, "train")


def test_a_file_that_fails_to_decode_is_named(folder):
    path = folder / "train" / "bee" / "1.jpg"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 3 // 4])  # the header survives, the pixels do not
    ds = open_stream(folder, "train", 16)
    with pytest.raises(DataError, match=r"bee/1.jpg: unreadable image"):
        list(StreamLoader(ds, 4, train=True))


def test_test_split_classes_come_from_train(folder):
    (folder / "test" / "dog").mkdir()
    with pytest.raises(DataError, match="dog not in the train split"):
        fi.folder_index(folder, "test")


# ----------------------------------------------------------------------------------------------
# Transforms


def naive_crop_box(width, height, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params (torchvision/transforms/transforms.py), its random draws
    replaced by the uniforms u[t] = (area, log-ratio, row, column) of try t."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[t][0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[t][1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(math.floor(u[t][2] * (height - h + 1)))
            j = int(math.floor(u[t][3] * (width - w + 1)))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_crop_boxes_follow_the_random_resized_crop_rule():
    rng = np.random.default_rng(1)
    n = 400
    widths = rng.integers(1, 600, n)
    heights = rng.integers(1, 600, n)
    widths[:40], heights[:40] = 1000, rng.integers(1, 12, 40)  # so elongated that every try misses
    widths[40:60], heights[40:60] = rng.integers(1, 12, 20), 900
    draws = rng.random((n, 41))
    got = resized_crop_boxes(widths, heights, draws)
    fallbacks = 0
    for k in range(n):
        u = draws[k, :40].reshape(10, 4).tolist()
        want = naive_crop_box(int(widths[k]), int(heights[k]), u)
        assert tuple(got[k].tolist()) == want, (k, widths[k], heights[k])
        top, left, h, w = want
        assert 0 <= top and top + h <= heights[k] and 0 <= left and left + w <= widths[k]
        fallbacks += all(
            not (0 < round(math.sqrt(widths[k] * heights[k] * (0.08 + 0.92 * a) * math.exp(b))) <= widths[k])
            or not (0 < round(math.sqrt(widths[k] * heights[k] * (0.08 + 0.92 * a) / math.exp(b))) <= heights[k])
            for a, b in ((x[0], math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * x[1]) for x in u)
        )
    assert fallbacks >= 40  # the central-crop fallback was exercised


def test_eval_view_is_resize_then_centre_crop(folder):
    size = 12
    short = round(size * 256 / 224)  # 14: rounded, not truncated (13)
    for rel in ("ant/0.png", "bee/3.jpg", "cat/4.png"):
        img = open_rgb(folder / "test" / rel)
        w, h = img.size
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        ref = img.resize(new, Image.BILINEAR)
        top, left = round((new[1] - size) / 2), round((new[0] - size) / 2)
        ref = np.asarray(ref.crop((left, top, left + size, top + size))).transpose(2, 0, 1)
        assert np.array_equal(eval_view(img, size), ref)


def test_train_view_is_crop_resize_flip(folder):
    img = open_rgb(folder / "train" / "cat" / "2.png")
    box = (3, 5, 11, 17)
    ref = np.asarray(img.crop((5, 3, 22, 14)).resize((8, 8), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(train_view(img, box, False, 8), ref)
    assert np.array_equal(train_view(img, box, True, 8), ref[:, :, ::-1])


def test_batches_hold_the_documented_views(folder):
    """The loader's first batch, rebuilt here from the documented seeding: randperm of epoch_seed(seed, epoch),
    position p's uniforms row p % 1024 of the block drawn by epoch_seed(epoch_seed(seed, epoch), 1 + p // 1024),
    ImageNet's mean/std."""
    ds = open_stream(folder, "train", 12)
    loader = StreamLoader(ds, 5, train=True, seed=7)
    loader.set_epoch(3)
    x, y, idx, view = next(loader.iter_batches(with_meta=True))
    g = torch.Generator().manual_seed(epoch_seed(7, 3))
    perm = torch.randperm(18, generator=g)
    block = torch.rand(
        (1024, 41), dtype=torch.float64, generator=torch.Generator().manual_seed(epoch_seed(epoch_seed(7, 3), 1))
    ).numpy()
    assert idx.tolist() == perm[:5].tolist() and y.tolist() == ds.labels[perm[:5]].tolist()
    assert view.tolist() == [0] * 5
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    for p in range(5):
        row = int(perm[p])
        img = open_rgb(Path(ds.split_dir) / ds.paths[row])
        box = naive_crop_box(img.size[0], img.size[1], block[p, :40].reshape(10, 4).tolist())
        crop = img.crop((box[1], box[0], box[1] + box[3], box[0] + box[2])).resize((12, 12), Image.BILINEAR)
        ref = np.asarray(crop).transpose(2, 0, 1)
        if block[p, 40] < 0.5:
            ref = ref[:, :, ::-1]
        want = (torch.from_numpy(ref.copy()).double() / 255 - mean) / std
        assert torch.allclose(x[p].double(), want, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Determinism and sharding


def batches(loader, **kw):
    return [tuple(t.clone() for t in b) for b in loader.iter_batches(with_meta=True, **kw)]


def same(a, b):
    return len(a) == len(b) and all(all(torch.equal(s, t) for s, t in zip(p, q)) for p, q in zip(a, b))


def test_order_and_views_do_not_depend_on_the_workers(folder):
    ds = open_stream(folder, "train", 12)
    runs = []
    for workers in (0, 2):
        loader = StreamLoader(ds, 4, train=True, seed=5, workers=workers, prefetch=1)
        loader.set_epoch(2)
        runs.append(batches(loader))
    assert len(runs[0]) == 4 and same(runs[0], runs[1])
    loader.set_epoch(3)
    assert not same(batches(loader), runs[0])


def test_resume_at_batch_k_gives_the_tail_of_the_epoch(folder):
    loader = StreamLoader(open_stream(folder, "train", 12), 3, train=True, seed=1)
    loader.set_epoch(4)
    full = batches(loader)
    for k in (1, 4):
        assert same(batches(loader, start=k), full[k:])
    ev = StreamLoader(open_stream(folder, "test", 12), 5, train=False)
    assert same(batches(ev, start=2), batches(ev)[2:])


def test_sharded_ranks_make_the_single_process_global_batches(folder):
    ds = open_stream(folder, "train", 10)
    single = StreamLoader(ds, 4, train=True, seed=2)
    single.set_epoch(1)
    whole = batches(single)
    ranks = []
    for r in range(2):
        loader = StreamLoader(ds, 2, train=True, seed=2, shard=(r, 2))
        loader.set_epoch(1)
        ranks.append(batches(loader))
        assert len(loader) == 18 // 4 and loader.num_samples == 8
    for i, global_batch in enumerate(whole):
        for part in range(4):
            assert torch.equal(torch.cat([ranks[0][i][part], ranks[1][i][part]]), global_batch[part])


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_eval_sees_every_sample_once(folder, world):
    ds = open_stream(folder, "test", 10)
    single = batches(StreamLoader(ds, 4, train=False))
    parts = [batches(StreamLoader(ds, 4, train=False, shard=(r, world))) for r in range(world)]
    sizes = [sum(len(b[1]) for b in p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    seen = torch.cat([b[2] for p in parts for b in p])
    assert seen.tolist() == list(range(18))
    assert torch.equal(torch.cat([b[0] for p in parts for b in p]), torch.cat([b[0] for b in single]))


def test_the_loader_works_ahead_by_workers_x_prefetch_batches_only(folder):
    ds = open_stream(folder, "train", 8)
    for workers, prefetch in ((0, 2), (2, 1), (2, 3)):
        loader = StreamLoader(ds, 1, train=True, workers=workers, prefetch=prefetch)
        made = []
        keys = loader._keys

        def counted(start, keys=keys, made=made):
            for key in keys(start):
                made.append(key)
                yield key

        loader._keys = counted
        it = loader.iter_batches()
        next(it)
        assert len(made) <= max(1, workers * prefetch) + 1, (workers, prefetch, len(made))
        assert len(list(it)) == 17 and len(made) == 18


def test_a_validation_split_of_a_streamed_folder(folder):
    from kdlab.data.val_split import hold_out, stratified_indices

    ds = open_stream(folder, "train", 8)
    rest, val = hold_out(ds, 6, seed=3)
    keep, held = stratified_indices(ds.labels, 6, 3, 3)
    assert val.paths == [ds.paths[i] for i in held.tolist()] and rest.paths == [ds.paths[i] for i in keep.tolist()]
    assert torch.equal(val.labels, ds.labels[held]) and torch.bincount(val.labels).tolist() == [2, 2, 2]
    assert (val.widths == ds.widths[held.numpy()]).all() and val.mean == IMAGENET_MEAN
    assert len(batches(StreamLoader(val, 4, train=False))) == 2


# ----------------------------------------------------------------------------------------------
# Recipes and runs


def recipe(root, **data):
    return validate(
        {
            "data": {"name": "imagefolder", "root": str(root), "image_size": 12, **data},
            "student": {"name": "resnet8"},
            "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "schedule": {"milestones": [1]}},
        }
    )


def test_a_streamed_run_trains_one_epoch(folder, tmp_path, capsys):
    r = recipe(folder, loader="stream", workers=0, val_split=3)
    data = load_data(r)
    assert data.streamed and len(data.train) == 15 and len(data.val) == 3 and data.in_chans == 3
    result = pipeline.run(r, tmp_path / "run", quiet=True)
    assert result["epochs"] == 1 and result["val_images"] == 3 and result["selected_on"] == "val"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == 1 and "val_top1" in rows[-1]
    _, meta = resolve_weights(tmp_path / "run")
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["class_names"] == list(CLASSES)
    assert main(["eval", str(tmp_path / "run"), "--device", "cpu"]) == 0  # streams the test split too
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["images"] == 18 and metrics["top1"] == pytest.approx(result["top1_last"])


def test_auto_streams_only_what_would_not_fit(folder, monkeypatch):
    import kdlab.data.stream as stream

    assert choose_loader("auto", "imagefolder", folder, 12) == "memory"
    monkeypatch.setattr(stream, "memory_threshold", lambda: 36 * 3 * 12 * 12 - 1)
    assert choose_loader("auto", "imagefolder", folder, 12) == "stream"
    assert choose_loader("auto", "digits", None, 12) == "memory"
    assert load_data(recipe(folder)).streamed
    with pytest.raises(ConfigError, match=r"data\.augment\.crop_pad: the stream loader.*auto streams"):
        load_data(recipe(folder, augment={"crop_pad": 2}))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "cifar100", "loader": "stream"}, r"data\.loader: stream reads image folders only"),
        ({"name": "digits", "loader": "stream"}, r"data\.loader: stream reads image folders only"),
        ({"loader": "stream", "workers": -1}, r"data\.workers: .*greater than or equal to 0"),
        ({"loader": "stream", "workers": "two"}, r"data\.workers: "),
        ({"loader": "stream", "prefetch": 0}, r"data\.prefetch: "),
        ({"loader": "disk"}, r"data\.loader: "),
        ({"loader": "stream", "augment": {"rotation": 10}}, r"data\.augment\.rotation: the stream loader"),
    ],
)
def test_bad_stream_keys_are_one_line_errors(data, message):
    raw = {"data": {"name": "imagefolder", "root": "somewhere", **data}, "student": {"name": "resnet8"}}
    if raw["data"]["name"] != "imagefolder":
        raw["data"].pop("root")
    with pytest.raises(ConfigError, match=message) as err:
        validate(raw)
    assert "\n" not in str(err.value)


def test_the_teacher_cache_is_refused_for_a_streamed_folder():
    raw = {
        "data": {"name": "imagefolder", "root": "somewhere", "loader": "stream"},
        "student": {"name": "resnet8"},
        "train": {"teacher_cache": True},
    }
    with pytest.raises(ConfigError, match=r"train\.teacher_cache: the stream loader.*no finite set of views"):
        validate(raw)


@pytest.mark.slow
def test_two_ranks_stream_like_one_process_at_the_global_batch(folder, tmp_path):
    """A real two-rank torchrun job (gloo, CPU) on a streamed folder: rank 0 builds the index, each rank
    decodes its share of every step, and the run matches one process at the global batch."""
    import os
    import subprocess
    import sys

    from kdlab import checkpoint, distributed
    from kdlab.recipe_files import dump

    root = Path(__file__).resolve().parents[1]
    r = validate(
        {
            "data": {"name": "imagefolder", "root": str(folder), "image_size": 12, "loader": "stream", "workers": 1},
            "student": {"name": "resnet8"},
            "train": {
                "epochs": 2,
                "batch_size": 6,
                "lr": 0.01,  # at 0.05 these 6 steps on 12-pixel crops amplify float rounding to 1e-3 in the weights
                "device": "cpu",
                "schedule": {"milestones": [2]},
                "sync_bn": True,
                "channels_last": "off",
            },
        }
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(dump(r))
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(port), "-m", "kdlab", "train", str(path), "--out", str(tmp_path / "ddp"), "--quiet"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        distributed.ENV_TIMEOUT: "60",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pipeline.run(r, tmp_path / "one", quiet=True)
    ddp, one = (
        [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("ddp", "one")
    )
    assert len(ddp) == len(one) == 2
    for d, s in zip(ddp, one):
        assert abs(d["train_loss"] - s["train_loss"]) < 1e-5 and d["test_top1"] == s["test_top1"]
    a = checkpoint.load(tmp_path / "ddp" / "student.safetensors")[0]
    b = checkpoint.load(tmp_path / "one" / "student.safetensors")[0]
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 1e-5


# ----------------------------------------------------------------------------------------------
# What real folders hold: odd colour modes, misnamed files, missing or mismatched splits, empty files


def test_greyscale_cmyk_and_a_png_named_jpeg_decode_to_rgb_on_both_paths(tmp_path, monkeypatch):
    """ImageNet's train split has greyscale and CMYK JPEGs and one PNG named .JPEG; both loaders give PIL's
    own convert('RGB') of each (16x16 files at image_size 16: the memory path stores them unresized; the
    stream's eval view at 14 crops the central 14x14, its resize target being 16)."""
    from kdlab.data.imagefolder import load_imagefolder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    rng = np.random.default_rng(5)
    root = tmp_path / "odd"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            rgb = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            rgb.save(d / "0_rgb.JPEG", quality=95)
            rgb.convert("L").save(d / "1_grey.JPEG", quality=95)
            rgb.convert("CMYK").save(d / "2_cmyk.JPEG", quality=95)
            rgb.save(d / "3_png.JPEG", format="PNG")
    modes = {}
    for f in sorted((root / "train" / "a").iterdir()):
        with Image.open(f) as im:
            modes[f.name] = (im.format, im.mode)
    assert modes == {
        "0_rgb.JPEG": ("JPEG", "RGB"),
        "1_grey.JPEG": ("JPEG", "L"),
        "2_cmyk.JPEG": ("JPEG", "CMYK"),
        "3_png.JPEG": ("PNG", "RGB"),
    }
    files = [root / "train" / cls / name for cls in ("a", "b") for name in sorted(modes)]
    expected = []
    for f in files:
        with Image.open(f) as im:
            expected.append(np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
    expected = torch.from_numpy(np.stack(expected))
    memory = load_imagefolder(root, "train", 16)
    assert memory.images.dtype == torch.uint8 and torch.equal(memory.images, expected)
    assert memory.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    ds = open_stream(root, "train", 14)
    assert ds.paths == [f"{f.parent.name}/{f.name}" for f in files]
    assert torch.equal(ds.first_images(8), expected[:, :, 1:15, 1:15])
    grey = expected[1]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # L -> RGB repeats the plane


def run_cli(root, tmp_path, capsys, **data):
    """`kdlab train` of a tiny recipe on ``root``: (exit status, stderr lines, run directory)."""
    from kdlab.recipe_files import dump

    path = tmp_path / "recipe.yaml"
    path.write_text(dump(recipe(root, **data)))
    out = tmp_path / f"run-{data.get('loader', 'auto')}"
    capsys.readouterr()
    code = main(["train", str(path), "--out", str(out), "--quiet"])
    return code, capsys.readouterr().err.strip().splitlines(), out


def assert_stopped_before_training(code, err, out, message):
    assert code != 0 and len(err) == 1 and err[0].startswith("kdlab: error: ")
    assert __import__("re").search(message, err[0]), err[0]
    trained = ("metrics.jsonl", "result.json", "student.safetensors", "checkpoints")
    assert not [n for n in trained if (out / n).exists()]


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_missing_test_split_is_a_one_line_error(tmp_path, capsys, monkeypatch, loader):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    root = make_folder(tmp_path / "data", per_class=3, splits=("train",))
    code, err, out = run_cli(root, tmp_path, capsys, loader=loader)
    assert_stopped_before_training(code, err, out, r"data/test: missing split folder \(expected test or val/")


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_val_classes_not_in_train_are_a_one_line_error(tmp_path, capsys, monkeypatch, loader):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    root = make_folder(tmp_path / "data", per_class=3, splits=("train", "val"))
    (root / "val" / "dog").mkdir()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "val" / "dog" / "0.png")
    code, err, out = run_cli(root, tmp_path, capsys, loader=loader)
    assert_stopped_before_training(code, err, out, r"data/val: class folder\(s\) dog not in the train split")


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_zero_byte_file_is_named_or_skipped_and_counted(tmp_path, capsys, monkeypatch, loader):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    root = make_folder(tmp_path / "data", per_class=3)
    (root / "train" / "bee" / "empty.JPEG").write_bytes(b"")
    code, err, out = run_cli(root, tmp_path, capsys, loader=loader)
    assert_stopped_before_training(code, err, out, r"train/bee/empty\.JPEG: unreadable image.*skip_unreadable")
    data = load_data(recipe(root, loader=loader, skip_unreadable=True))
    assert data.streamed == (loader == "stream")
    assert len(data.train) == 9 and len(data.train.skipped) == 1 and "empty.JPEG" in data.train.skipped[0]
    assert not data.test.skipped and len(data.test) == 9


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder whatever its permissions")
@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_a_data_root_without_read_permission_is_a_one_line_error(tmp_path, capsys, monkeypatch, loader):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    root = make_folder(tmp_path / "data", per_class=3)
    root.chmod(0)
    try:
        code, err, out = run_cli(root, tmp_path, capsys, loader=loader)
    finally:
        root.chmod(0o755)
    assert_stopped_before_training(code, err, out, r"data: no read permission")


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_an_unlistable_root_is_refused_by_its_access_check(tmp_path, capsys, monkeypatch, loader):
    """The permission check itself, where the tests run as root (which lists any folder): os.access says no."""
    import kdlab.data.imagefolder as imagefolder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    root = make_folder(tmp_path / "data", per_class=3)
    real = os.access
    monkeypatch.setattr(imagefolder.os, "access", lambda p, mode: real(p, mode) and Path(p) != root)
    code, err, out = run_cli(root, tmp_path, capsys, loader=loader)
    assert_stopped_before_training(code, err, out, r"data: no read permission")
