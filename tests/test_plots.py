"""Figures of the results (femursr.plots) on a tiny synthetic femur and a small morphometry table.

The femur: a ball (the head, known centre and radius) on a neck, a shaft and a smaller ball for
the greater trochanter, on a 0.5 mm grid; volumes are a random trabecular texture inside it.
"""

import json
import re
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from femursr import plots
from femursr.stats import bland_altman, lin_ccc, pearson
from femursr.tables import table1
from femursr.volume import Volume, read_volume, write_volume
from femursr.workflow import mock_snakemake

REPO = Path(__file__).resolve().parents[1]
SPACING = 0.5  # mm
SHAPE = (72, 48, 80)  # z, y, x
HEAD_C = np.array([28.0, 12.0, 26.0])  # x, y, z (mm from the origin)
HEAD_R = 8.0


def _segment_dist(p, a, b):
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def femur_mask_array() -> np.ndarray:
    """(z, y, x) uint8: head ball, neck, shaft along z and, lower down, a trochanter ball wider
    than the head (so the deepest point of the femur is not the head centre)."""
    z, y, x = np.indices(SHAPE) * SPACING
    p = np.stack([x, y, z], axis=-1)
    head = np.linalg.norm(p - HEAD_C, axis=-1) <= HEAD_R
    neck = _segment_dist(p, HEAD_C, np.array([12.0, 12.0, 18.0])) <= 4.0
    shaft = _segment_dist(p, np.array([12.0, 12.0, 0.0]), np.array([12.0, 12.0, 20.0])) <= 5.5
    trochanter = np.linalg.norm(p - np.array([10.0, 12.0, 13.0]), axis=-1) <= 9.0
    return (head | neck | shaft | trochanter).astype(np.uint8)


def texture(mask: np.ndarray, seed: int, blur: float = 0.0) -> np.ndarray:
    """A trabecular-looking pattern in [0, 1] inside the mask, 0 outside."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal(mask.shape), 1.2)
    bone = (np.abs(field) < 0.08).astype(np.float32) * 0.8 + 0.1
    if blur:
        bone = ndi.gaussian_filter(bone, blur)
    return (bone * mask).astype(np.float32)


@pytest.fixture(scope="module")
def femur(tmp_path_factory):
    """Paths of the femur mask (.nii.gz), HR and LR (.nii) and an SR output (.nii.gz), one grid."""
    d = tmp_path_factory.mktemp("femur")
    mask = femur_mask_array()
    geom = dict(spacing=(SPACING,) * 3, origin=(-10.0, 5.0, -30.0))
    hr = texture(mask, 0)
    paths = {"mask": d / "femur.nii.gz", "HR": d / "hr.nii", "LR": d / "lr.nii", "srgan_2d": d / "srgan_2d.nii.gz"}
    write_volume(Volume(mask, **geom), paths["mask"])
    write_volume(Volume(hr, **geom), paths["HR"])
    write_volume(Volume((ndi.gaussian_filter(hr, 2.0) * mask).astype(np.float32), **geom), paths["LR"])
    write_volume(Volume((ndi.gaussian_filter(hr, 0.7) * mask).astype(np.float32), **geom), paths["srgan_2d"])
    return paths


def test_axial_slice_reads_the_slice_of_read_volume(femur):
    for key in ("HR", "srgan_2d", "mask"):
        whole = np.asarray(read_volume(femur[key]).array)
        for z in (0, 30, SHAPE[0] - 1):
            np.testing.assert_array_equal(plots.axial_slice(femur[key], z), whole[z].astype(np.float32))
    with pytest.raises(IndexError, match="hr.nii: axial slice 72"):
        plots.axial_slice(femur["HR"], SHAPE[0])


def test_head_view_is_the_head_centre_deterministic_and_inside_the_femur(femur):
    mask = read_volume(femur["mask"])
    view = plots.femoral_head_view(mask)
    expected = np.asarray(mask.origin) + HEAD_C  # identity direction
    assert np.linalg.norm(np.asarray(view.centre_mm) - expected) <= 1.0  # two voxels
    assert view.head_radius_mm == pytest.approx(HEAD_R, abs=1.0)
    assert plots.femoral_head_view(mask) == view  # the same choice every time
    arr = np.asarray(mask.array)
    assert arr[view.z, view.y, view.x] == 1
    # a 10 mm inset around the head centre lies inside the femur (the head ball, radius 8 mm)
    y0, y1, x0, x1 = plots.inset_box(view, arr.shape[1:], (SPACING, SPACING), 10.0)
    assert (y1 - y0, x1 - x0) == (20, 20) and y0 <= view.y < y1 and x0 <= view.x < x1
    assert arr[view.z, y0:y1, x0:x1].all()


def test_head_view_follows_the_physical_superior_direction():
    """The same femur stored upside down (z axis pointing inferior): the same physical centre."""
    mask = femur_mask_array()
    up = Volume(mask, (SPACING,) * 3, (0.0, 0.0, 0.0))
    nz = SHAPE[0]
    down = Volume(mask[::-1].copy(), (SPACING,) * 3, (0.0, 0.0, (nz - 1) * SPACING), direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    a, b = plots.femoral_head_view(up), plots.femoral_head_view(down)
    assert np.allclose(a.centre_mm, b.centre_mm, atol=0.5)
    assert b.z == nz - 1 - a.z
    with pytest.raises(ValueError, match="femur mask is empty"):
        plots.femoral_head_view(Volume(np.zeros(SHAPE, np.uint8), (SPACING,) * 3, (0.0, 0.0, 0.0)))


def test_inset_box_stays_inside_the_slice():
    view = plots.HeadView(z=0, y=1, x=74, centre_mm=(0, 0, 0), head_radius_mm=1.0)
    assert plots.inset_box(view, (48, 80), (0.5, 0.5), 10.0) == (0, 20, 60, 80)
    assert plots.inset_box(view, (10, 80), (0.5, 0.5), 10.0)[:2] == (0, 10)  # slice smaller than the inset


def test_nice_scale_bar_lengths():
    assert plots.nice_length(18.0) == 5.0
    assert plots.nice_length(100.0) == 20.0
    assert plots.nice_length(3.0) == 0.5
    assert plots.nice_length(30.0) == 5.0


def test_grey_window_is_the_hr_percentiles_in_the_femur():
    hr = np.arange(100, dtype=float).reshape(10, 10)
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    assert plots.grey_window(hr, mask, (0, 100)) == (22.0, 77.0)


def test_figure1_one_window_insets_scale_bars_and_file(femur, tmp_path):
    mask = read_volume(femur["mask"])
    view = plots.femoral_head_view(mask)
    methods = ["LR", "srgan_2d", "HR"]
    slices = {m: plots.axial_slice(femur[m], view.z) for m in methods}
    mask_slice = np.asarray(mask.array[view.z]) != 0
    fig, window = plots.figure1(slices, mask_slice, view, (SPACING, SPACING), 10.0)
    assert window == plots.grey_window(slices["HR"], mask_slice)
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2 * len(methods)
    assert all(im.get_clim() == window for im in images)
    assert [ax.get_title() for ax in fig.axes[: len(methods)]] == ["LR", "SRGAN 2D", "HR"]
    bars = [a for ax in fig.axes for a in ax.artists if a.get_gid() == "scale_bar"]
    assert len(bars) == 2 * len(methods)
    # the insets show exactly the inset box of each volume, at full resolution
    y0, y1, x0, x1 = plots.inset_box(view, mask_slice.shape, (SPACING, SPACING), 10.0)
    np.testing.assert_array_equal(fig.axes[len(methods)].get_images()[0].get_array(), slices["LR"][y0:y1, x0:x1])
    extent = fig.axes[len(methods)].get_images()[0].get_extent()
    assert extent[1] == pytest.approx(10.0) and extent[2] == pytest.approx(10.0)  # mm

    out = tmp_path / "fig" / "figure1_S001.png"
    volumes = {m: femur[m] for m in ("HR", "srgan_2d", "LR")}
    record = plots.write_figure1(femur["mask"], volumes, out, inset_mm=10.0, subject="S001")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["methods"] == methods  # the paper's order, whatever the input order
    assert record["slice"] == view.z and record["window"] == list(window)
    assert not list(out.parent.glob(".*"))  # no temporary left


def test_figure_refuses_a_volume_on_another_grid(femur, tmp_path):
    other = tmp_path / "shifted.nii.gz"
    write_volume(Volume(np.zeros(SHAPE, np.float32), (SPACING,) * 3, (0.0, 0.0, 0.0)), other)
    with pytest.raises(ValueError, match="shifted.nii.gz: grid .* differs from that of the femur mask"):
        plots.write_figure1(femur["mask"], {"HR": femur["HR"], "srgan_2d": other}, tmp_path / "f.png", 10.0)


def test_sample_sd_figure(femur, tmp_path):
    mask = read_volume(femur["mask"])
    sd = np.zeros(SHAPE, np.float32)
    sd[np.asarray(mask.array) != 0] = 0.05
    sd_path = tmp_path / "ldm_2d.std.nii.gz"
    write_volume(mask.with_array(sd), sd_path)
    out = tmp_path / "sd.png"
    record = plots.write_sample_sd_figure(femur["mask"], femur["HR"], {"ldm_2d": (femur["srgan_2d"], sd_path)}, out, 10.0, "S001")
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert record["sd_range"] == [0.0, pytest.approx(0.05)]
    assert record["slice"] == plots.femoral_head_view(mask).z


# ----------------------------------------------------------------------------- agreement
def morphometry_table(n=7, seed=3) -> pd.DataFrame:
    """Long-form morphometry: HR; 'srgan_2d' = HR scaled and shifted with noise; LR far off;
    one undefined srgan_2d value (Tb.Th of the neck of S002)."""
    rng = np.random.default_rng(seed)
    rows = []
    for metric in ("bv_tv", "tb_th_mm", "tb_sp_mm", "tb_n_per_mm"):
        for region in ("head", "neck", "trochanter"):
            hr = rng.uniform(0.2, 0.8, n)
            values = {"HR": hr, "srgan_2d": 0.9 * hr + 0.05 + rng.normal(0, 0.03, n), "LR": rng.uniform(0, 0.1, n)}
            for method, v in values.items():
                for s in range(n):
                    value = np.nan if (method, metric, region, s) == ("srgan_2d", "tb_th_mm", "neck", 2) else float(v[s])
                    rows.append((f"S{s:03d}", method, region, metric, value))
    return pd.DataFrame(rows, columns=["subject", "method", "region", "metric", "value"])


def test_agreement_equals_stats_and_table1():
    tidy = morphometry_table()
    agree = plots.agreement(tidy, "srgan_2d")
    assert len(agree) == 12
    row = agree[(agree.metric == "tb_th_mm") & (agree.region == "neck")].iloc[0]
    assert row.n == 6 and "S002" not in row.subjects  # the undefined pair is left out
    long = table1(tidy)
    for _, row in agree.iterrows():
        sub = tidy[(tidy.metric == row.metric) & (tidy.region == row.region)].pivot(index="subject", columns="method", values="value")
        sub = sub[["srgan_2d", "HR"]].dropna()
        a, ref = sub["srgan_2d"].to_numpy(), sub["HR"].to_numpy()
        ba = bland_altman(a, ref)
        assert row.r == pytest.approx(pearson(a, ref)) and row.ccc == pytest.approx(lin_ccc(a, ref))
        assert (row.bias, row.loa_low, row.loa_high) == pytest.approx((ba["bias"], ba["loa_low"], ba["loa_high"]))
        t1 = long[(long.method == "srgan_2d") & (long.metric == row.metric) & (long.region == row.region)].iloc[0]
        assert (row.r, row.ccc, row.bias, row.loa_low, row.loa_high) == pytest.approx((t1.r, t1.ccc, t1.ba_bias, t1.ba_loa_low, t1.ba_loa_high))
    with pytest.raises(ValueError, match="no ldm_2d rows"):
        plots.agreement(tidy, "ldm_2d")


def _panel(fig, agree, metric, region):
    i = list(dict.fromkeys(agree.metric)).index(metric)
    j = list(dict.fromkeys(agree.region)).index(region)
    return fig.axes[i * len(set(agree.region)) + j]


def test_plots_draw_the_numbers_of_the_statistics():
    tidy = morphometry_table()
    agree = plots.agreement(tidy, "srgan_2d")
    scatter = plots.scatter_figure(agree, "srgan_2d")
    ba_fig = plots.bland_altman_figure(agree, "srgan_2d")
    assert len(scatter.axes) == 12 and len(ba_fig.axes) == 12
    for metric, region in (("bv_tv", "head"), ("tb_th_mm", "neck"), ("tb_n_per_mm", "trochanter")):
        row = agree[(agree.metric == metric) & (agree.region == region)].iloc[0]
        ax = _panel(scatter, agree, metric, region)
        points = next(c for c in ax.collections if c.get_gid() == "points").get_offsets()
        np.testing.assert_allclose(points, np.column_stack([row.reference, row["values"]]))
        text = next(t for t in ax.texts if t.get_gid() == "agreement").get_text()
        assert f"r = {row.r:.2f}" in text and f"CCC = {row.ccc:.2f}" in text and f"n = {row.n}" in text
        identity = next(ln for ln in ax.lines if ln.get_gid() == "identity")
        np.testing.assert_allclose(identity.get_xdata(), identity.get_ydata())
        ax = _panel(ba_fig, agree, metric, region)
        lines = {ln.get_gid(): ln.get_ydata()[0] for ln in ax.lines}
        ba = bland_altman(row["values"], row.reference)
        assert (lines["bias"], lines["loa_low"], lines["loa_high"]) == pytest.approx((ba["bias"], ba["loa_low"], ba["loa_high"]))
        points = next(c for c in ax.collections if c.get_gid() == "points").get_offsets()
        np.testing.assert_allclose(points[:, 1], row["values"] - row.reference)


def test_rule_scripts_write_their_outputs(femur, tmp_path):
    """The thin scripts, run as Snakemake runs them (a stand-in snakemake object)."""
    tidy = tmp_path / "all.tsv"
    morphometry_table().to_csv(tidy, sep="\t", index=False)
    sm = mock_snakemake(input={"morphometry": str(tidy)}, params={"subjects": ["S000", "S001", "S003", "S004"]},
                        output={"scatter": str(tmp_path / "scatter/LR.png"), "bland_altman": str(tmp_path / "bland_altman/LR.png")},
                        wildcards={"method": "LR"}, log=[str(tmp_path / "agreement.log")])  # fmt: skip
    runpy.run_path(str(REPO / "workflow_scripts" / "agreement_plots.py"), init_globals={"snakemake": sm})
    assert (tmp_path / "scatter/LR.png").stat().st_size > 0 and (tmp_path / "bland_altman/LR.png").stat().st_size > 0
    log = (tmp_path / "agreement.log").read_text()
    assert "LR against the HR" in log
    assert re.search(r"bv_tv\s+head\s+4\s", log) and re.search(r"tb_n_per_mm\s+trochanter\s+4\s", log)  # the 4 subjects

    sm = mock_snakemake(input={"mask": str(femur["mask"]), "volumes": [str(femur[m]) for m in ("LR", "srgan_2d", "HR")]},
                        params={"methods": ["LR", "srgan_2d", "HR"], "inset_mm": 10.0},
                        output={"png": str(tmp_path / "figure1_S001.png"), "view": str(tmp_path / "figure1_S001.json")},
                        wildcards={"subject": "S001"}, log=[str(tmp_path / "figure1.log")])  # fmt: skip
    runpy.run_path(str(REPO / "workflow_scripts" / "figure1.py"), init_globals={"snakemake": sm})
    view = json.loads((tmp_path / "figure1_S001.json").read_text())
    assert view["methods"] == ["LR", "srgan_2d", "HR"] and view["volumes"]["HR"] == str(femur["HR"])
    assert np.linalg.norm(np.asarray(view["centre_mm"]) - (np.array([-10.0, 5.0, -30.0]) + HEAD_C)) <= 1.0


def test_results_page_holds_table1_quality_and_statistics():
    from html.parser import HTMLParser

    from femursr.tables import better_counts, statistics_table, table1_layout

    tidy = morphometry_table(n=8)
    long = table1(tidy)
    stats_long = statistics_table(tidy, alpha=0.05, p_adjust="holm")
    summary = better_counts(stats_long).reset_index()
    quality = pd.DataFrame([{"method": "LR", "label": "LR", "ssim": 0.8, "psnr": 20.0, "gssim": 0.7, "lpips": np.nan, "seconds_per_volume": np.nan, "note": "LPIPS unavailable"},
                            {"method": "srgan_2d", "label": "SRGAN 2D", "ssim": 0.75, "psnr": 19.5, "gssim": 0.72, "lpips": np.nan, "seconds_per_volume": 9.5, "note": "LPIPS unavailable"}])  # fmt: skip
    page = plots.results_page(quality, long, stats_long, summary, alpha=0.05, p_adjust="holm", subjects=[f"S{i:03d}" for i in range(8)])

    class Tables(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.cells, self.in_cell = [], [], False

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append([])
            elif tag == "tr":
                self.tables[-1].append([])
            elif tag in ("td", "th"):
                self.in_cell = True
                self.tables[-1][-1].append("")
                if tag == "td":
                    self.cells.append(dict(attrs).get("class", ""))

        def handle_endtag(self, tag):
            self.in_cell = self.in_cell and tag not in ("td", "th")

        def handle_data(self, data):
            if self.in_cell:
                self.tables[-1][-1][-1] += data

    parser = Tables()
    parser.feed(page)
    t1, q, counts, st = parser.tables
    layout = table1_layout(long)
    assert t1[0] == ["metric", "ROI", "LR", "SRGAN 2D", "HR"] and len(t1) == 1 + 12
    assert t1[1] == ["BV/TV", "head", *[layout.loc[("BV/TV", "head"), c].replace(" (r = ", "(r = ") for c in layout.columns]]
    assert q[2] == ["SRGAN 2D", "0.7500", "19.50", "0.7200", "n/a", "9.5"]
    assert counts[1] == ["SRGAN 2D", str(summary.loc[summary.method == "srgan_2d", "better"].iloc[0]), "12"]
    assert len(st) == 1 + 12 and st[0][-1] == "SRGAN 2D"
    assert sum(c == "better" for c in parser.cells) == int(stats_long["better"].sum()) > 0
    assert "8 test subjects" in page and "LPIPS unavailable" in page
