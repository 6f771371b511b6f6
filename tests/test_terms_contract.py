"""Contract over every registered loss term, through the Distiller as training uses it."""

import copy
import math

import pytest
import torch

from kdlab import models
from kdlab.config import LossConfig
from kdlab.distiller import Distiller
from kdlab.losses import TERMS

# options that keep every term cheap and well defined on an 8x8 digits-sized batch of 16; the
# two-stage methods (FitNet, AB, FSP) run single-stage here so that their term is in the main loss
OPTIONS = {
    "fitnet": {"stages": "single", "weight": 1.0},
    "ab": {"stages": "single"},
    "fsp": {"stages": "single"},
    "lp": {"k": 3},
    "ensemble_kd": {},
    "dkd": {"warmup_epochs": 0},
    "sdd_dkd": {"warmup_epochs": 0},
    "cat_kd": {"student_bias": "drop"},  # the smallcnn student has a classifier bias; tests/test_cat_kd.py builds none
    "reviewkd": {"warmup_epochs": 0},
    # every other-class sample of the 60-sample training set below is a negative: no sampling noise, so the
    # value is a function of the batch (order invariance holds)
    "crd": {
        "nce_k": 54,
        "feat_dim": 16,
    },  # its warm-up needs the trainer's progress: tests/test_dkd.py covers that path
    # no channel masked: the masks are drawn per batch position, so masking would tie the value to the order
    # (tests/test_mgd.py covers the masks)
    "mgd": {"mask_ratio": 0.0},
}
TWO_TEACHERS = {"ensemble_kd", "feed"}
SAME_WIDTH_TEACHER = {"fsp"}  # FSP matrices need the teacher's channel counts: a smallcnn teacher
# option variants that the contract covers as well (logit standardisation, the paper/code modes)
VARIANTS = [
    ("kd", {"logit_standardize": True, "T": 2.0}),
    ("dist", {"logit_standardize": True, "T": 4.0}),
    ("cc", {"mode": "paper"}),
    ("cc", {"mode": "paper", "embed_dim": None}),
    ("pkt", {"mode": "paper"}),
    ("rkd", {"gather": True}),  # one process: gathering the global batch is the identity
    ("dist", {"gather": True}),
    ("sdd", {"complementary": 3.0}),
    ("cat_kd", {"normalize": True, "resolution": 1, "student_bias": "keep", "teacher_bias": True}),
]
CASES = [(t, {}) for t in sorted(TERMS)] + VARIANTS
CASE_IDS = [t + "".join(f"-{k}={v}" for k, v in o.items()) for t, o in CASES]
# terms whose value is a distance between student and teacher quantities without a trainable map in between
ZERO_WHEN_EQUAL = [
    (t, {}) for t in ("kd", "ensemble_kd", "at", "nst", "sp", "rkd", "pkt", "fsp", "dkd", "sdd", "sdd_dkd", "cat_kd")
] + [
    ("cat_kd", {"student_bias": "keep", "teacher_bias": True, "normalize": True}),
    ("kd", {"logit_standardize": True}),
    ("pkt", {"mode": "paper"}),
    ("cc", {"embed_dim": None}),
    ("cc", {"embed_dim": None, "mode": "paper"}),
]
# CC's code mode multiplies consecutive samples' differences: it depends on the batch order
ORDER_DEPENDENT = {("cc", ())}


def make(term: str, student_is_teacher_copy: bool = False, seed: int = 0, options: dict | None = None):
    torch.manual_seed(seed)
    n_teachers = 2 if term in TWO_TEACHERS else (1 if TERMS[term].needs_teacher else 0)
    if student_is_teacher_copy:
        student = models.create("smallcnn", num_classes=10, in_chans=1)
        teachers = [copy.deepcopy(student) for _ in range(n_teachers)]
    else:
        student = models.create("smallcnn", num_classes=10, in_chans=1)
        teacher_model = "smallcnn" if term in SAME_WIDTH_TEACHER else "smallcnn_wide"
        teachers = [models.create(teacher_model, num_classes=10, in_chans=1) for _ in range(n_teachers)]
    loss = LossConfig(ce=0.0, terms={term: {"weight": 1.0, **OPTIONS.get(term, {}), **(options or {})}})
    d = Distiller(student, teachers, loss)
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    d.build(x, y)
    if TERMS[term].needs_indices:
        with_indices(d, x)
    if TERMS[term].needs_progress:  # as the trainer passes it (CTKD's curriculum has no value without it)
        forward = d.forward
        d.forward = lambda xs, ys, **kw: forward(xs, ys, **{"progress": 3.0, **kw})
    return d, x, y


def with_indices(d: Distiller, x: torch.Tensor) -> None:
    """Terms that read sample indices (CRD) get a 60-sample training set, and each row of `x` keeps its index
    wherever a test moves it (batch-order test)."""
    d.attach_training_set(torch.arange(60) % 10)
    keys = {tuple(row.flatten()[:4].tolist()): i for i, row in enumerate(x)}
    forward = d.forward

    def indexed(xs, ys, **kw):
        kw.setdefault("indices", torch.tensor([keys[tuple(row.flatten()[:4].tolist())] for row in xs]))
        return forward(xs, ys, **kw)

    d.forward = indexed


@pytest.mark.parametrize("term, options", CASES, ids=CASE_IDS)
def test_finite_and_gradients_reach_student_and_side_modules_only(term, options):
    d, x, y = make(term, options=options)
    d.train()
    loss, logits, values = d(x, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(values) == {term}
    loss.backward()
    student_grads = [p.grad for p in d.student.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    side = [p for p in d.terms[term].parameters() if p.requires_grad]
    for p in side:
        assert p.grad is not None, f"{term}: a trainable side parameter got no gradient"
    for t in d.teachers:
        assert not t.training
        for p in t.parameters():
            assert not p.requires_grad and p.grad is None
    trainable = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) not in trainable for t in d.teachers for p in t.parameters())
    assert all(not k.startswith("_teachers") for k in d.state_dict())


@pytest.mark.parametrize(
    "term, options", ZERO_WHEN_EQUAL, ids=[t + "".join(f"-{k}={v}" for k, v in o.items()) for t, o in ZERO_WHEN_EQUAL]
)
def test_zero_when_student_equals_teacher(term, options):
    d, x, y = make(term, student_is_teacher_copy=True, options=options)
    d.eval()  # same BN statistics on both sides
    with torch.no_grad():
        _, _, values = d(x, y)
    assert abs(values[term].item()) < 1e-5


def test_lsr_floor_is_the_entropy_of_its_target():
    d, x, y = make("lsr")
    eps, k = 0.1, 10
    target = torch.full((16, k), eps / k)
    target[torch.arange(16), y] += 1 - eps
    from kdlab.losses.base import Outputs

    value = d.terms["lsr"](Outputs(logits=target.log(), targets=y))
    entropy = -(target * target.log()).sum(1).mean()
    assert value.item() == pytest.approx(entropy.item(), abs=1e-6)


@pytest.mark.parametrize("term, options", CASES, ids=CASE_IDS)
def test_batch_order_invariance(term, options):
    d, x, y = make(term, options=options)
    d.eval()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, _, a = d(x, y)
        _, _, b = d(x[perm], y[perm])
    if (term, tuple(sorted(options.items()))) in ORDER_DEPENDENT:
        assert a[term].item() != pytest.approx(b[term].item(), rel=1e-4, abs=1e-6)
    else:
        assert a[term].item() == pytest.approx(b[term].item(), rel=1e-4, abs=1e-6)


def test_dist_floor_when_student_equals_teacher():
    """DIST is 1 - (Pearson correlation) per row and column; with student == teacher what remains is
    the eps 1e-8 in the cosine's denominator: 1 - |a|^2 / (|a|^2 + 1e-8) per centred row or column a."""
    d, x, y = make("dist", student_is_teacher_copy=True, options={"T": 4.0, "beta": 2.0, "gamma": 2.0})
    d.eval()
    with torch.no_grad():
        _, logits, values = d(x, y)
        p = torch.softmax(logits.double() / 4.0, dim=1)

        def residue(m):
            sq = (m - m.mean(1, keepdim=True)).pow(2).sum(1)
            return (1 - sq / (sq + 1e-8)).mean()

        floor = 16.0 * (2.0 * residue(p) + 2.0 * residue(p.t()))
    # an untrained net's tempered predictions are nearly uniform, so |a|^2 is close to the eps and the
    # floor is far from 0 here (0.14): DIST cannot see a difference below that spread
    assert values["dist"].item() == pytest.approx(floor.item(), rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("term, options", CASES, ids=CASE_IDS)
def test_runs_under_bf16_autocast(term, options):
    d, x, y = make(term, options=options)
    d.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, values = d(x, y)
    assert values[term].dtype == torch.float32
    assert math.isfinite(loss.item())
    loss.backward()


def test_wrong_layer_name_fails_before_training_and_lists_names():
    from kdlab.errors import LayerError

    student = models.create("smallcnn", num_classes=10, in_chans=1)
    teacher = models.create("smallcnn_wide", num_classes=10, in_chans=1)
    with pytest.raises(LayerError) as e:
        Distiller(
            student, [teacher], LossConfig(terms={"at": {"student_layers": ["stage9"], "teacher_layers": ["stage3"]}})
        )
    msg = str(e.value)
    assert "stage9" in msg and "stage3" in msg and "student" in msg


def test_spatial_mismatch_names_both_shapes_and_the_option():
    from kdlab.errors import LayerError

    student = models.create("smallcnn", num_classes=10, in_chans=1)
    teacher = models.create("smallcnn_wide", num_classes=10, in_chans=1)
    d = Distiller(
        student, [teacher], LossConfig(terms={"at": {"student_layers": ["stage1"], "teacher_layers": ["stage3"]}})
    )
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    d.build(x, y)
    with pytest.raises(LayerError) as e:
        d(x, y)
    msg = str(e.value)
    assert "8, 8" in msg and "2, 2" in msg and "pool" in msg


def test_side_modules_are_not_part_of_the_student():
    d, x, y = make("feed")
    plain = sum(p.numel() for p in models.create("smallcnn", num_classes=10, in_chans=1).parameters())
    assert sum(p.numel() for p in d.student.parameters()) == plain
    assert sum(p.numel() for p in d.terms["feed"].parameters()) > 0
    assert len(d.terms["feed"].translators) == 2


@pytest.mark.parametrize("placement, layer", [("embedding", "embedding"), ("hint", "stage2")])
def test_lp_placement_picks_the_embedding_or_fitnets_hint_layer(placement, layer):
    from kdlab import models
    from kdlab.config import LossConfig
    from kdlab.distiller import Distiller

    student, teacher = models.create("resnet8", num_classes=10), models.create("resnet20", num_classes=10)
    fitnet = Distiller(student, [teacher], LossConfig(terms={"fitnet": {}})).terms["fitnet"]
    lp = Distiller(student, [teacher], LossConfig(terms={"lp": {"placement": placement}})).terms["lp"]
    assert lp.student_layers == [layer] and lp.teacher_layers == [[layer]]
    if placement == "hint":
        assert lp.student_layers == fitnet.student_layers and lp.teacher_layers == fitnet.teacher_layers
