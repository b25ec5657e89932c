"""Statistics of a benchmark: paired significance tests and latency percentiles.

The paired t-test computes its p-value from Student's t distribution through the regularised
incomplete beta function, evaluated by its continued fraction with the modified Lentz method
(as described in Press et al., *Numerical Recipes*, 3rd ed., section 6.4). Only the standard
library is needed, so the engine does not depend on SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# The continued fraction converges in O(sqrt(max(a, b))) terms; this bound is far above what
# any benchmark's degrees of freedom need.
_MAX_TERMS = 10_000
_EPSILON = 1e-15
_TINY = 1e-300


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """Return I_x(a, b), the regularised incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be positive, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be between 0 and 1, got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast for x below the mean of the distribution; above it, the
    # symmetry I_x(a, b) = 1 - I_{1-x}(b, a) is used.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Evaluate the continued fraction of I_x(a, b) with the modified Lentz method."""
    numerator_factor = 1.0
    denominator = 1.0 - (a + b) * x / (a + 1.0)
    denominator = 1.0 / (denominator if abs(denominator) > _TINY else _TINY)
    result = denominator
    for m in range(1, _MAX_TERMS + 1):
        # Even step: coefficient m (b - m) x / ((a + 2m - 1)(a + 2m)).
        coefficient = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        denominator, numerator_factor = _lentz_step(coefficient, denominator, numerator_factor)
        result *= denominator * numerator_factor
        # Odd step: coefficient -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)).
        coefficient = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        denominator, numerator_factor = _lentz_step(coefficient, denominator, numerator_factor)
        delta = denominator * numerator_factor
        result *= delta
        if abs(delta - 1.0) < _EPSILON:
            return result
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, "
                          f"x={x}")


def _lentz_step(coefficient: float, denominator: float, numerator: float) -> tuple[float, float]:
    denominator = 1.0 + coefficient * denominator
    denominator = 1.0 / (denominator if abs(denominator) > _TINY else _TINY)
    numerator = 1.0 + coefficient / numerator
    numerator = numerator if abs(numerator) > _TINY else _TINY
    return denominator, numerator


def student_t_two_sided_p(t: float, degrees_of_freedom: float) -> float:
    """Return P(|T| >= |t|) for Student's t distribution with the given degrees of freedom."""
    if degrees_of_freedom <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {degrees_of_freedom}")
    if math.isinf(t):
        return 0.0
    x = degrees_of_freedom / (degrees_of_freedom + t * t)
    return regularized_incomplete_beta(degrees_of_freedom / 2.0, 0.5, x)


def paired_t_test(system: Sequence[float], baseline: Sequence[float]) -> dict[str, float | int | None]:
    """Two-sided paired t-test of ``system`` against ``baseline``, value by value.

    Returns the number of pairs, the mean difference (system minus baseline), t, the degrees of
    freedom and the p-value. With fewer than 2 pairs, t and p are None. When every difference is
    equal, t is infinite (p = 0) unless they are all 0 (t = 0, p = 1).
    """
    differences = _differences(system, baseline)
    count = len(differences)
    mean = float(differences.mean()) if count else 0.0
    result: dict[str, float | int | None] = {"n": count, "mean_difference": mean, "t": None,
                                             "degrees_of_freedom": count - 1, "p_value": None}
    if count < 2:
        return result
    deviation = float(differences.std(ddof=1))
    if deviation == 0.0:
        result["t"] = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        result["p_value"] = 1.0 if mean == 0.0 else 0.0
        return result
    t = mean / (deviation / math.sqrt(count))
    result["t"] = t
    result["p_value"] = student_t_two_sided_p(t, count - 1)
    return result


def randomization_test(system: Sequence[float], baseline: Sequence[float], *, trials: int = 10_000,
                       seed: int = 0) -> dict[str, float | int | None]:
    """Two-sided paired randomisation test: random sign flips of the per-query differences.

    The p-value is (1 + number of trials whose absolute mean difference is at least the
    observed one) / (1 + trials), so it is never 0.
    """
    differences = _differences(system, baseline)
    count = len(differences)
    mean = float(differences.mean()) if count else 0.0
    result: dict[str, float | int | None] = {"n": count, "mean_difference": mean,
                                             "trials": trials, "seed": seed, "p_value": None}
    if count < 2:
        return result
    generator = np.random.default_rng(seed)
    observed = abs(differences.sum())
    extreme = 0
    for start in range(0, trials, 1000):
        signs = generator.choice((-1.0, 1.0), size=(min(1000, trials - start), count))
        # A small tolerance counts sums that equal the observed one up to rounding.
        extreme += int((np.abs(signs @ differences) >= observed - 1e-12).sum())
    result["p_value"] = (extreme + 1) / (trials + 1)
    return result


def _differences(system: Sequence[float], baseline: Sequence[float]) -> np.ndarray:
    if len(system) != len(baseline):
        raise ValueError(f"paired tests need as many values on each side, got {len(system)} "
                         f"and {len(baseline)}")
    return np.asarray(system, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99, mean and max of durations given in seconds, in milliseconds."""
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    if values.size == 0:
        raise ValueError("no durations to summarise")
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean()),
            "max": float(values.max()), "count": int(values.size)}
