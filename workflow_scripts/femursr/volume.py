"""Volumes with their geometry, and how they are stored between stages.

A :class:`Volume` is a 3D numpy array indexed (z, y, x) with the ITK/DICOM geometry: ``spacing``
(x, y, z) in mm, ``origin`` = LPS position (mm) of the centre of voxel (0, 0, 0), ``direction``
= 3x3 row-major matrix whose columns are the x, y, z grid axes in LPS. This is SimpleITK's
convention, so ``to_sitk``/``from_sitk`` are exact.

Between stages volumes are stored as NIfTI-1 files. Uncompressed ``.nii`` files are read back
memory-mapped (nibabel), so a patch sampler or a worker touches only the voxels it reads;
``.nii.gz`` is used for small label maps and truth. Files are written atomically.

Volumes of the paper's scale (an HR-pQCT of ~1.4 G voxels is 5.6 GB as float32) are processed
in slabs along z: :class:`VolumeWriter` writes a ``.nii`` slab by slab, :func:`read_slab` copies
a slab out of a memory-mapped volume and gives the pages it read back to the system, so that a
pass over the whole volume holds one slab, not the volume, in this process's memory.
"""

from __future__ import annotations

import ctypes
import io
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import _umask, atomic_file

# voxels per slab of the slab-wise passes (32 Mi: 128 MB of float32); read at call time, so a
# test or benchmark can change it
SLAB_VOXELS = 1 << 25


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


def _geometry_reader(path: Path) -> sitk.ImageFileReader:
    """A SimpleITK reader of ``path`` with its header read (a 3D volume, or a clear error)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: volume not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise ValueError(f"{path}: expected a 3D volume, got {reader.GetDimension()}D")
    return reader


def read_grid(path: str | os.PathLike) -> Volume:
    """The geometry of a volume file (spacing (x, y, z) mm, LPS origin, direction) without its
    voxels: the array is a zero-cost stand-in of the right (z, y, x) shape."""
    reader = _geometry_reader(Path(path))
    shape = tuple(reversed(reader.GetSize()))
    return Volume(np.broadcast_to(np.uint8(0), shape), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def read_volume(path: str | os.PathLike, mmap: bool = True) -> Volume:
    """Read a NIfTI volume. Uncompressed files come back memory-mapped (read-only) when ``mmap``.

    The geometry is read by SimpleITK (so it is exactly what SimpleITK wrote and reads); the
    voxels of a ``.nii`` come from nibabel's memory map, transposed to (z, y, x) without a copy.
    """
    path = Path(path)
    reader = _geometry_reader(path)
    geom = dict(spacing=reader.GetSpacing(), origin=reader.GetOrigin(), direction=reader.GetDirection())
    if mmap and path.name.endswith(".nii"):
        import nibabel as nib

        img = nib.load(str(path), mmap="r")
        slope, inter = img.dataobj.slope, img.dataobj.inter
        if (slope in (0, 1) or np.isnan(slope)) and (inter == 0 or np.isnan(inter)) and len(img.shape) == 3:
            # nibabel's array is (x, y, z) in Fortran order: its transpose is (z, y, x), C order
            return Volume(img.dataobj.get_unscaled().T, **geom)
    return Volume(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), **geom)


def nonzero_box(array: np.ndarray, margin=0) -> tuple[slice, slice, slice] | None:
    """The (z, y, x) slices of the bounding box of the nonzero voxels of ``array``, grown by
    ``margin`` voxels (one number, or one per axis) and clipped to the array; ``None`` when
    ``array`` is all zero."""
    a = np.asarray(array) != 0
    margins = np.broadcast_to(np.asarray(margin, int), (3,))
    box = []
    for ax in range(3):
        idx = np.flatnonzero(a.any(axis=tuple(j for j in range(3) if j != ax)))
        if idx.size == 0:
            return None
        box.append(slice(max(0, int(idx[0] - margins[ax])), min(a.shape[ax], int(idx[-1] + 1 + margins[ax]))))
    return tuple(box)


def crop(vol: Volume, box) -> Volume:
    """The part of ``vol`` inside ``box`` ((z, y, x) slices), with its origin moved to the box."""
    start = [b.start for b in box]  # z, y, x
    origin = vol.index_to_physical(np.asarray(start[::-1], float))
    return Volume(np.ascontiguousarray(np.asarray(vol.array)[box]), vol.spacing, tuple(origin), vol.direction)


# ------------------------------------------------------------------------------ slab-wise
def slab_thickness(shape, slab_voxels: int | None = None, multiple: int = 1) -> int:
    """Slices (along z, axis 0) per slab of ``shape`` so that a slab holds at most about
    ``slab_voxels`` voxels (default :data:`SLAB_VOXELS`); at least one slice and a multiple of
    ``multiple``."""
    limit = SLAB_VOXELS if slab_voxels is None else slab_voxels
    plane = max(1, int(np.prod(shape[1:])))
    n = max(1, int(limit // plane)) // multiple * multiple
    return max(int(multiple), n)


def slab_ranges(n: int, thickness: int):
    """(z0, z1) of consecutive slabs of ``thickness`` slices covering ``range(n)``."""
    return [(z0, min(z0 + thickness, n)) for z0 in range(0, n, max(1, int(thickness)))]


_MADV_DONTNEED = 4  # Linux
_libc = None


def _release(view: np.ndarray) -> None:
    """Give back the pages of ``view``, a part of a shared memory map (np.memmap opened ``r`` or
    ``r+``), that this process holds: they stay in the system's page cache, so nothing is lost,
    but no longer count in this process's resident memory. A no-op for anything else."""
    global _libc
    if not isinstance(view, np.memmap) or getattr(view, "mode", None) not in ("r", "r+", "w+") or not sys.platform.startswith("linux"):
        return
    if not view.flags.c_contiguous or view.nbytes == 0:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    addr = view.__array_interface__["data"][0]
    start = -(-addr // page) * page  # whole pages inside the view only
    end = (addr + view.nbytes) // page * page
    if end <= start:
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.madvise(start, end - start, _MADV_DONTNEED)


def read_slab(array: np.ndarray, z0: int, z1: int) -> np.ndarray:
    """A copy of ``array[z0:z1]`` in memory. When ``array`` is memory-mapped, the pages just read
    are given back to the system (see :func:`_release`), so that reading a whole volume slab by
    slab holds one slab in memory, not the volume."""
    view = array[z0:z1]
    out = np.array(view)
    _release(view)
    return out


def value_range(array: np.ndarray, slab_voxels: int | None = None) -> tuple[float, float]:
    """(min, max) of ``array`` (NaN if it holds NaN), read slab by slab (see :func:`read_slab`)."""
    if array.size == 0:
        return 0.0, 0.0
    lo, hi = [], []
    for z0, z1 in slab_ranges(array.shape[0], slab_thickness(array.shape, slab_voxels)):
        view = array[z0:z1]
        lo.append(np.min(view))
        hi.append(np.max(view))
        _release(view)
    return float(np.min(lo)), float(np.max(hi))


def take_plane(array: np.ndarray, axis: int, index: int, slab_voxels: int | None = None) -> np.ndarray:
    """``np.take(array, index, axis)`` of a (z, y, x) array, read slab by slab along z (a y or x
    plane of a memory-mapped volume touches every page of it; see :func:`read_slab`)."""
    if axis == 0:
        return read_slab(array, index, index + 1)[0]
    parts = []
    for z0, z1 in slab_ranges(array.shape[0], slab_thickness(array.shape, slab_voxels)):
        view = array[z0:z1]
        parts.append(np.take(view, index, axis=axis))
        _release(view)
    return np.concatenate(parts, axis=0)


NIFTI1_MAX_DIM = 32767


class VolumeWriter:
    """A NIfTI-1 volume (``.nii``) written slab by slab along z, never whole in memory.

    ``w[z0:z1] = block`` writes slices z0..z1-1 (a (z, y, x) block, cast to ``dtype``); ``w[k] =
    plane`` writes one slice. The header is the one :func:`write_volume` writes for the same
    geometry and dtype (SimpleITK writes it for a 2 x 2 x 2 stand-in; only the dimensions are set
    here), so the file reads back, with :func:`read_volume` or SimpleITK, like one written whole.
    Voxels go by positioned writes (no memory map: what is written does not stay in this
    process's memory) to a temporary file beside ``path``; :meth:`commit` (or leaving a ``with``
    block without error) checks that every slice was written and renames it into place;
    :meth:`abort` (or an error in the block) removes it. ``array`` is a read-only memory map of
    the voxels written, valid before and after the rename.
    """

    def __init__(self, path, shape, dtype, spacing, origin, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
        self.path = Path(path)
        if not self.path.name.endswith(".nii"):
            raise ValueError(f"{self.path}: a volume written slab by slab is an uncompressed .nii")
        self.shape = tuple(int(v) for v in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"{self.path}: a volume needs 3 dimensions of at least 1, got {shape}")
        if max(self.shape) > NIFTI1_MAX_DIM:
            raise ValueError(f"{self.path}: NIfTI-1 holds at most {NIFTI1_MAX_DIM} voxels along an axis, got {self.shape}")
        self.dtype = np.dtype(dtype).newbyteorder("<")
        geom = Volume(np.zeros((2, 2, 2), self.dtype.newbyteorder("=")), spacing, origin, direction)
        self.spacing, self.origin, self.direction = geom.spacing, geom.origin, geom.direction
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".nii", dir=self.path.parent)
        self._tmp = Path(name)
        self._fd = fd
        self._written = np.zeros(self.shape[0], bool)
        self._array = None
        self._state = "open"  # then "committed" or "aborted"
        try:
            self._offset = self._write_header(geom)
            os.ftruncate(fd, self._offset + int(np.prod(self.shape)) * self.dtype.itemsize)
        except BaseException:
            self.abort()
            raise

    ndim = 3

    def _write_header(self, geom: Volume) -> int:
        import nibabel as nib

        stand_in = self._tmp.with_name(self._tmp.name + ".header.nii")
        try:
            sitk.WriteImage(geom.to_sitk(), str(stand_in))
            raw = stand_in.read_bytes()
        finally:
            stand_in.unlink(missing_ok=True)
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
        dim = hdr["dim"].copy()
        dim[1:4] = self.shape[::-1]  # x, y, z
        hdr["dim"] = dim
        offset = int(hdr["vox_offset"])
        block = hdr.binaryblock + raw[len(hdr.binaryblock) : offset]  # the header, then the (empty) extension flag
        self._pwrite(block, 0)
        return offset

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def __setitem__(self, key, block):
        nz, ny, nx = self.shape
        if isinstance(key, (int, np.integer)):
            k = int(key) + (nz if key < 0 else 0)
            z0, z1, want = k, k + 1, (ny, nx)
        elif isinstance(key, slice) and key.step in (None, 1):
            z0, z1, _ = key.indices(nz)
            want = (z1 - z0, ny, nx)
        else:
            raise IndexError(f"{self.path}: a VolumeWriter takes a slice index or a range of slices, not {key!r}")
        if not 0 <= z0 < z1 <= nz:
            raise IndexError(f"{self.path}: slices {z0}:{z1} outside 0:{nz}")
        if self._state != "open":
            raise RuntimeError(f"{self.path}: the file is {self._state}, no more slices can be written")
        data = np.ascontiguousarray(np.broadcast_to(np.asarray(block), want), dtype=self.dtype)
        self._pwrite(data, self._offset + z0 * ny * nx * self.dtype.itemsize)
        self._written[z0:z1] = True

    @property
    def array(self) -> np.ndarray:
        """The voxels as a read-only (z, y, x) memory map."""
        if self._state == "aborted":
            raise RuntimeError(f"{self.path}: aborted, nothing was kept")
        if self._array is None:
            self._array = np.memmap(self._tmp if self._state == "open" else self.path, dtype=self.dtype, mode="r",
                                    offset=self._offset, shape=self.shape)  # fmt: skip
        return self._array

    def commit(self) -> Path:
        """Rename the finished file into place (every slice must have been written)."""
        if self._state == "committed":
            return self.path
        if self._state == "aborted":
            raise RuntimeError(f"{self.path}: aborted, nothing to commit")
        missing = np.flatnonzero(~self._written)
        if missing.size:
            self.abort()
            raise RuntimeError(f"{self.path}: {missing.size} slices never written (e.g. slice {missing[0]})")
        os.close(self._fd)
        os.chmod(self._tmp, 0o666 & ~_umask())
        os.replace(self._tmp, self.path)
        self._state = "committed"
        return self.path

    def abort(self) -> None:
        """Remove the temporary file; nothing appears at ``path``."""
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False
