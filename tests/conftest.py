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


# ------------------------------------------------------------------ analytic femur phantoms
def femur_shape(nsa=130.0, anteversion=12.0, size=1.0):
    """A demo-scale femur (45 % of adult size), as the synthetic cohort draws them."""
    from femursr.geometry import FemurShape

    s = 0.45 * size
    return FemurShape(head_radius=23 * s, neck_length=52 * s, neck_shaft_angle_deg=nsa, anteversion_deg=anteversion,
                      neck_radius_base=15.5 * s, neck_radius_head=13 * s, shaft_radius=14 * s, scale=s)  # fmt: skip


def femur_phantom(shape, vox: float, pose=None, cut_at_face: bool = False):
    """Femur mask and analytic region map (1 head .. 4 shaft) of ``shape`` on a ``vox`` mm grid,
    placed by ``pose`` (a femursr.pointcloud.Similarity, femur frame -> LPS), sawn 15 mm (adult)
    below the lesser trochanter; with ``cut_at_face`` the grid ends at the cut (the mask leaves
    through the array's face, as the workflow's masks do)."""
    import numpy as np

    from femursr.geometry import REGION_IDS
    from femursr.pointcloud import Similarity
    from femursr.volume import Volume

    pose = pose or Similarity()
    z_cut = shape.lt_bottom - 15 * shape.scale
    lo, hi = shape.bounding_box(z_cut)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    moved = pose.apply(corners)
    origin = moved.min(0) - 2 * vox
    n = np.ceil((moved.max(0) + 2 * vox - origin) / vox).astype(int) + 1
    axes = [origin[k] + vox * np.arange(n[k]) for k in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    p = pose.inverse().apply(grid)  # back into the femur frame
    inside = (shape.sdf(p) < 0) & (p[:, 2] > z_cut)
    regions = np.zeros(len(p), np.uint8)
    for name, m in shape.region_masks(p[inside]).items():
        regions[np.flatnonzero(inside)[m]] = REGION_IDS[name]
    mask = inside.reshape(tuple(n)).transpose(2, 1, 0).astype(np.uint8)  # (x, y, z) -> (z, y, x)
    regions = regions.reshape(tuple(n)).transpose(2, 1, 0).copy()
    if cut_at_face:  # the pose must keep the shaft along z; drop the slices below the cut
        z0 = int(np.flatnonzero(mask.any((1, 2)))[0]) + 2
        mask, regions = mask[z0:], regions[z0:]
        origin = origin + np.array([0.0, 0.0, z0 * vox])
    return Volume(mask, (vox,) * 3, origin), Volume(regions, (vox,) * 3, origin)
