"""Q-Sparse's scaling law and its fit.

    L(N, S) = E + A(S) / N^α,        A(S) = B + C·exp(β / (1 − S))

N counts the block linear parameters, S the sparsity of their inputs. With N = N_a / (1 − S) the same law in
activated parameters reads L(N_a, S) = E + A(S)·((1 − S) / N_a)^α, so at a fixed inference budget N_a the best
sparsity S* minimizes A(S)·(1 − S)^α, whatever N_a is.

The fit follows the method of Besiroglu et al.'s Chinchilla replication: a Huber loss (δ = 1e-3) on the
residuals log L̂ − log L, minimized by L-BFGS-B from a grid of starting points. For fixed α and β the law is
linear in E, B and C, so each grid point (α, β) starts from the non-negative least-squares E, B, C: the search
only has to find the two exponents. Confidence intervals come from refitting bootstrap resamples of the rows.
"""

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np

HUBER_DELTA = 1e-3
PARAMETERS = ("E", "B", "C", "alpha", "beta")
ALPHA_GRID = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75)
BETA_GRID = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
BOUNDS = ((1e-6, None), (0.0, None), (1e-9, None), (1e-3, 2.0), (0.0, 5.0))
S_MAX = 0.995  # the search for S* stops short of S = 1, where nothing is kept

# The paper's published fit (full precision, rounded to two decimals) and the optima it reports.
PAPER_CONSTANTS = {"E": 1.86, "B": 0.01, "C": 1.89, "alpha": 0.10, "beta": 0.05}
PAPER_S_STAR = {"full precision": 0.4558, "BitNet b1.58": 0.6125}


@dataclass(frozen=True)
class Law:
    E: float
    B: float
    C: float
    alpha: float
    beta: float

    def A(self, S):
        return self.B + self.C * np.exp(self.beta / (1.0 - np.asarray(S, dtype=float)))

    def loss(self, N, S):
        return self.E + self.A(S) / np.asarray(N, dtype=float) ** self.alpha

    def loss_at_activated(self, N_a, S):
        S = np.asarray(S, dtype=float)
        return self.E + self.A(S) * ((1.0 - S) / np.asarray(N_a, dtype=float)) ** self.alpha

    def optimal_sparsity(self) -> float:
        """S* = argmin over [0, S_MAX] of A(S)·(1 − S)^α (the N_a-independent part of the loss)."""
        from scipy.optimize import minimize_scalar

        grid = np.linspace(0.0, S_MAX, 2000)
        cost = np.log(self.A(grid)) + self.alpha * np.log1p(-grid)
        i = int(np.argmin(cost))
        if i in (0, len(grid) - 1):
            return float(grid[i])
        result = minimize_scalar(
            lambda s: math.log(float(self.A(s))) + self.alpha * math.log1p(-s),
            bounds=(grid[i - 1], grid[i + 1]),
            method="bounded",
            options={"xatol": 1e-9},
        )
        return float(result.x)

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def huber(residuals: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    small = np.abs(residuals) <= delta
    return np.where(small, 0.5 * residuals**2, delta * (np.abs(residuals) - 0.5 * delta))


def objective(theta: np.ndarray, N: np.ndarray, S: np.ndarray, loss: np.ndarray) -> float:
    predicted = Law(*theta).loss(N, S)
    if np.any(predicted <= 0) or not np.all(np.isfinite(predicted)):
        return 1e6
    return float(huber(np.log(predicted) - np.log(loss)).sum())


def linear_start(alpha: float, beta: float, N, S, loss) -> np.ndarray:
    """E, B, C ≥ 0 by least squares for fixed α, β (the law is linear in them), as a starting point."""
    from scipy.optimize import nnls

    scale = np.asarray(N, dtype=float) ** -alpha
    design = np.stack([np.ones_like(scale), scale, np.exp(beta / (1.0 - np.asarray(S))) * scale], axis=1)
    (E, B, C), _ = nnls(design, np.asarray(loss, dtype=float))
    return np.array([max(E, 1e-3), B, max(C, 1e-6), alpha, beta])


def _minimize(start: np.ndarray, N, S, loss):
    from scipy.optimize import minimize

    # The Huber values are tiny (residuals ~1e-3): scipy's default tolerances would stop at the start.
    return minimize(
        objective,
        start,
        args=(N, S, loss),
        method="L-BFGS-B",
        bounds=BOUNDS,
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000},
    )


def fit(N: Sequence[float], S: Sequence[float], loss: Sequence[float], starts: Optional[list] = None) -> Law:
    """The best law over L-BFGS-B runs from ``starts`` (default: the (α, β) grid with linear E, B, C)."""
    N, S, loss = (np.asarray(v, dtype=float) for v in (N, S, loss))
    if starts is None:
        starts = [linear_start(a, b, N, S, loss) for a in ALPHA_GRID for b in BETA_GRID]
    best = min((_minimize(start, N, S, loss) for start in starts), key=lambda r: r.fun)
    return Law(*(float(v) for v in best.x))


@dataclass
class FitReport:
    law: Law
    S_star: float
    intervals: Dict[str, tuple]  # name -> (low, high), 95% bootstrap percentiles
    rows: int
    bootstrap: int

    def as_dict(self) -> dict:
        out = dict(self.law.as_dict(), S_star=self.S_star, N_over_N_a=1.0 / (1.0 - self.S_star))
        out["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        out.update(rows=self.rows, bootstrap=self.bootstrap, huber_delta=HUBER_DELTA)
        return out


def fit_with_intervals(N, S, loss, bootstrap: int = 200, seed: int = 0, progress=None) -> FitReport:
    """The fit, S*, and 95% intervals of every constant and of S* from ``bootstrap`` row resamples (each refit
    from the full fit and its two neighbouring grid starts, which keeps the refits cheap and on the same basin)."""
    N, S, loss = (np.asarray(v, dtype=float) for v in (N, S, loss))
    law = fit(N, S, loss)
    rng = np.random.default_rng(seed)
    samples = []
    for b in range(bootstrap):
        pick = rng.integers(0, len(N), len(N))
        if len(np.unique(N[pick])) < 2 or len(np.unique(S[pick])) < 3:
            continue  # a resample that cannot identify the exponents
        starts = [np.array(list(law.as_dict().values()))]
        starts += [linear_start(law.alpha * f, law.beta, N[pick], S[pick], loss[pick]) for f in (0.5, 2.0)]
        refit = fit(N[pick], S[pick], loss[pick], starts)
        samples.append(list(refit.as_dict().values()) + [refit.optimal_sparsity()])
        if progress and (b + 1) % 50 == 0:
            progress(f"bootstrap {b + 1}/{bootstrap}")
    intervals = {}
    if samples:
        table = np.array(samples)
        for i, name in enumerate(PARAMETERS + ("S_star",)):
            low, high = np.percentile(table[:, i], [2.5, 97.5])
            intervals[name] = (float(low), float(high))
    return FitReport(law, law.optimal_sparsity(), intervals, len(N), len(samples))
