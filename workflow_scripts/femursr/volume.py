"""Volumes with their geometry, and how they are stored between stages.

A :class:`Volume` is a 3D numpy array indexed (z, y, x) with the ITK/DICOM geometry: ``spacing``
(x, y, z) in mm, ``origin`` = LPS position (mm) of the centre of voxel (0, 0, 0), ``direction``
= 3x3 row-major matrix whose columns are the x, y, z grid axes in LPS. This is SimpleITK's
convention, so ``to_sitk``/``from_sitk`` are exact.

Between stages volumes are stored as NIfTI-1 files. Uncompressed ``.nii`` files are read back
memory-mapped (nibabel), so a patch sampler or a worker touches only the voxels it reads;
``.nii.gz`` is used for small label maps and truth. Files are written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_file


@dataclass
class Volume:
    """A 3D array (z, y, x) with its geometry (spacing (x, y, z) mm, LPS origin, direction)."""

    array: np.ndarray
    spacing: tuple
    origin: tuple
    direction: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.spacing = tuple(float(v) for v in self.spacing)
        self.origin = tuple(float(v) for v in self.origin)
        self.direction = tuple(float(v) for v in np.ravel(self.direction))
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("a Volume needs 3 spacings, 3 origin coordinates and a 3x3 direction")

    @property
    def shape(self):
        return self.array.shape

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.reshape(self.direction, (3, 3))

    def index_to_physical(self, ijk) -> np.ndarray:
        """LPS mm of continuous indices ``ijk`` (..., 3) given in (x, y, z) order."""
        ijk = np.asarray(ijk, float)
        return (ijk * np.asarray(self.spacing)) @ self.direction_matrix.T + np.asarray(self.origin)

    def physical_to_index(self, p) -> np.ndarray:
        """Continuous indices (x, y, z) of LPS points ``p`` (..., 3)."""
        p = np.asarray(p, float) - np.asarray(self.origin)
        return (p @ self.direction_matrix) / np.asarray(self.spacing)

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry with another array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match the volume's {self.array.shape}")
        return replace(self, array=array, meta=dict(self.meta))

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def to_sitk(self) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, meta: dict | None = None) -> "Volume":
        if img.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {img.GetDimension()}D")
        return cls(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection(), meta or {})


def write_volume(vol: Volume, path: str | os.PathLike) -> Path:
    """Write ``vol`` as NIfTI (``.nii`` uncompressed, memory-mappable; ``.nii.gz`` compressed)."""
    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"{path}: volumes are stored as .nii or .nii.gz")
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    with atomic_file(path) as tmp:
        tmp_nii = tmp.with_name(tmp.name.removesuffix(tmp.suffix) + suffix) if suffix == ".nii.gz" else tmp
        sitk.WriteImage(vol.to_sitk(), str(tmp_nii), useCompression=suffix == ".nii.gz")
        if tmp_nii != tmp:
            os.replace(tmp_nii, tmp)
    return path


def read_volume(path: str | os.PathLike, mmap: bool = True) -> Volume:
    """Read a NIfTI volume. Uncompressed files come back memory-mapped (read-only) when ``mmap``.

    The geometry is read by SimpleITK (so it is exactly what SimpleITK wrote and reads); the
    voxels of a ``.nii`` come from nibabel's memory map, transposed to (z, y, x) without a copy.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: volume not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise ValueError(f"{path}: expected a 3D volume, got {reader.GetDimension()}D")
    geom = dict(spacing=reader.GetSpacing(), origin=reader.GetOrigin(), direction=reader.GetDirection())
    if mmap and path.name.endswith(".nii"):
        import nibabel as nib

        img = nib.load(str(path), mmap="r")
        slope, inter = img.dataobj.slope, img.dataobj.inter
        if (slope in (0, 1) or np.isnan(slope)) and (inter == 0 or np.isnan(inter)) and len(img.shape) == 3:
            # nibabel's array is (x, y, z) in Fortran order: its transpose is (z, y, x), C order
            return Volume(img.dataobj.get_unscaled().T, **geom)
    return Volume(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), **geom)
