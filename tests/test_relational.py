"""SP, CC, RKD, PKT, DIST and logit standardisation against naive float64 references.

Each reference is written from the paper's equations with Python floats and explicit loops over
samples, pairs, triplets and classes; none calls the code under test or a vectorised form of it.
Where the reference implementation's reduction differs from the paper's sum (RKD, PKT), the
reference applies the code's normalisation explicitly and says so.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.errors import ConfigError, LayerError
from kdlab.losses import functional as KF
from kdlab.losses import relational as R


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def close(value: torch.Tensor, ref: float, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    assert value.dim() == 0
    assert math.isclose(float(value), ref, rel_tol=rtol, abs_tol=atol), f"{float(value)!r} != reference {ref!r}"


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.flatten(1).tolist()


def dot(a: list[float], b: list[float]) -> float:
    out = 0.0
    for u, v in zip(a, b):
        out += u * v
    return out


def norm(a: list[float]) -> float:
    return math.sqrt(dot(a, a))


def unit(a: list[float], eps: float = 1e-12) -> list[float]:
    d = max(norm(a), eps)
    return [u / d for u in a]


def huber(x: float) -> float:  # smooth L1, delta 1
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


# --------------------------------------------------------------------------------------------------
# references


def ref_sp(fs, ft) -> float:
    """Tung & Mori: G = A A^T, each row L2-normalised; (1/b^2) ||G_T - G_S||_F^2."""

    def gram(a):
        g = [[dot(a[i], a[j]) for j in range(len(a))] for i in range(len(a))]
        return [unit(r) for r in g]

    gs, gt = gram(rows(fs)), gram(rows(ft))
    n = len(gs)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += (gt[i][j] - gs[i][j]) ** 2
    return total / (n * n)


def ref_cc_code(es, et) -> float:
    s, t = rows(es), rows(et)
    n = len(s)
    total = 0.0
    for i in range(n - 1):
        for j in range(len(s[0])):
            total += abs(s[i][j] - t[i][j]) * abs(s[i + 1][j] - t[i + 1][j])
    return total / (n - 1)


def ref_cc_kernel(e, gamma: float, order: int) -> list[list[float]]:
    """Peng et al.: k(x, y) = exp(-gamma ||x - y||^2) on unit vectors = exp(-2 gamma) exp(2 gamma x.y),
    the second factor expanded as sum_p (2 gamma x.y)^p / p!."""
    x = [unit(r) for r in rows(e)]
    n = len(x)
    k = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            c = dot(x[i], x[j])
            acc = 0.0
            for p in range(order + 1):
                acc += math.exp(-2 * gamma) * (2 * gamma * c) ** p / math.factorial(p)
            k[i][j] = acc
    return k


def ref_cc_paper(es, et, gamma: float, order: int) -> float:
    ks, kt = ref_cc_kernel(es, gamma, order), ref_cc_kernel(et, gamma, order)
    n = len(ks)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += (ks[i][j] - kt[i][j]) ** 2
    return total / (n * n)


def ref_rkd(fs, ft, wd: float, wa: float) -> float:
    """Park et al.: psi_D(i, j) = ||t_i - t_j|| / mu (mu: mean over the distinct pairs), psi_A(i, j, k) =
    <e_ij, e_kj> with e_ij = (t_i - t_j) / ||t_i - t_j|| (vertex j), Huber loss. The paper sums over
    pairs and triplets; the reference code averages over all N^2 pairs and N^3 triplets, the degenerate
    ones (i = j, or a vertex repeated) counting 0 - applied here as that normalisation."""
    s, t = rows(fs), rows(ft)
    n = len(s)

    def dists(x):
        d = [
            [math.sqrt(sum((x[i][c] - x[j][c]) ** 2 for c in range(len(x[0])))) if i != j else 0.0 for j in range(n)]
            for i in range(n)
        ]
        pos = [d[i][j] for i in range(n) for j in range(n) if i != j and d[i][j] > 0]
        mu = sum(pos) / len(pos)
        return [[v / mu for v in r] for r in d]

    def angles(x):
        out = {}
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if i == j or k == j:
                        out[i, j, k] = 0.0
                        continue
                    e_ij = unit([x[i][c] - x[j][c] for c in range(len(x[0]))])
                    e_kj = unit([x[k][c] - x[j][c] for c in range(len(x[0]))])
                    out[i, j, k] = dot(e_ij, e_kj)
        return out

    ds, dt = dists(s), dists(t)
    l_d = sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    a_s, a_t = angles(s), angles(t)
    l_a = sum(huber(a_s[key] - a_t[key]) for key in a_s) / n**3
    return wd * l_d + wa * l_a


def ref_pkt(fs, ft, mode: str, eps: float = 1e-7) -> float:
    """Passalis & Tefas: K(a, b) = (cos(a, b) + 1) / 2, p_{j|i} = K(x_i, x_j) / sum_k K(x_i, x_k) over k != i
    (paper), or over every k including i (the authors' code); KL(P_t || P_s) with eps 1e-7 inside the log,
    and the norms as ||x|| + eps (code). Normalised by the number of (i, j) entries (N^2 or N(N-1))."""
    s, t = rows(fs), rows(ft)
    n = len(s)

    def cond(x):
        p = [[0.0] * n for _ in range(n)]
        for i in range(n):
            ks = {}
            for j in range(n):
                if mode == "paper" and j == i:
                    continue
                ks[j] = 0.5 * (dot(x[i], x[j]) / ((norm(x[i]) + eps) * (norm(x[j]) + eps)) + 1.0)
            z = sum(ks.values())
            for j, v in ks.items():
                p[i][j] = v / z
        return p

    ps, pt = cond(s), cond(t)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if mode == "paper" and i == j:
                continue
            total += pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
    return total / (n * n if mode == "code" else n * (n - 1))


def ref_zscore(row: list[float], eps: float = 1e-7) -> list[float]:
    """Sun et al.: Z(z) = (z - mean(z)) / std(z); std unbiased (K - 1) with eps 1e-7 added, as their code."""
    k = len(row)
    m = sum(row) / k
    sd = math.sqrt(sum((v - m) ** 2 for v in row) / (k - 1))
    return [(v - m) / (eps + sd) for v in row]


def ref_softmax(row: list[float]) -> list[float]:
    mx = max(row)
    ex = [math.exp(v - mx) for v in row]
    z = sum(ex)
    return [v / z for v in ex]


def ref_kd(zs, zt, T: float, standardize: bool) -> float:
    s, t = zs.tolist(), zt.tolist()
    total = 0.0
    for n in range(len(s)):
        a, b = (ref_zscore(s[n]), ref_zscore(t[n])) if standardize else (s[n], t[n])
        ps, pt = ref_softmax([v / T for v in a]), ref_softmax([v / T for v in b])
        for k in range(len(a)):
            total += pt[k] * (math.log(pt[k]) - math.log(ps[k]))
    return T * T * total / len(s)


def ref_pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    ca, cb = [v - ma for v in a], [v - mb for v in b]
    return dot(ca, cb) / (norm(ca) * norm(cb) + eps)


def ref_dist(zs, zt, T: float, beta: float, gamma: float, standardize: bool = False) -> float:
    """Huang et al.: Y = softmax(Z / tau); L = tau^2 [beta (1 - mean_i rho(Y_s[i,:], Y_t[i,:]))
    + gamma (1 - mean_j rho(Y_s[:,j], Y_t[:,j]))], rho the Pearson correlation (eps 1e-8 as their code)."""
    s, t = zs.tolist(), zt.tolist()
    if standardize:
        s, t = [ref_zscore(r) for r in s], [ref_zscore(r) for r in t]
    ys = [ref_softmax([v / T for v in r]) for r in s]
    yt = [ref_softmax([v / T for v in r]) for r in t]
    n, k = len(ys), len(ys[0])
    inter = 1.0 - sum(ref_pearson(ys[i], yt[i]) for i in range(n)) / n
    intra = 1.0 - sum(ref_pearson([ys[i][j] for i in range(n)], [yt[i][j] for i in range(n)]) for j in range(k)) / k
    return T * T * (beta * inter + gamma * intra)


# --------------------------------------------------------------------------------------------------
# values


FEATURE_PAIRS = {
    "flat": lambda: (rand(6, 5, seed=1), rand(6, 7, seed=2)),
    "maps": lambda: (rand(5, 2, 2, 2, seed=3), rand(5, 3, 2, 1, seed=4)),
    "relu": lambda: (rand(7, 4, seed=5).relu(), rand(7, 3, seed=6).relu() + 0.1),
}


@pytest.mark.parametrize("case", list(FEATURE_PAIRS))
def test_sp_matches_reference(case):
    fs, ft = FEATURE_PAIRS[case]()
    close(R.sp(fs, ft), ref_sp(fs, ft))
    close(R.sp(ft, ft.clone()), 0.0, atol=1e-15)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_cc_code_matches_reference(n):
    es, et = rand(n, 6, seed=10), rand(n, 6, seed=11)
    close(R.cc(es, et), ref_cc_code(es, et))
    close(R.cc(es, et, mode="code"), ref_cc_code(es, et))


@pytest.mark.parametrize("gamma, order", [(0.4, 2), (0.4, 0), (1.0, 3), (0.1, 5)])
def test_cc_paper_matches_reference(gamma, order):
    es, et = rand(6, 5, seed=12), rand(6, 9, seed=13)
    close(R.cc(es, et, mode="paper", gamma=gamma, order=order), ref_cc_paper(es, et, gamma, order))


def test_cc_taylor_kernel_tends_to_the_gaussian_rbf():
    """The paper's kernel is a Taylor series of exp(-gamma ||x - y||^2) on unit vectors: a high order recovers it."""
    e = rand(5, 4, seed=14)
    k = R.cc_kernel(e, gamma=0.4, order=20)
    x = [unit(r) for r in rows(e)]
    for i in range(5):
        for j in range(5):
            rbf = math.exp(-0.4 * sum((x[i][c] - x[j][c]) ** 2 for c in range(4)))
            assert abs(float(k[i, j]) - rbf) < 1e-12


def test_cc_code_depends_on_batch_order_and_paper_does_not():
    es, et = rand(6, 5, seed=15), rand(6, 5, seed=16)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert abs(float(R.cc(es, et)) - float(R.cc(es[perm], et[perm]))) > 1e-3
    close(R.cc(es[perm], et[perm], mode="paper"), float(R.cc(es, et, mode="paper")), rtol=1e-12)


@pytest.mark.parametrize("case", list(FEATURE_PAIRS))
@pytest.mark.parametrize("wd, wa", [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
def test_rkd_matches_reference(case, wd, wa):
    fs, ft = FEATURE_PAIRS[case]()
    close(R.rkd(fs, ft, wd, wa), ref_rkd(fs, ft, wd, wa), rtol=1e-8, atol=1e-12)


def test_rkd_default_weights_and_zero_when_equal():
    fs, ft = FEATURE_PAIRS["flat"]()
    close(R.rkd(fs, ft), ref_rkd(fs, ft, 25.0, 50.0), rtol=1e-8)
    close(R.rkd(ft, ft.clone()), 0.0, atol=1e-12)
    # distances are relative to their mean: a scaled student loses nothing
    close(R.rkd(3.0 * ft, ft), 0.0, atol=1e-10)


def test_rkd_teacher_side_is_detached():
    fs, ft = FEATURE_PAIRS["flat"]()
    fs, ft = fs.clone().requires_grad_(), ft.clone().requires_grad_()
    R.rkd(fs, ft).backward()
    assert fs.grad is not None and ft.grad is None


@pytest.mark.parametrize("case", list(FEATURE_PAIRS))
@pytest.mark.parametrize("mode", ["code", "paper"])
def test_pkt_matches_reference(case, mode):
    fs, ft = FEATURE_PAIRS[case]()
    close(R.pkt(fs, ft, mode=mode), ref_pkt(fs, ft, mode), rtol=1e-9, atol=1e-14)


def test_pkt_default_is_code_and_zero_when_equal():
    fs, ft = FEATURE_PAIRS["flat"]()
    close(R.pkt(fs, ft), ref_pkt(fs, ft, "code"))
    for mode in ("code", "paper"):
        close(R.pkt(ft, ft.clone(), mode=mode), 0.0, atol=1e-15)
    assert abs(float(R.pkt(fs, ft, mode="code")) - float(R.pkt(fs, ft, mode="paper"))) > 1e-5


LOGITS = {
    "small": lambda: (rand(5, 4, seed=20, scale=2.0), rand(5, 4, seed=21, scale=3.0)),
    "classes": lambda: (rand(3, 12, seed=22), rand(3, 12, seed=23, scale=4.0)),
    "two_classes": lambda: (rand(6, 2, seed=24), rand(6, 2, seed=25)),
}


@pytest.mark.parametrize("case", list(LOGITS))
@pytest.mark.parametrize("T, beta, gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 2.0), (2.0, 1.0, 0.0), (3.0, 0.0, 0.5)])
@pytest.mark.parametrize("standardize", [False, True])
def test_dist_matches_reference(case, T, beta, gamma, standardize):
    zs, zt = LOGITS[case]()
    close(
        R.dist(zs, zt, T=T, beta=beta, gamma=gamma, standardize=standardize),
        ref_dist(zs, zt, T, beta, gamma, standardize),
        rtol=1e-9,
        atol=1e-13,
    )


def test_dist_defaults_are_the_official_ones():
    zs, zt = LOGITS["small"]()
    close(R.dist(zs, zt), ref_dist(zs, zt, 1.0, 1.0, 1.0))


@pytest.mark.parametrize("case", list(LOGITS))
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_with_logit_standardisation_matches_reference(case, T):
    zs, zt = LOGITS[case]()
    close(KF.kd(zs, zt, T=T, standardize=True), ref_kd(zs, zt, T, True), rtol=1e-9, atol=1e-13)
    close(KF.kd(zs, zt, T=T), ref_kd(zs, zt, T, False), rtol=1e-9, atol=1e-13)


def test_logit_standardisation_ignores_each_samples_shift_and_scale():
    """The point of the z-score: a student whose logits are a per-sample affine map of the teacher's
    (any positive scale, any shift) has nothing left to learn."""
    zt = rand(4, 10, seed=26, scale=3.0)
    a = torch.tensor([[0.5], [2.0], [7.0], [1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0], [-3.0], [0.0], [10.0]], dtype=torch.float64)
    zs = a * zt + b
    assert float(KF.kd(zs, zt, T=2.0)) > 0.1
    close(KF.kd(zs, zt, T=2.0, standardize=True), 0.0, atol=1e-12)
    close(
        R.dist(zs, zt, T=2.0, standardize=True), float(R.dist(zt, zt, T=2.0, standardize=True)), rtol=1e-6, atol=1e-12
    )


# --------------------------------------------------------------------------------------------------
# gradients


def _req(*xs):
    return tuple(x.clone().requires_grad_() for x in xs)


GRAD_CASES = {
    "sp": (R.sp, (4, 3, 2, 2), (4, 5, 2, 2)),
    "cc_code": (R.cc, (4, 5), (4, 5)),
    "cc_paper": (lambda s, t: R.cc(s, t, mode="paper", gamma=0.4, order=3), (4, 5), (4, 6)),
    "pkt_code": (R.pkt, (4, 5), (4, 3)),
    "pkt_paper": (lambda s, t: R.pkt(s, t, mode="paper"), (4, 5), (4, 3)),
    "dist": (lambda s, t: R.dist(s, t, T=4.0, beta=2.0, gamma=2.0), (4, 6), (4, 6)),
    "dist_ls": (lambda s, t: R.dist(s, t, T=2.0, standardize=True), (4, 6), (4, 6)),
    "kd_ls": (lambda s, t: KF.kd(s, t, T=2.0, standardize=True), (4, 6), (4, 6)),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_student_and_teacher(name):
    fn, s_shape, t_shape = GRAD_CASES[name]
    s, t = _req(rand(*s_shape, seed=30), rand(*t_shape, seed=31))
    assert torch.autograd.gradcheck(fn, (s, t))


@pytest.mark.parametrize("wd, wa", [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)])
def test_gradcheck_rkd_student(wd, wa):
    (s,) = _req(rand(5, 4, seed=32))
    t = rand(5, 6, seed=33)
    assert torch.autograd.gradcheck(lambda x: R.rkd(x, t, wd, wa), (s,))


# --------------------------------------------------------------------------------------------------
# precision and errors


def _all(dtype, then=None):
    def c(*shape, seed, scale=1.0):
        x = rand(*shape, seed=seed, scale=scale).to(dtype)
        return x if then is None else x.to(then)

    fs, ft, gs = c(8, 5, seed=40), c(8, 7, seed=41), c(8, 5, seed=46)
    ms, mt = c(8, 3, 2, 2, seed=42), c(8, 4, 2, 2, seed=43)
    zs, zt = c(8, 10, seed=44, scale=3.0), c(8, 10, seed=45, scale=3.0)
    return [
        ("sp", lambda: R.sp(ms, mt)),
        ("cc_code", lambda: R.cc(fs, gs)),
        ("cc_paper", lambda: R.cc(fs, ft, mode="paper")),
        ("rkd", lambda: R.rkd(fs, ft)),
        ("pkt", lambda: R.pkt(fs, ft)),
        ("pkt_paper", lambda: R.pkt(fs, ft, mode="paper")),
        ("dist", lambda: R.dist(zs, zt, T=4.0)),
        ("dist_ls", lambda: R.dist(zs, zt, T=4.0, standardize=True)),
        ("kd_ls", lambda: KF.kd(zs, zt, T=2.0, standardize=True)),
    ]


def test_float32_and_float64_agree():
    for (name, f64), (_, f32) in zip(_all(torch.float64), _all(torch.float32)):
        v64, v32 = f64(), f32()
        assert v64.dtype == torch.float64 and v32.dtype == torch.float32, name
        assert math.isclose(float(v32), float(v64), rel_tol=2e-4, abs_tol=1e-6), (name, float(v32), float(v64))


def test_bf16_autocast_keeps_float32_maths():
    plain = [fn() for _, fn in _all(torch.bfloat16, then=torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = [(name, fn()) for name, fn in _all(torch.bfloat16)]
    for (name, a), p in zip(auto, plain):
        assert a.dtype == torch.float32 and torch.isfinite(a), name
        assert math.isclose(float(a), float(p), rel_tol=1e-6, abs_tol=1e-9), (name, float(a), float(p))


def test_errors_name_the_problem():
    x = torch.randn
    with pytest.raises(LayerError, match=r"sp: batch sizes differ.*\(4, 3\).*\(5, 3\)"):
        R.sp(x(4, 3), x(5, 3))
    with pytest.raises(LayerError, match="mode 'paper'"):
        R.cc(x(4, 3), x(4, 5))
    with pytest.raises(LayerError, match="at least 2"):
        R.cc(x(1, 3), x(1, 3))
    with pytest.raises(ConfigError, match="cubic"):
        R.cc(x(4, 3), x(4, 3), mode="cubic")
    with pytest.raises(ConfigError, match="angle_weight"):
        R.rkd(x(4, 3), x(4, 3), angle_weight=-1.0)
    with pytest.raises(ConfigError, match="sum"):
        R.pkt(x(4, 3), x(4, 3), mode="sum")
    with pytest.raises(LayerError, match=r"dist:.*\(4, 10\).*\(4, 100\)"):
        R.dist(x(4, 10), x(4, 100))
    with pytest.raises(ConfigError, match="beta"):
        R.dist(x(4, 10), x(4, 10), beta=float("nan"))
    with pytest.raises(LayerError, match="2 classes"):
        KF.kd(x(4, 1), x(4, 1), standardize=True)
