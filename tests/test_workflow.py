"""The Snakemake workflow: DAGs build, bad config fails before any job, lint is clean, and a
small synthetic study runs end to end."""

import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from conftest import REPO, SNAKEMAKE, load_config, run_snakemake, small_synthetic


def _write_config(tmp_path, cfg, name="config.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("name, n_subjects", [("config.yaml", 25), ("paper.yaml", 50)])
def test_dry_run_builds_the_dag(tmp_path, name, n_subjects):
    res = run_snakemake(["-n", "--configfile", str(REPO / "config" / name)], tmp_path)
    jobs = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            jobs[parts[0]] = int(parts[1])
    assert jobs["synthesize_subject"] == n_subjects
    assert jobs["synthesize_cohort"] == 1
    assert not (tmp_path / "results").exists()


def test_config_typo_fails_before_any_job(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["synthetic"]["hr"]["voxl_mm"] = 0.2
    res = run_snakemake(["-c1", "--configfile", str(_write_config(tmp_path, cfg))], tmp_path, check=False)
    assert res.returncode != 0
    assert "'voxl_mm' was unexpected" in res.stdout + res.stderr
    assert not (tmp_path / "results").exists()


def test_sheet_with_missing_folder_fails_naming_the_subject(tmp_path):
    (tmp_path / "lr_ok").mkdir()
    sheet = tmp_path / "subjects.tsv"
    sheet.write_text(f"subject\tlr\thr\nP01\t{tmp_path}/lr_ok\t\nP02\t{tmp_path}/missing_lr\t\n")
    cfg = load_config(cohort="sheet", subjects=str(sheet))
    res = run_snakemake(["-n", "--configfile", str(_write_config(tmp_path, cfg))], tmp_path, check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "subject P02" in out and "missing_lr" in out


def test_lint_is_clean(tmp_path):
    res = run_snakemake(["--lint", "--configfile", str(REPO / "config" / "config.yaml")], tmp_path, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Congratulations" in res.stdout + res.stderr


def test_snakefmt_is_clean():
    exe = shutil.which("snakefmt", path=str(__import__("pathlib").Path(SNAKEMAKE).parent))
    res = subprocess.run([exe, "--check", "Snakefile", "rules"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_small_study_runs_end_to_end_and_is_up_to_date_after(tmp_path):
    cfg = small_synthetic(n_subjects=3, scale=0.45, voxel=0.3)
    cfgfile = _write_config(tmp_path, cfg)
    run_snakemake(["-c2", "--configfile", str(cfgfile)], tmp_path)
    root = tmp_path / "results" / "synthetic"
    sheet = pd.read_csv(root / "subjects.tsv", sep="\t")
    assert list(sheet.subject) == ["S001", "S002", "S003"]
    for s in sheet.subject:
        assert len(list((root / s / "lr_dicom").glob("*.dcm"))) > 10
        assert (root / s / "truth" / "pose.tfm").is_file()
        assert (tmp_path / "logs" / "synthetic" / f"{s}.log").is_file()
    morph = pd.read_csv(root / "truth_morphometry.tsv", sep="\t")
    assert set(morph.region) == {"head", "neck", "trochanter", "shaft"}
    assert len(morph) == 3 * 4 * 4
    ranges = pd.read_csv(root / "truth_ranges.tsv", sep="\t")
    assert {"paper_hr_mean", "mean", "std"} <= set(ranges.columns)
    assert (root / "preview.png").stat().st_size > 10_000
    # nothing left to do on a second run
    res = run_snakemake(["-n", "--configfile", str(cfgfile)], tmp_path)
    assert "Nothing to be done" in res.stdout + res.stderr


def test_typo_in_a_parameter_block_fails_naming_the_key(tmp_path):
    cfg = load_config()
    cfg["preprocessing"]["mask"]["threshold"]["work_mn"] = 1.0
    res = run_snakemake(["-n", "--configfile", str(_write_config(tmp_path, cfg))], tmp_path, check=False)
    assert res.returncode != 0
    assert "preprocessing.mask.threshold: unknown key 'work_mn'" in res.stdout + res.stderr
