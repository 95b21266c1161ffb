"""Continuous geometry of a left proximal femur, its pelvis and body, in millimetres.

The femur is described by signed distance functions (negative inside) of a few primitives
(head sphere, elliptical neck cone, trochanteric mass, greater and lesser trochanter, shaft)
joined with a smooth union. Everything is evaluated at arbitrary points, so two acquisitions
with different grids, poses and resolutions sample the *same* object.

Femur frame (the HR frame of the synthetic cohort): LPS-like axes, x towards the patient's
left (lateral for a left femur), y posterior, z superior; the origin is where the neck axis
meets the shaft axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

REGION_NAMES = {1: "head", 2: "neck", 3: "trochanter", 4: "shaft"}
REGION_IDS = {v: k for k, v in REGION_NAMES.items()}

# tissue classes of the truth tissue map
TISSUE_NAMES = {0: "outside", 1: "marrow", 2: "trabecular bone", 3: "cortical bone"}


def _norm(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def smooth_min(a, b, k):
    """Polynomial smooth minimum of two distance fields with blend radius ``k`` (mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def sd_sphere(p, c, r):
    x, y, z = (p[..., i] - np.float32(c[i]) for i in range(3))
    return np.sqrt(x * x + y * y + z * z) - np.float32(r)


def sd_ellipsoid(p, c, radii):
    """Approximate signed distance to an axis-aligned ellipsoid (exact on the axes, a bound elsewhere)."""
    a, b, e = (np.float32(v) for v in radii)
    x, y, z = (p[..., i] - np.float32(c[i]) for i in range(3))
    x0, y0, z0 = x / a, y / b, z / e
    k0 = np.sqrt(x0 * x0 + y0 * y0 + z0 * z0)
    x0 /= a
    y0 /= b
    z0 /= e
    k1 = np.sqrt(x0 * x0 + y0 * y0 + z0 * z0)
    return k0 * (k0 - 1.0) / np.maximum(k1, np.float32(1e-6))


@dataclass
class FemurShape:
    """Parameters of one femur, all lengths in mm (already scaled)."""

    head_radius: float
    neck_length: float  # origin to head centre along the neck axis
    neck_shaft_angle_deg: float
    anteversion_deg: float
    neck_radius_base: float
    neck_radius_head: float
    shaft_radius: float
    scale: float  # overall length scale (anatomy scale x subject size)
    blend: float = 0.0
    cortex_mm: dict = field(default_factory=dict)  # per region, neck split sup/inf
    cortex_min_mm: float = 0.3

    def __post_init__(self):
        s = self.scale
        if not self.blend:
            self.blend = 7.0 * s
        a = np.deg2rad(180.0 - self.neck_shaft_angle_deg)
        av = np.deg2rad(self.anteversion_deg)
        # medial is -x for a left femur; anteversion turns the neck anteriorly (-y)
        self.neck_axis = _norm([-np.sin(a) * np.cos(av), -np.sin(a) * np.sin(av), np.cos(a)])
        self.head_center = self.neck_length * self.neck_axis
        up = np.array([0.0, 0.0, 1.0])
        sup = up - up.dot(self.neck_axis) * self.neck_axis
        self.neck_sup = _norm(sup)  # "superior" direction of the neck cross-section
        self.neck_ant = np.cross(self.neck_axis, self.neck_sup)
        self.neck_frame = np.stack([self.neck_axis, self.neck_sup, self.neck_ant])
        self.neck_start = 0.15 * self.neck_length * self.neck_axis
        self.neck_end = 0.85 * self.neck_length * self.neck_axis
        self.troch_center = np.array([4.0, 2.0, -8.0]) * s
        self.troch_radii = np.array([22.0, 17.0, 30.0]) * s
        self.gt_center = np.array([15.0, 6.0, 14.0]) * s
        self.gt_radii = np.array([12.0, 13.0, 19.0]) * s
        self.lt_center = np.array([-11.0, 10.0, -40.0]) * s
        self.lt_radii = np.array([7.0, 7.0, 9.0]) * s
        self.shaft_top = -8.0 * s
        self.lt_bottom = self.lt_center[2] - self.lt_radii[2]
        # region boundaries
        self.head_plane = -0.62 * self.head_radius  # along the neck axis from the head centre
        self.neck_base = 0.30 * self.neck_length  # along the neck axis from the origin
        self.neck_radial_limit = 1.45 * self.neck_radius_base
        self.shaft_plane = self.lt_bottom  # z below which the region is shaft

    # ------------------------------------------------------------------ distance
    def sdf(self, p: np.ndarray) -> np.ndarray:
        """Signed distance (mm, negative inside) at points ``p`` (..., 3) in the femur frame."""
        p = np.asarray(p, dtype=np.float32)
        d = sd_sphere(p, self.head_center, self.head_radius)
        d = smooth_min(d, self._sd_neck(p), self.blend)
        d = smooth_min(d, sd_ellipsoid(p, self.troch_center, self.troch_radii), self.blend)
        d = smooth_min(d, sd_ellipsoid(p, self.gt_center, self.gt_radii), self.blend)
        d = smooth_min(d, sd_ellipsoid(p, self.lt_center, self.lt_radii), 0.6 * self.blend)
        d = smooth_min(d, self._sd_shaft(p), self.blend)
        return d

    def _sd_neck(self, p):
        axis = self.neck_axis.astype(p.dtype)
        q = p - self.neck_start.astype(p.dtype)
        length = float(np.linalg.norm(self.neck_end - self.neck_start))
        t_ax = q @ axis
        t = np.clip(t_ax / length, 0.0, 1.0)
        r = self.neck_radius_base + (self.neck_radius_head - self.neck_radius_base) * t
        q1 = q @ self.neck_sup.astype(p.dtype)
        q2 = q @ self.neck_ant.astype(p.dtype)
        ax1, ax2 = 1.15 * r, 0.87 * r  # taller than wide, as the real neck
        k0 = np.sqrt((q1 / ax1) ** 2 + (q2 / ax2) ** 2)
        k1 = np.sqrt((q1 / ax1**2) ** 2 + (q2 / ax2**2) ** 2)
        side = k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)
        return np.maximum(side, np.maximum(-t_ax, t_ax - length))

    def _sd_shaft(self, p):
        rho = np.sqrt(p[..., 0] ** 2 + (p[..., 1] / 1.06) ** 2)
        return np.maximum(rho - self.shaft_radius, p[..., 2] - self.shaft_top)

    # ------------------------------------------------------------------ regions
    def region_masks(self, p: np.ndarray) -> dict[str, np.ndarray]:
        """Boolean masks of the four anatomical regions at ``p``; a partition of space.

        head: beyond the head-neck junction plane; neck: between that plane and the neck base
        plane, close to the neck axis; shaft: below the lesser trochanter; trochanter: the rest.
        """
        p = np.asarray(p, dtype=np.float64)
        ax = self.neck_axis
        along_head = (p - self.head_center) @ ax
        t = p @ ax
        radial = np.linalg.norm(p - t[..., None] * ax, axis=-1)
        head = along_head > self.head_plane
        neck = ~head & (t > self.neck_base) & (radial < self.neck_radial_limit)
        shaft = ~head & ~neck & (p[..., 2] < self.shaft_plane)
        troch = ~head & ~neck & ~shaft
        return {"head": head, "neck": neck, "trochanter": troch, "shaft": shaft}

    def region_weights(self, p: np.ndarray, width: float | None = None) -> np.ndarray:
        """Soft region memberships (..., 4) in the order head, neck, trochanter, shaft.

        The logistic blend (``width`` mm) is used to vary trabecular and cortical properties
        smoothly across region borders; it rounds to :meth:`region_masks`.
        """
        w = width if width is not None else 2.5 * self.scale
        p = np.asarray(p, dtype=np.float64)
        ax = self.neck_axis

        def sig(x):
            return 1.0 / (1.0 + np.exp(-np.clip(x / w, -40, 40)))

        along_head = (p - self.head_center) @ ax
        t = p @ ax
        radial = np.linalg.norm(p - t[..., None] * ax, axis=-1)
        h = sig(along_head - self.head_plane)
        n = (1 - h) * sig(t - self.neck_base) * sig(self.neck_radial_limit - radial)
        rest = 1 - h - n
        s = rest * sig(self.shaft_plane - p[..., 2])
        tr = rest - s
        return np.stack([h, n, tr, s], axis=-1)

    def cortex_thickness(self, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Cortical thickness (mm) at surface points ``p``: thin in the head and superior neck,
        thick in the inferior neck (calcar) and the shaft."""
        c = self.cortex_mm
        ax = self.neck_axis
        t = p @ ax
        radial = p - t[..., None] * ax
        rn = radial / np.maximum(np.linalg.norm(radial, axis=-1, keepdims=True), 1e-6)
        w_inf = 0.5 * (1.0 - rn @ self.neck_sup)
        neck_t = c["neck_superior"] + (c["neck_inferior"] - c["neck_superior"]) * w_inf
        th = (
            weights[..., 0] * c["head"]
            + weights[..., 1] * neck_t
            + weights[..., 2] * c["trochanter"]
            + weights[..., 3] * c["shaft"]
        ) * self.scale
        return np.maximum(th, self.cortex_min_mm)

    def bounding_box(self, z_min: float) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned box (mm) that holds the femur above ``z_min``."""
        pts = [
            self.head_center - self.head_radius,
            self.head_center + self.head_radius,
            self.gt_center - self.gt_radii,
            self.gt_center + self.gt_radii,
            self.troch_center - self.troch_radii,
            self.troch_center + self.troch_radii,
            self.lt_center - self.lt_radii,
            self.lt_center + self.lt_radii,
            np.array([-self.shaft_radius, -self.shaft_radius * 1.06, z_min]),
            np.array([self.shaft_radius, self.shaft_radius * 1.06, z_min]),
        ]
        for e in (self.neck_start, self.neck_end):
            pts += [e - 1.2 * self.neck_radius_base, e + 1.2 * self.neck_radius_base]
        pts = np.array(pts)
        lo, hi = pts.min(0), pts.max(0)
        lo[2] = max(lo[2], z_min)
        # the smooth union bulges a little past the primitives
        return lo - 0.3 * self.blend, hi + 0.3 * self.blend


@dataclass
class Pelvis:
    """Acetabulum, ilium, ischium and pubis around the femoral head, in the patient frame (mm)."""

    head_center: np.ndarray  # patient frame
    head_radius: float
    joint_gap: float
    scale: float
    cortex_mm: float

    def sdf(self, p):
        s = self.scale
        c = self.head_center.astype(p.dtype)
        r_in = self.head_radius + self.joint_gap
        r_out = r_in + 9.0 * s
        dist = np.linalg.norm(p - c, axis=-1)
        n_open = _norm([0.7, -0.3, -0.65]).astype(p.dtype)
        cup = np.maximum(dist - r_out, (p - c) @ n_open - 0.25 * r_out)
        d = cup
        d = smooth_min(d, sd_ellipsoid(p, c + np.array([-9, 6, 40]) * s, np.array([8, 34, 38]) * s), 6 * s)
        d = smooth_min(d, sd_ellipsoid(p, c + np.array([-12, 16, -30]) * s, np.array([8, 10, 22]) * s), 6 * s)
        d = smooth_min(d, sd_ellipsoid(p, c + np.array([-28, -12, -12]) * s, np.array([24, 7, 8]) * s), 6 * s)
        # the acetabular cavity holds the head and its cartilage
        return np.maximum(d, r_in - dist)


@dataclass
class Body:
    """Elliptical soft-tissue cylinder of the pelvis/thigh level, in the patient frame (mm)."""

    semi_axes: tuple[float, float]
    fat_mm: float
    centre: tuple[float, float] = (0.0, 0.0)

    def sdf(self, p):
        a, b = self.semi_axes
        x, y = p[..., 0] - np.float32(self.centre[0]), p[..., 1] - np.float32(self.centre[1])
        k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2)
        k1 = np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2)
        return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)


def rotation_matrix(axis, angle_rad) -> np.ndarray:
    """Rotation about a unit ``axis`` by ``angle_rad`` (right-handed)."""
    a = _norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * k @ k


def rotation_angle_deg(rot: np.ndarray) -> float:
    return float(np.rad2deg(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))))
