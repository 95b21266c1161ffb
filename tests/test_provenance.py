"""Precise reruns (issue 8, item 3): each rule's `code` param is a hash of its script and of the
femursr modules it imports; editing config or code reruns exactly what the edit touches."""

import shutil
from pathlib import Path

import pytest
import yaml

from femursr.provenance import code_version, imported_modules, module_closure

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"


def _package(root: Path) -> Path:
    """A small package `femursr` with relative, absolute, lazy and unrelated modules."""
    pkg = root / "femursr"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\nimport numpy\n")
    (pkg / "b.py").write_text("def f():\n    from femursr.sub import c  # lazy\n    return c\n")
    (pkg / "sub" / "c.py").write_text("from .. import d as _d\nX = 1\n")
    (pkg / "d.py").write_text("Y = 2\n")
    (pkg / "unused.py").write_text("Z = 3\n")
    (pkg / "model.py").write_text("W = 4\n")
    (root / "script.py").write_text("from femursr.a import f\nimport os\n")
    return pkg


def test_closure_follows_relative_absolute_and_lazy_imports(tmp_path):
    pkg = _package(tmp_path)
    names = sorted(str(p.relative_to(tmp_path)) for p in module_closure(tmp_path, tmp_path / "script.py"))
    assert names == ["femursr/__init__.py", "femursr/a.py", "femursr/b.py", "femursr/d.py", "femursr/sub/__init__.py", "femursr/sub/c.py", "script.py"]
    assert imported_modules(tmp_path, pkg / "sub" / "c.py") == ("femursr", "femursr.d")
    with_extra = module_closure(tmp_path, tmp_path / "script.py", ["femursr.model"])
    assert pkg / "model.py" in with_extra and pkg / "unused.py" not in with_extra
    with pytest.raises(ValueError, match="femursr.nothing not found"):
        module_closure(tmp_path, tmp_path / "script.py", ["femursr.nothing"])


def test_hash_changes_with_the_code_a_script_runs_and_only_with_it(tmp_path):
    pkg = _package(tmp_path)
    script = tmp_path / "script.py"
    first = code_version(tmp_path, script)
    assert first == code_version(tmp_path, script) and len(first) == 16
    (pkg / "unused.py").write_text("Z = 30\n")
    assert code_version(tmp_path, script) == first
    (pkg / "sub" / "c.py").write_text("from .. import d as _d\nX = 10\n")  # reached through a lazy import
    second = code_version(tmp_path, script)
    assert second != first
    (pkg / "d.py").write_text("Y = 20\n")
    assert code_version(tmp_path, script) != second
    assert code_version(tmp_path, script, ["femursr.model"]) != code_version(tmp_path, script)


def test_the_workflow_modules_are_split_so_that_morphometry_edits_stay_local():
    def closure(script):
        return {p.relative_to(SCRIPTS).as_posix() for p in module_closure(SCRIPTS, SCRIPTS / script)}

    morph = "femursr/morphometry.py"
    assert morph in closure("roi_morphometry.py") and morph in closure("truth_morphometry.py")
    for script in ("synthesize_subject.py", "place_rois.py", "bone_mask.py", "import_scan.py", "train_sr.py", "sr_infer.py"):
        assert morph not in closure(script), script
    # the SR model modules are imported by name (the registry): the rules add them explicitly
    assert "femursr/sr/gan.py" not in closure("train_sr.py")


# ------------------------------------------------------------------ the workflow reruns
def _copy_workflow(dst: Path) -> None:
    for name in ("Snakefile", "rules", "config", "report", "envs", "workflow_scripts"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / name)


def _jobs(stdout: str) -> dict:
    jobs = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0].isidentifier() and parts[0] != "total":
            jobs[parts[0]] = int(parts[1])
    return jobs


@pytest.mark.slow
def test_config_and_code_edits_rerun_exactly_what_they_touch(tmp_path):
    """A tiny study (5 subjects, SRGAN 2D for one step per phase, the ROI evaluation of the test
    subject) is run; then `snakemake -n` after each edit lists the jobs it would rerun."""
    from conftest import run_snakemake, small_synthetic

    work = tmp_path / "wf"
    work.mkdir()
    _copy_workflow(work)
    cfg = small_synthetic(n_subjects=5, scale=0.45, voxel=0.4)
    cfg["synthetic"]["n_clinical"] = 0
    cfg["training"].update({"models": ["srgan"], "dims": ["2d"], "samples_per_epoch": 2, "batch_size": 2, "validation_patches": 2, "device": "cpu"})
    cfg["models"]["srgan"]["pretrain"]["epochs"] = 1
    cfg["models"]["srgan"]["gan"]["epochs"] = 1
    cfgfile = work / "config" / "test.yaml"

    def dry():
        cfgfile.write_text(yaml.safe_dump(cfg))
        res = run_snakemake(["-n", "-s", str(work / "Snakefile"), "--configfile", str(cfgfile)], work)
        return _jobs(res.stdout)

    def snakemake(*args):
        cfgfile.write_text(yaml.safe_dump(cfg))
        return run_snakemake(["-s", str(work / "Snakefile"), "--configfile", str(cfgfile), *args], work, timeout=3000)

    snakemake("-c2")
    assert dry() == {}, "a finished study must rerun nothing"

    # 1. one model's hyper-parameter: that model's training, inference and evaluation, the tables
    old = cfg["models"]["srgan"]["pretrain"]["lr"]
    cfg["models"]["srgan"]["pretrain"]["lr"] = old / 2
    jobs = dry()
    print("model lr edit reruns", jobs)
    assert jobs.pop("train_sr") == 1 and jobs.pop("sr_infer") == 1
    # what uses the SR volume: its evaluation, its figures, and the model's portable export
    downstream = {"bone_mask", "place_rois", "roi_morphometry", "morphometry_table", "image_quality", "figure1", "agreement_plots"}
    assert set(jobs) <= downstream | {"clinical_export_model", "results_tables", "all"}, jobs
    assert jobs.get("roi_morphometry") == 1 and jobs.get("bone_mask") == 1  # the SR volume's only
    cfg["models"]["srgan"]["pretrain"]["lr"] = old

    # 2. the ROI size: the ROIs of every evaluated volume and their morphometry, nothing upstream
    cfg["evaluation"]["roi_edge_vox"] += 4
    jobs = dry()
    print("ROI size edit reruns", jobs)
    assert jobs.get("place_rois") == 3 and jobs.get("roi_morphometry") == 3, jobs
    # (the portable model carries the evaluation settings its clinical ROIs are placed with)
    assert set(jobs) <= {"place_rois", "roi_morphometry", "morphometry_table", "roi_accuracy", "clinical_export_model", "all"}, jobs
    cfg["evaluation"]["roi_edge_vox"] -= 4
    assert dry() == {}

    # 3. the morphometry code: the truth tables and the ROI morphometry, not the scans, the
    # preprocessing, the models or the ROI placement
    morph = work / "workflow_scripts" / "femursr" / "morphometry.py"
    morph.write_text(morph.read_text() + "\n# an edit\n")
    jobs = dry()
    print("morphometry code edit reruns", jobs)
    assert jobs.get("truth_morphometry") == 5 and jobs.get("roi_morphometry") == 3, jobs
    assert set(jobs) <= {"truth_morphometry", "synthesize_cohort", "roi_morphometry", "morphometry_table", "roi_accuracy", "all"}, jobs
