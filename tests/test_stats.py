"""Statistics against published worked examples, SciPy, statsmodels and scikit-posthocs."""

import numpy as np
import pandas as pd
import pytest
import scikit_posthocs
from scipy import stats
from statsmodels.stats.multitest import multipletests

from femursr.stats import adjust_p, bland_altman, conover_friedman, friedman, icc_2_1, lin_ccc, pearson

# Conover (1999), Practical Nonparametric Statistics, 3rd ed., example 5.8.1: twelve homeowners
# (blocks) rank four grass varieties (treatments). Rank sums 38, 23.5, 24.5, 34; A1 = 356.5,
# C1 = 300, T1 = 8.097, T2 = 3.19; with t(0.975, 33) = 2.035 the critical rank-sum difference is
# 11.49, so variety 1 differs from 2 and 3 and no other pair differs.
GRASS = pd.DataFrame(
    [
        [4, 3, 2, 1], [4, 2, 3, 1], [3, 1.5, 1.5, 4], [3, 1, 2, 4], [4, 2, 1, 3], [2, 2, 2, 4],
        [1, 3, 2, 4], [2, 4, 1, 3], [3.5, 1, 2, 3.5], [4, 1, 3, 2], [4, 2, 3, 1], [3.5, 1, 2, 3.5],
    ],
    columns=["g1", "g2", "g3", "g4"],
)


def test_friedman_reproduces_conovers_worked_example_and_scipy():
    f = friedman(GRASS)
    assert f.statistic == pytest.approx(8.097, abs=5e-4)
    assert f.f_statistic == pytest.approx(3.19, abs=5e-3)
    ref = stats.friedmanchisquare(*GRASS.to_numpy().T)
    assert f.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert f.p_value == pytest.approx(ref.pvalue, rel=1e-12)


def test_conover_reproduces_the_worked_example_decisions():
    p = conover_friedman(GRASS, p_adjust="none")
    significant = {(a, b) for a in p.index for b in p.columns if a < b and p.loc[a, b] < 0.05}
    assert significant == {("g1", "g2"), ("g1", "g3")}
    # the critical difference of the example, from the p-value's t
    b, k = GRASS.shape
    t_crit = stats.t.ppf(0.975, (b - 1) * (k - 1))
    assert t_crit == pytest.approx(2.035, abs=5e-4)
    assert 2.035 * np.sqrt(2 * 12 * 56.5 / 33 * (1 - 8.097 / 36)) == pytest.approx(11.49, abs=0.01)


@pytest.mark.parametrize("method", ["none", "holm", "bonferroni", "fdr_bh"])
def test_conover_equals_scikit_posthocs(method):
    rng = np.random.default_rng(7)
    table = pd.DataFrame(rng.gamma(2.0, 1.0, size=(10, 9)) + np.linspace(0, 1.5, 9), columns=[f"m{i}" for i in range(9)])
    ours = conover_friedman(table, p_adjust=method)
    theirs = scikit_posthocs.posthoc_conover_friedman(table.to_numpy(), p_adjust=None if method == "none" else method)
    np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["holm", "bonferroni", "fdr_bh"])
def test_p_adjustment_equals_statsmodels(method):
    p = np.random.default_rng(1).uniform(0, 0.2, 17)
    np.testing.assert_allclose(adjust_p(p, method), multipletests(p, method=method)[1], rtol=1e-12)
    with pytest.raises(ValueError, match="unknown p-value adjustment"):
        adjust_p(p, "hochberg-typo")


def test_missing_values_are_refused_naming_the_subject():
    t = GRASS.copy().astype(float)
    t.index = [f"S{i:03d}" for i in range(1, 13)]
    t.loc["S004", "g2"] = np.nan
    with pytest.raises(ValueError, match="S004"):
        friedman(t)


def test_icc_reproduces_shrout_and_fleiss():
    # Shrout & Fleiss (1979), table 2: six targets rated by four judges; ICC(2,1) = 0.29
    y = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    assert icc_2_1(y) == pytest.approx(0.29, abs=0.005)
    assert icc_2_1(np.column_stack([np.arange(5.0), np.arange(5.0)])) == pytest.approx(1.0)


def test_ccc_pearson_and_bland_altman():
    rng = np.random.default_rng(2)
    x = rng.normal(10, 2, 50)
    y = x + rng.normal(0, 0.5, 50)
    assert lin_ccc(x, x) == pytest.approx(1.0)
    # a constant shift keeps Pearson's r at 1 but lowers the CCC by Lin's bias factor
    assert pearson(x, x + 3) == pytest.approx(1.0)
    assert lin_ccc(x, x + 3) == pytest.approx(2 * x.var() / (2 * x.var() + 9))
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)
    # CCC = r * C_b (Lin 1989)
    v = (x.std() / y.std() + y.std() / x.std() + (x.mean() - y.mean()) ** 2 / (x.std() * y.std())) / 2
    assert lin_ccc(x, y) == pytest.approx(pearson(x, y) / v)
    ba = bland_altman(y, x)
    d = y - x
    assert ba["bias"] == pytest.approx(d.mean())
    assert ba["loa_high"] - ba["loa_low"] == pytest.approx(2 * 1.96 * d.std(ddof=1))
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))
