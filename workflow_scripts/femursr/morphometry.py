"""Bone morphometry after Hildebrand & Rüegsegger (1997): BV/TV, Tb.Th, Tb.Sp, Tb.N.

Local thickness at a voxel is the diameter of the largest ball that lies inside the phase and
contains the voxel. Balls are centred on the phase voxels with radius equal to the Euclidean
distance from the centre to the nearest voxel of the other phase (``R``); a voxel ``x`` is in
the ball of centre ``c`` when ``|x - c| < R(c)``, and its thickness is ``2 max R(c)``. Only the
centres on the distance ridge are painted (a ball contained in a neighbour's ball is dropped),
which leaves the result unchanged. All lengths are in mm, from the voxel spacing, and
anisotropic spacing is honoured (the balls are balls in mm).

Tb.N follows the convention of the study: ``Tb.N = 1 / (Tb.Th + Tb.Sp)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import edt
import numba
import numpy as np


@numba.njit(cache=True)
def _ridge(dist, mask, sz, sy, sx):
    """Mask of centres whose ball is not inside a 26-neighbour's ball."""
    nz, ny, nx = dist.shape
    out = np.zeros(dist.shape, np.bool_)
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if not mask[z, y, x]:
                    continue
                r = dist[z, y, x]
                keep = True
                for dz in range(-1, 2):
                    zz = z + dz
                    if zz < 0 or zz >= nz:
                        continue
                    for dy in range(-1, 2):
                        yy = y + dy
                        if yy < 0 or yy >= ny:
                            continue
                        for dx in range(-1, 2):
                            xx = x + dx
                            if xx < 0 or xx >= nx or (dz == 0 and dy == 0 and dx == 0):
                                continue
                            step = np.sqrt((dz * sz) ** 2 + (dy * sy) ** 2 + (dx * sx) ** 2)
                            if dist[zz, yy, xx] >= r + step:
                                keep = False
                                break
                        if not keep:
                            break
                    if not keep:
                        break
                if keep:
                    out[z, y, x] = True
    return out


@numba.njit(cache=True)
def _paint(dist, centres, sz, sy, sx, out):
    nz, ny, nx = dist.shape
    for i in range(len(centres)):
        z, y, x = centres[i]
        r = dist[z, y, x]
        r2 = r * r
        d = 2.0 * r
        rz = int(np.ceil(r / sz))
        ry = int(np.ceil(r / sy))
        rx = int(np.ceil(r / sx))
        for dz in range(-rz, rz + 1):
            zz = z + dz
            if zz < 0 or zz >= nz:
                continue
            ez = (dz * sz) ** 2
            if ez >= r2:
                continue
            for dy in range(-ry, ry + 1):
                yy = y + dy
                if yy < 0 or yy >= ny:
                    continue
                ey = ez + (dy * sy) ** 2
                if ey >= r2:
                    continue
                for dx in range(-rx, rx + 1):
                    xx = x + dx
                    if xx < 0 or xx >= nx:
                        continue
                    if ey + (dx * sx) ** 2 < r2 and out[zz, yy, xx] < d:
                        out[zz, yy, xx] = d


def local_thickness(mask: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Local thickness map (mm) of the ``True`` phase of a 3D ``mask`` indexed (z, y, x).

    ``spacing_zyx`` is the voxel size in mm along the array axes. Outside the phase the map is
    0. Everything outside the array counts as the other phase.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"local_thickness needs a 3D mask, got shape {mask.shape}")
    sz, sy, sx = (float(s) for s in spacing_zyx)
    out = np.zeros(mask.shape, np.float32)
    if not mask.any():
        return out
    dist = edt.edt(mask, anisotropy=(sz, sy, sx), black_border=True, parallel=1).astype(np.float64)
    centres = np.argwhere(_ridge(dist, mask, sz, sy, sx))
    _paint(dist, centres, sz, sy, sx, out)
    out[~mask] = 0
    return out


@dataclass
class Morphometry:
    bv_tv: float
    tb_th_mm: float
    tb_sp_mm: float
    tb_n_per_mm: float
    bone_voxels: int
    total_voxels: int


def morphometry(
    bone: np.ndarray,
    volume: np.ndarray,
    spacing_zyx=(1.0, 1.0, 1.0),
    regions: np.ndarray | None = None,
    labels: dict[int, str] | None = None,
) -> dict[str, Morphometry]:
    """Hildebrand morphometry of ``bone`` inside the tissue volume ``volume`` (both boolean).

    Thickness maps are computed once over the whole arrays (bone phase: ``bone & volume``;
    marrow phase: ``volume & ~bone``), then averaged per region, so balls may cross region
    borders as local thickness requires. Returns one :class:`Morphometry` per region label (or
    a single entry ``"all"`` when ``regions`` is None). Lengths in mm, Tb.N in 1/mm.
    """
    bone = np.asarray(bone, bool) & np.asarray(volume, bool)
    marrow = np.asarray(volume, bool) & ~bone
    th = local_thickness(bone, spacing_zyx)
    sp = local_thickness(marrow, spacing_zyx)
    if regions is None:
        regions = np.asarray(volume, np.uint8)
        labels = {1: "all"}
    out = {}
    for lab, name in labels.items():
        r = regions == lab
        tv = int(np.count_nonzero(r & np.asarray(volume, bool)))
        b = r & bone
        m = r & marrow
        bv = int(np.count_nonzero(b))
        tb_th = float(th[b].mean()) if bv else float("nan")
        tb_sp = float(sp[m].mean()) if m.any() else float("nan")
        tb_n = 1.0 / (tb_th + tb_sp) if bv and m.any() else float("nan")
        out[name] = Morphometry(bv / tv if tv else float("nan"), tb_th, tb_sp, tb_n, bv, tv)
    return out
