import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))

from snakemake.utils import validate  # noqa: E402

SCHEMA = REPO / "config" / "schemas" / "config.schema.yaml"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def load_config(name="config.yaml", **overrides) -> dict:
    """A config file of the repo, validated (defaults filled), with top-level overrides."""
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    cfg.update(copy.deepcopy(overrides))
    validate(cfg, str(SCHEMA))
    return cfg


def small_synthetic(n_subjects=3, scale=0.35, voxel=0.25) -> dict:
    """A quick synthetic block (seconds per subject) for tests."""
    cfg = load_config()
    syn = cfg["synthetic"]
    syn["n_subjects"] = n_subjects
    syn["anatomy_scale"] = scale
    syn["hr"]["voxel_mm"] = voxel
    syn["lr"]["fov_mm"] = [70, 70, 60]
    # no SR models: training them takes minutes per model on a CPU (test_sr_machinery.py turns
    # them back on in its workflow test)
    cfg["training"]["models"] = []
    return cfg


def run_snakemake(args, cwd, check=True, timeout=900):
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(cwd), *args]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


@pytest.fixture(scope="session")
def small_subject(tmp_path_factory):
    """One small synthetic subject written to disk: (record, lr_dir, hr_dir, truth_dir, cfg)."""
    from femursr.phantom import synthesize_subject

    cfg = small_synthetic(scale=0.45, voxel=0.25)
    root = tmp_path_factory.mktemp("subject")
    rec = synthesize_subject("S001", 1, cfg["synthetic"], cfg["seed"], root / "lr", root / "hr", root / "truth")
    yield rec, root / "lr", root / "hr", root / "truth", cfg
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Torch on one thread for a test module: tiny convolutions are far faster on one thread
    than on two (OpenMP overhead), the more so on a shared machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
