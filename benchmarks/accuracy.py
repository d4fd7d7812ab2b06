"""Accuracy statistics of the LLM benchmarks: paired differences, means over seeds, test-set sizes.

Every method answers the same test problems, so two methods are compared problem by problem
(paired): problems both get right or both get wrong add no noise, and what is left is the
**discordance** q, the share of problems on which they disagree. One seed's per-problem
difference d ∈ {−1, 0, 1} has variance q − δ² (δ its mean), so the 95% interval of the
accuracy difference has half-width 1.96·√((q − δ²)/n) on n problems. With several seeds,
each problem's difference is first averaged over the seeds (seed k of one method against
seed k of the other; the average does not depend on that pairing), then the same interval is
taken over problems: it covers the test problems' noise and, through the seeds, part of the
training noise.
"""

from __future__ import annotations

import math
import statistics

Z95 = 1.959964  # two-sided 95% normal quantile
# Student's t, two-sided 95%, for 1..30 degrees of freedom (the normal quantile beyond, within 4%)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    """Two-sided 95% Student's t quantile for `df` degrees of freedom (the normal quantile beyond the table)."""
    return T95[df - 1] if df <= len(T95) else Z95


def seed_interval(values: list[float]) -> tuple[float, float]:
    """Mean of `values` (one per seed) and the half-width of its 95% interval (Student's t; nan for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def units_needed(values: list[float], half_width: float) -> int:
    """Units (seeds, or paired units) whose 95% interval (Student's t, as ``seed_interval``) would be ±`half_width` at the
    spread `values` show: the smallest n with t(n−1)·sd/√n ≤ half_width (at least 2; needs two values for a spread)."""
    if len(values) < 2 or not half_width > 0:
        raise ValueError(f"need two values and a positive half-width, got {len(values)} and {half_width}")
    sd, n = statistics.stdev(values), 2
    while t95(n - 1) * sd / math.sqrt(n) > half_width:
        n += 1
    return n


def wilson_interval(hits: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval (low, high) of a rate of `hits` in `n` trials (sound near 0 and 1, unlike ±1.96·se)."""
    if n < 1:
        return math.nan, math.nan
    p, z2 = hits / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _check(a: list[list[bool]], b: list[list[bool]]) -> None:
    if not a or len(a) != len(b) or any(len(x) != len(a[0]) for x in [*a, *b]):
        raise ValueError(f"answer sheets do not pair: {len(a)} and {len(b)} seeds of {sorted({len(x) for x in [*a, *b]})} problems")


def paired_difference(a: list[list[bool]], b: list[list[bool]]) -> tuple[float, float]:
    """Accuracy of `a` minus `b` in points and the half-width of its 95% interval, from answer
    sheets of the same problems (one sheet per seed, the same number for both), pooled over seeds."""
    _check(a, b)
    d = [statistics.fmean(int(x[i]) - int(y[i]) for x, y in zip(a, b)) for i in range(len(a[0]))]
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return 100 * statistics.fmean(d), 100 * Z95 * sd / math.sqrt(len(d))


def discordance(a: list[list[bool]], b: list[list[bool]]) -> float:
    """Share of (seed, problem) answers on which `a` and `b` disagree."""
    _check(a, b)
    return statistics.fmean(x[i] != y[i] for x, y in zip(a, b) for i in range(len(x)))


def problems_needed(discordance: float, points: float = 1.0, power: float = 0.5) -> int:
    """Test problems one seed's paired comparison needs to resolve a difference of `points`.

    n = (z₀.₉₇₅ + z_power)²·(q − δ²)/δ² with δ = points/100 and q the discordance. With
    ``power=0.5`` (z = 0) the 95% interval's half-width is `points`; with ``power=0.8`` a true
    difference of `points` comes out significant (5%, two-sided) in 4 runs out of 5."""
    if not 0 < points < 100 or not 0 < power < 1:
        raise ValueError(f"points must be in (0, 100) and power in (0, 1), got {points} and {power}")
    delta = points / 100
    z = Z95 + statistics.NormalDist().inv_cdf(power)
    return math.ceil(z * z * max(discordance - delta * delta, 0.0) / (delta * delta))


def _ratio_terms(num: list[bool], den: list[bool]) -> tuple[float, list[float]]:
    """r = mean(num) / mean(den) and each problem's linearized contribution (num_i − r·den_i) / mean(den)."""
    if not num or len(num) != len(den):
        raise ValueError(f"answer sheets do not pair: {len(num)} and {len(den)} problems")
    b = statistics.fmean(den)
    if not b:
        return math.nan, [math.nan] * len(num)
    r = statistics.fmean(num) / b
    return r, [(int(x) - r * int(y)) / b for x, y in zip(num, den)]


def ratio_interval(num: list[bool], den: list[bool]) -> tuple[float, float]:
    """Ratio of two accuracies on the same problems (e.g. merged / solo: the share kept) and the
    half-width of its 95% interval (delta method over problems); nan when `den` got nothing right."""
    r, z = _ratio_terms(num, den)
    if r != r or len(z) < 2:
        return r, math.nan
    return r, Z95 * statistics.stdev(z) / math.sqrt(len(z))


def ratio_difference(num_a: list[bool], den_a: list[bool], num_b: list[bool], den_b: list[bool]) -> tuple[float, float]:
    """r_a − r_b for two ratios of accuracies on the same problems (e.g. the share SBoRA keeps
    merged minus the share LoRA keeps) and its 95% half-width, paired over problems (delta method)."""
    ra, za = _ratio_terms(num_a, den_a)
    rb, zb = _ratio_terms(num_b, den_b)
    if len(za) != len(zb):
        raise ValueError(f"answer sheets do not pair: {len(za)} and {len(zb)} problems")
    d = [x - y for x, y in zip(za, zb)]
    if ra != ra or rb != rb or len(d) < 2:
        return ra - rb, math.nan
    return ra - rb, Z95 * statistics.stdev(d) / math.sqrt(len(d))
