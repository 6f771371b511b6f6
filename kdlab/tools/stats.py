"""Seed statistics for the tables: a t-interval of a cell's mean, Welch's interval of a difference of means.

No scipy: the Student t quantile is found by bisection on its distribution function, written with the
regularized incomplete beta function I_x(a, b) evaluated by its continued fraction (modified Lentz; the
form of Numerical Recipes, 3rd ed., section 6.4). Works for any real degrees of freedom > 0, which Welch's
Welch-Satterthwaite degrees of freedom need.
"""

from __future__ import annotations

import math
import statistics

LEVEL = 0.95
ONE_SEED = "one seed: vs baseline noise"
NO_NOISE = "one seed each: no noise estimate"


def _beta_cf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # the continued fraction converges fast for x < (a + 1) / (a + b + 2); the symmetry I_x(a,b) = 1 - I_1-x(b,a)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on `t_cdf` (to float precision)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def summary(values: list[float], level: float = LEVEL) -> dict:
    """n, mean, sample std (n-1) and the t-interval of the mean over seeds (`lo`, `hi`; None below 2 values)."""
    values = [float(v) for v in values]
    n = len(values)
    out = {"n": n, "mean": None, "std": None, "lo": None, "hi": None}
    if not n:
        return out
    out["mean"] = statistics.fmean(values)
    if n > 1:
        out["std"] = statistics.stdev(values)
        half = t_quantile(0.5 + level / 2.0, n - 1) * out["std"] / math.sqrt(n)
        out["lo"], out["hi"] = out["mean"] - half, out["mean"] + half
    return out


def difference(ours: list[float], theirs: list[float], level: float = LEVEL) -> dict:
    """mean(ours) - mean(theirs) with its interval.

    Both sides with 2+ seeds: Welch's t interval, Welch-Satterthwaite degrees of freedom. One seed on one side:
    the single run is read against the other side's seed noise, the interval of a new run's value minus the other
    mean, diff +- t(n-1) s sqrt(1 + 1/n) (`kind` says so). One seed on both: no interval. `within_noise`: the
    interval covers zero."""
    a, b = summary(ours), summary(theirs)
    out = {"diff": None, "lo": None, "hi": None, "df": None, "kind": None, "within_noise": None}
    if a["mean"] is None or b["mean"] is None:
        return out
    out["diff"] = a["mean"] - b["mean"]
    if a["n"] > 1 and b["n"] > 1:
        va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
        se = math.sqrt(va + vb)
        if se == 0.0:
            df = float(a["n"] + b["n"] - 2)
        else:
            df = (va + vb) ** 2 / (va**2 / (a["n"] - 1) + vb**2 / (b["n"] - 1))
        out["kind"] = "welch"
    elif a["n"] > 1 or b["n"] > 1:
        noisy = a if a["n"] > 1 else b
        se = noisy["std"] * math.sqrt(1.0 + 1.0 / noisy["n"])
        df = float(noisy["n"] - 1)
        out["kind"] = ONE_SEED
    else:
        out["kind"] = NO_NOISE
        return out
    half = t_quantile(0.5 + level / 2.0, df) * se
    out.update(
        lo=out["diff"] - half, hi=out["diff"] + half, df=df, within_noise=out["diff"] - half <= 0 <= out["diff"] + half
    )
    return out


def fmt_summary(s: dict, digits: int = 2) -> str:
    """'72.10 ± 0.25 [71.48, 72.72]' (mean ± std [95% interval]); '72.10 (1 seed)'; '-' for none."""
    if s["mean"] is None:
        return "-"
    if s["std"] is None:
        return f"{s['mean']:.{digits}f} (1 seed)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def fmt_difference(d: dict, digits: int = 2) -> str:
    """'+0.42 [-0.10, +0.94] within noise'; a one-seed comparison says so."""
    if d["diff"] is None:
        return "—"
    text = f"{d['diff']:+.{digits}f}"
    if d["lo"] is None:
        return f"{text} ({d['kind']})"
    text += f" [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"
    if d["within_noise"]:
        text += " within noise"
    if d["kind"] == ONE_SEED:
        text += f" ({ONE_SEED})"
    return text
