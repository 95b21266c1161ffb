"""Table 1 and the statistics table of the study (paper section 3.2), from tidy morphometry.

Input: one tidy table of ROI morphometry, columns ``subject, method, region, metric, value``,
with ``method`` among LR, the SR variants (``{model}_{dims}``) and HR, ``region`` among head,
neck, trochanter and ``metric`` among bv_tv, tb_th_mm, tb_sp_mm, tb_n_per_mm.

* :func:`table1` - per method, region and metric: n, mean, SD, and agreement with the HR over the
  same subjects (Pearson r as in the paper; Lin's CCC, ICC(2,1) and Bland-Altman bias and limits
  beyond it). Tidy, long form.
* :func:`table1_layout` - the paper's layout: rows metric x ROI, methods as columns, cells
  ``mean ± SD (r = ...)``; written as Markdown and LaTeX by :func:`to_markdown`, :func:`to_latex`.
* :func:`statistics_table` - per metric and ROI: Friedman's test on the absolute errors against
  the HR across the non-reference methods, Conover's adjusted p of each method against the LR,
  and whether it is significantly better; :func:`better_counts` sums that over the 12 tables.

Subjects missing a method are refused by name: the tests are paired.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .stats import bland_altman, conover_friedman, friedman, icc_2_1, lin_ccc, pearson

METRICS = {"bv_tv": "BV/TV", "tb_th_mm": "Tb.Th (mm)", "tb_sp_mm": "Tb.Sp (mm)", "tb_n_per_mm": "Tb.N (1/mm)"}
REGIONS = ("head", "neck", "trochanter")
MODEL_LABELS = {"srgan": "SRGAN", "realesrgan": "Real-ESRGAN+", "ldm": "LDM", "resshift": "ResShift"}
DIMS_LABELS = {"2d": "2D", "25d": "2.5D"}
COLUMNS = ["subject", "method", "region", "metric", "value"]


def method_label(method: str) -> str:
    """Display name: ``srgan_25d`` -> ``SRGAN 2.5D``; LR and HR unchanged."""
    model, _, dims = method.rpartition("_")
    if model in MODEL_LABELS and dims in DIMS_LABELS:
        return f"{MODEL_LABELS[model]} {DIMS_LABELS[dims]}"
    return method


def method_order(methods) -> list[str]:
    """LR first, HR last, SR variants in the paper's order between."""
    rank = {m: i for i, m in enumerate(MODEL_LABELS)}

    def key(m):
        if m == "LR":
            return (0, 0, 0)
        if m == "HR":
            return (2, 0, 0)
        model, _, dims = m.rpartition("_")
        return (1, rank.get(model, len(rank)), list(DIMS_LABELS).index(dims) if dims in DIMS_LABELS else 9, m)

    return sorted(set(methods), key=key)


def _check(tidy: pd.DataFrame, reference: str) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in tidy.columns]
    if missing:
        raise ValueError(f"morphometry table lacks column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    if reference not in set(tidy["method"]):
        raise ValueError(f"no {reference} rows in the morphometry table: the agreement statistics need the reference")
    dup = tidy.duplicated(["subject", "method", "region", "metric"])
    if dup.any():
        first = tidy[dup].iloc[0]
        raise ValueError(f"duplicate rows, e.g. subject {first.subject}, {first.method}, {first.region}, {first.metric}")
    return tidy


def _paired(tidy: pd.DataFrame, region: str, metric: str, methods) -> pd.DataFrame:
    """subjects x methods for one region and metric; subjects lacking a method are named."""
    sub = tidy[(tidy.region == region) & (tidy.metric == metric)]
    wide = sub.pivot(index="subject", columns="method", values="value").reindex(columns=list(methods))
    bad = wide.index[wide.isna().any(axis=1)]
    if len(bad):
        gaps = {s: [m for m in methods if pd.isna(wide.loc[s, m])] for s in bad}
        detail = "; ".join(f"{s}: {', '.join(ms)}" for s, ms in gaps.items())
        raise ValueError(f"{metric} in the {region}: missing or undefined values ({detail}); the paired statistics need every method for every subject")
    return wide


def table1(tidy: pd.DataFrame, reference: str = "HR") -> pd.DataFrame:
    """Long Table 1: method, region, metric, n, mean, sd, r, ccc, icc, ba_bias, ba_loa_low/high."""
    _check(tidy, reference)
    methods = method_order(tidy["method"])
    rows = []
    for metric in [m for m in METRICS if m in set(tidy.metric)]:
        for region in [r for r in REGIONS if r in set(tidy.region)]:
            wide = _paired(tidy, region, metric, methods)
            ref = wide[reference].to_numpy()
            for m in methods:
                v = wide[m].to_numpy()
                row = {"method": m, "region": region, "metric": metric, "n": len(v), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan")}
                if m != reference:
                    ba = bland_altman(v, ref)
                    row.update(r=pearson(v, ref), ccc=lin_ccc(v, ref), icc=icc_2_1(np.column_stack([v, ref])), ba_bias=ba["bias"], ba_loa_low=ba["loa_low"], ba_loa_high=ba["loa_high"])
                rows.append(row)
    return pd.DataFrame(rows)


def _fmt(x: float) -> str:
    if not np.isfinite(x):
        return "n/a"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def table1_layout(long: pd.DataFrame) -> pd.DataFrame:
    """The paper's layout: index (metric, ROI), one column per method, ``mean ± SD (r = ...)``."""
    methods = method_order(long["method"])
    out = {}
    for (metric, region), g in long.groupby(["metric", "region"], sort=False):
        g = g.set_index("method")
        cells = {}
        for m in methods:
            row = g.loc[m]
            cell = f"{_fmt(row['mean'])} ± {_fmt(row['sd'])}"
            if m != "HR" and "r" in row and pd.notna(row.get("r")):
                cell += f" (r = {row['r']:.2f})"
            cells[method_label(m)] = cell
        out[(METRICS[metric], region)] = cells
    table = pd.DataFrame.from_dict(out, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["metric", "ROI"])
    return table


def to_markdown(layout: pd.DataFrame) -> str:
    cols = list(layout.columns)
    lines = ["| metric | ROI | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for (metric, roi), row in layout.iterrows():
        lines.append(f"| {metric} | {roi} | " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_latex(layout: pd.DataFrame) -> str:
    cols = list(layout.columns)
    esc = lambda s: str(s).replace("±", r"$\pm$").replace("_", r"\_")  # noqa: E731
    lines = [r"\begin{tabular}{ll" + "l" * len(cols) + "}", r"\hline", "metric & ROI & " + " & ".join(esc(c) for c in cols) + r" \\", r"\hline"]
    for (metric, roi), row in layout.iterrows():
        lines.append(f"{esc(metric)} & {roi} & " + " & ".join(esc(row[c]) for c in cols) + r" \\")
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def statistics_table(tidy: pd.DataFrame, reference: str = "HR", baseline: str = "LR", alpha: float = 0.05, p_adjust: str = "holm") -> pd.DataFrame:
    """Per metric, ROI and method (not the reference, not the baseline): Friedman's statistic and
    p across all non-reference methods on |method - reference|, Conover's adjusted p against the
    baseline, the mean absolute errors, and ``better`` (significantly smaller errors than the
    baseline at ``alpha``)."""
    _check(tidy, reference)
    methods = [m for m in method_order(tidy["method"]) if m != reference]
    if baseline not in methods:
        raise ValueError(f"no {baseline} rows in the morphometry table: the comparison needs the baseline")
    rows = []
    for metric in [m for m in METRICS if m in set(tidy.metric)]:
        for region in [r for r in REGIONS if r in set(tidy.region)]:
            wide = _paired(tidy, region, metric, methods + [reference])
            err = wide[methods].sub(wide[reference], axis=0).abs()
            f = friedman(err)
            pairs = conover_friedman(err, p_adjust)
            rank_sums = err.rank(axis=1).sum()
            for m in methods:
                if m == baseline:
                    continue
                p = float(pairs.loc[m, baseline])
                rows.append({
                    "metric": metric, "region": region, "method": m, "n": len(err),
                    "friedman_chi2": f.statistic, "friedman_p": f.p_value,
                    "conover_p_vs_" + baseline: p, "p_adjust": p_adjust,
                    "mae": float(err[m].mean()), "mae_" + baseline: float(err[baseline].mean()),
                    "better": bool(f.p_value < alpha and p < alpha and rank_sums[m] < rank_sums[baseline]),
                })
    return pd.DataFrame(rows)


def better_counts(stats_long: pd.DataFrame) -> pd.DataFrame:
    """Per method: on how many metric x ROI tables it is significantly better than the baseline."""
    g = stats_long.groupby("method", sort=False)["better"]
    out = pd.DataFrame({"better": g.sum().astype(int), "tables": g.size()})
    return out.loc[method_order(out.index)]
