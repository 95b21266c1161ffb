"""The default demo cohort, generated whole: its truth lies in the ranges of the paper's HR column."""

import pandas as pd
import pytest

from conftest import REPO, run_snakemake

pytestmark = pytest.mark.slow


def test_default_cohort_truth_matches_paper_ranges(tmp_path):
    run_snakemake(["synthesize_cohort", "-c2", "--configfile", str(REPO / "config" / "config.yaml")], tmp_path)
    root = tmp_path / "results" / "synthetic"
    ranges = pd.read_csv(root / "truth_ranges.tsv", sep="\t").set_index(["region", "metric"])
    for region in ("head", "neck", "trochanter"):
        for metric in ("BV/TV", "Tb.Sp", "Tb.N"):
            r = ranges.loc[(region, metric)]
            lo = r.paper_hr_mean - 2 * r.paper_hr_sd
            hi = r.paper_hr_mean + 2 * r.paper_hr_sd
            assert lo <= r["mean"] <= hi, f"{region} {metric}: cohort mean {r['mean']:.3f} outside paper {lo:.3f}..{hi:.3f}"
        # the 0.2 mm demo grid cannot show trabeculae thinner than about 0.4 mm
        th = ranges.loc[(region, "Tb.Th")]
        assert 0.2 <= th["mean"] <= max(0.5, th.paper_hr_mean + 2 * th.paper_hr_sd)
    # subjects differ, so that correlations across subjects mean something
    morph = pd.read_csv(root / "truth_morphometry.tsv", sep="\t")
    sd = morph.query("metric == 'BV/TV'").groupby("region")["value"].std()
    assert (sd[["head", "neck", "trochanter"]] > 0.01).all()
    summary = pd.read_csv(root / "subjects_summary.tsv", sep="\t")
    assert len(summary) >= 25
    # mean/SD in the femur: structure plus 150 HU of noise (the paper reports 0.93 on its scans)
    assert summary.lr_snr_femur.between(0.9, 1.6).all()
    assert summary.pose_rotation_deg.max() > 10


def test_paper_config_network_at_82um_matches_paper_means():
    """The paper config's trabecular network, sampled at 82 um in 8 mm cubes at the region centres
    of 6 subjects: cohort means within one paper SD (Tb.Sp of the neck, SD 6 mm, within 0.5 SD)."""
    from femursr.phantom import PAPER_HR
    from femursr.truth import region_block_morphometry

    from conftest import load_config

    cfg = load_config("paper.yaml")
    df = pd.concat([region_block_morphometry(cfg["synthetic"], cfg["seed"], i, edge_mm=8.0) for i in range(1, 7)])
    means = df.groupby(["region", "metric"])["value"].mean()
    for (region, metric), (mean, sd) in PAPER_HR.items():
        tol = 0.5 * sd if (region, metric) == ("neck", "Tb.Sp") else sd
        assert abs(means[(region, metric)] - mean) <= tol, f"{region} {metric}: {means[(region, metric)]:.3f} vs paper {mean}±{sd}"
