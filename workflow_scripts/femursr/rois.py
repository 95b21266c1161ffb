"""Standardized ROIs in the femoral head, neck and trochanter (paper section 3.1, steps 2 and 3;
their morphometry, step 4, is :mod:`femursr.roimetrics`).

Placement (:func:`place_from_outline`): the surface of a volume's femur outline is sampled
(:func:`femursr.pointcloud.mask_points`), the template nearest in bone volume is matched onto it
(centroids, RANSAC on FPFH, ICP with scaling), the template's labels are carried over by nearest
neighbour, and each region's centre is the mean of its points. Optionally (``refine_radius`` > 0,
an addition to the paper) each region's centre is then taken after one more ICP with scaling of
the template points within ``refine_radius`` (in units of the subject cloud's RMS radius) of that
region: a similarity cannot fit a template whose neck-shaft angle differs from the subject's
everywhere at once, and the local fit moves the region borders onto the subject's anatomy.

ROIs (:func:`roi_boxes`): cubes of ``edge_vox`` voxels of the evaluated grid, centred within half
a voxel of the region centres. A cube that leaves the volume or the femur is not moved or
clipped: the fractions of its voxels outside the volume and outside the femur mask are reported,
and the morphometry counts only the voxels inside both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .geometry import REGION_IDS, REGION_NAMES
from .pointcloud import MatchParams, PointCloud, Similarity, mask_points, match, region_centres, to_open3d, transfer_labels
from .templates import REGION_COLOURS, Template, nearest_template
from .volume import Volume, take_plane

#: the regions that get an ROI (the shaft does not)
ROI_REGIONS = {k: v for k, v in REGION_NAMES.items() if v != "shaft"}

@dataclass
class Placement:
    """Where one volume's ROIs go: the template used, the match, the region centres (LPS mm), and
    the subject's surface cloud with the transferred labels."""

    template: str
    template_bone_ml: float
    bone_ml: float
    match: dict
    centres: dict  # region -> (3,) mm: the ROI centres (refined when refine_radius > 0)
    centres_global: dict  # region -> (3,) mm after the global match only
    cloud: PointCloud

    def to_dict(self) -> dict:
        return {
            "template": self.template,
            "template_bone_ml": self.template_bone_ml,
            "bone_ml": self.bone_ml,
            "match": self.match,
            "centres_mm": {k: np.asarray(v).tolist() for k, v in self.centres.items()},
            "centres_global_mm": {k: np.asarray(v).tolist() for k, v in self.centres_global.items()},
        }


def refine_centres(template_moved: np.ndarray, template_labels: np.ndarray, target: PointCloud, radius: float,
                   distances=(0.04, 0.02), iterations: int = 100) -> dict[str, np.ndarray]:  # fmt: skip
    """Region centres after a local ICP with scaling per region (see the module docstring).

    ``template_moved``: the template's points after the global match; ``radius`` and
    ``distances`` (ICP correspondence distances) are in units of the target's RMS radius."""
    from open3d.pipelines import registration as reg

    pts = target.points
    rms = float(np.sqrt(((pts - pts.mean(0)) ** 2).sum(1).mean()))
    tgt = to_open3d(pts)
    out = {}
    for lab, name in ROI_REGIONS.items():
        own = template_labels == lab
        if not own.any():
            continue
        centre = template_moved[own].mean(0)
        near = np.linalg.norm(template_moved - centre, axis=1) < radius * rms
        m = np.eye(4)
        for d in distances:
            icp = reg.registration_icp(
                to_open3d(template_moved[near]), tgt, d * rms, m, reg.TransformationEstimationPointToPoint(True),
                reg.ICPConvergenceCriteria(relative_fitness=1e-9, relative_rmse=1e-9, max_iteration=iterations),
            )  # fmt: skip
            m = np.asarray(icp.transformation)
        labels = transfer_labels(Similarity.from_matrix(m).apply(template_moved), template_labels, pts)
        c = region_centres(pts, labels, {lab: name})
        if name in c:
            out[name] = c[name]
    return out


def place_from_outline(outline: Volume, templates: list[Template], n_points: int, surface_voxel_mm: float,
                       match_params: MatchParams, refine_radius: float = 0.0, seed: int = 0) -> Placement:  # fmt: skip
    """ROI centres of a volume from its femur outline (see the module docstring)."""
    from .bonemask import volume_ml

    bone_ml = volume_ml(outline)
    if bone_ml == 0:
        raise ValueError("the femur outline is empty: no surface to place ROIs on")
    cloud = mask_points(outline, n_points, seed=seed, surface_voxel_mm=surface_voxel_mm)
    t = templates[nearest_template(bone_ml, templates)]
    res = match(t.cloud, cloud, match_params)
    moved = res.transform.apply(t.cloud.points)
    cloud.labels = transfer_labels(moved, t.cloud.labels, cloud.points)
    glob = region_centres(cloud.points, cloud.labels, ROI_REGIONS)
    centres = refine_centres(moved, t.cloud.labels, cloud, refine_radius) if refine_radius > 0 else dict(glob)
    missing = [n for n in ROI_REGIONS.values() if n not in centres]
    if missing:
        raise ValueError(f"no surface point was labelled {', '.join(missing)} after matching template {t.subject}")
    return Placement(t.subject, t.bone_ml, bone_ml, res.to_dict(), centres, glob, cloud)


@dataclass
class Roi:
    """A cubic ROI: its region, the centre it was placed on (LPS mm), its first voxel (z, y, x)
    and edge (voxels), and the fractions of its voxels outside the volume and outside the femur
    mask (the latter including the former)."""

    region: str
    centre_mm: list
    start_zyx: list
    edge_vox: int
    outside_volume: float
    outside_femur: float

    def slices(self) -> tuple[slice, slice, slice]:
        """The cube's index ranges (may reach outside the array)."""
        return tuple(slice(a, a + self.edge_vox) for a in self.start_zyx)

    def centre_voxel_mm(self, grid: Volume) -> np.ndarray:
        """LPS mm of the cube's geometric centre."""
        c = np.asarray(self.start_zyx, float) + (self.edge_vox - 1) / 2.0
        return grid.index_to_physical(c[::-1])


def roi_boxes(centres: dict, femur: Volume, edge_vox: int) -> list[Roi]:
    """Cubes of ``edge_vox`` voxels of the grid of ``femur`` around each centre (LPS mm), in the
    order of :data:`ROI_REGIONS`; their geometric centre is within half a voxel of the point."""
    f = np.asarray(femur.array)
    out = []
    for name in ROI_REGIONS.values():
        if name not in centres:
            continue
        idx_xyz = femur.physical_to_index(np.asarray(centres[name], float))
        start = np.round(idx_xyz[::-1] - (edge_vox - 1) / 2.0).astype(int)
        inside = [slice(max(0, a), min(n, a + edge_vox)) for a, n in zip(start, f.shape)]
        n_in = int(np.prod([max(0, s.stop - s.start) for s in inside]))
        n_femur = int(np.count_nonzero(f[tuple(inside)])) if n_in else 0
        total = edge_vox**3
        out.append(Roi(name, np.asarray(centres[name], float).tolist(), start.tolist(), int(edge_vox),
                       1.0 - n_in / total, 1.0 - n_femur / total))  # fmt: skip
    return out


def qc_figure(image: Volume, cloud: PointCloud, rois: list[Roi], title: str, path, slab_mm: float = 0.6) -> None:
    """Three orthogonal slices (axial, coronal, sagittal) through each ROI's centre: the volume,
    the surface points within ``slab_mm`` of the slice coloured by their transferred label, and
    every ROI's square where it cuts the slice (the row's own ROI drawn solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .atomic import atomic_file

    sp = np.asarray(image.spacing)  # x, y, z
    pts_idx = image.physical_to_index(cloud.points)  # continuous x, y, z
    labels = cloud.labels if cloud.labels is not None else np.zeros(len(cloud.points), np.uint8)
    colours = np.array([REGION_COLOURS.get(int(v), "#000000") for v in labels])
    planes = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))  # normal axis, (u, v) axes (x, y, z)
    fig, axes = plt.subplots(len(rois), 3, figsize=(11, 3.6 * len(rois)), squeeze=False)
    for row, roi in enumerate(rois):
        c_idx = np.asarray(roi.start_zyx[::-1], float) + (roi.edge_vox - 1) / 2.0  # x, y, z
        for col, (name, normal, (u, v)) in enumerate(planes):
            ax = axes[row, col]
            k = int(np.clip(np.round(c_idx[normal]), 0, image.shape[2 - normal] - 1))
            plane = take_plane(image.array, 2 - normal, k)  # array axes are z, y, x
            # plane axes: (z, y, x) minus the normal; imshow wants rows = v, cols = u
            img = np.asarray(plane, np.float32)  # rows: the v axis, columns: the u axis
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
            near = np.abs(pts_idx[:, normal] - k) * sp[normal] < slab_mm
            ax.scatter(pts_idx[near, u], pts_idx[near, v], c=colours[near], s=3, linewidths=0)
            for other in rois:
                o_idx = np.asarray(other.start_zyx[::-1], float)
                if not (o_idx[normal] <= k < o_idx[normal] + other.edge_vox):
                    continue
                own = other is roi
                ax.add_patch(Rectangle((o_idx[u] - 0.5, o_idx[v] - 0.5), other.edge_vox, other.edge_vox, fill=False,
                                       lw=1.8 if own else 0.8, ls="-" if own else "--", ec=REGION_COLOURS[REGION_IDS[other.region]]))  # fmt: skip
            ax.set_title(f"{roi.region} ROI, {name} slice {k}\noutside volume {100 * roi.outside_volume:.0f} %, "
                         f"outside femur {100 * roi.outside_femur:.0f} %", fontsize=8)  # fmt: skip
            ax.set_xlabel("xyz"[u] + " (voxels)")
            ax.set_ylabel("xyz"[v] + " (voxels)")
    handles = [plt.Line2D([], [], ls="", marker="o", color=REGION_COLOURS[k], label=n) for k, n in REGION_NAMES.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def roi_table_rows(record: dict) -> pd.DataFrame:
    """One row per ROI of a place_rois record: the centre the ROI is placed on (LPS mm), which
    placement it comes from, the fractions of the cube outside the volume and outside the femur,
    the distance (mm) from this volume's own centre of the region to the HR's (0 for the HR, NaN
    when the volume has no placement of its own), the template and the outline fraction."""
    rows = []
    for r in record["rois"]:
        c = r["centre_mm"]
        dist = 0.0 if record["method"] == "HR" else record["own_to_hr_mm"].get(r["region"], float("nan"))
        rows.append({
            "subject": record["subject"], "method": record["method"], "region": r["region"],
            "placed_by": record["placed_by"], "centre_x_mm": c[0], "centre_y_mm": c[1], "centre_z_mm": c[2],
            "own_to_hr_mm": dist, "outside_volume": r["outside_volume"], "outside_femur": r["outside_femur"],
            "template": record["own"]["template"] if record["own"] else "",
            "outline_fraction": record["outline"]["fraction"],
        })  # fmt: skip
    return pd.DataFrame(rows)


def truth_centre_errors(cloud: PointCloud, truth_regions: Volume, centres: dict, where: str = "truth") -> dict:
    """Distance (mm) of each ROI centre to the centre computed the same way from the truth: the
    mean of the same surface points, labelled by the truth region map (:func:`label_points`).
    Returns region -> {"truth_mm": [x, y, z], "distance_mm": d}."""
    from .templates import label_points

    truth = region_centres(cloud.points, label_points(cloud.points, truth_regions, where=where), ROI_REGIONS)
    return {
        name: {"truth_mm": truth[name].tolist(), "distance_mm": float(np.linalg.norm(np.asarray(centres[name]) - truth[name]))}
        for name in ROI_REGIONS.values()
        if name in truth and name in centres
    }
