"""Forecasting a reused value from its last computed values: TaylorSeer (Liu et al. 2025,
arXiv:2503.06923), as diffusers implements it (`diffusers/hooks/taylorseer_cache.py`, `TaylorSeerState`).

TaylorSeer keeps Taylor factors per cached output, updated at every step that computes it:

    D_0 = F                                   the fresh value
    D_{j+1} = (D_j − D_j⁻) / h                for j < order where the previous update had D_j⁻;
                                              h = steps since that update

and a step at distance d from the last update reuses Σ_j D_j · d^j / j!. Where history is short (the
first computations) the expansion has fewer orders: after the n-th computation of a value, orders
0 … min(order, n − 1).

Each factor is a fixed linear combination of the last computed values, so for a static schedule a
forecast is Σ_i w_i · F_{n−i} with weights known before sampling: `taylor_weights` derives them (what
a plan's graphs are given per step), while the eager reference runs the recursion itself
(exporter/reference.py), so the two derivations check each other.
"""

from __future__ import annotations

from math import factorial

import numpy as np

MAX_ORDER = 2


def taylor_weights(history, step: int) -> np.ndarray:
    """Weights w (float64, newest first) with forecast = Σ_i w_i · F(history[i]) at `step`, where
    `history` lists the steps that computed F, newest first; its length is the expansion order + 1."""
    ascending = [int(t) for t in reversed(history)]
    n = len(ascending)
    factors = None  # order j → its coefficient vector over `ascending`
    for i, t in enumerate(ascending):
        new = {0: np.eye(n)[i]}
        if factors is not None:
            h = t - ascending[i - 1]
            for j in range(n - 1):
                if j in factors:
                    new[j + 1] = (new[j] - factors[j]) / h
        factors = new
    d = step - ascending[-1]
    w = sum(factor * d ** j / factorial(j) for j, factor in factors.items())
    return np.asarray(w[::-1], dtype=np.float64)
