"""Figures for people: the synthetic-subject preview (LR and HR slices with region labels)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .atomic import atomic_file  # noqa: E402
from .geometry import REGION_NAMES  # noqa: E402

REGION_COLOURS = ["#00000000", "#e6194b", "#3cb44b", "#4363d8", "#f58231"]


def read_series(folder) -> sitk.Image:
    """Read the single DICOM series in ``folder`` with SimpleITK (HU, LPS geometry)."""
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    if not names:
        raise FileNotFoundError(f"{folder}: no DICOM series found")
    reader.SetFileNames(names)
    return reader.Execute()


def _slice(img: sitk.Image, point, plane: str):
    """2D array and its extent (mm) through physical ``point`` in an axial or coronal plane."""
    arr = sitk.GetArrayViewFromImage(img)
    idx = img.TransformPhysicalPointToIndex([float(v) for v in point])
    sp = img.GetSpacing()
    org = img.GetOrigin()
    nz, ny, nx = arr.shape
    if plane == "axial":
        k = int(np.clip(idx[2], 0, nz - 1))
        a = arr[k]
        ext = (org[0] - sp[0] / 2, org[0] + (nx - 0.5) * sp[0], org[1] + (ny - 0.5) * sp[1], org[1] - sp[1] / 2)
        return a, ext
    j = int(np.clip(idx[1], 0, ny - 1))
    a = arr[:, j, :]
    ext = (org[0] - sp[0] / 2, org[0] + (nx - 0.5) * sp[0], org[2] - sp[2] / 2, org[2] + (nz - 0.5) * sp[2])
    return a, ext


def subject_preview(lr_dir, hr_dir, truth_dir, out_png, title: str = "") -> None:
    """Axial and coronal slices through the femoral head centre: LR (clinical CT, its own
    frame), HR (HR-pQCT), and HR with the truth region labels. Written to ``out_png``."""
    truth_dir = Path(truth_dir)
    rec = json.loads((truth_dir / "subject.json").read_text())
    lr = read_series(lr_dir)
    hr = read_series(hr_dir)
    reg = sitk.ReadImage(str(truth_dir / "regions.nii.gz"))
    c_hr = rec["pose"]["head_centre_hr"]
    c_lr = rec["pose"]["head_centre_lr"]
    cmap = ListedColormap(REGION_COLOURS)
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.6), constrained_layout=True)
    for row, plane in enumerate(("axial", "coronal")):
        a, e = _slice(lr, c_lr, plane)
        origin = "upper" if plane == "axial" else "lower"
        axes[row, 0].imshow(a, cmap="gray", vmin=-300, vmax=1500, extent=e, origin=origin)
        axes[row, 0].set_title(f"clinical CT ({plane}, {lr.GetSpacing()[0]:.2f} x {lr.GetSpacing()[1]:.2f} x {lr.GetSpacing()[2]:.2f} mm)")
        h, e = _slice(hr, c_hr, plane)
        axes[row, 1].imshow(h, cmap="gray", vmin=-300, vmax=1800, extent=e, origin=origin)
        axes[row, 1].set_title(f"HR-pQCT ({plane}, {hr.GetSpacing()[0]:.2f} mm)")
        r, e = _slice(reg, c_hr, plane)
        axes[row, 2].imshow(h, cmap="gray", vmin=-300, vmax=1800, extent=e, origin=origin)
        axes[row, 2].imshow(r, cmap=cmap, vmin=0, vmax=4, alpha=0.45, extent=e, origin=origin, interpolation="nearest")
        axes[row, 2].set_title("HR with truth regions")
        for ax in axes[row]:
            ax.set_xlabel("x (mm, patient left +)")
            ax.set_ylabel("y (mm, posterior +)" if plane == "axial" else "z (mm, superior +)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=REGION_COLOURS[k]) for k in REGION_NAMES]
    axes[0, 2].legend(handles, list(REGION_NAMES.values()), loc="lower right", fontsize=8)
    fig.suptitle(title or f"{rec['subject']}: left proximal femur phantom, LR pose rotated {rec['pose']['rotation_deg']:.1f} deg")
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
