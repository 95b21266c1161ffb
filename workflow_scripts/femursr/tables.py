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

A subject without a row for a method is refused by name. An undefined value (NaN, e.g. Tb.Th
of an ROI in which a method finds no bone) is left out: Table 1 summarizes each method over the
subjects where it is defined (``n``, and the others listed in ``undefined``), agreement uses the
subjects where the method and the HR are defined, and the paired tests use the complete cases
(``n``, the others listed in ``excluded``).
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
    """subjects x methods for one region and metric. A subject without a row for a method is an
    error that names it; a row whose value is undefined (NaN: e.g. Tb.Th of an ROI without bone)
    stays NaN, and the callers use the subjects where what they compare is defined."""
    sub = tidy[(tidy.region == region) & (tidy.metric == metric)]
    present = sub.groupby("subject")["method"].agg(set)
    gaps = {s: [m for m in methods if m not in have] for s, have in present.items() if not set(methods) <= have}
    if gaps:
        detail = "; ".join(f"{s}: {', '.join(ms)}" for s, ms in gaps.items())
        raise ValueError(f"{metric} in the {region}: no rows for ({detail}); every method needs a morphometry table for every subject")
    return sub.pivot(index="subject", columns="method", values="value").reindex(columns=list(methods))


def _undefined(wide: pd.DataFrame, method: str) -> str:
    return ",".join(str(s) for s in wide.index[wide[method].isna()])


def table1(tidy: pd.DataFrame, reference: str = "HR") -> pd.DataFrame:
    """Long Table 1: method, region, metric, n, mean, sd, r, ccc, icc, ba_bias, ba_loa_low/high."""
    _check(tidy, reference)
    methods = method_order(tidy["method"])
    rows = []
    for metric in [m for m in METRICS if m in set(tidy.metric)]:
        for region in [r for r in REGIONS if r in set(tidy.region)]:
            wide = _paired(tidy, region, metric, methods)
            for m in methods:
                ok = wide[m].notna()
                v = wide.loc[ok, m].to_numpy()
                row = {"method": m, "region": region, "metric": metric, "n": len(v), "mean": float(v.mean()) if len(v) else float("nan"), "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"), "undefined": _undefined(wide, m)}
                if m != reference:
                    both = ok & wide[reference].notna()
                    a, ref = wide.loc[both, m].to_numpy(), wide.loc[both, reference].to_numpy()
                    if len(a) >= 2:
                        ba = bland_altman(a, ref)
                        row.update(n_paired=len(a), r=pearson(a, ref), ccc=lin_ccc(a, ref), icc=icc_2_1(np.column_stack([a, ref])), ba_bias=ba["bias"], ba_loa_low=ba["loa_low"], ba_loa_high=ba["loa_high"])
                    else:
                        row.update(n_paired=len(a), r=float("nan"), ccc=float("nan"), icc=float("nan"), ba_bias=float("nan"), ba_loa_low=float("nan"), ba_loa_high=float("nan"))
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
            if row["n"] < g["n"].max():  # undefined for some subjects (e.g. no bone in the ROI)
                cell += f" [n = {int(row['n'])}]"
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
            complete = wide.notna().all(axis=1)  # complete cases: the tests are paired
            excluded = ",".join(str(s) for s in wide.index[~complete])
            err = wide.loc[complete, methods].sub(wide.loc[complete, reference], axis=0).abs()
            testable = len(err) >= 2
            f = friedman(err) if testable else None
            pairs = conover_friedman(err, p_adjust) if testable else None
            rank_sums = err.rank(axis=1).sum()
            for m in methods:
                if m == baseline:
                    continue
                p = float(pairs.loc[m, baseline]) if testable else float("nan")
                rows.append({
                    "metric": metric, "region": region, "method": m, "n": len(err), "excluded": excluded,
                    "friedman_chi2": f.statistic if testable else float("nan"), "friedman_p": f.p_value if testable else float("nan"),
                    "conover_p_vs_" + baseline: p, "p_adjust": p_adjust,
                    "mae": float(err[m].mean()) if testable else float("nan"), "mae_" + baseline: float(err[baseline].mean()) if testable else float("nan"),
                    "better": bool(testable and f.p_value < alpha and p < alpha and rank_sums[m] < rank_sums[baseline]),
                })
    return pd.DataFrame(rows)


def better_counts(stats_long: pd.DataFrame) -> pd.DataFrame:
    """Per method: on how many metric x ROI tables it is significantly better than the baseline."""
    g = stats_long.groupby("method", sort=False)["better"]
    out = pd.DataFrame({"better": g.sum().astype(int), "tables": g.size()})
    return out.loc[method_order(out.index)]
