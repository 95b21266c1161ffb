"""Statistics of the study (paper section 3.2) and agreement measures beyond it.

* :func:`friedman` and :func:`conover_friedman`: Friedman's test across methods on paired data
  (subjects are blocks, methods are treatments), then Conover's post-hoc comparison of the rank
  sums (Conover 1999, *Practical Nonparametric Statistics*, 3rd ed., section 5.8), with a p-value
  adjustment (:func:`adjust_p`: Holm by default, as in config ``statistics.p_adjust``);
* agreement with the reference: :func:`pearson`, Lin's concordance correlation coefficient
  (:func:`lin_ccc`), the intraclass correlation ICC(2,1) (:func:`icc_2_1`, Shrout & Fleiss 1979)
  and Bland-Altman limits (:func:`bland_altman`).

Everything here is plain NumPy/SciPy on small tables; nothing reads files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

P_ADJUST = ("holm", "bonferroni", "fdr_bh", "none")


def _blocks(table: pd.DataFrame) -> np.ndarray:
    """The block x treatment matrix as floats; missing values are refused (a paired design)."""
    values = np.asarray(table, dtype=float)
    if values.ndim != 2 or values.shape[0] < 2 or values.shape[1] < 2:
        raise ValueError(f"need at least 2 blocks (rows) and 2 treatments (columns), got shape {values.shape}")
    if not np.isfinite(values).all():
        rows = [str(i) for i, ok in zip(table.index, np.isfinite(values).all(axis=1)) if not ok]
        raise ValueError(f"missing or non-finite values for block(s) {', '.join(rows)}: the paired tests need every method for every subject")
    return values


@dataclass(frozen=True)
class Friedman:
    statistic: float  # Conover's T1: the Friedman chi-square, corrected for ties
    f_statistic: float  # Conover's T2 = (b - 1) T1 / (b (k - 1) - T1), F-distributed
    p_value: float  # from the chi-square distribution with k - 1 degrees of freedom (as SciPy)
    n_blocks: int
    n_treatments: int


def _ranks(values: np.ndarray):
    ranks = stats.rankdata(values, axis=1, method="average")
    b, k = values.shape
    a1 = float((ranks**2).sum())
    c1 = b * k * (k + 1) ** 2 / 4.0
    r = ranks.sum(axis=0)
    t1 = (k - 1) * float(((r - b * (k + 1) / 2.0) ** 2).sum()) / (a1 - c1) if a1 > c1 else 0.0
    return r, a1, c1, t1


def friedman(table: pd.DataFrame) -> Friedman:
    """Friedman's test on a (blocks x treatments) table, e.g. absolute errors (subjects x methods)."""
    values = _blocks(table)
    b, k = values.shape
    _, _, _, t1 = _ranks(values)
    denom = b * (k - 1) - t1
    t2 = (b - 1) * t1 / denom if denom > 0 else float("inf")
    return Friedman(t1, t2, float(stats.chi2.sf(t1, k - 1)), b, k)


def adjust_p(p: np.ndarray, method: str = "holm") -> np.ndarray:
    """Adjusted p-values of a family of tests: holm, bonferroni, fdr_bh (Benjamini-Hochberg), none."""
    p = np.asarray(p, dtype=float)
    if method not in P_ADJUST:
        raise ValueError(f"unknown p-value adjustment {method!r}; use one of {', '.join(P_ADJUST)}")
    m = p.size
    if method == "none" or m == 0:
        return p.copy()
    if method == "bonferroni":
        return np.minimum(p * m, 1.0)
    order = np.argsort(p, kind="stable")
    ps = p[order]
    if method == "holm":
        adj = np.maximum.accumulate((m - np.arange(m)) * ps)
    else:  # fdr_bh
        adj = np.minimum.accumulate((m / np.arange(m, 0, -1) * ps[::-1]))[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def conover_friedman(table: pd.DataFrame, p_adjust: str = "holm") -> pd.DataFrame:
    """Conover's post-hoc test after Friedman: adjusted two-sided p-values, treatments x treatments.

    Treatments i and j differ when ``|R_i - R_j|`` exceeds
    ``t * sqrt(2 b (A1 - C1) / ((b - 1)(k - 1)) * (1 - T1 / (b (k - 1))))`` with ``R`` the rank
    sums, ``A1`` the sum of squared ranks, ``C1 = b k (k + 1)^2 / 4`` and ``t`` Student's t with
    ``(b - 1)(k - 1)`` degrees of freedom. The adjustment runs over the k (k - 1) / 2 pairs.
    """
    values = _blocks(table)
    b, k = values.shape
    r, a1, c1, t1 = _ranks(values)
    df = (b - 1) * (k - 1)
    scale = 2.0 * b * (a1 - c1) / df * (1.0 - t1 / (b * (k - 1)))
    iu = np.triu_indices(k, 1)
    diff = np.abs(r[iu[0]] - r[iu[1]])
    if scale <= 0:  # every block ranks the treatments the same way (or all tied)
        p = np.where(diff > 0, 0.0, 1.0)
    else:
        p = 2.0 * stats.t.sf(diff / np.sqrt(scale), df)
    p = adjust_p(p, p_adjust)
    out = np.ones((k, k))
    out[iu] = p
    out[(iu[1], iu[0])] = p
    return pd.DataFrame(out, index=table.columns, columns=table.columns)


def pearson(x, y) -> float:
    """Pearson's correlation coefficient (NaN when either side is constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.pearsonr(x, y).statistic)


def lin_ccc(x, y) -> float:
    """Lin's concordance correlation coefficient (Lin 1989): ``2 s_xy / (s_x^2 + s_y^2 + (m_x - m_y)^2)``
    with moments over n (not n - 1), as Lin defines it."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    mx, my = x.mean(), y.mean()
    sxy = ((x - mx) * (y - my)).mean()
    denom = x.var() + y.var() + (mx - my) ** 2
    return float(2 * sxy / denom) if denom > 0 else float("nan")


def icc_2_1(ratings) -> float:
    """ICC(2,1) of Shrout & Fleiss (1979): two-way random effects, absolute agreement, single
    rating; ``ratings`` is targets x raters (e.g. subjects x [method, HR])."""
    y = np.asarray(ratings, float)
    n, k = y.shape
    grand = y.mean()
    ss_rows = k * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_err = ((y - grand) ** 2).sum() - ss_rows - ss_cols
    bms = ss_rows / (n - 1)
    jms = ss_cols / (k - 1)
    ems = ss_err / ((n - 1) * (k - 1))
    denom = bms + (k - 1) * ems + k * (jms - ems) / n
    return float((bms - ems) / denom) if denom != 0 else float("nan")


def bland_altman(method, reference) -> dict:
    """Mean difference (method - reference) and the 95 % limits of agreement (mean +- 1.96 SD)."""
    d = np.asarray(method, float) - np.asarray(reference, float)
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if d.size > 1 else float("nan")
    return {"bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}
