"""Fits the bf16 engine's GELU (crates/kernels/src/gemm.rs, `gelu_bf16`): erf(x / sqrt 2) as
c P(c^2) / Q(c^2), c = x clamped to +-CLAMP, P of degree 2 and Q of degree 3 with Q(0) = 1,
by iteratively reweighted least squares towards the minimax fit. Prints the coefficients and
the largest |error| of erf on [0, 12] (past the clamp).

    .venv/bin/python tools/fit_gelu_bf16.py
"""
import math

import numpy as np

erf = np.vectorize(math.erf)

CLAMP = 4.25
P_DEGREE, Q_DEGREE = 2, 3


def fit(clamp, m, n, iterations=200):
    x = np.linspace(0, clamp, 6000)
    y, c2 = erf(x / np.sqrt(2)), x * x
    weights, best = np.ones_like(x), None
    for _ in range(iterations):
        # Linearised: x P(c^2) - y (Q(c^2) - 1) = y.
        a = np.hstack([x[:, None] * c2[:, None] ** np.arange(m + 1), -(y[:, None] * c2[:, None] ** np.arange(1, n + 1))])
        coef, *_ = np.linalg.lstsq(a * weights[:, None], y * weights, rcond=None)
        p, q = coef[: m + 1], np.concatenate([[1.0], coef[m + 1 :]])
        err = x * np.polyval(p[::-1], c2) / np.polyval(q[::-1], c2) - y
        worst = np.abs(err).max()
        if best is None or worst < best[0]:
            best = (worst, p, q)
        weights = weights * (1 + np.abs(err) / worst)
        weights /= weights.mean()
    return best[1], best[2]


p, q = fit(CLAMP, P_DEGREE, Q_DEGREE)
p32, q32 = p.astype(np.float32), q.astype(np.float32)
xs = np.linspace(0, 12, 40001)
c = np.minimum(xs, CLAMP).astype(np.float32)
approx = c * np.polyval(p32[::-1], c * c) / np.polyval(q32[::-1], c * c)
print("P (lowest degree first):", ", ".join(f"{v:.8e}" for v in p32))
print("Q (lowest degree first):", ", ".join(f"{v:.8e}" for v in q32))
print(f"max |erf error| on [0, 12]: {np.abs(approx - erf(xs / np.sqrt(2))).max():.2e}")
