"""The 224-px ImageNet recipes (recipes/imagenet/<pair>/<method>.yaml) and their table: every protocol value and
every loss option against the official ImageNet configs, written out here with the file each comes from. Planning
and validation only: no data, no weights."""

from pathlib import Path

import pytest

from kdlab import models, taps
from kdlab.errors import CheckpointError
from kdlab.methods import check_recipe
from kdlab.recipe_files import load_recipe
from kdlab.teachers import load_model_weights
from kdlab.tools.reproduce import load_table, plan

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ROOT / "recipes" / "imagenet"
TABLE = ROOT / "recipes" / "tables" / "imagenet.yaml"

# (student, teacher, the torchvision teacher file the recipes expect at a placeholder path)
PAIRS = {
    "resnet34_resnet18": ("resnet18_imagenet", "resnet34_imagenet", "data/teachers/resnet34-b627a593.pth"),
    "resnet50_mobilenetv1": ("mobilenetv1", "resnet50_imagenet", "data/teachers/resnet50-0676ba61.pth"),
}
METHODS = ["vanilla", "kd", "at", "nst", "nst_kd", "pfeed", "tfkd_self", "tfkd_reg", "crd", "reviewkd", "dkd", "dist"]
R18, MV1 = "resnet34_resnet18", "resnet50_mobilenetv1"

# The global batch and lr of each recipe (both pairs unless keyed by pair), from:
#   vanilla, nst, nst_kd, pfeed: the standard protocol (batch 256, lr 0.1)
#   kd, dkd: megvii-research/mdistiller configs/imagenet/{r34_r18,r50_mv1}/{kd,dkd}.yaml (BATCH_SIZE 512, LR 0.2)
#   at (R34 -> R18): szagoruyko/attention-transfer imagenet.py (--batchSize 256, --lr 0.1)
#   at (R50 -> MV1): mdistiller configs/imagenet/r50_mv1/at.yaml (512, 0.2)
#   crd: mdistiller configs/imagenet/*/crd.yaml (256, 0.1)
#   reviewkd: dvlab-research/ReviewKD ImageNet/README.md (4 GPUs x -b 64) and imagenet_amp.py (lr 0.1 * batch/256)
#   dist: hunto/image_classification_sota configs/strategies/distill/resnet_dist.yaml (32 per GPU x 8, lr 0.1)
#   tfkd_*: yuanli2333/Teacher-free-Knowledge-Distillation ImageNet_train/main.py (-b 512, lr 0.1 * 512/256)
BATCH_LR = {
    "vanilla": (256, 0.1),
    "kd": (512, 0.2),
    ("at", R18): (256, 0.1),
    ("at", MV1): (512, 0.2),
    "nst": (256, 0.1),
    "nst_kd": (256, 0.1),
    "pfeed": (256, 0.1),
    "tfkd_self": (512, 0.2),
    "tfkd_reg": (512, 0.2),
    "crd": (256, 0.1),
    "reviewkd": (256, 0.1),
    "dkd": (512, 0.2),
    "dist": (256, 0.1),
}
# Tf-KD's ImageNet_train/main.py: --epochs 90, MultiStepLR milestones [30, 60, 80]; every other source: 100, 30/60/90
SCHEDULE = {"tfkd_self": (90, [30, 60, 80]), "tfkd_reg": (90, [30, 60, 80])}
# DIST's tools/train.py + lib/utils/optim.py: SGD nesterov unless --sgd-no-nesterov, no weight decay on 1-d
# parameters and biases unless --opt-no-filter; resnet_dist.yaml sets neither
OPTIMISER = {"dist": {"nesterov": True, "decay_norm_and_bias": False}}

# CE weight and term options, with the official value's source:
LOSS = {
    "vanilla": (1.0, {}),
    # mdistiller configs/imagenet/*/kd.yaml: KD.TEMPERATURE 1, LOSS.CE_WEIGHT 0.5, LOSS.KD_WEIGHT 0.5
    "kd": (0.5, {"kd": {"weight": 0.5, "T": 1.0, "reduction": "batchmean"}}),
    # attention-transfer imagenet.py (alpha 0: CE only; README --beta 1e+3; at() = normalize(mean_c x^2)) and
    # mdistiller cfg.py AT.P 2, FEAT_WEIGHT 1000, CE_WEIGHT 1; every stage of both nets
    ("at", R18): (1.0, {"at": {"weight": 1000.0, "p": 2.0, "mode": "code", "student_layers": None}}),
    # mdistiller distillers/AT.py feats[1:] with models/imagenet/mobilenetv1.py's stem-less feature list: student
    # stages 2-4 against teacher stages 1-3, the larger map adaptive-average-pooled
    ("at", MV1): (
        1.0,
        {
            "at": {
                "weight": 1000.0,
                "p": 2.0,
                "mode": "code",
                "student_layers": ["stage2", "stage3", "stage4"],
                "teacher_layers": ["stage1", "stage2", "stage3"],
                "pool": True,
            }
        },
    ),
    # TuSimple/neuron-selectivity-transfer config/cfgs.py (mmd_kernel poly, kt_weight 50; the last block's pre-ReLU
    # output) and symbol/transfer.py (c 0; mmd_diff = student term - 2 cross term: no teacher-teacher term)
    "nst": (
        1.0,
        {
            "nst": {
                "weight": 50.0,
                "kernel": "poly",
                "teacher_term": False,
                "student_layers": ["last:pre"],
                "teacher_layers": ["last:pre"],
            }
        },
    ),
    # cfgs.py kt_type mmd+kd: kt_weight [16, 50], kd_t 4 (soft CE with gradient scale 16 = T^2: KD weight 1)
    "nst_kd": (
        1.0,
        {
            "nst": {"weight": 50.0, "kernel": "poly", "teacher_term": False, "student_layers": ["last:pre"]},
            "kd": {"weight": 1.0, "T": 4.0},
        },
    ),
    # torchdistill rrpr2020/ft-resnet18_from_resnet34.yaml stage 2: FTLoss p 1, mean, weight 1000, translator
    # uses_bn False; FEED matches the raw teacher map (no paraphraser)
    "pfeed": (1.0, {"feed": {"weight": 1000.0, "paraphraser": False, "distance": "factor", "translator_bn": False}}),
    # Tf-KD ImageNet_train/main.py defaults --alpha 0.1, --T 20: (1 - alpha) CE + alpha T^2 KLDivLoss-mean
    "tfkd_self": (0.9, {"kd": {"weight": 0.1, "T": 20.0, "reduction": "mean"}}),
    # Tf-KD experiments/base_experiments/base_resnet18/params.json: reg_alpha 0.1, reg_temperature 20, multiplier 100
    ("tfkd_reg", R18): (0.9, {"tfkd_reg": {"weight": 10.0, "a": 0.99, "T": 20.0, "mode": "code", "reduction": "mean"}}),
    # Tf-KD base_mobilenetv2/params.json: reg_alpha 0.95, reg_temperature 40, multiplier 1
    ("tfkd_reg", MV1): (
        0.05,
        {"tfkd_reg": {"weight": 0.95, "a": 0.99, "T": 40.0, "mode": "code", "reduction": "mean"}},
    ),
    # mdistiller cfg.py CRD: FEAT.DIM 128, NCE.K 16384, NCE.TEMPERATURE 0.07, NCE.MOMENTUM 0.5, FEAT_WEIGHT 0.8,
    # CE_WEIGHT 1, MODE exact (torchdistill rrpr2020/crd-resnet18_from_resnet34.yaml: the same)
    "crd": (
        1.0,
        {"crd": {"weight": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "mode": "exact"}},
    ),
    # ReviewKD ImageNet/README.md --review-kd-loss-weight 1.0 / 8.0; models/reviewkd.py build_review_kd mid_channel
    # 512 (resnet18) / 256 (mobilenet); imagenet_amp.py adds the loss with no ramp; pre-ReLU student stages
    ("reviewkd", R18): (1.0, {"reviewkd": {"weight": 1.0, "max_mid_channels": 512, "warmup_epochs": 0.0}}),
    ("reviewkd", MV1): (1.0, {"reviewkd": {"weight": 8.0, "max_mid_channels": 256, "warmup_epochs": 0.0}}),
    # mdistiller configs/imagenet/r34_r18/dkd.yaml (CE_WEIGHT 1, BETA 0.5, T 1, WARMUP 1), cfg.py ALPHA 1
    ("dkd", R18): (1.0, {"dkd": {"weight": 1.0, "alpha": 1.0, "beta": 0.5, "T": 1.0, "warmup_epochs": 1.0}}),
    # mdistiller configs/imagenet/r50_mv1/dkd.yaml: BETA 2.0, the rest as r34_r18
    ("dkd", MV1): (1.0, {"dkd": {"weight": 1.0, "alpha": 1.0, "beta": 2.0, "T": 1.0, "warmup_epochs": 1.0}}),
    # resnet_dist.yaml ori_loss_weight 1, kd_loss_weight 2, kd 'dist'; lib/models/losses/kd_loss.py: DIST(beta=1,
    # gamma=1, tau=1); each GPU correlates its own 32 samples (no gather)
    "dist": (1.0, {"dist": {"weight": 2.0, "T": 1.0, "beta": 1.0, "gamma": 1.0, "gather": False}}),
}
REVIEWKD_STUDENT = ["stage1:pre", "stage2:pre", "stage3:pre", "stage4:pre", "embedding"]


def of(table: dict, method: str, pair: str):
    return table.get((method, pair), table.get(method))


def header(path: Path) -> str:
    """The comment header as one line of text (its lines rewrapped freely)."""
    return " ".join(line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#"))


RECIPES = [(pair, m) for pair in PAIRS for m in METHODS]


def test_each_pair_has_exactly_the_packaged_methods():
    for pair in PAIRS:
        assert sorted(p.stem for p in (IMAGENET / pair).glob("*.yaml")) == sorted(METHODS)
    # the 64-px recipes they replace are gone; nothing else sits beside the pair folders
    assert sorted(p.name for p in IMAGENET.iterdir()) == sorted(PAIRS)


@pytest.mark.parametrize(("pair", "method"), RECIPES, ids=lambda v: v)
def test_protocol(pair, method):
    path = IMAGENET / pair / f"{method}.yaml"
    recipe = load_recipe(path)
    check_recipe(recipe)
    d, t = recipe.data, recipe.train
    assert (d.name, d.image_size, d.root) == ("imagefolder", 224, "data/imagenet")
    batch, lr = of(BATCH_LR, method, pair)
    assert (t.batch_size, t.lr) == (batch, lr)
    assert t.lr / t.batch_size == pytest.approx(0.1 / 256)  # linear scaling: lr 0.1 per 256 images
    assert f"Global batch {batch} " in header(path)
    epochs, milestones = SCHEDULE.get(method, (100, [30, 60, 90]))
    assert (t.epochs, t.schedule.type, t.schedule.milestones, t.schedule.gamma) == (
        epochs,
        "multistep",
        milestones,
        0.1,
    )
    assert t.schedule.warmup_epochs == 0
    assert (t.momentum, t.weight_decay, t.sync_bn) == (0.9, 1e-4, False)
    opt = OPTIMISER.get(method, {"nesterov": False, "decay_norm_and_bias": True})
    assert {"nesterov": t.nesterov, "decay_norm_and_bias": t.decay_norm_and_bias} == opt
    if epochs != 100:
        assert "90 epochs" in header(path)  # a recipe off the 100-epoch protocol says why


@pytest.mark.parametrize(("pair", "method"), RECIPES, ids=lambda v: v)
def test_models_and_teachers(pair, method):
    student, teacher, weights = PAIRS[pair]
    recipe = load_recipe(IMAGENET / pair / f"{method}.yaml")
    assert recipe.student.name == student
    if method in ("vanilla", "tfkd_reg"):
        assert (recipe.teachers, recipe.generations) == ([], 0)
    elif method == "tfkd_self":
        assert (recipe.teachers, recipe.generations) == ([], 1)
    elif method == "pfeed":  # torchvision's teacher, and a second one of the same kind trained by the job
        assert [(x.name, x.weights) for x in recipe.teachers] == [(teacher, weights), (teacher, None)]
    else:
        assert [(x.name, x.weights) for x in recipe.teachers] == [(teacher, weights)]


@pytest.mark.parametrize(("pair", "method"), RECIPES, ids=lambda v: v)
def test_loss_options_are_the_official_values(pair, method):
    recipe = load_recipe(IMAGENET / pair / f"{method}.yaml")
    ce, terms = of(LOSS, method, pair)
    assert recipe.loss.ce == ce
    assert set(recipe.loss.terms) == set(terms)
    for name, expected in terms.items():
        got = term_options(name, recipe.loss.terms[name])
        for key, value in expected.items():
            assert got[key] == value, f"{pair}/{method}: {name}.{key} = {got[key]!r}, official {value!r}"
    if method == "reviewkd":
        assert recipe.loss.terms["reviewkd"]["student_layers"] == REVIEWKD_STUDENT


def term_options(name: str, opts: dict) -> dict:
    """The term's options with its defaults filled in, as the term itself will read them."""
    from kdlab.losses import TERMS

    return TERMS[name].Options.model_validate(opts or {}).model_dump()


@pytest.fixture(scope="module")
def nets():
    names = {n for s, t, _ in PAIRS.values() for n in (s, t)}
    return {n: models.create(n, num_classes=10) for n in names}


@pytest.mark.parametrize(("pair", "method"), RECIPES, ids=lambda v: v)
def test_named_layers_exist(pair, method, nets):
    """A misnamed tap would otherwise fail only at the run's preflight, after the data has loaded."""
    student, teacher, _ = PAIRS[pair]
    recipe = load_recipe(IMAGENET / pair / f"{method}.yaml")
    for opts in recipe.loss.terms.values():
        for key, net in (("student_layers", student), ("teacher_layers", teacher)):
            for spec in (opts or {}).get(key) or []:
                taps.resolve(nets[net], spec, key)


def test_a_missing_teacher_file_is_named_before_training(nets):
    """What preflight does with the placeholder path when the torchvision file was not put there."""
    _, teacher, weights = PAIRS[R18]
    assert not (ROOT / weights).exists()
    with pytest.raises(CheckpointError, match="resnet34-b627a593.pth: no such file"):
        load_model_weights(nets[teacher], Path(weights), "teacher 0")


# Published numbers carried by the table, each with its source (README tables that could be read)
PUBLISHED = {
    f"{R18}/vanilla": 69.76,  # hunto/DIST_KD README + torchdistill rrpr2020 README: torchvision's ResNet-18
    f"{R18}/kd": 71.03,  # megvii-research/mdistiller README, ImageNet, KD
    f"{R18}/at": 70.7,  # szagoruyko/attention-transfer README: ResNet-18-ResNet-34-AT top-1 error 29.3
    f"{R18}/crd": 70.93,  # torchdistill configs/official/ilsvrc2012/yoshitomo-matsubara/rrpr2020/README.md, CRD
    f"{R18}/reviewkd": 71.61,  # dvlab-research/ReviewKD ImageNet/README.md
    f"{R18}/dkd": 71.70,  # mdistiller README, ImageNet, DKD
    f"{R18}/dist": 72.07,  # hunto/DIST_KD README, baseline settings
    f"{MV1}/vanilla": 68.87,  # ReviewKD ImageNet/README.md, MobileNet baseline
    f"{MV1}/kd": 70.50,  # mdistiller README
    f"{MV1}/reviewkd": 72.56,  # ReviewKD ImageNet/README.md
    f"{MV1}/dkd": 72.05,  # mdistiller README
    f"{MV1}/dist": 73.24,  # hunto/DIST_KD README
}


def test_table_covers_every_recipe_with_its_published_numbers(tmp_path):
    table = load_table(TABLE)
    cells = {c.name: c for c in table.cells}
    assert sorted(cells) == sorted(f"{pair}/{m}" for pair, m in RECIPES)
    for name, cell in cells.items():
        assert cell.recipe == f"../imagenet/{name}.yaml"
        assert cell.published == PUBLISHED.get(name), name
        assert cell.source, name
        if cell.published is None:
            assert cell.source == "unverified" and cell.compare_to, name
        has_teacher = not name.endswith(("/vanilla", "/tfkd_self", "/tfkd_reg"))
        expected = {R18: 73.31, MV1: 76.16}[name.split("/")[0]] if has_teacher else None
        assert (cell.teacher_published[0] if cell.teacher_published else None) == expected, name
    assert table.metric_of(cells[f"{R18}/at"]) == "last"  # the AT code keeps only its latest epoch
    assert table.metric_of(cells[f"{R18}/dkd"]) == "best"  # mdistiller reports its best epoch
    # planning needs none of the teacher files, and every cell keeps its recipe's placeholder path
    jobs = plan(table, TABLE, tmp_path, 1, None, [], None)
    for job in jobs:
        pair = job.cell.name.split("/")[0]
        assert all(t.weights in (PAIRS[pair][2], None) for t in job.recipe.teachers)
