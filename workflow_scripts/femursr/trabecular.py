"""A continuous, oriented trabecular network: plates and rods from random wave fields.

Each region owns four Gaussian-like random fields, each a sum of random-phase plane waves
``g(x) = sqrt(2/N) * sum_i cos(k_i . x + phi_i)`` (unit variance, defined at every point in mm):

* plates: the band ``|g1| < w_p``; all ``k_i`` lie (nearly) perpendicular to the region's load
  direction, so the sheets contain that direction;
* rods: ``|g2| < w_r`` and (``|g3| < w_r`` or ``|g4| < w_r``): the intersection of two sheet
  families along the load direction gives longitudinal rods, and ``g4`` (waves along the load
  direction) adds cross-struts that connect them.

The band half-width follows from the wanted volume fraction (``P(|g| < w) = erf(w / sqrt 2)``)
and the wave number from the wanted spacing, so BV/TV, spacing and rod/plate mix are set per
region and per subject; the measured truth is computed afterwards on the sampled structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import erfinv


@dataclass
class RegionStructure:
    bvtv: float  # target volume fraction of the network (before union overlap)
    period_mm: float  # spacing of neighbouring trabeculae, ~ Tb.Th + Tb.Sp = 1 / Tb.N
    rod_fraction: float  # share of the bone volume in rods
    direction: np.ndarray  # main load direction (unit vector, femur frame)


class WaveField:
    """Sum of ``n`` random plane waves with wave number about ``k`` rad/mm."""

    def __init__(self, rng, direction, k, n, along: bool, spread: float = 0.3):
        d = np.asarray(direction, float)
        d /= np.linalg.norm(d)
        v = rng.normal(size=(n, 3))
        if along:
            v = np.sign(rng.uniform(-1, 1, size=(n, 1))) * d + spread * (v - (v @ d)[:, None] * d)
        else:
            v = v - (v @ d)[:, None] * d
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            v = v + spread * rng.normal(size=(n, 1)) * d
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        mag = k * np.clip(1 + 0.15 * rng.normal(size=(n, 1)), 0.6, 1.4)
        self.k = (v * mag).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
        self.amp = np.float32(np.sqrt(2.0 / n))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        arg = p.astype(np.float32) @ self.k.T
        arg += self.phase
        return self.amp * np.cos(arg).sum(axis=1)


# Empirical factor between the spacing of the zero sheets of a field and pi / k (projection of
# random in-plane directions onto the sheet normal); calibrated so that `period_mm` matches the
# measured 1 / Tb.N of the plates.
_K_FACTOR = 1.9


class TrabecularNetwork:
    def __init__(self, rng: np.random.Generator, spec: RegionStructure, n_waves: int = 16):
        self.spec = spec
        k = _K_FACTOR * np.pi / spec.period_mm
        d = spec.direction
        self.fields = [
            WaveField(rng, d, k, n_waves, along=False),
            WaveField(rng, d, k, n_waves, along=False),
            WaveField(rng, d, k, n_waves, along=False),
            WaveField(rng, d, k, n_waves, along=True),
        ]
        b = float(np.clip(spec.bvtv, 1e-4, 0.95))
        b_rod = spec.rod_fraction * b
        b_plate = b - b_rod
        self.w_plate = float(np.sqrt(2) * erfinv(b_plate)) if b_plate > 0 else 0.0
        if b_rod > 0:
            q = brentq(lambda x: 2 * x * x - x**3 - b_rod, 0.0, 1.0)
            self.w_rod = float(np.sqrt(2) * erfinv(q))
        else:
            self.w_rod = 0.0

    def fields_at(self, p):
        return [f(p) for f in self.fields]


def blended_structure(p: np.ndarray, weights: np.ndarray, networks: list[TrabecularNetwork]):
    """Boolean trabecular bone at points ``p`` with soft region ``weights`` (M, R).

    Fields of neighbouring regions are mixed with their weights (variance-normalized) and the
    band widths interpolated, so the structure is continuous across region borders.
    """
    m = p.shape[0]
    g = np.zeros((4, m), np.float32)
    wsq = np.zeros(m, np.float32)
    w_plate = np.zeros(m, np.float32)
    w_rod = np.zeros(m, np.float32)
    for r, net in enumerate(networks):
        wr = weights[:, r].astype(np.float32)
        sel = wr > 1e-3
        if not sel.any():
            continue
        ps = p[sel]
        for j, f in enumerate(net.fields):
            g[j, sel] += wr[sel] * f(ps)
        wsq[sel] += wr[sel] ** 2
        w_plate[sel] += wr[sel] * net.w_plate
        w_rod[sel] += wr[sel] * net.w_rod
    g /= np.sqrt(np.maximum(wsq, 1e-12))
    plates = np.abs(g[0]) < w_plate
    rods = (np.abs(g[1]) < w_rod) & ((np.abs(g[2]) < w_rod) | (np.abs(g[3]) < w_rod))
    return plates | rods
