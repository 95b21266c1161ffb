"""Training data: axial LR/HR patch pairs of the prepared volumes, centred in the femur.

Paper section 3.1: patches of the axial slices (512 x 512 px in the study), centred on a random
voxel inside the femur, augmented by rotation and flipping; 2D models see the slice alone, 2.5D
models the slice and ``neighbours`` slices on each side as channels (centre slice at channel
``C // 2``; beyond the first and last slice the edge slice is repeated). Parts of a patch outside
the volume are 0, the value of the masked background.

Sample ``i`` of epoch ``e`` is a function of ``(seed, stream, e, i)`` alone (its own random
generator), so a DataLoader gives the same batches whatever its number of workers, and a run
resumed in the middle of an epoch sees exactly the samples it would have seen. A
:class:`PatchDataset` is therefore indexed by ``(epoch, i)`` keys, which :class:`EpochSampler`
yields.

Volumes are opened lazily, in the process that reads them (each DataLoader worker), as memory
maps of the uncompressed ``.nii`` files: a patch reads only its own voxels. The femur voxels are
indexed once, in the main process, as runs along x (:class:`FemurVoxels`: a few bytes per run, a
solid femur has one or two runs per image row), and that index goes to the workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..volume import read_volume

log = logging.getLogger("femursr.sr.data")

#: a separate random stream per use of the sampler
STREAMS = {"train": 0, "validation": 1}


@dataclass(frozen=True)
class SubjectFiles:
    """The prepared volumes of one subject: LR on the HR grid, HR, femur mask (same grid)."""

    subject: str
    lr: str
    hr: str
    mask: str


class FemurVoxels:
    """The voxels of a binary mask, stored as runs along x.

    Run ``r`` covers ``x0[r] ... x0[r] + length - 1`` in image row ``(z[r], y[r])``; ``ends`` is
    the cumulative voxel count, so voxel ``k`` (0 <= k < :attr:`total`, in z, y, x order) is
    found by a binary search.
    """

    def __init__(self, shape, z, y, x0, length):
        self.shape = tuple(int(v) for v in shape)
        self.z = np.asarray(z, np.int32)
        self.y = np.asarray(y, np.int32)
        self.x0 = np.asarray(x0, np.int32)
        self.ends = np.cumsum(np.asarray(length, np.int64))

    @classmethod
    def from_mask(cls, mask: np.ndarray, chunk: int = 32) -> "FemurVoxels":
        """Index the nonzero voxels of ``mask`` (z, y, x), ``chunk`` slices at a time."""
        nz, ny, nx = mask.shape
        parts = []
        for z0 in range(0, nz, chunk):
            m = np.asarray(mask[z0 : z0 + chunk]) != 0
            edge = np.zeros((m.shape[0], ny, nx + 2), np.int8)
            edge[:, :, 1:-1] = m
            d = np.diff(edge, axis=2)
            zs, ys, xs = np.nonzero(d == 1)  # row-major order: starts and ends pair up per row
            xe = np.nonzero(d == -1)[2]
            parts.append((zs + z0, ys, xs, xe - xs))
        cat = [np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, np.int64) for i in range(4)]
        return cls(mask.shape, *cat)

    @property
    def total(self) -> int:
        """Number of voxels in the mask."""
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def nbytes(self) -> int:
        return self.z.nbytes + self.y.nbytes + self.x0.nbytes + self.ends.nbytes

    def voxel(self, k: int) -> tuple[int, int, int]:
        """The ``k``-th voxel (z, y, x) of the mask."""
        if not 0 <= k < self.total:
            raise IndexError(f"voxel {k} of a mask with {self.total} voxels")
        r = int(np.searchsorted(self.ends, k, side="right"))
        before = int(self.ends[r - 1]) if r else 0
        return int(self.z[r]), int(self.y[r]), int(self.x0[r]) + (k - before)

    def slices(self) -> np.ndarray:
        """Indices of the axial slices that hold at least one voxel, ascending."""
        return np.unique(self.z)


def index_subject(files: SubjectFiles) -> FemurVoxels:
    """Check that the LR, HR and femur mask of a subject share one grid, and index its femur.

    The mask is read once (a ``.nii.gz`` is decompressed here, in the main process)."""
    lr, hr, mask = (read_volume(p) for p in (files.lr, files.hr, files.mask))
    for name, vol, path in (("HR", hr, files.hr), ("femur mask", mask, files.mask)):
        if not lr.same_grid(vol):
            raise ValueError(
                f"subject {files.subject}: the {name} {path} (shape {vol.shape}, spacing {vol.spacing}) is not "
                f"on the grid of the LR {files.lr} (shape {lr.shape}, spacing {lr.spacing}); rerun this subject's preprocessing"
            )
    for path, vol in ((files.lr, lr), (files.hr, hr)):
        if not isinstance(vol.array, np.memmap):
            log.warning("subject %s: %s is not memory-mapped (compressed?); each DataLoader worker will hold it whole", files.subject, path)
    femur = FemurVoxels.from_mask(mask.array)
    if femur.total == 0:
        raise ValueError(f"subject {files.subject}: the femur mask {files.mask} is empty; check its preprocessing (femur_mask rule)")
    return femur


def neighbour_slices(z: int, neighbours: int, depth: int) -> np.ndarray:
    """Slice indices of the 2.5D stack around ``z``: z - n ... z + n, edge slices repeated."""
    return np.clip(np.arange(z - neighbours, z + neighbours + 1), 0, depth - 1)


def axial_stack(array: np.ndarray, z: int, neighbours: int, y0: int = 0, x0: int = 0, height: int | None = None, width: int | None = None) -> np.ndarray:
    """The (2n + 1, height, width) float32 stack of rows ``y0 ...`` and columns ``x0 ...`` of the
    slices around ``z`` (edge slices repeated); parts outside the volume are 0.

    Reads only those voxels (``array`` may be a memory map)."""
    nz, ny, nx = array.shape
    height = ny if height is None else height
    width = nx if width is None else width
    out = np.zeros((2 * neighbours + 1, height, width), np.float32)
    ya, yb = max(y0, 0), min(y0 + height, ny)
    xa, xb = max(x0, 0), min(x0 + width, nx)
    if ya < yb and xa < xb:
        out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = array[neighbour_slices(z, neighbours, nz), ya:yb, xa:xb]
    return out


@dataclass(frozen=True)
class Draw:
    """What sample (epoch, i) is: subject index, centre voxel (z, y, x), rotations by 90 degrees
    (counter-clockwise in the (y, x) plane) and whether x is flipped after them."""

    subject: int
    z: int
    y: int
    x: int
    rot90: int
    flip: bool


def augment(a: np.ndarray, rot90: int, flip: bool) -> np.ndarray:
    """Rotate (C, H, W) patches by ``rot90`` quarter turns in (H, W), then flip W if ``flip``."""
    a = np.rot90(a, rot90, axes=(1, 2))
    if flip:
        a = a[:, :, ::-1]
    return np.ascontiguousarray(a)


class PatchDataset(Dataset):
    """LR/HR patch pairs around the femur, indexed by ``(epoch, i)``.

    Item: ``lr`` (2n + 1, P, P) and ``hr`` (1, P, P) float32 tensors. ``neighbours`` is 0 for 2D.
    ``stream`` (``train`` or ``validation``) separates the random streams of training and of the
    fixed validation set; ``augment`` applies the random rotation and flip.
    ``femur`` (one :class:`FemurVoxels` per subject) is built with :func:`index_subject` if not given.
    """

    def __init__(self, subjects, patch_px: int, neighbours: int, seed: int, *, stream: str = "train", augment: bool = True, femur=None):
        self.subjects = list(subjects)
        if not self.subjects:
            raise ValueError(f"PatchDataset ({stream}): no subjects")
        self.patch_px = int(patch_px)
        self.neighbours = int(neighbours)
        self.seed = int(seed) % 2**63
        self.stream = STREAMS[stream]
        self.augment = bool(augment)
        self.femur = list(femur) if femur is not None else [index_subject(s) for s in self.subjects]
        self._arrays = {}  # subject index -> (lr, hr) memory maps, opened in the process that reads

    @property
    def channels(self) -> int:
        return 2 * self.neighbours + 1

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = {}  # each worker opens its own memory maps
        return state

    def draw(self, epoch: int, i: int) -> Draw:
        """The random choices of sample ``i`` of ``epoch`` (a function of the seed, epoch and i)."""
        rng = np.random.default_rng([self.stream, self.seed, int(epoch), int(i)])
        j = int(rng.integers(len(self.subjects)))
        z, y, x = self.femur[j].voxel(int(rng.integers(self.femur[j].total)))
        rot, flip = (int(rng.integers(4)), bool(rng.integers(2))) if self.augment else (0, False)
        return Draw(j, z, y, x, rot, flip)

    def volumes(self, j: int):
        """(lr, hr) arrays of subject ``j``, memory-mapped on first use in this process."""
        if j not in self._arrays:
            s = self.subjects[j]
            self._arrays[j] = (read_volume(s.lr).array, read_volume(s.hr).array)
        return self._arrays[j]

    def patch(self, d: Draw) -> tuple[np.ndarray, np.ndarray]:
        """The (lr, hr) arrays of a draw."""
        lr, hr = self.volumes(d.subject)
        p = self.patch_px
        y0, x0 = d.y - p // 2, d.x - p // 2  # the centre voxel lands at (p // 2, p // 2)
        a = axial_stack(lr, d.z, self.neighbours, y0, x0, p, p)
        b = axial_stack(hr, d.z, 0, y0, x0, p, p)
        return augment(a, d.rot90, d.flip), augment(b, d.rot90, d.flip)

    def __getitem__(self, key):
        epoch, i = key
        a, b = self.patch(self.draw(epoch, i))
        return torch.from_numpy(a), torch.from_numpy(b)


class EpochSampler(Sampler):
    """Yields the keys ``(epoch, i)`` for ``i`` in ``start ... stop - 1``."""

    def __init__(self, epoch: int, start: int, stop: int):
        self.epoch, self.start, self.stop = int(epoch), int(start), int(stop)

    def __iter__(self):
        return ((self.epoch, i) for i in range(self.start, self.stop))

    def __len__(self):
        return max(0, self.stop - self.start)
