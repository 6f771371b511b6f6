"""The CUDA-only paths, checked on the CPU: the graph step's capture and replay against RerunGraphs
(a graph whose replay re-runs the captured function), and every refusal of what cannot work on CUDA."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import become_torchrun_rank
from test_distributed import free_port
from test_fast import small_teacher
from test_train import RECIPES
from torch import nn

from kdlab import compute, distributed, models, optim, pipeline, sync_bn, train, train_state
from kdlab.config import LossConfig, TrainConfig
from kdlab.data import AugmentSpec, DeviceLoader, load_dataset
from kdlab.distiller import Distiller
from kdlab.errors import ConfigError
from kdlab.fast import teacher_cache as tc
from kdlab.fast.graph_step import GraphStep, RerunGraphs
from kdlab.fast.teacher_cache import CacheTooLarge, TeacherCache
from kdlab.recipe_files import load_recipe

KD = LossConfig(ce=0.1, terms={"kd": {"weight": 0.9, "T": 4}})


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train").subset(slice(0, 96))


def distiller_and_optimizer(digits, cfg: TrainConfig):
    torch.manual_seed(0)
    student = models.create("smallcnn", num_classes=10, in_chans=1)
    distiller = Distiller(student, [small_teacher()], KD)
    distiller.build(digits.images[:4].float() / 255, digits.labels[:4])
    return distiller, optim.make_optimizer(distiller, cfg, torch.device("cpu"))


def batches(digits, sizes: list[int]):
    """Batches of the given sizes with their (index, view) metadata, as the training loader yields them."""
    loader = DeviceLoader(digits, 16, train=True, augment=AugmentSpec(crop_pad=1), seed=0)
    x, y, index, view = next(loader.iter_batches(with_meta=True))
    g = torch.Generator().manual_seed(1)
    out = []
    for n in sizes:
        pick = torch.randint(0, len(y), (n,), generator=g)
        out.append((x[pick].contiguous(), y[pick], index[pick], view[pick]))
    return out


def run_steps(digits, sizes: list[int], capture: bool, cache: bool = False):
    """Weights after every step, every step's outputs, and the step and its graphs."""
    cfg = TrainConfig(lr=0.1, device="cpu", nesterov=True, grad_clip=5.0)
    distiller, opt = distiller_and_optimizer(digits, cfg)
    teacher_cache = (
        TeacherCache.build(distiller.teachers, digits, AugmentSpec(crop_pad=1), "cpu", 16) if cache else None
    )
    graphs = RerunGraphs([distiller]) if capture else None
    forward = lambda x, y, tl: distiller(x, y, teacher_logits=tl)  # noqa: E731
    step = GraphStep(
        forward, opt, "cpu", teacher_cache=teacher_cache, capture=capture, graphs=graphs, grad_clip=cfg.grad_clip
    )
    weights, outputs = [], []
    for i, (x, y, index, view) in enumerate(batches(digits, sizes)):
        outputs.append(step(x, y, 0.1 / (1 + i), index, view))
        weights.append({k: v.detach().clone() for k, v in distiller.state_dict().items()})
    return weights, outputs, step, graphs


# a full batch is 16; the 3 warm-up calls run eagerly, the 4th captures, then 8 and 1 arrive
SIZES = [16, 16, 16, 16, 16, 8, 16, 1, 16]


@pytest.mark.parametrize("cache", [False, True], ids=["live_teacher", "teacher_cache"])
def test_batches_of_another_size_run_eagerly_and_the_graph_trains_like_eager_steps(digits, cache):
    eager_w, _, _, _ = run_steps(digits, SIZES, capture=False, cache=cache)
    graph_w, _, step, graphs = run_steps(digits, SIZES, capture=True, cache=cache)
    assert graphs.captures == 1 and graphs.replays == 4  # the 16s from the 4th call on, nothing else
    assert step.eager_calls == 2
    for i, (e, g) in enumerate(zip(eager_w, graph_w)):
        for k in e:
            torch.testing.assert_close(g[k], e[k], rtol=0, atol=0, msg=f"step {i}: {k}")


def test_a_kept_output_is_not_overwritten_by_later_replays(digits):
    sizes = [16] * 7
    _, eager_out, _, _ = run_steps(digits, sizes, capture=False)
    _, graph_out, _, graphs = run_steps(digits, sizes, capture=True)
    assert graphs.replays == 4
    for i, ((el, elog, eterms), (gl, glog, gterms)) in enumerate(zip(eager_out, graph_out)):
        assert torch.equal(gl, el) and torch.equal(glog, elog), f"step {i}"
        assert all(torch.equal(gterms[k], eterms[k]) for k in eterms), f"step {i}"


def test_fit_with_a_captured_graph_step_trains_like_the_plain_trainer(digits, tmp_path):
    base = dict(epochs=2, batch_size=32, lr=0.1, max_steps_per_epoch=3, device="cpu", channels_last="off")
    results = []
    for name, fast, capture in (("plain", {}, False), ("graph", {"graph_step": True}, True)):
        cfg = TrainConfig(**base, fast=fast)
        distiller, _ = distiller_and_optimizer(digits, cfg)
        loader = DeviceLoader(digits, cfg.batch_size, train=True, augment=AugmentSpec(crop_pad=1), seed=0)
        graphs = RerunGraphs([distiller]) if capture else None
        train.fit(distiller, loader, None, cfg, tmp_path / name, lambda _m: None, graphs=graphs)
        results.append(distiller.state_dict())
        if capture:
            assert graphs.captures == 1 and graphs.replays == 3  # 6 steps: 3 warm-up, then capture and 3 replays
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=0, atol=1e-6, msg=k)


def test_autocast_cache_is_off_inside_the_graph_step(digits, tmp_path):
    cfg = TrainConfig(
        epochs=1, batch_size=32, max_steps_per_epoch=2, device="cpu", amp="bf16", fast={"graph_step": True}
    )
    distiller, _ = distiller_and_optimizer(digits, cfg)
    seen = []
    distiller.student.register_forward_pre_hook(
        lambda *_: seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()))
    )
    loader = DeviceLoader(digits, cfg.batch_size, train=True, augment=AugmentSpec(crop_pad=1), seed=0)
    train.fit(distiller, loader, None, cfg, tmp_path, lambda _m: None)
    assert seen and all(seen_ == (True, False) for seen_ in seen), seen


# ------------------------------------------------------------------------------------------ refusals


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_cuda_graph_under_torchrun_is_refused_before_training():
    cfg = TrainConfig(fast={"graph_step": True})
    with pytest.raises(ConfigError) as e:
        compute.check_device_options(cfg, "cuda", world=2)
    assert one_line(e).startswith("train.fast.cuda_graph: capturing the step as a CUDA graph under torchrun")
    compute.check_device_options(cfg, "cuda", world=1)
    compute.check_device_options(cfg, "cpu", world=2)  # eager on the CPU: nothing is captured
    compute.check_device_options(
        cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"cuda_graph": False})}), "cuda", 2
    )

    fast = load_recipe(RECIPES.parent / "cifar100" / "fast" / "resnet32x4_resnet8x4_kd_b512.yaml")
    pipeline.check_run_options(fast, world=1, cuda=True)
    pipeline.check_run_options(fast, world=2, cuda=False)
    with pytest.raises(ConfigError, match=r"^train\.fast\.cuda_graph: "):
        pipeline.check_run_options(fast, world=2, cuda=True)
    teacher_graph = load_recipe(RECIPES / "kd.yaml", ["teachers.0.train={fast: {graph_step: true}}"])
    with pytest.raises(ConfigError, match=r"^teachers\.0\.train\.fast\.cuda_graph: "):  # before the teacher trains
        pipeline.check_run_options(teacher_graph, world=2, cuda=True)


def test_a_disk_teacher_cache_inside_a_capture_is_refused(digits, tmp_path):
    cfg = TrainConfig(teacher_cache=True, fast={"graph_step": True, "cache_storage": "disk"})
    with pytest.raises(ConfigError) as e:
        compute.check_device_options(cfg, "cuda", world=1)
    assert one_line(e).startswith("train.fast.cache_storage: a disk table is gathered on the host")
    compute.check_device_options(cfg, "cpu", world=1)
    auto = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"cache_storage": "auto"})})
    compute.check_device_options(auto, "cuda", world=1)

    distiller, opt = distiller_and_optimizer(digits, cfg)
    cache = TeacherCache.build(
        distiller.teachers, digits, AugmentSpec(crop_pad=1), "cpu", 16, storage="disk", cache_dir=tmp_path
    )
    forward = lambda x, y, tl: distiller(x, y, teacher_logits=tl)  # noqa: E731
    with pytest.raises(
        ConfigError, match="^train.fast.cache_storage: a CUDA graph needs the teacher cache in device memory"
    ):
        GraphStep(forward, opt, "cpu", teacher_cache=cache, capture=True, graphs=RerunGraphs([distiller]))
    GraphStep(forward, opt, "cpu", teacher_cache=cache, capture=False)  # eager: a gather on the host is allowed


def test_a_teacher_cache_that_does_not_fit_is_refused_before_it_is_computed(digits, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("computed although it cannot fit")

    monkeypatch.setattr(tc, "build_table", never)
    teacher = small_teacher()
    shape_bytes = 96 * 18 * 10 * 4  # images x views x classes x float32
    monkeypatch.setattr(
        tc, "free_bytes", lambda where, device, cache_dir: shape_bytes if where == "device" else 1 << 40
    )
    with pytest.raises(CacheTooLarge) as e:  # 75% of the free memory at most
        TeacherCache.build([teacher], digits, AugmentSpec(crop_pad=1), "cpu", 16, storage="device")
    assert one_line(e).startswith("train.fast.cache_storage: the teacher logit tables need 0.00 GiB of cpu memory")
    monkeypatch.setattr(
        tc, "free_bytes", lambda where, device, cache_dir: shape_bytes - 1 if where == "disk" else 1 << 40
    )
    with pytest.raises(CacheTooLarge, match="^train.teacher_cache: the teacher logit tables need .* on disk"):
        TeacherCache.build([teacher], digits, AugmentSpec(crop_pad=1), "cpu", 16, storage="disk", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_disk_table_is_computed_straight_into_its_file(digits, tmp_path, monkeypatch):
    real = tc.build_table
    seen = {}

    def spy(teacher, images, mean, std, augment, out, *a, **k):
        temps = list(tmp_path.glob("*.tmp*"))
        seen["file"] = [(p.name, p.stat().st_size) for p in temps]
        seen["shares_file"] = bool(temps) and not out.untyped_storage().resizable()  # a numpy memmap, not an allocation
        real(teacher, images, mean, std, augment, out, *a, **k)

    monkeypatch.setattr(tc, "build_table", spy)
    teacher = small_teacher()
    cache = TeacherCache.build(
        [teacher], digits, AugmentSpec(crop_pad=1), "cpu", 16, storage="disk", cache_dir=tmp_path
    )
    assert seen["shares_file"] and seen["file"][0][1] == 96 * 18 * 10 * 4, seen
    monkeypatch.setattr(tc, "build_table", real)
    reference = TeacherCache.build([teacher], digits, AugmentSpec(crop_pad=1), "cpu", 16, storage="device")
    assert torch.equal(cache.tables[0].logits, reference.tables[0].logits)


def _cache_rank(rank: int, world: int, port: int, folder: str) -> None:
    become_torchrun_rank(rank, world, port)
    data = load_dataset("digits", split="train").subset(slice(0, 48))
    lines = []
    with distributed.session("cpu"):
        cache = TeacherCache.build(
            [small_teacher()],
            data,
            AugmentSpec(crop_pad=1),
            "cpu",
            16,
            storage="disk",
            cache_dir=os.path.join(folder, "logits"),
            log=lines.append,
        )
        torch.save(cache.tables[0].logits.clone(), os.path.join(folder, f"table{rank}.pt"))
    with open(os.path.join(folder, f"log{rank}.txt"), "w") as f:
        f.write("\n".join(lines))


def test_torchrun_ranks_build_the_teacher_cache_once(tmp_path):
    mp.spawn(_cache_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    log0, log1 = (tmp_path / "log0.txt").read_text(), (tmp_path / "log1.txt").read_text()
    assert "computing teacher 0" in log0 and "computing" not in log1 and "read from" in log1, (log0, log1)
    assert torch.equal(torch.load(tmp_path / "table0.pt"), torch.load(tmp_path / "table1.pt"))


# ------------------------------------------------------------------------ CUDA-only code made CPU-testable


def test_sync_bn_on_cuda_is_the_global_batchnorm_the_cpu_tests_check():
    model = models.create("resnet8", num_classes=10)
    converted = sync_bn.convert_sync_batchnorm(model, torch.device("cuda"))
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) is sync_bn.GlobalBatchNorm for m in bns)


def test_global_batchnorm_copies_nothing_from_the_host(monkeypatch):
    # two "ranks" whose sums are this rank's own: the statistics path runs, and equals plain BatchNorm
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda t: t)

    def host_copy(*a, **k):
        raise AssertionError("new_tensor: a host-to-device copy on CUDA, once per layer and step")

    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3)
    bn = sync_bn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cuda"))[0]
    x = torch.randn(4, 3, 5, 5)
    monkeypatch.setattr(torch.Tensor, "new_tensor", host_copy)
    torch.testing.assert_close(bn(x), plain(x), atol=1e-5, rtol=0)


def test_checkpoint_keeps_the_cuda_rng_and_the_parameters_layout(tmp_path, monkeypatch):
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.append(state.clone()))
    cuda = torch.device("cuda", 0)

    torch.manual_seed(0)
    model = models.create("resnet8", num_classes=10).to(memory_format=torch.channels_last)
    cfg = TrainConfig(device="cpu")
    opt = optim.make_optimizer(model, cfg, torch.device("cpu"))
    model(torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
    opt.step()
    train_state.save_checkpoint(tmp_path, model, opt, train_state.TrainState(epoch=1), cuda)

    fresh = optim.make_optimizer(model, cfg, torch.device("cpu"))
    assert train_state.load_checkpoint(tmp_path, model, fresh, lambda _m: None, cuda).epoch == 1
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)  # dropout on CUDA resumes exactly
    convs = [p for p in model.parameters() if p.dim() == 4]
    for p in convs:  # momentum laid out like its channels_last parameter: foreach keeps its fast path
        buf = fresh.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride() and torch.equal(buf, opt.state[p]["momentum_buffer"])


def test_amp_off_on_cuda_is_fp32_without_tf32_and_cudnn_autotunes(monkeypatch):
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    monkeypatch.setattr(cudnn, "benchmark", False)
    monkeypatch.setattr(cudnn, "allow_tf32", True)
    before = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cuda = torch.device("cuda")
    with compute.cuda_numerics(TrainConfig(amp="off"), cuda):
        assert cudnn.benchmark and not cudnn.allow_tf32 and not matmul.allow_tf32
    assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == before
    with compute.cuda_numerics(TrainConfig(amp="auto"), cuda):  # bf16: TF32 changes nothing that matters
        assert cudnn.benchmark and cudnn.allow_tf32
    with compute.cuda_numerics(TrainConfig(amp="off"), torch.device("cpu")):
        assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == before


def test_evaluation_copies_nothing_from_the_host_per_batch(digits, monkeypatch):
    loader = DeviceLoader(digits, 32, train=False)
    model = models.create("smallcnn", num_classes=10, in_chans=1)
    real = torch.tensor

    def no_device_copy(*a, **k):
        if "device" in k:
            raise AssertionError(
                "torch.tensor(..., device=...) in the evaluation loop: a host-to-device copy per batch"
            )
        return real(*a, **k)

    monkeypatch.setattr(torch, "tensor", no_device_copy)
    result = train.evaluate(model, loader)
    assert 0 <= result["top1"] <= 100
