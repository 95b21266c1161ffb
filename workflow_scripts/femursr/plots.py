"""Figures of the study's results (paper section 3.2): Figure 1, the agreement plots and the
map of where a sampled (diffusion) model is unsure.

* :func:`femoral_head_view` chooses Figure 1's axial slice and inset centre from the femur mask
  alone, so the choice is reproducible and needs no reader: the femoral head centre is the
  deepest point of the femur (largest inscribed ball) among the points whose ball reaches up to
  near the femur's top. The slice is the axial plane (array axis 0) through it, and the inset is
  centred on it: trabecular bone of the head, inside the femur.
* :func:`figure1` draws LR, each SR variant and HR side by side, the slice cropped to the femur
  and below it the enlarged inset (``inset_mm`` square), one grey window for every panel (taken
  from the HR, :func:`grey_window`), scale bars in mm and the paper's method labels.
* :func:`sample_sd_figure` draws, for each method whose inference drew several samples, the
  mean of the samples beside their voxel-wise SD on the same slice, with the SD colour bar.
* :func:`agreement` pairs each method with the HR per metric and ROI (the subjects where both are
  defined, as Table 1 does) and gives Pearson r, Lin's CCC and the Bland-Altman bias and limits
  of agreement (:mod:`femursr.stats`); :func:`scatter_figure` and :func:`bland_altman_figure`
  draw them, 4 metrics x 3 ROIs.

Slices are read through nibabel's array proxy (:func:`axial_slice`): one slice of a compressed
paper-scale SR volume is decompressed on the way, never the whole volume. Images are shown in
the radiological convention of the LPS grid (anterior up, the patient's right on the left) with
axes in mm. Writers (``write_*``) save PNGs atomically.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar  # noqa: E402

from .atomic import atomic_file  # noqa: E402
from .stats import bland_altman, lin_ccc, pearson  # noqa: E402
from .tables import METRICS, REGIONS, method_label, method_order  # noqa: E402
from .volume import Volume, read_grid, read_volume  # noqa: E402

METHOD_COLOURS = {"LR": "#7f7f7f"}
_SR_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
INSET_COLOUR = "#ffd700"
DPI = 110


# ----------------------------------------------------------------------------- volumes
def check_same_grid(path, grid: Volume, reference: str) -> None:
    """Refuse a volume whose grid differs from ``grid`` (that of ``reference``), naming both."""
    g = read_grid(path)
    if not g.same_grid(grid):
        raise ValueError(f"{path}: grid {g.shape} (z, y, x) at spacing {np.round(g.spacing, 4).tolist()} mm, origin "
                         f"{np.round(g.origin, 3).tolist()} differs from that of {reference} ({grid.shape}, "
                         f"{np.round(grid.spacing, 4).tolist()} mm, {np.round(grid.origin, 3).tolist()}); the figures "
                         "compare volumes on the HR grid: rerun the stage that wrote it")  # fmt: skip


def axial_slice(path, z: int) -> np.ndarray:
    """Axial slice ``z`` (array axis 0) of a NIfTI volume as float32 (y, x), the same as
    ``read_volume(path).array[z]``, reading only that slice (nibabel's proxy; a ``.nii.gz`` is
    decompressed up to the slice, in a stream)."""
    import nibabel as nib

    img = nib.load(str(path))
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {img.shape}")
    if not 0 <= z < img.shape[2]:
        raise IndexError(f"{path}: axial slice {z} outside the volume's {img.shape[2]} slices")
    return np.asarray(img.dataobj[:, :, int(z)], dtype=np.float32).T


# ----------------------------------------------------------------------------- the view
@dataclass(frozen=True)
class HeadView:
    """Figure 1's axial slice and inset centre (array indices) and what they came from."""

    z: int  # axial slice (array axis 0)
    y: int  # inset centre in the slice (array axes 1 and 2)
    x: int
    centre_mm: tuple  # LPS position of the inset centre
    head_radius_mm: float  # radius of the largest ball inside the femur there


def femoral_head_view(mask: Volume, step_mm: float = 0.5, reach: float = 1.25) -> HeadView:
    """The femoral head centre of a femur mask (z, y, x; nonzero inside) and the axial slice
    through it.

    On a grid subsampled to about ``step_mm``, the Euclidean distance (mm) of every femur voxel to
    the outside is the radius of the largest ball centred there inside the femur. Among the voxels
    whose ball comes within ``(reach - 1)`` radii of the femur's top (the most superior femur
    point, LPS +z), the head centre is the one with the largest ball: the shaft, neck and
    trochanter are either thinner or too far below the top. Ties go to the first voxel in C order,
    so the choice is deterministic. Raises ValueError on an empty mask.
    """
    import edt

    spacing = np.asarray(mask.spacing, float)  # x, y, z
    step = np.maximum(1, np.round(step_mm / spacing)).astype(int)
    sub = np.asarray(mask.array[:: step[2], :: step[1], :: step[0]]) != 0
    if not sub.any():
        raise ValueError("the femur mask is empty: no femoral head to show")
    depth = edt.edt(sub, anisotropy=tuple(float(v) for v in (spacing * step)[::-1]), black_border=True)
    zz, yy, xx = np.nonzero(sub)
    ijk = np.stack([xx * step[0], yy * step[1], zz * step[2]], axis=1)
    superior = mask.index_to_physical(ijk)[:, 2]
    d = depth[zz, yy, xx]
    near_top = (superior.max() - superior) <= reach * d
    best = int(np.argmax(np.where(near_top, d, -1.0)))
    z, y, x = (int(v) for v in (ijk[best, 2], ijk[best, 1], ijk[best, 0]))
    return HeadView(z, y, x, tuple(float(v) for v in mask.index_to_physical([x, y, z])), float(d[best]))


def inset_box(view: HeadView, shape_yx, spacing_yx, inset_mm: float) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the ``inset_mm`` square centred on the view's centre, moved inside the
    slice where it would cross an edge (its size kept, unless the slice is smaller)."""
    box = []
    for c, n, sp in ((view.y, shape_yx[0], spacing_yx[0]), (view.x, shape_yx[1], spacing_yx[1])):
        size = min(int(n), max(2, int(round(inset_mm / sp))))
        lo = int(np.clip(c - size // 2, 0, n - size))
        box += [lo, lo + size]
    return tuple(box)


def femur_crop(mask_slice: np.ndarray, box, spacing_yx, margin_mm: float = 2.0) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) holding the femur of the slice and the inset ``box``, plus ``margin_mm``."""
    ys, xs = np.nonzero(mask_slice)
    y0, y1 = ys.min(initial=box[0]), max(ys.max(initial=0) + 1, box[1])
    x0, x1 = xs.min(initial=box[2]), max(xs.max(initial=0) + 1, box[3])
    my, mx = (int(np.ceil(margin_mm / s)) for s in spacing_yx)
    n_y, n_x = mask_slice.shape
    return max(0, y0 - my), min(n_y, y1 + my), max(0, x0 - mx), min(n_x, x1 + mx)


def grey_window(hr_slice: np.ndarray, mask_slice: np.ndarray, percentiles=(0.5, 99.5)) -> tuple[float, float]:
    """The grey window of every panel: percentiles of the HR inside the femur on the slice."""
    inside = hr_slice[mask_slice != 0]
    if inside.size == 0:
        inside = hr_slice.ravel()
    lo, hi = (float(v) for v in np.percentile(inside, percentiles))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def nice_length(width_mm: float, fraction: float = 0.3) -> float:
    """A round scale-bar length (1, 2 or 5 x 10^k mm) at most ``fraction`` of ``width_mm``."""
    target = width_mm * fraction
    k = np.floor(np.log10(target))
    for m in (5, 2, 1):
        if m * 10**k <= target:
            return float(m * 10**k)
    return float(10**k)


def _scale_bar(ax, width_mm: float) -> float:
    length = nice_length(width_mm)
    bar = AnchoredSizeBar(ax.transData, length, f"{length:g} mm", loc="lower right", color="white", frameon=True,
                          size_vertical=width_mm / 120, pad=0.25, borderpad=0.3, sep=2, fontproperties={"size": 8})  # fmt: skip
    bar.patch.set_facecolor("black")  # readable on bright bone too
    bar.patch.set_alpha(0.55)
    bar.patch.set_edgecolor("none")
    bar.set_gid("scale_bar")
    ax.add_artist(bar)
    return length


def _suptitle(fig, title: str, fontsize: float = 11) -> None:
    """A figure title wrapped to the figure's width (about 10 characters per inch at 11 pt)."""
    import textwrap

    width = max(30, int(fig.get_figwidth() * 10 * 11 / fontsize))
    fig.suptitle(textwrap.fill(title, width), fontsize=fontsize)


def _show(ax, image, box, spacing_yx, **kw):
    """``image[y0:y1, x0:x1]`` with axes in mm from the box's corner (anterior up)."""
    y0, y1, x0, x1 = box
    h, w = (y1 - y0) * spacing_yx[0], (x1 - x0) * spacing_yx[1]
    im = ax.imshow(image[y0:y1, x0:x1], extent=(0, w, h, 0), interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    return im, w


# ----------------------------------------------------------------------------- Figure 1
def figure1(slices: dict, mask_slice: np.ndarray, view: HeadView, spacing_yx, inset_mm: float, title: str = ""):
    """Figure 1: ``slices`` (method -> (y, x) slice, in display order) cropped to the femur, the
    inset square drawn on each, and the enlarged insets below; one grey window from the HR (the
    last method when there is no HR). Returns the matplotlib figure and the window."""
    methods = list(slices)
    ref = "HR" if "HR" in slices else methods[-1]
    window = grey_window(slices[ref], mask_slice)
    box = inset_box(view, mask_slice.shape, spacing_yx, inset_mm)
    crop = femur_crop(mask_slice, box, spacing_yx)
    ch, cw = (crop[1] - crop[0]) * spacing_yx[0], (crop[3] - crop[2]) * spacing_yx[1]
    col_w = 2.3
    fig, axes = plt.subplots(2, len(methods), figsize=(col_w * len(methods), col_w * (ch / cw) + col_w + 0.9),
                             gridspec_kw={"height_ratios": [ch / cw, 1.0]}, squeeze=False, layout="constrained")  # fmt: skip
    for j, m in enumerate(methods):
        top, bottom = axes[0, j], axes[1, j]
        _, w = _show(top, slices[m], crop, spacing_yx, cmap="gray", vmin=window[0], vmax=window[1])
        top.set_title(method_label(m), fontsize=11)
        iy, ix = (box[0] - crop[0]) * spacing_yx[0], (box[2] - crop[2]) * spacing_yx[1]
        ih, iw = (box[1] - box[0]) * spacing_yx[0], (box[3] - box[2]) * spacing_yx[1]
        top.add_patch(Rectangle((ix, iy), iw, ih, fill=False, edgecolor=INSET_COLOUR, linewidth=1.0, gid="inset"))
        _scale_bar(top, w)
        _, w = _show(bottom, slices[m], box, spacing_yx, cmap="gray", vmin=window[0], vmax=window[1])
        for side in bottom.spines.values():
            side.set_edgecolor(INSET_COLOUR)
        _scale_bar(bottom, w)
    axes[0, 0].set_ylabel("axial slice", fontsize=10)
    axes[1, 0].set_ylabel(f"{inset_mm:g} mm inset", fontsize=10)
    if title:
        _suptitle(fig, title)
    return fig, window


def _read_view(mask_path, volumes: dict):
    """The femur mask's head view, its slice and the same slice of every volume (grids checked)."""
    mask = read_volume(mask_path)
    for m, p in volumes.items():
        check_same_grid(p, mask, f"the femur mask {mask_path}")
    view = femoral_head_view(mask)
    mask_slice = np.asarray(mask.array[view.z]) != 0
    spacing_yx = (mask.spacing[1], mask.spacing[0])
    return view, mask_slice, spacing_yx


def write_figure1(mask_path, volumes: dict, out_png, inset_mm: float = 30.0, subject: str = "") -> dict:
    """Figure 1 of ``volumes`` (method -> NIfTI path on the grid of the femur mask ``mask_path``)
    written to ``out_png``; methods are put in the paper's order (LR, SR variants, HR). Returns
    what was shown: slice, inset centre (index and LPS mm), window, inset box, methods."""
    methods = method_order(volumes)
    view, mask_slice, spacing_yx = _read_view(mask_path, volumes)
    slices = {m: axial_slice(volumes[m], view.z) for m in methods}
    title = f"{subject}: axial slice {view.z} through the femoral head centre (z = {view.centre_mm[2]:.1f} mm); {inset_mm:g} mm inset"
    fig, window = figure1(slices, mask_slice, view, spacing_yx, inset_mm, title=title.lstrip(": "))
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    return {"subject": subject, "slice": view.z, "centre_index_zyx": [view.z, view.y, view.x], "centre_mm": list(view.centre_mm),
            "head_radius_mm": view.head_radius_mm, "window": list(window), "inset_mm": inset_mm,
            "inset_box_yx": list(inset_box(view, mask_slice.shape, spacing_yx, inset_mm)), "methods": methods}  # fmt: skip


# ----------------------------------------------------------------------------- sampled models
def sample_sd_figure(means: dict, sds: dict, mask_slice: np.ndarray, view: HeadView, spacing_yx, window, inset_mm: float, title: str = ""):
    """Per method (rows): the mean of the samples and their voxel-wise SD on the Figure-1 slice,
    whole (cropped to the femur) and in the inset. The mean uses ``window``; the SD one colour
    scale for every method (0 to its 99.5th percentile in the femur), with its colour bar.
    Returns the figure and the SD range."""
    methods = list(means)
    box = inset_box(view, mask_slice.shape, spacing_yx, inset_mm)
    crop = femur_crop(mask_slice, box, spacing_yx)
    inside = np.concatenate([sds[m][mask_slice] for m in methods]) if mask_slice.any() else np.concatenate([sds[m].ravel() for m in methods])
    sd_max = float(np.nanpercentile(inside, 99.5)) if inside.size else 1.0
    sd_max = sd_max if np.isfinite(sd_max) and sd_max > 0 else 1.0
    ch, cw = (crop[1] - crop[0]) * spacing_yx[0], (crop[3] - crop[2]) * spacing_yx[1]
    ratio = ch / cw
    fig, axes = plt.subplots(len(methods), 4, figsize=(10.5, 2.6 * max(ratio, 1.0) * len(methods) + 0.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1 / ratio, 1 / ratio, 1, 1]} if ratio > 0 else None, layout="constrained")  # fmt: skip
    sd_image = None
    for i, m in enumerate(methods):
        row = axes[i]
        for k, (part, img) in enumerate(((crop, means[m]), (crop, sds[m]), (box, means[m]), (box, sds[m]))):
            kw = dict(cmap="gray", vmin=window[0], vmax=window[1]) if k % 2 == 0 else dict(cmap="magma", vmin=0.0, vmax=sd_max)
            im, w = _show(row[k], img, part, spacing_yx, **kw)
            if k % 2:
                sd_image = im
            if part is crop:
                iy, ix = (box[0] - crop[0]) * spacing_yx[0], (box[2] - crop[2]) * spacing_yx[1]
                ih, iw = (box[1] - box[0]) * spacing_yx[0], (box[3] - box[2]) * spacing_yx[1]
                row[k].add_patch(Rectangle((ix, iy), iw, ih, fill=False, edgecolor=INSET_COLOUR, linewidth=1.0))
            _scale_bar(row[k], w)
        row[0].set_ylabel(method_label(m), fontsize=11)
        if i == 0:
            for ax, t in zip(row, ("mean of the samples", "SD across samples", f"mean, {inset_mm:g} mm inset", "SD, inset")):
                ax.set_title(t, fontsize=10)
    bar = fig.colorbar(sd_image, ax=axes[:, -1].tolist(), shrink=0.9, location="right")
    bar.set_label("SD across samples (normalized intensity)")
    if title:
        _suptitle(fig, title)
    return fig, (0.0, sd_max)


def write_sample_sd_figure(mask_path, hr_path, sampled: dict, out_png, inset_mm: float = 30.0, subject: str = "") -> dict:
    """The SD figure of ``sampled`` (method -> (mean path, SD path)) on Figure 1's slice, with
    Figure 1's grey window (from the HR ``hr_path``). Returns the slice, window and SD range."""
    methods = method_order(sampled)
    paths = {"HR": hr_path, **{f"{m} mean": sampled[m][0] for m in methods}, **{f"{m} SD": sampled[m][1] for m in methods}}
    view, mask_slice, spacing_yx = _read_view(mask_path, paths)
    window = grey_window(axial_slice(hr_path, view.z), mask_slice)
    means = {m: axial_slice(sampled[m][0], view.z) for m in methods}
    sds = {m: axial_slice(sampled[m][1], view.z) for m in methods}
    title = f"{subject}: where the sampled models are unsure (axial slice {view.z}, as in Figure 1)".lstrip(": ")
    fig, sd_range = sample_sd_figure(means, sds, mask_slice, view, spacing_yx, window, inset_mm, title=title)
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    return {"subject": subject, "slice": view.z, "window": list(window), "sd_range": list(sd_range), "methods": methods}


# ----------------------------------------------------------------------------- agreement
def agreement(tidy: pd.DataFrame, method: str, reference: str = "HR") -> pd.DataFrame:
    """Per metric and ROI (rows in Table 1's order): the subjects where ``method`` and the
    ``reference`` are both defined, their values (``values``, ``reference`` as arrays), n, Pearson
    r, Lin's CCC and the Bland-Altman bias, SD and 95 % limits (method - reference)."""
    for name in (method, reference):
        if name not in set(tidy["method"]):
            raise ValueError(f"no {name} rows in the morphometry table (methods there: {', '.join(method_order(tidy['method']))})")
    rows = []
    for metric in [m for m in METRICS if m in set(tidy.metric)]:
        for region in [r for r in REGIONS if r in set(tidy.region)]:
            sub = tidy[(tidy.metric == metric) & (tidy.region == region) & tidy.method.isin([method, reference])]
            wide = sub.pivot(index="subject", columns="method", values="value").reindex(columns=[method, reference]).dropna()
            a, ref = wide[method].to_numpy(float), wide[reference].to_numpy(float)
            row = {"metric": metric, "region": region, "n": len(a), "subjects": list(wide.index), "values": a, "reference": ref}
            if len(a) >= 2:
                ba = bland_altman(a, ref)
                row.update(r=pearson(a, ref), ccc=lin_ccc(a, ref), bias=ba["bias"], sd=ba["sd"], loa_low=ba["loa_low"], loa_high=ba["loa_high"])
            else:
                row.update({k: float("nan") for k in ("r", "ccc", "bias", "sd", "loa_low", "loa_high")})
            rows.append(row)
    return pd.DataFrame(rows)


def method_colour(method: str) -> str:
    """LR grey; the SR variants in the paper's order take the tab10 colours."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    from .tables import DIMS_LABELS, MODEL_LABELS

    model, _, dims = method.rpartition("_")
    models, dims_list = list(MODEL_LABELS), list(DIMS_LABELS)
    if model in models and dims in dims_list:
        return _SR_COLOURS[(models.index(model) * len(dims_list) + dims_list.index(dims)) % len(_SR_COLOURS)]
    return _SR_COLOURS[-1]


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.2f}"


def _value_fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.3g}"


def _free_corner(ax, x, y) -> tuple[float, float, str, str]:
    """Text position (axes fraction) in the upper-left or lower-right corner, whichever holds
    fewer of the points (x, y) in data units; the axes limits must be set."""
    if not len(x):
        return 0.04, 0.96, "left", "top"
    fx, fy = ax.transAxes.inverted().transform(ax.transData.transform(np.column_stack([x, y]))).T
    upper_left = int(np.sum((fx < 0.45) & (fy > 0.65)))
    lower_right = int(np.sum((fx > 0.55) & (fy < 0.35)))
    return (0.96, 0.04, "right", "bottom") if lower_right < upper_left else (0.04, 0.96, "left", "top")


def _tidy_axes(ax, x) -> None:
    """Few plain tick labels (no offset notation), and an x range of at least 10 % of the values'
    size, so that nearly equal values do not crowd the ticks."""
    from matplotlib.ticker import MaxNLocator

    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size:
        lo, hi = ax.get_xlim()
        half = max((hi - lo) / 2, 0.05 * float(np.abs(x).max()), 1e-6)
        mid = (lo + hi) / 2
        ax.set_xlim(mid - half, mid + half)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(4))
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=8)


def _grid(agree: pd.DataFrame, suptitle: str):
    metrics = list(dict.fromkeys(agree.metric))
    regions = list(dict.fromkeys(agree.region))
    fig, axes = plt.subplots(len(metrics), len(regions), figsize=(3.4 * len(regions), 2.9 * len(metrics)), squeeze=False, layout="constrained")
    fig.suptitle(suptitle, fontsize=12)
    panels = {}
    for i, metric in enumerate(metrics):
        for j, region in enumerate(regions):
            panels[(metric, region)] = axes[i, j]
            if i == 0:
                axes[i, j].set_title(region, fontsize=11)
    return fig, axes, panels


def scatter_figure(agree: pd.DataFrame, method: str, reference: str = "HR"):
    """``method`` against the ``reference`` per metric (rows) and ROI (columns): one point per
    subject, the identity line, and r, CCC and n in each panel."""
    label, colour = method_label(method), method_colour(method)
    fig, _, panels = _grid(agree, f"{label} against {reference}: one point per test subject, dashed line y = x")
    for _, row in agree.iterrows():
        ax = panels[(row.metric, row.region)]
        x, y = row.reference, row["values"]
        if len(x):
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            pad = 0.06 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
            lo, hi = lo - pad, hi + pad
            ax.plot([lo, hi], [lo, hi], "--", color="0.4", linewidth=0.9, gid="identity")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
        ax.scatter(x, y, s=22, color=colour, edgecolor="black", linewidth=0.4, zorder=3, gid="points")
        tx, ty, ha, va = _free_corner(ax, x, y)
        ax.text(tx, ty, f"r = {_fmt(row.r)}\nCCC = {_fmt(row.ccc)}\nn = {row.n}", transform=ax.transAxes, va=va, ha=ha,
                fontsize=8.5, gid="agreement", bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor="0.8", alpha=0.85))  # fmt: skip
        name = METRICS[row.metric]
        ax.set_xlabel(f"{reference} {name}", fontsize=9)
        ax.set_ylabel(f"{label} {name}", fontsize=9)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        ax.ticklabel_format(useOffset=False, style="plain")
        ax.tick_params(labelsize=8)
    return fig


def bland_altman_figure(agree: pd.DataFrame, method: str, reference: str = "HR"):
    """Bland-Altman plots of ``method`` against the ``reference`` per metric (rows) and ROI
    (columns): difference (method - reference) against the mean of the two, the bias (solid) and
    the 95 % limits of agreement (dashed), with their values."""
    label, colour = method_label(method), method_colour(method)
    fig, _, panels = _grid(agree, f"Bland-Altman: {label} - {reference}; bias (solid) and 95 % limits of agreement (dashed)")
    for _, row in agree.iterrows():
        ax = panels[(row.metric, row.region)]
        a, ref = row["values"], row.reference
        ax.scatter((a + ref) / 2, a - ref, s=22, color=colour, edgecolor="black", linewidth=0.4, zorder=3, gid="points")
        ax.axhline(0.0, color="0.75", linewidth=0.8, gid="zero")
        if np.isfinite(row.bias):
            ax.axhline(row.bias, color="black", linewidth=1.1, gid="bias")
        if np.isfinite(row.loa_low):
            ax.axhline(row.loa_low, color="black", linestyle="--", linewidth=0.9, gid="loa_low")
            ax.axhline(row.loa_high, color="black", linestyle="--", linewidth=0.9, gid="loa_high")
        text = f"bias = {_value_fmt(row.bias)}\nLoA = [{_value_fmt(row.loa_low)}, {_value_fmt(row.loa_high)}]\nn = {row.n}"
        ax.text(0.04, 0.96, text, transform=ax.transAxes, va="top", ha="left", fontsize=8.5, gid="agreement",
                bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor="0.8", alpha=0.85))  # fmt: skip
        name = METRICS[row.metric]
        ax.set_xlabel(f"mean of {label} and {reference}", fontsize=9)
        ax.set_ylabel(f"difference, {name}", fontsize=9)
        _tidy_axes(ax, (a + ref) / 2)
        ys = np.concatenate([a - ref, [row.loa_low, row.loa_high, 0.0]])
        ys = ys[np.isfinite(ys)]
        if ys.size:
            span = float(ys.max() - ys.min()) or 1e-3
            ax.set_ylim(float(ys.min()) - 0.45 * span, float(ys.max()) + 0.55 * span)  # room for the text
    return fig


def write_agreement_plots(tidy: pd.DataFrame, method: str, scatter_png, bland_altman_png, subjects=None, reference: str = "HR") -> pd.DataFrame:
    """Scatter and Bland-Altman figures of ``method`` against the ``reference`` (over ``subjects``
    when given), written atomically. Returns :func:`agreement`'s table."""
    if subjects is not None:
        tidy = tidy[tidy.subject.isin(list(subjects))]
    agree = agreement(tidy, method, reference)
    for make, path in ((scatter_figure, scatter_png), (bland_altman_figure, bland_altman_png)):
        fig = make(agree, method, reference)
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=DPI)
        plt.close(fig)
    return agree


# ----------------------------------------------------------------------------- results page
_PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em 1.6em; color: #1f2933; }
h1 { font-size: 1.35em; margin-bottom: 0.2em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
p.note { color: #52606d; font-size: 0.88em; max-width: 62em; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.4em 0; }
th, td { border-bottom: 1px solid #d9e2ec; padding: 0.28em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f0f4f8; } td.key, th.key { text-align: left; }
td.better { background: #d8f3dc; font-weight: 600; }
"""


def _cell(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2g}"
    return str(x)


def _p_value(p) -> str:
    """``p = 0.012``, ``p < 0.001`` (also for an exact 0, e.g. every subject ranks alike)."""
    if p is None or not np.isfinite(p):
        return "n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _html_table(header: list, rows: list, keys: int = 1, classes=None) -> str:
    """An HTML table; the first ``keys`` columns are labels (left-aligned); ``classes`` gives a
    CSS class per cell (same shape as ``rows``) or None; a newline in a cell breaks the line."""
    from html import escape

    out = ["<table>", "<tr>" + "".join(f'<th class="{"key" if i < keys else ""}">{escape(str(h))}</th>' for i, h in enumerate(header)) + "</tr>"]
    for r, row in enumerate(rows):
        cells = []
        for i, v in enumerate(row):
            cls = ["key"] if i < keys else []
            if classes is not None and classes[r][i]:
                cls.append(classes[r][i])
            cells.append(f'<td class="{" ".join(cls)}">{escape(str(v)).replace(chr(10), "<br>")}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def results_page(quality: pd.DataFrame, long: pd.DataFrame, stats_long: pd.DataFrame, summary: pd.DataFrame, alpha: float, p_adjust: str, subjects=()) -> str:
    """One HTML page of the study's tables, for the report: Table 1 in the paper's layout (from
    the long Table 1 of :func:`femursr.tables.table1`), the image quality (``quality_table``),
    and the statistics (:func:`femursr.tables.statistics_table` and ``better_counts``)."""
    from html import escape

    from .tables import table1_layout

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>femursr results</title><style>{_PAGE_CSS}</style></head><body>"]
    n = len(subjects)
    parts.append(f"<h1>Results on the {n} test subject{'s' if n != 1 else ''}</h1>" if n else "<h1>Results</h1>")
    if n:
        parts.append(f"<p class='note'>{escape(', '.join(map(str, subjects)))}</p>")

    parts.append("<h2>Table 1. Bone microstructure in the ROIs</h2>")
    parts.append("<p class='note'>Mean ± SD over the test subjects and Pearson's r against the HR. BV/TV; Tb.Th and Tb.Sp in mm; "
                 "Tb.N in 1/mm (1 / (Tb.Th + Tb.Sp)). [n = k]: the metric is undefined (no bone in the ROI) for the other subjects. "
                 "Lin's CCC, ICC(2,1) and the Bland-Altman limits are in table1.csv and in the agreement plots.</p>")  # fmt: skip
    layout = table1_layout(long)
    # r on its own line, so that ten methods fit a page
    rows = [[metric, roi, *[layout.loc[(metric, roi), c].replace(" (r = ", "\n(r = ") for c in layout.columns]] for metric, roi in layout.index]
    parts.append(_html_table(["metric", "ROI", *layout.columns], rows, keys=2))

    parts.append("<h2>Image quality against the HR</h2>")
    notes = sorted({str(x) for x in quality.get("note", pd.Series(dtype=str)).dropna() if str(x)})
    q_rows = [[r.get("label", method_label(r["method"])), _cell(r.get("ssim"), 4), _cell(r.get("psnr"), 2), _cell(r.get("gssim"), 4),
               _cell(r.get("lpips"), 4), _cell(r.get("seconds_per_volume"), 1)] for _, r in quality.iterrows()]  # fmt: skip
    parts.append(_html_table(["method", "SSIM", "PSNR (dB)", "GSSIM", "LPIPS", "T/V (s)"], q_rows))
    parts.append("<p class='note'>Whole axial slices holding femur, averaged over the slices and the test subjects. "
                 + escape(" ".join(notes)) + "</p>")  # fmt: skip

    parts.append("<h2>Statistics: closer to the HR than the LR?</h2>")
    parts.append(f"<p class='note'>Per metric and ROI: Friedman's test on the absolute errors against the HR across the methods, then "
                 f"Conover's post-hoc p of each SR variant against the LR ({escape(p_adjust)}-adjusted). Green: significantly smaller "
                 f"errors than the LR at α = {alpha:g}.</p>")  # fmt: skip
    if len(summary):
        parts.append(_html_table(["method", "better than the LR", "of tables"], [[method_label(r["method"]), int(r["better"]), int(r["tables"])] for _, r in summary.iterrows()]))
    if len(stats_long):
        pcol = next(c for c in stats_long.columns if c.startswith("conover_p_vs_"))
        methods = method_order(stats_long["method"])
        keys = list(dict.fromkeys(zip(stats_long.metric, stats_long.region)))
        s_rows, s_cls = [], []
        for metric, region in keys:
            g = stats_long[(stats_long.metric == metric) & (stats_long.region == region)].set_index("method")
            row = [METRICS.get(metric, metric), region, _p_value(g["friedman_p"].iloc[0]), int(g["n"].iloc[0])]
            cls = ["", "", "", ""]
            for m in methods:
                row.append(_p_value(g.loc[m, pcol]) if m in g.index else "")
                cls.append("better" if m in g.index and bool(g.loc[m, "better"]) else "")
            s_rows.append(row)
            s_cls.append(cls)
        parts.append(_html_table(["metric", "ROI", "Friedman p", "n", *[method_label(m) for m in methods]], s_rows, keys=2, classes=s_cls))
    parts.append("</body></html>")
    return "\n".join(parts)
