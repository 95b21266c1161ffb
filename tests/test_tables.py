"""Table 1 and the statistics table from tidy morphometry."""

import numpy as np
import pandas as pd
import pytest

from femursr.tables import better_counts, method_label, method_order, statistics_table, table1, table1_layout, to_latex, to_markdown


def tidy_study(n=20, seed=0, good_tables=8):
    """HR truth; LR far off; 'srgan_2d' close to the HR on the first `good_tables` of the 12
    metric x ROI tables and exactly as far off as the LR on the others; 'ldm_25d' always worse."""
    rng = np.random.default_rng(seed)
    rows = []
    k = 0
    for metric in ("bv_tv", "tb_th_mm", "tb_sp_mm", "tb_n_per_mm"):
        for region in ("head", "neck", "trochanter"):
            hr = rng.uniform(0.2, 0.6, n)
            lr = hr + rng.uniform(0.3, 0.6, n)
            sr = hr + rng.normal(0, 0.01, n) if k < good_tables else lr.copy()
            worse = lr + 0.5
            for s in range(n):
                for method, v in (("HR", hr), ("LR", lr), ("srgan_2d", sr), ("ldm_25d", worse)):
                    rows.append((f"S{s:03d}", method, region, metric, float(v[s])))
            k += 1
    return pd.DataFrame(rows, columns=["subject", "method", "region", "metric", "value"])


def test_method_order_and_labels():
    assert method_order(["HR", "resshift_25d", "srgan_2d", "LR", "srgan_25d"]) == ["LR", "srgan_2d", "srgan_25d", "resshift_25d", "HR"]
    assert method_label("realesrgan_25d") == "Real-ESRGAN+ 2.5D"
    assert method_label("LR") == "LR"


def test_table1_means_sds_and_correlations():
    tidy = tidy_study()
    long = table1(tidy)
    assert len(long) == 12 * 4
    row = long[(long.method == "srgan_2d") & (long.metric == "bv_tv") & (long.region == "head")].iloc[0]
    v = tidy[(tidy.method == "srgan_2d") & (tidy.metric == "bv_tv") & (tidy.region == "head")].value
    assert row["mean"] == pytest.approx(v.mean()) and row["sd"] == pytest.approx(v.std(ddof=1))
    assert row["r"] > 0.95 and row["ccc"] > 0.95
    hr = long[long.method == "HR"]
    assert hr["r"].isna().all()  # no agreement of the reference with itself
    layout = table1_layout(long)
    assert list(layout.columns) == ["LR", "SRGAN 2D", "LDM 2.5D", "HR"]
    assert layout.shape == (12, 4)
    md, tex = to_markdown(layout), to_latex(layout)
    assert "| BV/TV | head |" in md and "(r = " in md
    assert r"\pm" in tex and tex.strip().endswith(r"\end{tabular}")


def test_statistics_count_eight_of_twelve_on_a_constructed_case():
    st = statistics_table(tidy_study(good_tables=8), alpha=0.05, p_adjust="holm")
    counts = better_counts(st)
    assert counts.loc["srgan_2d", "better"] == 8
    assert counts.loc["ldm_25d", "better"] == 0
    assert (counts["tables"] == 12).all()


def test_undefined_values_are_left_out_and_listed():
    tidy = tidy_study()
    sel = (tidy.metric == "tb_th_mm") & (tidy.region == "trochanter") & (tidy.method == "LR") & tidy.subject.isin(["S001", "S002"])
    tidy.loc[sel, "value"] = np.nan  # e.g. no bone in the LR's trochanter ROI
    long = table1(tidy)
    row = long[(long.method == "LR") & (long.metric == "tb_th_mm") & (long.region == "trochanter")].iloc[0]
    assert row["n"] == 18 and row["undefined"] == "S001,S002" and row["n_paired"] == 18
    st = statistics_table(tidy)
    srow = st[(st.metric == "tb_th_mm") & (st.region == "trochanter")].iloc[0]
    assert srow["n"] == 18 and srow["excluded"] == "S001,S002"


def test_missing_method_for_a_subject_is_named():
    tidy = tidy_study()
    tidy = tidy[~((tidy.subject == "S003") & (tidy.method == "srgan_2d") & (tidy.metric == "tb_th_mm"))]
    with pytest.raises(ValueError, match="S003: srgan_2d"):
        table1(tidy)
    with pytest.raises(ValueError, match="no HR rows"):
        table1(tidy[tidy.method != "HR"])
