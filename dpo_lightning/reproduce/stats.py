"""Part 2's statistics, fixed before any run: bootstrap intervals, verdicts, and the curve comparisons.

    draws = Bootstrap(n_seeds=1, n_prompts=512, n_boot=2000, seed=0)
    rewards = draws.means(per_prompt)              # (n_boot,) bootstrap means of one point's per-prompt rewards
    lo, hi = interval(statistic_draws)             # the 95% percentile interval
    verdict(lo, hi, threshold=0.0)                 # "PASS" / "FAIL" / "INCONCLUSIVE"

Every evaluated checkpoint is a point (KL, reward) measured on the same deciding prompts (and, with several
training seeds, once per seed). A replicate draws seeds with replacement and then prompts with replacement, the
same draw for every point of every method (a paired bootstrap: two methods evaluated on the same prompts are
compared prompt by prompt), recomputes every point's mean reward and mean KL, and then the claim's statistic.
The 95% interval is the 2.5th–97.5th percentile of the statistic over the replicates.

Verdicts (a claim "statistic > threshold"): PASS when the whole interval is above the threshold, FAIL when it is
entirely at or below it, INCONCLUSIVE when it straddles it. A claim "statistic within [a, b]": PASS when the
interval lies inside, FAIL when it is disjoint, INCONCLUSIVE otherwise.

Curve comparisons of method A against method B, each a set of (KL, reward) points:

- **point-wise**: each method's curve is the linear interpolation of its points sorted by KL; the margin is the
  mean of r_A(k) − r_B(k) over the matched grid, every KL of either method inside the overlap of their KL
  ranges (each curve read at the other's KL points). NaN when the ranges do not overlap.
- **envelope**: each method's frontier (:func:`dpo_lightning.evaluate.frontier`, the SFT point at KL 0
  included) read at the same kind of grid over [0, min of the two largest KLs]; the margin is the mean gap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dpo_lightning.errors import ConfigError

LEVEL = 0.95
VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")


def interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of the finite bootstrap draws; (NaN, NaN) when fewer than 90% are finite."""
    draws = np.asarray(draws, dtype=np.float64)
    finite = draws[np.isfinite(draws)]
    if len(finite) < 0.9 * len(draws) or len(finite) == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(finite, [tail, 1.0 - tail])
    return float(lo), float(hi)


def verdict(lo: float, hi: float, threshold: float, *, direction: str = ">") -> str:
    """PASS when [lo, hi] clears ``threshold`` on the claimed side, FAIL when it lies wholly on the other side
    (touching the threshold counts as the other side), INCONCLUSIVE when it straddles or is NaN."""
    if direction not in (">", "<"):
        raise ConfigError(f"verdict: direction must be '>' or '<', got {direction!r}")
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "INCONCLUSIVE"
    if direction == "<":
        lo, hi, threshold = -hi, -lo, -threshold
    if lo > threshold:
        return "PASS"
    if hi <= threshold:
        return "FAIL"
    return "INCONCLUSIVE"


def band_verdict(lo: float, hi: float, band_lo: float, band_hi: float) -> str:
    """PASS when [lo, hi] lies inside [band_lo, band_hi], FAIL when it is disjoint from it, else INCONCLUSIVE."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "INCONCLUSIVE"
    if band_lo <= lo and hi <= band_hi:
        return "PASS"
    if hi < band_lo or lo > band_hi:
        return "FAIL"
    return "INCONCLUSIVE"


class Bootstrap:
    """One fixed set of replicates over (training seeds, evaluation prompts), shared by every statistic.

    ``means(x)`` takes per-prompt values of one point, shaped (P,) for one seed or (S, P), and returns the
    (n_boot,) replicate means; replicate b uses the same seeds and prompts for every point.
    """

    def __init__(self, n_seeds: int, n_prompts: int, *, n_boot: int = 2000, seed: int = 0):
        if n_seeds < 1 or n_prompts < 2 or n_boot < 10:
            raise ConfigError(f"bootstrap needs ≥ 1 seed, ≥ 2 prompts, ≥ 10 replicates (got {n_seeds}, "
                              f"{n_prompts}, {n_boot})")  # fmt: skip
        rng = np.random.default_rng(seed)
        self.n_seeds, self.n_prompts, self.n_boot = n_seeds, n_prompts, n_boot
        self.seed_idx = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
        self.prompt_idx = rng.integers(0, n_prompts, size=(n_boot, n_prompts))

    def means(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        x = np.asarray(values, dtype=np.float64)
        x = x[None, :] if x.ndim == 1 else x
        if x.shape != (self.n_seeds, self.n_prompts):
            raise ConfigError(f"bootstrap: per-prompt values of shape {x.shape}, expected "
                              f"({self.n_seeds}, {self.n_prompts}) (seeds × evaluation prompts)")  # fmt: skip
        per_seed = x[:, self.prompt_idx].mean(axis=2)  # (S, n_boot): every seed on replicate b's prompts
        return per_seed[self.seed_idx.T, np.arange(self.n_boot)].mean(axis=0)


@dataclass(frozen=True)
class Decision:
    """A statistic, its 95% interval, the threshold decided in advance, and the verdict."""

    estimate: float
    lo: float
    hi: float
    verdict: str

    @property
    def interval(self) -> list[float]:
        return [round(self.lo, 4), round(self.hi, 4)]


def decide(estimate: float, draws: np.ndarray, threshold: float, *, direction: str = ">") -> Decision:
    lo, hi = interval(draws)
    return Decision(float(estimate), lo, hi, verdict(lo, hi, threshold, direction=direction))


def decide_band(estimate: float, draws: np.ndarray, band_lo: float, band_hi: float) -> Decision:
    lo, hi = interval(draws)
    return Decision(float(estimate), lo, hi, band_verdict(lo, hi, band_lo, band_hi))


# ---------------------------------------------------------------------------------------------------- curves
def _curve(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pts = points[np.all(np.isfinite(points), axis=1)]
    order = np.argsort(pts[:, 0], kind="stable")
    return pts[order, 0], pts[order, 1]


def pointwise_margins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """r_A(k) − r_B(k) at every KL of either method inside the overlap of their KL ranges (linear
    interpolation of each method's points sorted by KL); empty when the ranges do not overlap."""
    ka, ra = _curve(np.asarray(a, dtype=np.float64))
    kb, rb = _curve(np.asarray(b, dtype=np.float64))
    if len(ka) == 0 or len(kb) == 0:
        return np.array([])
    lo, hi = max(ka[0], kb[0]), min(ka[-1], kb[-1])
    grid = np.concatenate([ka, kb])
    grid = grid[(grid >= lo) & (grid <= hi)]
    return np.interp(grid, ka, ra) - np.interp(grid, kb, rb)


def envelope_margins(a: np.ndarray, b: np.ndarray, origin: tuple[float, float]) -> np.ndarray:
    """frontier_A(k) − frontier_B(k), both frontiers through ``origin`` (the SFT point), at every KL of either
    method in [origin KL, the smaller of the two largest KLs]."""
    from dpo_lightning.evaluate import frontier_reward

    a = [tuple(p) for p in np.asarray(a, dtype=np.float64) if np.all(np.isfinite(p))] + [origin]
    b = [tuple(p) for p in np.asarray(b, dtype=np.float64) if np.all(np.isfinite(p))] + [origin]
    hi = min(max(k for k, _ in a), max(k for k, _ in b))
    grid = sorted({k for k, _ in a + b if origin[0] <= k <= hi})
    return np.array([frontier_reward(a, k) - frontier_reward(b, k) for k in grid])


def mean_or_nan(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def curve_draws(
    stat: Callable[[np.ndarray, np.ndarray], float], a_draws: np.ndarray, b_draws: np.ndarray
) -> np.ndarray:
    """``stat`` on every replicate: ``a_draws``/``b_draws`` are (n_boot, n_points, 2) (KL, reward) arrays."""
    return np.array([stat(a, b) for a, b in zip(a_draws, b_draws, strict=True)])
