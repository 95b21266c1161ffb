"""Surface point clouds of binary masks and their similarity matching (paper section 3.1).

* :func:`mask_points`: a mask's surface as a triangle mesh (marching cubes at the half level of
  the mask, block-averaged to about ``surface_voxel_mm``), then ``n`` points sampled uniformly
  over its area (seeded), each with the outward normal of its triangle. Points are LPS mm.
* :func:`match`: the similarity transform (rotation, translation, one scale) that carries a
  template cloud onto a subject's cloud, in the paper's three stages: (1) the centres are aligned
  by translation; (2) a rough registration by RANSAC on FPFH features; (3) ICP with scaling.
  RANSAC that also estimates the scale is unreliable on raw clouds, so both clouds are first put
  into a normalized frame (centroid at 0, RMS radius 1), where RANSAC is rigid; ICP with scaling
  then finds the relative size, and the result is carried back to millimetres. RANSAC is run a
  few times with different seeds (Open3D's generator) and the run whose ICP ends with the
  smallest symmetric surface distance wins.
* :func:`transfer_labels`, :func:`region_centres`: nearest-neighbour label transfer from the
  transformed template onto the subject's points, and the centre of each labelled region.

Open3D (``open3d-cpu``) does the FPFH features, RANSAC and ICP; meshes come from scikit-image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from .volume import Volume, nonzero_box


@dataclass
class Similarity:
    """``p -> scale * R p + t`` (LPS mm), a rotation ``R`` (3x3, det +1), one ``scale``, ``t`` mm."""

    scale: float = 1.0
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def apply(self, p: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(p, float) @ np.asarray(self.rotation).T + np.asarray(self.translation)

    def matrix(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.scale * np.asarray(self.rotation)
        m[:3, 3] = self.translation
        return m

    @classmethod
    def from_matrix(cls, m: np.ndarray) -> "Similarity":
        m = np.asarray(m, float)
        a = m[:3, :3]
        scale = float(np.cbrt(np.linalg.det(a)))
        if scale <= 0:
            raise ValueError("not a similarity: the linear part has a non-positive determinant")
        return cls(scale, a / scale, m[:3, 3].copy())

    def compose(self, inner: "Similarity") -> "Similarity":
        """``self(inner(p))``."""
        return Similarity.from_matrix(self.matrix() @ inner.matrix())

    def inverse(self) -> "Similarity":
        return Similarity.from_matrix(np.linalg.inv(self.matrix()))

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "rotation": np.asarray(self.rotation).tolist(), "translation_mm": np.asarray(self.translation).tolist()}


def rotation_error_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) of the rotation ``a b^T``."""
    c = (np.trace(np.asarray(a) @ np.asarray(b).T) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


# ------------------------------------------------------------------------------------ surfaces
def _block_mean(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Fraction of set voxels of the boolean ``a`` over blocks of ``f`` voxels (edge blocks padded
    with False to full size); no float copy of ``a`` is made."""
    pad = [(0, -n % k) for n, k in zip(a.shape, f)]
    a = np.pad(np.asarray(a, bool), pad)
    s = a.shape
    blocks = a.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2])
    return blocks.sum(axis=(1, 3, 5), dtype=np.float32) / np.float32(np.prod(f))


def surface_mesh(mask: Volume, surface_voxel_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Triangle mesh (vertices LPS mm (n, 3), faces (m, 3)) of the boundary of ``mask.array > 0``.

    The mask is averaged over blocks of about ``surface_voxel_mm`` (0: the mask's own voxels) and
    the mesh is the 0.5 level of that fraction; the array is padded with background, so a mask
    that reaches the edge of the volume (a sawn shaft) gets a closed surface there.
    """
    from skimage.measure import marching_cubes

    arr = np.asarray(mask.array) > 0
    if not arr.any():
        raise ValueError("the mask is empty: no surface")
    sp_zyx = np.asarray(mask.spacing[::-1], float)
    f = tuple(max(1, int(round(surface_voxel_mm / s))) if surface_voxel_mm else 1 for s in sp_zyx)
    # crop to the mask's bounding box (plus one block) before averaging
    box = nonzero_box(arr, f)
    lo = np.array([b.start for b in box])
    hi = np.array([b.stop for b in box])
    frac = _block_mean(arr[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], f)
    frac = np.pad(frac, 1)
    verts, faces, _, _ = marching_cubes(frac, 0.5, allow_degenerate=False)
    # block index b covers voxels b*f .. b*f+f-1: its centre is at voxel b*f + (f-1)/2
    f = np.asarray(f, float)
    vox_zyx = (verts - 1.0) * f + (f - 1.0) / 2.0 + lo
    return mask.index_to_physical(vox_zyx[:, ::-1]), faces.astype(np.int64)


def sample_surface(verts: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniformly distributed over the area of a triangle mesh, and the unit normals
    of their triangles (outward for a mesh of :func:`surface_mesh`), seeded."""
    rng = np.random.default_rng(seed)
    a, b, c = (verts[faces[:, k]] for k in range(3))
    cross = np.cross(b - a, c - a)
    area = np.linalg.norm(cross, axis=1)
    keep = area > 0
    a, b, c, cross, area = a[keep], b[keep], c[keep], cross[keep], area[keep]
    tri = rng.choice(len(area), size=int(n), p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    pts = a[tri] + u[:, None] * (b[tri] - a[tri]) + v[:, None] * (c[tri] - a[tri])
    normals = cross[tri] / area[tri, None]
    return pts, normals


def _orient_outward(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces reordered, if needed, so that the normals point away from the enclosed volume (the
    signed volume of a closed, outward-oriented mesh is positive)."""
    a, b, c = (verts[faces[:, k]] for k in range(3))
    vol = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0
    return faces if vol > 0 else faces[:, ::-1]


@dataclass
class PointCloud:
    """Surface points (LPS mm), outward unit normals, and an integer label per point (0: none)."""

    points: np.ndarray
    normals: np.ndarray
    labels: np.ndarray | None = None

    def save(self, path) -> None:
        from .atomic import atomic_file

        with atomic_file(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, points=self.points, normals=self.normals,
                                    labels=np.zeros(0, np.uint8) if self.labels is None else self.labels)  # fmt: skip

    @classmethod
    def load(cls, path) -> "PointCloud":
        with np.load(path) as z:
            labels = z["labels"]
            return cls(z["points"], z["normals"], labels if labels.size else None)


def mask_points(mask: Volume, n: int, seed: int = 0, surface_voxel_mm: float = 0.0) -> PointCloud:
    """``n`` points sampled uniformly over the surface of ``mask`` (see :func:`surface_mesh`)."""
    verts, faces = surface_mesh(mask, surface_voxel_mm)
    faces = _orient_outward(verts, faces)
    pts, normals = sample_surface(verts, faces, n, seed)
    return PointCloud(pts, normals)


# ------------------------------------------------------------------------------------ matching
@dataclass
class MatchParams:
    """Settings of :func:`match`. Lengths are in units of a cloud's RMS radius (the normalized
    frame), so they fit any anatomy size and voxel size."""

    voxel: float = 0.05  # downsampling voxel of the FPFH stage (0.04 failed more often on unlike femurs)
    normal_radius: float = 2.5  # x voxel, when a cloud has no normals
    feature_radius: float = 6.0  # x voxel: FPFH neighbourhood
    ransac_distance: float = 1.5  # x voxel: inlier distance of RANSAC
    ransac_iterations: int = 50_000
    ransac_confidence: float = 0.999
    ransac_runs: int = 3  # RANSAC runs (seeds seed, seed + 1, ...); the best after ICP is kept
    icp_distances: tuple = (2.0, 1.0, 0.5)  # x voxel: correspondence distances of the ICP rounds
    icp_iterations: int = 100
    max_rmse: float = 0.1  # symmetric RMS distance after ICP above which the match has failed
    seed: int = 0


@dataclass
class MatchResult:
    """The template->subject similarity (mm) and how well it fits.

    ``fitness``: fraction of the subject's points within ``fit_distance_mm`` of the transformed
    template; ``rmse_mm``: RMS of the symmetric nearest-point distances (both directions)."""

    transform: Similarity
    fitness: float
    rmse_mm: float
    fit_distance_mm: float
    runs: list

    def to_dict(self) -> dict:
        d = asdict(self)
        d["transform"] = self.transform.to_dict()
        return d


def _normalizer(points: np.ndarray) -> Similarity:
    """Similarity into the normalized frame: centroid to 0, RMS radius to 1."""
    c = points.mean(0)
    r = float(np.sqrt(((points - c) ** 2).sum(1).mean()))
    if not r > 0:
        raise ValueError("a point cloud of a single point cannot be matched")
    return Similarity(1.0 / r, np.eye(3), -c / r)


def to_open3d(points, normals=None):
    """An Open3D point cloud of ``points`` (n, 3) and, if given, their ``normals``."""
    import open3d as o3d

    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.ascontiguousarray(points, np.float64)))
    if normals is not None:
        pc.normals = o3d.utility.Vector3dVector(np.ascontiguousarray(normals, np.float64))
    return pc


def _symmetric_rmse(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """RMS of the nearest-point distances from a to b and from b to a; and the b->a distances."""
    d_ab = cKDTree(b).query(a)[0]
    d_ba = cKDTree(a).query(b)[0]
    return float(np.sqrt((np.sum(d_ab**2) + np.sum(d_ba**2)) / (len(a) + len(b)))), d_ba


def match(source: PointCloud, target: PointCloud, params: MatchParams | None = None) -> MatchResult:
    """Similarity carrying ``source`` (template) onto ``target`` (subject), both LPS mm.

    Stage 1 aligns the centroids (and, in the normalized frame, the RMS sizes); stage 2 is rigid
    RANSAC on FPFH features of the downsampled normalized clouds; stage 3 is point-to-point ICP
    with scaling on the full normalized clouds at decreasing correspondence distances.
    """
    import open3d as o3d
    from open3d.pipelines import registration as reg

    p = params or MatchParams()
    ns, nt = _normalizer(source.points), _normalizer(target.points)
    src_n, tgt_n = ns.apply(source.points), nt.apply(target.points)
    v = p.voxel

    def prepared(points, normals):
        pc = to_open3d(points, normals)
        down = pc.voxel_down_sample(v)
        if not down.has_normals():
            down.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=p.normal_radius * v, max_nn=30))
        feat = reg.compute_fpfh_feature(down, o3d.geometry.KDTreeSearchParamHybrid(radius=p.feature_radius * v, max_nn=100))
        return pc, down, feat

    src_full, src_down, src_feat = prepared(src_n, source.normals)
    tgt_full, tgt_down, tgt_feat = prepared(tgt_n, target.normals)
    runs = []
    best = None
    for k in range(max(1, p.ransac_runs)):
        o3d.utility.random.seed(int(p.seed) + k)
        ransac = reg.registration_ransac_based_on_feature_matching(
            src_down, tgt_down, src_feat, tgt_feat, False, p.ransac_distance * v,
            reg.TransformationEstimationPointToPoint(False), 3,
            [reg.CorrespondenceCheckerBasedOnEdgeLength(0.9), reg.CorrespondenceCheckerBasedOnDistance(p.ransac_distance * v)],
            reg.RANSACConvergenceCriteria(p.ransac_iterations, p.ransac_confidence),
        )  # fmt: skip
        m = np.asarray(ransac.transformation)
        for d in p.icp_distances:
            icp = reg.registration_icp(
                src_full, tgt_full, d * v, m, reg.TransformationEstimationPointToPoint(True),
                reg.ICPConvergenceCriteria(relative_fitness=1e-9, relative_rmse=1e-9, max_iteration=p.icp_iterations),
            )  # fmt: skip
            m = np.asarray(icp.transformation)
        moved = Similarity.from_matrix(m).apply(src_n)
        rmse_n, _ = _symmetric_rmse(moved, tgt_n)
        runs.append({"seed": int(p.seed) + k, "ransac_fitness": float(ransac.fitness), "icp_fitness": float(icp.fitness), "rmse_normalized": rmse_n})
        if best is None or rmse_n < best[0]:
            best = (rmse_n, m)
    if best[0] > p.max_rmse:
        raise ValueError(
            f"the point clouds could not be matched: after {len(runs)} RANSAC run(s) and ICP the symmetric RMS "
            f"distance is {best[0]:.3f} cloud radii (max_rmse {p.max_rmse}; a good match of two femurs gives "
            "0.02 to 0.05). More ransac_runs or ransac_iterations (evaluation.matching) may help; check that "
            "both surfaces are whole femurs"
        )
    total = nt.inverse().compose(Similarity.from_matrix(best[1])).compose(ns)
    moved = total.apply(source.points)
    rmse, d_ba = _symmetric_rmse(moved, target.points)
    fit_mm = p.icp_distances[-1] * v / nt.scale
    return MatchResult(total, float(np.mean(d_ba <= fit_mm)), rmse, float(fit_mm), runs)


def transfer_labels(template_points: np.ndarray, template_labels: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Label of the nearest template point (already transformed onto the subject) for each point."""
    _, idx = cKDTree(template_points).query(points)
    return np.asarray(template_labels)[idx]


def region_centres(points: np.ndarray, labels: np.ndarray, names: dict[int, str]) -> dict[str, np.ndarray]:
    """Centre (mean, LPS mm) of the points of each label in ``names``; labels with no point are
    left out."""
    out = {}
    for lab, name in names.items():
        sel = labels == lab
        if sel.any():
            out[name] = points[sel].mean(0)
    return out
