"""Tests of kdlab.losses.functional, and of NST (feature_functional) and LP (relational), against naive
float64 references.

Every reference below works on Python floats with explicit loops over samples, channels, positions
and pairs; none calls the code under test or a vectorised form of the same formula.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdlab.errors import ConfigError, DataError, LayerError
from kdlab.losses import feature_functional as FF
from kdlab.losses import functional as KF
from kdlab.losses import relational as R

EPS = 1e-12  # the normalisation rule: v / max(||v||, EPS)


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float64, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def labels(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (n,), generator=g)


def close(value: torch.Tensor, ref: float, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    assert value.dim() == 0, f"expected a scalar, got shape {tuple(value.shape)}"
    assert math.isclose(float(value), ref, rel_tol=rtol, abs_tol=atol), f"{float(value)!r} != reference {ref!r}"


# --------------------------------------------------------------------------------------------------
# naive references (Python floats, explicit loops)
# --------------------------------------------------------------------------------------------------


def r_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    total = 0.0
    for x in row:
        total += math.exp(x - m)
    lse = m + math.log(total)
    return [x - lse for x in row]


def r_softmax(row: list[float]) -> list[float]:
    return [math.exp(v) for v in r_log_softmax(row)]


def r_kl(log_p: list[float], log_q: list[float]) -> float:
    out = 0.0
    for lp_, lq in zip(log_p, log_q):
        out += math.exp(lp_) * (lp_ - lq)
    return out


def r_normalize(v: list[float]) -> list[float]:
    sq = 0.0
    for x in v:
        sq += x * x
    d = max(math.sqrt(sq), EPS)
    return [x / d for x in v]


def r_dot(a: list[float], b: list[float]) -> float:
    out = 0.0
    for x, y in zip(a, b):
        out += x * y
    return out


def r_sqdist(a: list[float], b: list[float]) -> float:
    out = 0.0
    for x, y in zip(a, b):
        out += (x - y) * (x - y)
    return out


def ref_kd(zs: torch.Tensor, zt: torch.Tensor, T: float) -> float:
    s, t = zs.tolist(), zt.tolist()
    total = 0.0
    for n in range(len(s)):
        total += r_kl(r_log_softmax([x / T for x in t[n]]), r_log_softmax([x / T for x in s[n]]))
    return T * T * total / len(s)


def ref_at(fs: torch.Tensor, ft: torch.Tensor, p: float) -> float:
    s, t = fs.flatten(2).tolist(), ft.flatten(2).tolist()
    n_pos = len(s[0][0])

    def attention(sample: list[list[float]]) -> list[float]:
        a = []
        for pos in range(n_pos):
            acc = 0.0
            for ch in range(len(sample)):
                acc += abs(sample[ch][pos]) ** p
            a.append(acc / len(sample))
        return r_normalize(a)

    total = 0.0
    for n in range(len(s)):
        qs, qt = attention(s[n]), attention(t[n])
        for pos in range(n_pos):
            total += (qs[pos] - qt[pos]) ** 2
    return total / (len(s) * n_pos)


def ref_nst_sigma2(s_vecs: list[list[float]], t_vecs: list[list[float]]) -> float:
    union = s_vecs + t_vecs
    total, count = 0.0, 0
    for a in range(len(union)):
        for b in range(len(union)):
            if a != b:
                total += r_sqdist(union[a], union[b])
                count += 1
    mean = total / count
    return mean if mean > 0 else 1.0


def ref_nst(fs, ft, kernel: str, sigma2=None, teacher_term: bool = True) -> float:
    s_all, t_all = fs.flatten(2).tolist(), ft.flatten(2).tolist()
    total = 0.0
    for n in range(len(s_all)):
        s_vecs = [r_normalize(v) for v in s_all[n]]
        t_vecs = [r_normalize(v) for v in t_all[n]]
        sig = None
        if kernel == "gaussian":
            sig = ref_nst_sigma2(s_vecs, t_vecs) if sigma2 is None else sigma2

        def k(x, y, sig=sig):
            if kernel == "linear":
                return r_dot(x, y)
            if kernel == "poly":
                return r_dot(x, y) ** 2
            return math.exp(-r_sqdist(x, y) / (2.0 * sig))

        tt = ss = st = 0.0
        for a in t_vecs:
            for b in t_vecs:
                tt += k(a, b)
        for a in s_vecs:
            for b in s_vecs:
                ss += k(a, b)
        for a in s_vecs:
            for b in t_vecs:
                st += k(a, b)
        cs, ct = len(s_vecs), len(t_vecs)
        value = ss / cs**2 - 2.0 * st / (cs * ct)
        if teacher_term:
            value += tt / ct**2
        total += value
    return total / len(s_all)


def ref_knn(d: list[list[float]], i: int, k: int, prefer_high: bool = False) -> list[int]:
    others = [j for j in range(len(d)) if j != i]
    if prefer_high:
        return sorted(others, key=lambda j: (d[i][j], -j))[:k]
    return sorted(others, key=lambda j: (d[i][j], j))[:k]


def ref_lp(fs, ft, k: int, sigma2=None, normalize: bool = False, prefer_high: bool = False) -> float:
    s, t = fs.flatten(1).tolist(), ft.flatten(1).tolist()
    if normalize:
        s = [r_normalize(v) for v in s]
        t = [r_normalize(v) for v in t]
    n = len(s)
    d = [[r_sqdist(t[i], t[j]) for j in range(n)] for i in range(n)]
    nbrs = [ref_knn(d, i, k, prefer_high) for i in range(n)]
    if sigma2 is None:
        acc = 0.0
        for i in range(n):
            for j in nbrs[i]:
                acc += d[i][j]
        sigma2 = acc / (n * k)
        if sigma2 == 0:
            sigma2 = 1.0
    total = 0.0
    for i in range(n):
        for j in nbrs[i]:
            total += math.exp(-d[i][j] / sigma2) * r_sqdist(s[i], s[j])
    return total / (n * k)


def ref_factor(a, b) -> float:
    x, y = a.flatten(1).tolist(), b.flatten(1).tolist()
    total = 0.0
    for n in range(len(x)):
        px, py = r_normalize(x[n]), r_normalize(y[n])
        for i in range(len(px)):
            total += abs(px[i] - py[i])
    return total / (len(x) * len(x[0]))


def ref_mean_diff(a, b, power: int) -> float:
    x, y = a.flatten().tolist(), b.flatten().tolist()
    total = 0.0
    for u, v in zip(x, y):
        total += abs(u - v) ** power
    return total / len(x)


def ref_target(y: list[int], K: int, a: float) -> list[list[float]]:
    rows = []
    for c in y:
        rows.append([a if k == c else (1.0 - a) / (K - 1) for k in range(K)])
    return rows


def ref_tfkd(z, y, a: float, T: float, mode: str) -> float:
    logits, ys = z.tolist(), y.tolist()
    K = len(logits[0])
    pd = ref_target(ys, K, a)
    total = 0.0
    for n in range(len(logits)):
        log_teacher = r_log_softmax([p / T for p in pd[n]])
        if mode == "code":
            total += r_kl(log_teacher, r_log_softmax(logits[n]))
        else:
            total += T * T * r_kl(log_teacher, r_log_softmax([v / T for v in logits[n]]))
    return total / len(logits)


def ref_lsr(z, y, eps: float, spread: str) -> float:
    logits, ys = z.tolist(), y.tolist()
    K = len(logits[0])
    total = 0.0
    for n in range(len(logits)):
        logp = r_log_softmax(logits[n])
        for k in range(K):
            if spread == "all":
                q = (1.0 - eps if k == ys[n] else 0.0) + eps / K
            else:
                q = 1.0 - eps if k == ys[n] else eps / (K - 1)
            total -= q * logp[k]
    return total / len(logits)


# --------------------------------------------------------------------------------------------------
# values against the references
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 10), (7, 3), (1, 100)])
@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_kd_matches_reference(shape, T):
    zs, zt = rand(*shape, seed=1, scale=3.0), rand(*shape, seed=2, scale=3.0)
    close(KF.kd(zs, zt, T=T), ref_kd(zs, zt, T))


def test_kd_zero_when_equal_and_default_T():
    z = rand(5, 7, seed=3)
    close(KF.kd(z, z.clone()), 0.0, atol=1e-14)
    zs, zt = rand(5, 7, seed=4), rand(5, 7, seed=5)
    close(KF.kd(zs, zt), ref_kd(zs, zt, 4.0))


def _at_cases():
    a_s, a_t = rand(2, 3, 4, 4, seed=10), rand(2, 5, 4, 4, seed=11)
    b_s, b_t = rand(3, 4, 2, 5, seed=12), rand(3, 4, 2, 5, seed=13)
    z_s, z_t = rand(3, 3, 3, 3, seed=14), rand(3, 2, 3, 3, seed=15)
    z_s[0, 1] = 0.0  # one all-zero channel
    z_t[1] = 0.0  # a whole sample of zeros: zero attention map, kept finite by the eps
    z_s[2] = 0.0
    return [(a_s, a_t), (b_s, b_t), (z_s, z_t)]


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("p", [2, 1, 3.0])
def test_at_matches_reference(case, p):
    fs, ft = _at_cases()[case]
    value = KF.at(fs, ft, p=p)
    assert torch.isfinite(value)
    close(value, ref_at(fs, ft, p))


def _nst_cases():
    # poly: (4,6 channels, 16 positions) goes through the C x C Gram path,
    # (12,10 channels, 4 positions) through the HW x HW path
    a_s, a_t = rand(2, 4, 4, 4, seed=20), rand(2, 6, 4, 4, seed=21)
    b_s, b_t = rand(2, 12, 2, 2, seed=22), rand(2, 10, 2, 2, seed=23)
    z_s, z_t = rand(2, 5, 3, 3, seed=24), rand(2, 3, 3, 3, seed=25)
    z_s[0, 2] = 0.0  # all-zero channel maps: normalised to the zero vector
    z_t[1, 0] = 0.0
    z_s[1, 4] = 0.0
    c_s, c_t = rand(1, 3, 3, 5, seed=26).relu(), rand(1, 3, 3, 5, seed=27).relu()  # post-ReLU, C_s == C_t
    return [(a_s, a_t), (b_s, b_t), (z_s, z_t), (c_s, c_t)]


NST_KERNELS = [("linear", None), ("poly", None), ("gaussian", None), ("gaussian", 0.7)]


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("kernel,sigma2", NST_KERNELS)
@pytest.mark.parametrize("teacher_term", [True, False])
def test_nst_matches_reference(case, kernel, sigma2, teacher_term):
    fs, ft = _nst_cases()[case]
    value = FF.nst(fs, ft, kernel=kernel, sigma2=sigma2, teacher_term=teacher_term)
    assert torch.isfinite(value)
    close(value, ref_nst(fs, ft, kernel, sigma2, teacher_term), rtol=1e-9, atol=1e-13)


def test_nst_default_is_poly_with_teacher_term():
    fs, ft = _nst_cases()[0]
    close(FF.nst(fs, ft), ref_nst(fs, ft, "poly", None, True))


@pytest.mark.parametrize("kernel,sigma2", NST_KERNELS)
def test_nst_is_nonnegative_mmd(kernel, sigma2):
    for fs, ft in _nst_cases():
        assert float(FF.nst(fs, ft, kernel=kernel, sigma2=sigma2)) >= 0.0
        same = FF.nst(ft, ft.clone(), kernel=kernel, sigma2=sigma2)
        assert 0.0 <= float(same) < 1e-12
    # the teacher-free form is not an MMD: it can go negative (here with student == teacher)
    fs, ft = _nst_cases()[0]
    assert float(FF.nst(ft, ft.clone(), kernel=kernel, sigma2=sigma2, teacher_term=False)) < 0.0


def _lp_cases():
    tie_t = torch.tensor(
        [[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0], [-1.0, 0.0], [1.0, 0.0]],
        dtype=torch.float64,
    )  # rows 1, 2, 6 duplicate; row 0 is at distance 1 from rows 1, 2, 5, 6
    dup_t = rand(9, 6, seed=31)
    dup_t[4] = dup_t[1]
    dup_t[7] = dup_t[1]
    dup_t[8] = dup_t[3]
    return {
        "random": (rand(8, 5, seed=30), rand(8, 7, seed=32)),
        "flatten": (rand(6, 2, 3, seed=33), rand(6, 3, 2, 2, seed=34)),
        "ties": (rand(7, 3, seed=35), tie_t),
        "duplicates": (rand(9, 4, seed=36), dup_t),
        "constant_teacher": (rand(5, 3, seed=37), torch.ones(5, 4, dtype=torch.float64)),
    }


@pytest.mark.parametrize("name", ["random", "flatten", "ties", "duplicates", "constant_teacher"])
@pytest.mark.parametrize("sigma2", [None, 0.5])
@pytest.mark.parametrize("normalize", [False, True])
def test_lp_matches_reference(name, sigma2, normalize):
    fs, ft = _lp_cases()[name]
    n = fs.shape[0]
    for k in sorted({1, 2, 3, n - 1}):
        value = R.lp(fs, ft, k=k, sigma2=sigma2, normalize=normalize)
        close(value, ref_lp(fs, ft, k, sigma2, normalize), rtol=1e-9, atol=1e-14)


def test_lp_default_k5():
    fs, ft = _lp_cases()["random"]
    close(R.lp(fs, ft), ref_lp(fs, ft, 5))


@pytest.mark.parametrize("name,k", [("ties", 1), ("ties", 2), ("ties", 3), ("duplicates", 2)])
def test_lp_ties_go_to_the_lower_index(name, k):
    fs, ft = _lp_cases()[name]
    low, high = ref_lp(fs, ft, k), ref_lp(fs, ft, k, prefer_high=True)
    assert abs(low - high) > 1e-6, "the case must actually exercise a tie at the k-th neighbour"
    for dtype in (torch.float64, torch.float32):
        close(R.lp(fs.to(dtype), ft.to(dtype), k=k), low, rtol=1e-5 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_lp_raw_is_lowered_by_shrinking_the_student_and_normalised_is_not(scale):
    """Why raw LP can stall a student: the raw loss is quadratic in the student's scale, so shrinking every
    feature (a dead ReLU, a smaller BN gain) lowers it without changing any neighbourhood; normalised LP
    sees directions only."""
    fs, ft = _lp_cases()["random"]
    close(R.lp(scale * fs, ft, k=3), scale**2 * ref_lp(fs, ft, 3), rtol=1e-9)
    close(R.lp(scale * fs, ft, k=3, normalize=True), ref_lp(fs, ft, 3, normalize=True), rtol=1e-9)


def test_lp_no_gradient_through_teacher():
    fs, ft = _lp_cases()["random"]
    fs, ft = fs.clone().requires_grad_(), ft.clone().requires_grad_()
    R.lp(fs, ft, k=3).backward()
    assert fs.grad is not None and torch.count_nonzero(fs.grad) > 0
    assert ft.grad is None


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (2, 7), (4, 2, 3)])
def test_factor_matches_reference(shape):
    a, b = rand(*shape, seed=40), rand(*shape, seed=41)
    close(KF.factor(a, b), ref_factor(a, b))
    b0 = b.clone()
    b0[0] = 0.0  # zero sample: normalised to zero, finite
    close(KF.factor(a, b0), ref_factor(a, b0))


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (2, 7)])
def test_hint_and_recon_match_reference(shape):
    a, b = rand(*shape, seed=42), rand(*shape, seed=43)
    close(KF.hint(a, b), ref_mean_diff(a, b, 2))
    close(KF.recon_error(a, b), ref_mean_diff(a, b, 1))
    close(KF.recon_error(a, b, kind="l1"), ref_mean_diff(a, b, 1))
    close(KF.recon_error(a, b, kind="l2"), ref_mean_diff(a, b, 2))


@pytest.mark.parametrize("a", [0.99, 0.9, 0.5])
def test_tfkd_reg_target_matches_reference(a):
    y = labels(6, 5, seed=50)
    out = KF.tfkd_reg_target(y, 5, a=a)
    assert out.shape == (6, 5)
    ref = ref_target(y.tolist(), 5, a)
    for n in range(6):
        for k in range(5):
            assert math.isclose(float(out[n, k]), ref[n][k], rel_tol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(6))
    assert KF.tfkd_reg_target(y, 5, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("a,T", [(0.99, 20.0), (0.9, 1.0), (0.99, 40.0)])
@pytest.mark.parametrize("K", [5, 100])
def test_tfkd_reg_matches_reference(mode, a, T, K):
    z, y = rand(6, K, seed=51, scale=2.0), labels(6, K, seed=52)
    close(KF.tfkd_reg(z, y, a=a, T=T, mode=mode), ref_tfkd(z, y, a, T, mode))


def test_tfkd_reg_defaults_and_modes_differ():
    z, y = rand(4, 10, seed=53, scale=2.0), labels(4, 10, seed=54)
    close(KF.tfkd_reg(z, y), ref_tfkd(z, y, 0.99, 20.0, "code"))
    assert abs(float(KF.tfkd_reg(z, y, mode="code")) - float(KF.tfkd_reg(z, y, mode="paper"))) > 1e-3


def test_tfkd_teacher_is_near_uniform_at_the_default_a_and_T():
    # Tf-KD (Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020):
    # the manually designed regularisation distribution p_d (a on the true class, (1-a)/(K-1) elsewhere),
    # softened at a high temperature, is a near-uniform teacher. At K=100, a=0.99, T=20 (kdlab's defaults),
    # softmax(p_d / T) worked out by hand: true class 0.01050, every other class 0.009995.
    p_d = KF.tfkd_reg_target(torch.tensor([3]), 100, 0.99, dtype=torch.float64)
    teacher = torch.softmax(p_d / 20.0, dim=1)
    assert abs(float(teacher[0, 3]) - 0.01050) < 5e-6
    assert abs(float(teacher[0, 0]) - 0.009995) < 5e-7


@pytest.mark.parametrize("spread", ["all", "others"])
@pytest.mark.parametrize("eps", [0.1, 0.0, 0.3])
@pytest.mark.parametrize("K", [2, 10])
def test_lsr_matches_reference(spread, eps, K):
    z, y = rand(7, K, seed=60, scale=2.0), labels(7, K, seed=61)
    close(KF.lsr(z, y, eps=eps, spread=spread), ref_lsr(z, y, eps, spread))


@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_lsr_all_equals_torch_label_smoothing(eps):
    z, y = rand(9, 13, seed=62, scale=2.0), labels(9, 13, seed=63)
    torch.testing.assert_close(KF.lsr(z, y, eps=eps), F.cross_entropy(z, y, label_smoothing=eps))
    close(KF.lsr(z, y), ref_lsr(z, y, 0.1, "all"))


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------


def _req(*xs):
    return tuple(x.clone().requires_grad_() for x in xs)


GRAD_CASES = {
    "kd": (lambda s, t: KF.kd(s, t, T=3.0), (3, 5), (3, 5)),
    "at_p2": (lambda s, t: KF.at(s, t), (2, 3, 3, 3), (2, 4, 3, 3)),
    "at_p3": (lambda s, t: KF.at(s, t, p=3), (2, 3, 3, 3), (2, 2, 3, 3)),
    "nst_linear": (lambda s, t: FF.nst(s, t, "linear"), (2, 3, 3, 3), (2, 4, 3, 3)),
    "nst_poly_cc": (lambda s, t: FF.nst(s, t, "poly"), (2, 3, 3, 3), (2, 4, 3, 3)),
    "nst_poly_hw": (lambda s, t: FF.nst(s, t, "poly"), (2, 9, 2, 2), (2, 8, 2, 2)),
    "nst_gauss": (lambda s, t: FF.nst(s, t, "gaussian", sigma2=0.8), (2, 3, 3, 3), (2, 4, 3, 3)),
    "nst_no_tt": (lambda s, t: FF.nst(s, t, "gaussian", sigma2=0.8, teacher_term=False), (2, 3, 3, 3), (2, 4, 3, 3)),
    "factor": (KF.factor, (2, 3, 2, 2), (2, 3, 2, 2)),
    "hint": (KF.hint, (2, 3, 2, 2), (2, 3, 2, 2)),
    "recon_l1": (lambda s, t: KF.recon_error(s, t, "l1"), (2, 3, 2), (2, 3, 2)),
    "recon_l2": (lambda s, t: KF.recon_error(s, t, "l2"), (2, 3, 2), (2, 3, 2)),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_student_and_teacher(name):
    fn, s_shape, t_shape = GRAD_CASES[name]
    s, t = _req(rand(*s_shape, seed=70), rand(*t_shape, seed=71))
    assert torch.autograd.gradcheck(fn, (s, t))


@pytest.mark.parametrize("sigma2", [None, 0.6])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_lp_student(sigma2, normalize):
    fs, ft = _lp_cases()["ties"]
    (s,) = _req(fs)
    assert torch.autograd.gradcheck(lambda x: R.lp(x, ft, k=3, sigma2=sigma2, normalize=normalize), (s,))
    (s,) = _req(rand(5, 4, seed=72))
    assert torch.autograd.gradcheck(lambda x: R.lp(x, rand(5, 6, seed=73), k=4, sigma2=sigma2), (s,))


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_gradcheck_tfkd_reg(mode):
    (z,) = _req(rand(4, 6, seed=74))
    y = labels(4, 6, seed=75)
    assert torch.autograd.gradcheck(lambda x: KF.tfkd_reg(x, y, a=0.9, T=3.0, mode=mode), (z,))


@pytest.mark.parametrize("spread", ["all", "others"])
def test_gradcheck_lsr(spread):
    (z,) = _req(rand(4, 6, seed=76))
    y = labels(4, 6, seed=77)
    assert torch.autograd.gradcheck(lambda x: KF.lsr(x, y, eps=0.2, spread=spread), (z,))


def test_nst_gaussian_auto_sigma_is_detached():
    # sigma2=None depends on the student but is detached: its gradient is that of a fixed sigma2
    # equal to the computed value (so the gradient is checked with that constant by gradcheck).
    fs, ft = rand(1, 3, 3, 3, seed=78), rand(1, 4, 3, 3, seed=79)
    s_vecs = [r_normalize(v) for v in fs.flatten(2).tolist()[0]]
    t_vecs = [r_normalize(v) for v in ft.flatten(2).tolist()[0]]
    sig = ref_nst_sigma2(s_vecs, t_vecs)
    a, b = _req(fs, fs)
    auto = FF.nst(a, ft, "gaussian", sigma2=None)
    fixed = FF.nst(b, ft, "gaussian", sigma2=sig)
    torch.testing.assert_close(auto, fixed, rtol=1e-12, atol=1e-15)
    auto.backward()
    fixed.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)
    (c,) = _req(fs)
    assert torch.autograd.gradcheck(lambda x: FF.nst(x, ft, "gaussian", sigma2=sig), (c,))


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


def _raises(exc, fn, *needles):
    with pytest.raises(exc) as info:
        fn()
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {str(info.value)!r}"


def test_shape_errors_name_both_shapes():
    x = torch.randn
    _raises(
        LayerError,
        lambda: KF.at(x(2, 8, 16, 16), x(2, 8, 8, 8)),
        "at: spatial sizes differ",
        "(8, 16, 16)",
        "(8, 8, 8)",
        "pool",
    )
    _raises(LayerError, lambda: KF.at(x(2, 8, 4, 4), x(3, 8, 4, 4)), "(2, 8, 4, 4)", "(3, 8, 4, 4)")
    _raises(LayerError, lambda: KF.at(x(2, 8), x(2, 8)), "at:")
    _raises(LayerError, lambda: FF.nst(x(2, 3, 4, 4), x(2, 5, 2, 2)), "nst: spatial", "(3, 4, 4)", "(5, 2, 2)")
    _raises(LayerError, lambda: KF.kd(x(4, 10), x(4, 100)), "kd:", "(4, 10)", "(4, 100)")
    _raises(LayerError, lambda: KF.factor(x(2, 4, 3, 3), x(2, 5, 3, 3)), "factor:", "(2, 4, 3, 3)", "(2, 5, 3, 3)")
    _raises(LayerError, lambda: KF.hint(x(2, 4, 3, 3), x(2, 4, 6, 6)), "hint:", "(2, 4, 3, 3)", "(2, 4, 6, 6)")
    _raises(LayerError, lambda: KF.recon_error(x(2, 4), x(2, 5)), "recon_error:", "(2, 4)", "(2, 5)")
    _raises(LayerError, lambda: R.lp(x(4, 3), x(5, 3)), "lp:", "(4, 3)", "(5, 3)")
    _raises(LayerError, lambda: KF.lsr(x(4, 3), torch.zeros(5, dtype=torch.long)), "lsr:", "(4, 3)", "(5,)")
    _raises(LayerError, lambda: KF.tfkd_reg(x(4, 3), torch.zeros(4, 1, dtype=torch.long)), "tfkd_reg:")


@pytest.mark.parametrize("n,k", [(8, 8), (8, 9), (5, 0), (1, 1)])
def test_lp_bad_k(n, k):
    _raises(ConfigError, lambda: R.lp(torch.randn(n, 3), torch.randn(n, 4), k=k), f"k={k}", f"N={n}")


def test_option_errors():
    x = torch.randn(2, 3, 4, 4)
    y = torch.tensor([0, 1])
    _raises(ConfigError, lambda: FF.nst(x, x, kernel="cubic"), "cubic", "poly")
    _raises(ConfigError, lambda: FF.nst(x, x, kernel="gaussian", sigma2=0.0), "sigma2")
    _raises(ConfigError, lambda: R.lp(torch.randn(4, 2), torch.randn(4, 2), k=2, sigma2=-1.0), "sigma2")
    _raises(ConfigError, lambda: KF.kd(torch.randn(2, 3), torch.randn(2, 3), T=0), "T")
    _raises(ConfigError, lambda: KF.tfkd_reg(torch.randn(2, 3), y, mode="eq9"), "eq9")
    _raises(ConfigError, lambda: KF.lsr(torch.randn(2, 3), y, spread="none"), "none")
    _raises(ConfigError, lambda: KF.lsr(torch.randn(2, 3), y, eps=1.5), "eps")
    _raises(ConfigError, lambda: KF.recon_error(x, x, kind="l3"), "l3")
    _raises(ConfigError, lambda: KF.tfkd_reg_target(y, 1), "num_classes")
    _raises(DataError, lambda: KF.lsr(torch.randn(2, 3), torch.tensor([0, 3])), "out of range")


# --------------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------------


def _all_losses(dtype: torch.dtype, then: torch.dtype | None = None):
    """(name, callable) pairs whose inputs are fixed float64 draws cast to ``dtype`` (then to ``then``)."""

    def c(*shape, seed, scale=1.0):
        x = rand(*shape, seed=seed, scale=scale).to(dtype)
        return x if then is None else x.to(then)

    y = labels(6, 10, seed=80)
    fs, ft = c(3, 4, 4, 4, seed=81), c(3, 6, 4, 4, seed=82)
    gs = c(3, 4, 4, 4, seed=87)
    ls, lt = c(8, 5, seed=83), c(8, 7, seed=84)
    zs, zt = c(6, 10, seed=85, scale=3.0), c(6, 10, seed=86, scale=3.0)
    return [
        ("kd", lambda: KF.kd(zs, zt)),
        ("at", lambda: KF.at(fs, ft)),
        ("nst_linear", lambda: FF.nst(fs, ft, "linear")),
        ("nst_poly", lambda: FF.nst(fs, ft, "poly")),
        ("nst_gauss", lambda: FF.nst(fs, ft, "gaussian")),
        ("nst_gauss_fixed", lambda: FF.nst(fs, ft, "gaussian", sigma2=0.5)),
        ("lp", lambda: R.lp(ls, lt, k=3)),
        ("lp_norm", lambda: R.lp(ls, lt, k=7, normalize=True)),
        ("factor", lambda: KF.factor(fs, gs)),
        ("hint", lambda: KF.hint(fs, gs)),
        ("tfkd_code", lambda: KF.tfkd_reg(zs, y)),
        ("tfkd_paper", lambda: KF.tfkd_reg(zs, y, mode="paper")),
        ("lsr_all", lambda: KF.lsr(zs, y)),
        ("lsr_others", lambda: KF.lsr(zs, y, spread="others")),
        ("recon", lambda: KF.recon_error(fs, gs)),
    ]


def test_float32_and_float64_agree():
    for (name, f64), (_, f32) in zip(_all_losses(torch.float64), _all_losses(torch.float32)):
        v64, v32 = f64(), f32()
        assert v64.dtype == torch.float64 and v32.dtype == torch.float32, name
        assert math.isclose(float(v32), float(v64), rel_tol=2e-5, abs_tol=1e-7), (name, float(v32), float(v64))


def test_bf16_autocast_keeps_float32_maths():
    # bf16 inputs (as produced by autocast matmuls/convs) under autocast: the loss is computed in
    # float32 and equals the loss of the same bf16-rounded values given as float32 without autocast
    plain = [fn() for _, fn in _all_losses(torch.bfloat16, then=torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = [(name, fn()) for name, fn in _all_losses(torch.bfloat16)]
    for (name, a), p in zip(auto, plain):
        assert a.dtype == torch.float32, name
        assert torch.isfinite(a), name
        assert math.isclose(float(a), float(p), rel_tol=1e-6, abs_tol=1e-9), (name, float(a), float(p))


def test_bf16_autocast_backward_is_finite():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    y = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)  # bf16 under autocast
        assert h.dtype == torch.bfloat16
        fmap = h.view(4, 4, 2, 2)
        t = torch.randn(4, 4, 2, 2)
        loss = (
            KF.kd(h, torch.randn(4, 16))
            + KF.at(fmap, t)
            + FF.nst(fmap, t, "gaussian")
            + R.lp(h, torch.randn(4, 8), k=2)
            + KF.factor(fmap, t)
            + KF.hint(fmap, t)
            + KF.tfkd_reg(h, y)
            + KF.lsr(h, y)
            + KF.recon_error(fmap, t)
        )
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0


def test_attention_map_matches_naive_loops():
    from kdlab.losses.functional import attention_map

    torch.manual_seed(3)
    f = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    f[1] = 0.0  # an all-zero sample stays zero
    got = attention_map(f, p=2)
    for n in range(3):
        vals = []
        for h in range(5):
            for w in range(6):
                vals.append(sum(float(f[n, c, h, w]) ** 2 for c in range(4)) / 4)
        norm = max(sum(v * v for v in vals) ** 0.5, 1e-12)
        for i, v in enumerate(vals):
            assert abs(float(got[n, i]) - v / norm) < 1e-12
