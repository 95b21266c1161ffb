"""Femur templates for the ROI placement (paper section 3.1): which training subjects serve as
templates, their labelled surface point clouds, and which template an evaluated volume uses.

* :func:`select_templates`: the ``n`` templates are the training subjects nearest to the
  quantiles ``(k + 1/2) / n`` (k = 0 .. n-1; 1/6, 1/2, 5/6 for three) of the bone volume over the
  training subjects, bone volume being the volume (mL) of the HR femur mask ("the sum of bone
  voxels within the binary mask"). Uniform quantiles span the cohort's anatomy without taking its
  extremes.
* :func:`label_points`: a region label per surface point from a label map (1 head, 2 neck,
  3 trochanter, 4 shaft, 0 elsewhere; :data:`femursr.geometry.REGION_NAMES`): the label of the
  nearest labelled voxel. The label map may be on any grid of the same physical (LPS) space as the
  template's HR: the synthetic truth (``truth/regions.nii.gz``), a segmentation made in
  3D Slicer and exported as a label map (NIfTI or NRRD), or the automatic labels of the
  template's femur mask (:func:`femursr.labelling.label_femur`, rule ``template_labels``).
* :func:`build_template`, :func:`save_templates`, :func:`load_templates`: the labelled clouds of
  all templates in one ``.npz`` file; :func:`nearest_template`: the template nearest in bone
  volume to an evaluated volume; :func:`templates_figure`: the labelled templates, for a person
  to check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .geometry import REGION_NAMES
from .pointcloud import PointCloud, mask_points
from .volume import Volume

REGION_COLOURS = {0: "#9e9e9e", 1: "#e6194b", 2: "#3cb44b", 3: "#4363d8", 4: "#f58231"}


@dataclass
class Template:
    """One template: its subject, bone volume (mL), the quantile it stands for, where its labels
    came from, and its labelled surface cloud (LPS mm of its own HR)."""

    subject: str
    bone_ml: float
    quantile: float
    label_source: str
    cloud: PointCloud


def select_templates(bone_ml: dict[str, float], n: int) -> list[tuple[str, float, float]]:
    """``(subject, quantile, bone volume at that quantile)`` of the ``n`` templates, in order of
    quantile: for each quantile ``(k + 1/2) / n`` the not yet chosen subject whose bone volume is
    nearest to the quantile of ``bone_ml`` (mL). Ties go to the subject first in sort order."""
    if n < 1:
        raise ValueError(f"templates: n_templates must be >= 1, got {n}")
    if len(bone_ml) < n:
        raise ValueError(
            f"templates: {n} templates asked for, but only {len(bone_ml)} training subject(s) "
            f"({', '.join(sorted(bone_ml)) or 'none'}); lower evaluation.n_templates or train on more subjects"
        )
    names = sorted(bone_ml)
    vals = np.array([bone_ml[s] for s in names], float)
    chosen = []
    for k in range(n):
        q = (k + 0.5) / n
        target = float(np.quantile(vals, q))
        free = [i for i in range(len(names)) if names[i] not in {c[0] for c in chosen}]
        i = min(free, key=lambda j: (abs(vals[j] - target), names[j]))
        chosen.append((names[i], q, target))
    return chosen


def nearest_template(bone_ml: float, templates: list[Template]) -> int:
    """Index of the template nearest in bone volume (mL) to ``bone_ml``."""
    return int(np.argmin([abs(t.bone_ml - bone_ml) for t in templates]))


def label_points(points: np.ndarray, labels: Volume, max_distance_mm: float = 2.0, max_far_fraction: float = 0.1,
                 where: str = "label map") -> np.ndarray:  # fmt: skip
    """Region label (uint8) of each point (LPS mm, (n, 3)): that of the nearest labelled voxel
    (label > 0) of ``labels``. Raises ValueError, naming ``where``, when more than
    ``max_far_fraction`` of the points lie farther than ``max_distance_mm`` from any labelled voxel
    (the label map does not cover the femur, or is not in the femur's physical space); a few far
    points are expected where the femur mask and the label map were drawn differently."""
    lab = np.asarray(labels.array)
    fg = lab > 0
    if not fg.any():
        raise ValueError(f"{where}: holds no labelled voxel (expected 1 head, 2 neck, 3 trochanter, 4 shaft)")
    # the boundary voxels of the labelled set suffice for points on its surface
    edge = fg & ~ndi.binary_erosion(fg, border_value=0)
    kji = np.argwhere(edge)
    pos = labels.index_to_physical(kji[:, ::-1].astype(float))
    dist, idx = cKDTree(pos).query(np.asarray(points, float))
    far = dist > max_distance_mm
    if far.mean() > max_far_fraction:
        raise ValueError(
            f"{where}: {100 * far.mean():.1f} % of the femur's surface points lie more than "
            f"{max_distance_mm} mm from any labelled voxel (median {np.median(dist):.2f} mm): the label map "
            "must cover the whole femur, in the same physical (LPS) space as the template's HR scan"
        )
    out = lab[tuple(kji[idx].T)].astype(np.uint8)
    unknown = sorted(set(np.unique(out).tolist()) - set(REGION_NAMES))
    if unknown:
        raise ValueError(
            f"{where}: label value(s) {unknown} are not regions; use 1 head, 2 neck, 3 trochanter, 4 shaft (0 background)"
        )
    return out


def build_template(subject: str, femur: Volume, labels: Volume, n_points: int, seed: int, surface_voxel_mm: float,
                   label_source: str, bone_ml: float, quantile: float) -> Template:  # fmt: skip
    """The labelled surface cloud of one template subject (``labels``: its region label map)."""
    cloud = mask_points(femur, n_points, seed=seed, surface_voxel_mm=surface_voxel_mm)
    cloud.labels = label_points(cloud.points, labels, where=f"template {subject}: {label_source}")
    missing = [name for lab, name in REGION_NAMES.items() if not np.any(cloud.labels == lab) and name != "shaft"]
    if missing:
        raise ValueError(f"template {subject}: no surface point is labelled {', '.join(missing)} in {label_source}")
    return Template(subject, bone_ml, quantile, label_source, cloud)


def save_templates(templates: list[Template], path) -> None:
    """All templates in one ``.npz`` (points, normals, labels per template, and a JSON index)."""
    from .atomic import atomic_file

    arrays = {}
    index = []
    for k, t in enumerate(templates):
        arrays[f"points_{k}"] = t.cloud.points
        arrays[f"normals_{k}"] = t.cloud.normals
        arrays[f"labels_{k}"] = t.cloud.labels
        index.append({"subject": t.subject, "bone_ml": t.bone_ml, "quantile": t.quantile, "label_source": t.label_source})
    arrays["index"] = np.array(json.dumps(index))
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def load_templates(path) -> list[Template]:
    with np.load(path) as z:
        index = json.loads(str(z["index"]))
        return [
            Template(e["subject"], e["bone_ml"], e["quantile"], e["label_source"],
                     PointCloud(z[f"points_{k}"], z[f"normals_{k}"], z[f"labels_{k}"]))  # fmt: skip
            for k, e in enumerate(index)
        ]


def templates_figure(templates: list[Template], path) -> None:
    """Each template's labelled points seen from the front (x, z) and from above (x, y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_file

    n = len(templates)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 7.2), squeeze=False)
    for k, t in enumerate(templates):
        p, lab = t.cloud.points, t.cloud.labels
        colours = np.array([REGION_COLOURS.get(int(v), "#000000") for v in lab])
        for row, (i, j, names) in enumerate(((0, 2, ("x (R→L) mm", "z (I→S) mm")), (0, 1, ("x (R→L) mm", "y (A→P) mm")))):
            ax = axes[row, k]
            # far points first, so the near side is on top
            depth = p[:, 1] if row == 0 else -p[:, 2]
            order = np.argsort(-depth)
            ax.scatter(p[order, i], p[order, j], c=colours[order], s=2, linewidths=0)
            ax.set_aspect("equal")
            ax.set_xlabel(names[0])
            ax.set_ylabel(names[1])
            if row == 1:
                ax.invert_yaxis()
        axes[0, k].set_title(f"{t.subject}: {t.bone_ml:.2f} mL (q = {t.quantile:.2f})\nlabels: {t.label_source}", fontsize=8)
    handles = [plt.Line2D([], [], ls="", marker="o", color=REGION_COLOURS[k], label=v) for k, v in REGION_NAMES.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
