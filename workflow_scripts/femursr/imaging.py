"""Import of the LR and HR scans: a DICOM folder, a NIfTI/MHA/NRRD file or a Scanco ISQ file
becomes one :class:`~femursr.volume.Volume` (array (z, y, x) float32, spacing (x, y, z) mm,
origin and direction in LPS) with a JSON-serializable report in ``vol.meta``.

DICOM series are checked from their headers (read by pydicom without pixel data) before any
voxel is read, so that a refusal names the tag, the value and the file: several series in one
folder (the caller's SeriesInstanceUID, or else the CT series with the most slices, and the
report says which and why), slices sorted by their position along the slice normal, one
geometry across the slices (Rows, Columns, PixelSpacing, ImageOrientationPatient), no duplicate
positions, no shear between the slice positions and ImageOrientationPatient (gantry tilt), and a
uniform slice spacing. A non-uniform spacing (a missing slice, two stacks joined) is refused with
the spacings found, or, when the caller allows it, the stack is interpolated linearly along the
slice normal onto a uniform spacing. SimpleITK's series reader would accept such stacks silently,
which is why the voxels are read slice by slice here (pydicom, RescaleSlope and RescaleIntercept
of each slice applied; SimpleITK/GDCM for pixel encodings pydicom cannot decode), and the first
slice is cross-checked against SimpleITK's reading of the same file.

Scanco files: ISQ (512-byte ``CTDATA-HEADER_V1`` header, int16 voxels, dimensions in pixels and
micrometres) is read here; values are converted to HU when the calibration header gives mu_water,
else left in Scanco native units (the report says which). AIM files are refused with what to do.

Patient identifiers (name, ID, birth date) are deliberately not copied into the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from . import __version__
from .atomic import atomic_file
from .volume import Volume, VolumeWriter, read_slab, value_range, write_volume

log = logging.getLogger(__name__)

SITK_FORMATS = {".nii": "nifti", ".nii.gz": "nifti", ".mha": "metaimage", ".mhd": "metaimage", ".nrrd": "nrrd", ".nhdr": "nrrd"}
DICOM_SUFFIXES = {"", ".dcm", ".dicom", ".ima"}
GEOMETRY_ATOL = 1e-4  # mm for PixelSpacing, unitless for direction cosines, across the slices of a series
ORTHONORMAL_ATOL = 1e-3
ISQ_MAGIC = b"CTDATA-HEADER_V1"
ISQ_BLOCK = 512
MU_WATER_RANGE = (0.05, 5.0)  # 1/cm: a plausible linear attenuation of water for X-ray CT


class ScanImportError(ValueError):
    """A scan that cannot be imported as it is.

    The message names the scan (``label``, e.g. ``subject S07 LR``), what is wrong, the file or
    folder, and the fix. The parts are also kept as attributes ``label``, ``path`` and ``fix``.
    """

    def __init__(self, message: str, *, label: str = "", path: str = "", fix: str = ""):
        super().__init__(message)
        self.label, self.path, self.fix = label, str(path), fix


def _error(label: str, path, problem: str, fix: str = "") -> ScanImportError:
    msg = f"{label or 'scan'}: {problem} [{path}]"
    if fix:
        msg += f". Fix: {fix}"
    return ScanImportError(msg, label=label, path=str(path), fix=fix)


# --------------------------------------------------------------------------------------------
# entry points


def import_scan(
    path: str | os.PathLike,
    *,
    label: str = "",
    series_uid: str | None = None,
    allow_resample_nonuniform: bool = False,
    spacing_tolerance_mm: float = 0.01,
    out=None,
) -> Volume:
    """Import one scan as a :class:`Volume` in LPS geometry, values float32 (HU for CT).

    ``path``: a DICOM folder (searched recursively), one DICOM file (its series is imported), a
    ``.nii``/``.nii.gz``/``.mha``/``.mhd``/``.nrrd``/``.nhdr`` file (SimpleITK), or a Scanco
    ``.isq`` file. ``label`` names the scan in messages and the report (``"subject S07 LR"``).
    ``series_uid`` picks a DICOM series; without it the CT series with the most slices is taken.
    Slice positions must lie on a uniform grid within ``spacing_tolerance_mm``; if they do not,
    the scan is refused, or interpolated onto a uniform spacing when ``allow_resample_nonuniform``.

    ``out`` says where the voxels of a DICOM series or an ISQ file go: None (a new array in
    memory) or a callable ``out(shape_zyx, spacing, origin, direction)`` returning an array-like
    that takes slice assignment, such as a :class:`~femursr.volume.VolumeWriter` (the volume's
    array is then its ``array``); :func:`import_to_file` streams the slices into its output file
    that way, so a paper-scale HR (5.6 GB as float32) is never whole in memory.

    Returns the volume; ``vol.meta`` is a JSON-serializable report (source, format, series,
    why it was chosen, other series found, geometry, units, warnings). Raises
    :class:`ScanImportError` for any scan that cannot be imported as asked.
    """
    if not spacing_tolerance_mm > 0:
        raise ValueError(f"spacing_tolerance_mm must be > 0, got {spacing_tolerance_mm}")
    path = Path(path)
    if not path.exists():
        raise _error(
            label,
            path,
            "scan not found",
            "check the path in the subjects sheet (paths are relative to the directory snakemake runs in)",
        )
    fmt = scan_format(path, label)
    warnings: list[str] = []
    if fmt == "dicom":
        folder, uid, given = path, series_uid, "caller"
        if path.is_file():
            folder = path.parent
            if uid is None:
                try:
                    uid, given = str(_read_header(path, force=True).SeriesInstanceUID), "file"
                except Exception as exc:
                    raise _error(
                        label,
                        path,
                        f"cannot read the DICOM file's SeriesInstanceUID ({type(exc).__name__})",
                        "give the folder of the DICOM series",
                    ) from None
        vol = _import_dicom(folder, label, uid, given, allow_resample_nonuniform, spacing_tolerance_mm, warnings, out)
    else:
        if series_uid is not None:
            warnings.append(f"series_uid {series_uid} ignored: {path.name} is not a DICOM series")
        if fmt == "scanco-isq":
            vol = read_isq(path, label=label, warnings=warnings, out=out)
        elif fmt == "scanco-aim":
            raise _error(
                label, path, "Scanco AIM files are not read by femursr (only ISQ is)",
                "export the scan as ISQ or as a DICOM series from the scanner software, or convert the AIM to NIfTI/MHA "
                "(e.g. with the optional package itk-ioscanco: pip install itk-ioscanco; python -c \"import itk; "
                "itk.imwrite(itk.imread('scan.aim'), 'scan.mha')\") and put that file in the subjects sheet",
            )  # fmt: skip
        else:
            vol = _read_sitk_file(path, fmt, label)
    vol.meta = _jsonable(_report(vol, path, fmt, label, warnings))
    for w in vol.meta["warnings"]:
        log.warning("%s: %s", label or path, w)
    return vol


def import_to_file(path: str | os.PathLike, out_nii: str | os.PathLike, out_json: str | os.PathLike, **kw) -> Volume:
    """Import ``path`` (see :func:`import_scan`, which takes ``kw``), write the volume to
    ``out_nii`` (use ``.nii``: uncompressed, read back memory-mapped) and the report to
    ``out_json``. Both are written atomically; on any error neither output exists afterwards
    (stale outputs of an earlier run are removed too, as Snakemake does). A DICOM series or ISQ
    file imported to ``.nii`` is streamed into the file slice by slice (see ``out`` of
    :func:`import_scan`). Returns the volume (memory-mapped when streamed).
    """
    out_nii, out_json = Path(out_nii), Path(out_json)
    if not out_nii.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{out_nii}: the imported volume is stored as .nii (memory-mappable) or .nii.gz")
    writers: list[VolumeWriter] = []

    def stream(shape, spacing, origin, direction):
        writers.append(VolumeWriter(out_nii, shape, np.float32, spacing, origin, direction))
        return writers[-1]

    try:
        vol = import_scan(path, out=stream if out_nii.name.endswith(".nii") else None, **kw)
        text = json.dumps(vol.meta, indent=2, allow_nan=False)
        with atomic_file(out_json) as tmp_json:
            tmp_json.write_text(text + "\n")
            if writers:
                writers[-1].commit()
            else:
                write_volume(vol, out_nii)
    except BaseException:
        for w in writers:
            w.abort()
        out_nii.unlink(missing_ok=True)
        out_json.unlink(missing_ok=True)
        raise
    return vol


def scan_format(path: str | os.PathLike, label: str = "") -> str:
    """The format of a scan path: ``dicom``, ``nifti``, ``metaimage``, ``nrrd``, ``scanco-isq``
    or ``scanco-aim``. Raises :class:`ScanImportError` for anything else."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    fmt = _format_of_name(path.name)
    if fmt not in (None, "dicom"):
        return fmt
    head = b""
    if path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(ISQ_BLOCK)
    if _is_aim_header(head):
        return "scanco-aim"
    if head.startswith(ISQ_MAGIC):
        return "scanco-isq"
    if head[128:132] == b"DICM" or fmt == "dicom":
        return "dicom"
    name = _strip_version(path.name.lower())
    raise _error(
        label, path, f"unknown scan format '{Path(name).suffix or name}'",
        "give a DICOM folder, a NIfTI/MHA/NRRD file (.nii, .nii.gz, .mha, .mhd, .nrrd) or a Scanco ISQ file",
    )  # fmt: skip


def _strip_version(name: str) -> str:
    return re.sub(r";\d+$", "", name)  # OpenVMS version suffix of Scanco files: C0001234.ISQ;1


def _format_of_name(name: str) -> str | None:
    """The format a file name suggests (``nifti``, ``metaimage``, ``nrrd``, ``scanco-isq``,
    ``scanco-aim``, ``dicom``), or None."""
    name = _strip_version(Path(name).name.lower())
    for suffix, fmt in SITK_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    suffix = Path(name).suffix
    return {".isq": "scanco-isq", ".aim": "scanco-aim"}.get(suffix) or ("dicom" if suffix in DICOM_SUFFIXES - {""} else None)


def _report(vol: Volume, path: Path, fmt: str, label: str, warnings: list[str]) -> dict:
    lo, hi = value_range(vol.array)  # slab by slab: the array may be a paper-scale memory map
    if not (math.isfinite(lo) and math.isfinite(hi)):
        warnings.append("the volume holds non-finite values (NaN or inf)")
    return {
        "label": label,
        "source": str(path.resolve()),
        "format": fmt,
        **vol.meta,
        "shape_zyx": list(vol.array.shape),
        "spacing_xyz_mm": list(vol.spacing),
        "origin_lps_mm": list(vol.origin),
        "direction_lps": list(vol.direction),
        "dtype": str(vol.array.dtype),
        "value_min": lo if math.isfinite(lo) else None,
        "value_max": hi if math.isfinite(hi) else None,
        "warnings": list(vol.meta.get("warnings", [])) + warnings,
        "importer": f"femursr.imaging {__version__}",
    }


def _jsonable(obj):
    """Plain JSON types from numpy scalars/arrays, pydicom values, paths and tuples."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray, MultiValue)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return str(obj)


# --------------------------------------------------------------------------------------------
# DICOM


@dataclass
class _Image:
    path: Path
    ds: pydicom.Dataset  # header only (no pixel data)


def _read_header(path: Path, force: bool = False) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True, force=force)


def _scan_folder(folder: Path) -> tuple[dict[str, list[_Image]], list[tuple[str, str]]]:
    """Headers of the DICOM images under ``folder``, grouped by SeriesInstanceUID; and the
    files skipped, each with why."""
    series: dict[str, list[_Image]] = {}
    skipped: list[tuple[str, str]] = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if f.name.startswith(".") or f.name.upper() == "DICOMDIR":
            skipped.append((rel, "hidden or DICOMDIR"))
            continue
        try:
            ds = _read_header(f)
        except InvalidDicomError:
            # files without the 128-byte preamble are still DICOM; try them if named like DICOM
            if f.suffix.lower() not in DICOM_SUFFIXES:
                skipped.append((rel, "not DICOM"))
                continue
            try:
                ds = _read_header(f, force=True)
            except Exception:
                skipped.append((rel, "not DICOM"))
                continue
        except Exception as exc:  # truncated or corrupt files
            skipped.append((rel, f"unreadable: {type(exc).__name__}"))
            continue
        if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
            skipped.append((rel, "not DICOM"))
        elif "Rows" not in ds or "Columns" not in ds:
            skipped.append((rel, f"DICOM without an image: {ds.get('Modality', '?')} {ds.get('SOPClassUID', '')}"))
        else:
            series.setdefault(str(ds.SeriesInstanceUID), []).append(_Image(f, ds))
    return series, skipped


def _is_localizer(ds) -> bool:
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return any(str(v).strip().upper() == "LOCALIZER" for v in image_type)


def _series_info(uid: str, images: list[_Image]) -> dict:
    ds = images[0].ds
    n_loc = sum(_is_localizer(i.ds) for i in images)
    return {
        "series_instance_uid": uid,
        "modality": str(ds.get("Modality", "") or ""),
        "series_description": str(ds.get("SeriesDescription", "") or ""),
        "series_number": _int_or_none(ds.get("SeriesNumber")),
        "n_slices": len(images) - n_loc,
        "n_localizers": n_loc,
        "rows_columns": [int(ds.Rows), int(ds.Columns)],
        "folder": str(images[0].path.parent),
    }


def _describe(info: dict) -> str:
    desc = f" '{info['series_description']}'" if info["series_description"] else ""
    return f"{info['series_instance_uid']} ({info['modality'] or 'no Modality'}{desc}, {info['n_slices']} slices)"


def _int_or_none(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _num(ds, keyword: str, default: float | None = None) -> float | None:
    v = ds.get(keyword)
    if v is None or v == "":
        return default
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _select_series(series: dict[str, list[_Image]], series_uid: str | None, given: str, label: str, folder: Path):
    """(uid, selection report, warnings)."""
    infos = sorted(
        (_series_info(u, imgs) for u, imgs in series.items()),
        key=lambda i: (-i["n_slices"], i["series_number"] or 0, i["series_instance_uid"]),
    )
    found = "; ".join(_describe(i) for i in infos)
    warnings: list[str] = []
    if series_uid is not None:
        series_uid = str(series_uid).strip()
        if series_uid not in series:
            raise _error(
                label, folder, f"no series {series_uid} in the folder; {len(infos)} series found: {found}",
                "use one of the SeriesInstanceUIDs above, or give no series UID to take the CT series with the most slices",
            )  # fmt: skip
        chosen = next(i for i in infos if i["series_instance_uid"] == series_uid)
        reason = (
            "its SeriesInstanceUID was given"
            if given == "caller"
            else "it is the series of the DICOM file given as the scan path"
        )
        rule = "series_uid" if given == "caller" else "file"
        if chosen["modality"] != "CT":
            raise _error(
                label, folder, f"series {_describe(chosen)} is {chosen['modality'] or 'without a Modality tag'}, not CT",
                "give the SeriesInstanceUID of the CT series" + (f"; series found: {found}" if len(infos) > 1 else ""),
            )  # fmt: skip
    else:
        ct = [i for i in infos if i["modality"] == "CT" and i["n_slices"] > 0]
        if not ct:
            if len(infos) == 1:
                only = infos[0]
                what = (
                    f"is {only['modality'] or 'without a Modality tag'}, not CT"
                    if only["modality"] != "CT"
                    else "holds only localizer images"
                )
                raise _error(label, folder, f"the only series {_describe(only)} {what}", "give the folder of the CT scan")
            raise _error(
                label,
                folder,
                f"none of the {len(infos)} series is a CT series with axial slices: {found}",
                "give the folder of the CT scan",
            )
        chosen = ct[0]
        if len(infos) == 1:
            rule, reason = "only", "it is the only series in the folder"
        elif len(ct) == 1:
            rule, reason = "only_ct", f"it is the only CT series among the {len(infos)} series in the folder"
        else:
            rule = "most_slices"
            reason = f"it is the CT series with the most slices ({chosen['n_slices']}; next: {_describe(ct[1])})"
            ties = [i for i in ct if i["n_slices"] == chosen["n_slices"]]
            if len(ties) > 1:
                warnings.append(
                    f"{len(ties)} CT series have {chosen['n_slices']} slices: {'; '.join(_describe(i) for i in ties)}; "
                    f"took {chosen['series_instance_uid']} (lowest SeriesNumber); give series_uid to choose"
                )
    others = [i for i in infos if i is not chosen]
    log.info("%s: series %s chosen because %s", label or folder, _describe(chosen), reason)
    return chosen["series_instance_uid"], {"rule": rule, "reason": reason, "chosen": chosen, "other_series": others}, warnings


def _fmt_mm(values, ref: float | None = None) -> str:
    """Lengths in mm with enough decimals for the smallest (or ``ref``): 0.65, 1.30 / 0.082, 0.164."""
    ref = ref or min((abs(v) for v in values if v), default=1.0)
    decimals = max(2, 1 - math.floor(math.log10(ref)))
    return ", ".join(f"{v:.{decimals}f}" for v in values)


def _cluster(values: np.ndarray, tol: float) -> list[tuple[float, int]]:
    """Values grouped where neighbours (sorted) differ by at most ``tol``: (mean, count)."""
    groups: list[list[float]] = []
    for v in np.sort(values):
        if groups and v - groups[-1][0] <= tol:
            groups[-1].append(float(v))
        else:
            groups.append([float(v)])
    return [(float(np.mean(g)), len(g)) for g in groups]


def _check_same(images: list[_Image], keyword: str, key, atol: float | None, label: str, uid: str, folder: Path):
    """Refuse when ``key(ds)`` differs across the slices (values within ``atol`` count as one)."""
    groups: list[tuple[object, list[_Image]]] = []
    for im in images:
        v = key(im.ds)
        for g in groups:
            same = np.allclose(g[0], v, atol=atol, rtol=0) if atol is not None else g[0] == v
            if same:
                g[1].append(im)
                break
        else:
            groups.append((v, [im]))
    if len(groups) > 1:
        groups.sort(key=lambda g: -len(g[1]))
        parts = ", ".join(f"{_show(v)} in {_plural(len(ims), 'file')} (e.g. {ims[0].path.name})" for v, ims in groups[:4])
        raise _error(
            label, folder, f"series {uid}: {keyword} differs across the {len(images)} slices: {parts}",
            "export only the axial reconstruction (this series mixes images of different geometry: a localizer, a second "
            "reconstruction or a resized image), or pick another series with series_uid",
        )  # fmt: skip


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _show(v) -> str:
    if isinstance(v, tuple):
        return "(" + ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) + ")"
    return str(v)


def _floats(ds, keyword: str, n: int) -> tuple:
    v = ds.get(keyword)
    vals = tuple(float(x) for x in v) if v is not None and not isinstance(v, (str, float, int)) else ()
    if len(vals) != n:
        raise ValueError(keyword)
    return vals


def _import_dicom(folder: Path, label, series_uid, given, allow_resample, tol, warnings, out=None) -> Volume:
    series, skipped = _scan_folder(folder)
    if not series:
        raise _no_dicom_error(folder, skipped, label)
    uid, selection, sel_warnings = _select_series(series, series_uid, given, label, folder)
    warnings.extend(sel_warnings)
    images = [im for im in series[uid] if not _is_localizer(im.ds)]
    localizers = [im for im in series[uid] if _is_localizer(im.ds)]
    if localizers:
        warnings.append(f"{_plural(len(localizers), 'localizer image')} of the series left out (e.g. {localizers[0].path.name})")
    if len(images) < 2:
        what = "holds only localizer images" if not images else "has 1 slice (a 3D scan needs at least 2)"
        raise _error(label, folder, f"series {uid} {what}", "give the series of the axial CT slices, or pick it with series_uid")
    _check_slices(images, label, uid, folder)
    st = _stack_geometry(images, label, uid, folder, tol, allow_resample, warnings)

    geometry = dict(spacing=(st.ps[1], st.ps[0], st.step), origin=st.pos[0], direction=np.stack([st.row, st.col, st.normal], axis=1))
    shape = (len(st.images) if st.targets is None else len(st.targets), int(st.images[0].ds.Rows), int(st.images[0].ds.Columns))
    dest = out(shape, **geometry) if out is not None else None
    array, decoders, rescales, interpolated = _read_voxels(st.images, st.targets, st.d, label, uid, dest)
    vol = Volume(array, **geometry)
    # the result's grid must put every slice where its header says it is, and SimpleITK must agree
    pos_err = None
    if st.targets is None:
        n = len(st.images)
        grid = vol.index_to_physical(np.stack([np.zeros(n), np.zeros(n), np.arange(n)], axis=1))
        pos_err = float(np.linalg.norm(grid - st.pos, axis=1).max())
        if pos_err > tol + st.shear_tol:
            raise _error(
                label,
                folder,
                f"series {uid}: internal check failed: slice positions differ from the grid by {pos_err:.4f} mm",
                "report this as a bug",
            )
    warnings.extend(_cross_check_sitk(st.images[0], vol, label, uid))
    if not any(_num(im.ds, "RescaleSlope") is not None for im in images):
        warnings.append("no RescaleSlope/RescaleIntercept in the headers: stored values taken as HU")

    ds0, info = st.images[0].ds, selection["chosen"]
    vol.meta = {
        "series_instance_uid": uid,
        "series_description": info["series_description"],
        "series_number": info["series_number"],
        "modality": info["modality"],
        "study_instance_uid": str(ds0.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(ds0.get("FrameOfReferenceUID", "")),
        "manufacturer": str(ds0.get("Manufacturer", "")),
        "manufacturer_model_name": str(ds0.get("ManufacturerModelName", "")),
        "kvp": _num(ds0, "KVP"),
        "convolution_kernel": ds0.get("ConvolutionKernel", ""),
        "slice_thickness_mm": _num(ds0, "SliceThickness"),
        "spacing_between_slices_tag_mm": _num(ds0, "SpacingBetweenSlices"),
        "gantry_detector_tilt_deg": st.tilt_tag,
        "patient_position": str(ds0.get("PatientPosition", "")),
        "selection": {"rule": selection["rule"], "reason": selection["reason"]},
        "other_series": selection["other_series"],
        "n_slices": int(vol.shape[0]),
        "n_files_in_series": len(images),
        "n_localizers_left_out": len(localizers),
        "first_file": st.images[0].path.name,
        "last_file": st.images[-1].path.name,
        "skipped_files": len(skipped),
        "skipped_examples": [f"{name} ({why})" for name, why in skipped[:5]],
        "slice_spacings_mm": [round(c[0], 6) for c in st.clusters],
        "resampled": st.targets is not None,
        "interpolated_slices": interpolated,
        "max_inplane_offset_mm": st.max_offset,
        "max_position_error_mm": pos_err,
        "rescale": rescales,
        "rescale_type": sorted({str(im.ds.get("RescaleType", "") or "") for im in images}),
        "pixel_decoder": decoders,
        "units": "HU",
    }
    return vol


def _no_dicom_error(folder: Path, skipped: list[tuple[str, str]], label: str) -> ScanImportError:
    images = [name for name, _ in skipped if _format_of_name(name) not in ("dicom", None)]
    hint = f"; it holds {', '.join(images[:3])}: give that file as the scan path instead" if images else ""
    examples = f" (e.g. {', '.join(f'{n} ({why})' for n, why in skipped[:3])})" if skipped else ""
    return _error(
        label, folder, f"no DICOM image found in the folder: {_plural(len(skipped), 'file')} looked at{examples}{hint}",
        "give the folder that holds the DICOM files of the scan",
    )  # fmt: skip


def _check_slices(images: list[_Image], label: str, uid: str, folder: Path) -> None:
    """Refuse slices without the geometry tags, multi-frame or colour images, and slices whose
    size, pixel spacing or orientation differ from the others'."""
    for keyword, n in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
        for im in images:
            try:
                _floats(im.ds, keyword, n)
            except ValueError:
                raise _error(
                    label, im.path, f"series {uid}: {keyword} is missing or malformed ({im.ds.get(keyword, 'absent')!s})",
                    "a CT series needs ImagePositionPatient, ImageOrientationPatient and PixelSpacing in every slice; export it again from the scanner or PACS",
                ) from None  # fmt: skip
    for im in images:
        frames = _int_or_none(im.ds.get("NumberOfFrames")) or 1
        if frames > 1:
            raise _error(
                label, im.path, f"series {uid}: multi-frame image ({frames} frames; enhanced CT) not supported",
                "export the series as single-frame CT images (one file per slice), or convert it to NIfTI (e.g. dcm2niix) and give that file",
            )  # fmt: skip
        if int(im.ds.get("SamplesPerPixel", 1)) != 1:
            raise _error(
                label,
                im.path,
                f"series {uid}: colour image (SamplesPerPixel {im.ds.SamplesPerPixel})",
                "give the grey-value CT series",
            )
    _check_same(images, "Rows/Columns", lambda d: (int(d.Rows), int(d.Columns)), None, label, uid, folder)
    _check_same(images, "PixelSpacing", lambda d: _floats(d, "PixelSpacing", 2), GEOMETRY_ATOL, label, uid, folder)
    _check_same(
        images, "ImageOrientationPatient", lambda d: _floats(d, "ImageOrientationPatient", 6), GEOMETRY_ATOL, label, uid, folder
    )


@dataclass
class _Stack:
    """A checked series: slices sorted along the normal, their positions, and the grid to read."""

    images: list[_Image]
    pos: np.ndarray  # (n, 3) LPS mm of each slice's first voxel
    d: np.ndarray  # (n,) positions along the normal, ascending
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    ps: tuple  # PixelSpacing: (between rows = along y, between columns = along x)
    step: float  # slice spacing of the result, mm
    targets: np.ndarray | None  # positions along the normal to interpolate at, or None
    clusters: list  # slice spacings found: (mm, count)
    max_offset: float  # largest in-plane offset of a slice from the first one's normal line
    shear_tol: float
    tilt_tag: float | None


def _stack_geometry(images: list[_Image], label, uid, folder, tol, allow_resample, warnings) -> _Stack:
    """Sort the slices along the normal and refuse duplicate positions, a sheared stack (gantry
    tilt) and a non-uniform spacing (or plan the resampling when ``allow_resample``)."""
    ds0 = images[0].ds
    iop = np.array(_floats(ds0, "ImageOrientationPatient", 6))
    row, col = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row) - 1) > ORTHONORMAL_ATOL
        or abs(np.linalg.norm(col) - 1) > ORTHONORMAL_ATOL
        or abs(row @ col) > ORTHONORMAL_ATOL
    ):
        raise _error(
            label,
            images[0].path,
            f"series {uid}: ImageOrientationPatient {_show(tuple(iop))} is not two orthogonal unit vectors",
            "the header is corrupt; export the series again",
        )
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    ps = _floats(ds0, "PixelSpacing", 2)
    if min(ps) <= 0:
        raise _error(
            label,
            images[0].path,
            f"series {uid}: PixelSpacing {_show(ps)} is not positive",
            "the header is corrupt; export the series again",
        )

    pos = np.array([_floats(im.ds, "ImagePositionPatient", 3) for im in images])
    d = pos @ normal
    order = np.argsort(d, kind="stable")
    images, pos, d = [images[i] for i in order], pos[order], d[order]
    z_name = "z" if normal[2] > 0.99 else "position along the slice normal"

    # duplicate positions: two acquisitions, echoes or copied files in one series
    dup = np.flatnonzero(np.diff(d) <= tol)
    if dup.size:
        k = int(dup[0])
        raise _error(
            label, folder, f"series {uid}: {_plural(dup.size, 'pair')} of slices share a position (e.g. {images[k].path.name} and "
            f"{images[k + 1].path.name} at {z_name} = {d[k]:.3f} mm): duplicate files, or several acquisitions in one series",
            "remove the duplicate files, or split the series (e.g. by AcquisitionNumber) and import one part",
        )  # fmt: skip

    # shear between the slice positions and ImageOrientationPatient: gantry tilt
    rel = pos - pos[0]
    offsets = np.linalg.norm(rel - np.outer(rel @ normal, normal), axis=1)
    tilt_tag = _num(ds0, "GantryDetectorTilt")
    tag_text = f"GantryDetectorTilt = {tilt_tag:g} deg" if tilt_tag is not None else "no GantryDetectorTilt tag"
    shear_tol = max(tol, 0.1 * min(ps))  # below a tenth of a pixel it is rounding of the positions
    if offsets.max() > shear_tol:
        angle = math.degrees(math.atan2(offsets[-1], d[-1] - d[0]))
        raise _error(
            label, folder, f"series {uid}: the slice positions are sheared against ImageOrientationPatient: they advance "
            f"at {angle:.2f} deg to the slice normal (in-plane offset up to {offsets.max():.2f} mm; {tag_text}): gantry tilt",
            "reconstruct or export the series without gantry tilt, or resample it onto an orthogonal grid (e.g. dcm2niix corrects "
            "gantry tilt) and give the resulting NIfTI file",
        )  # fmt: skip
    if tilt_tag:
        warnings.append(
            f"{tag_text}, but the slice positions agree with ImageOrientationPatient (the tilt is already corrected); imported as is"
        )

    # slice spacing: every position on a uniform grid within ``tol`` (so a slow drift is caught too)
    n = len(images)
    step = (d[-1] - d[0]) / (n - 1)
    clusters = _cluster(np.diff(d), tol)
    targets = None
    if np.abs(d - (d[0] + step * np.arange(n))).max() > tol:
        base = max(clusters, key=lambda c: (c[1], -c[0]))[0]  # the most frequent spacing
        problem = f"series {uid}{_desc(ds0)} has {_spacing_problem(d, clusters, base, tol, z_name)}"
        m = int(round((d[-1] - d[0]) / base)) + 1
        if not allow_resample or m > 2 * n:
            fix = "supply the complete series, or allow resampling onto a uniform slice spacing (allow_resample_nonuniform)"
            if allow_resample:
                problem += f"; resampling at {base:.4f} mm would make {m} slices of {n}"
                fix = "supply the complete series"
            raise _error(label, folder, problem, fix)
        step = (d[-1] - d[0]) / (m - 1)
        targets = d[0] + step * np.arange(m)
        warnings.append(f"{problem}: resampled by linear interpolation along the slice normal onto {m} slices at {step:.4f} mm")

    spacing_tag = _num(ds0, "SpacingBetweenSlices")
    if spacing_tag is not None and abs(spacing_tag - step) > tol:
        warnings.append(
            f"SpacingBetweenSlices tag says {spacing_tag:g} mm, the slice positions {step:.4f} mm; the positions are used"
        )
    return _Stack(images, pos, d, row, col, normal, ps, float(step), targets, clusters, float(offsets.max()), shear_tol, tilt_tag)


def _desc(ds) -> str:
    d = str(ds.get("SeriesDescription", "") or "")
    return f" ('{d}')" if d else ""


def _spacing_problem(d, clusters, base, tol, z_name) -> str:
    found = f"{_plural(len(clusters), 'slice spacing')} ({_fmt_mm([c[0] for c in clusters])} mm)"
    if len(clusters) == 1:
        return f"{found}, but the positions drift up to {np.abs(d - np.linspace(d[0], d[-1], len(d))).max():.3f} mm from a uniform grid"
    dz = np.diff(d)
    missing, other = [], []
    for k in np.flatnonzero(np.abs(dz - base) > tol):
        m = int(round(dz[k] / base))
        if m >= 2 and abs(dz[k] - m * base) <= tol * m:
            missing.extend(d[k] + base * np.arange(1, m))
        else:
            other.append(0.5 * (d[k] + d[k + 1]))
    if other:
        where = _fmt_mm(other[:5], ref=0.1) + (", ..." if len(other) > 5 else "")
        return f"{found}: the spacing changes near {z_name} = {where} mm (two stacks joined, or a variable table increment?)"
    where = _fmt_mm(missing[:5], ref=0.1) + (", ..." if len(missing) > 5 else "")
    count = "a missing slice" if len(missing) == 1 else f"{len(missing)} missing slices"
    return f"{found}: {count} near {z_name} = {where} mm?"


def _read_slice(im: _Image, label: str, uid: str) -> tuple[np.ndarray, str, tuple]:
    """One slice in HU (float32, (rows, columns)), the decoder used, and (slope, intercept)."""
    rows, cols = int(im.ds.Rows), int(im.ds.Columns)
    slope, inter = _num(im.ds, "RescaleSlope", 1.0), _num(im.ds, "RescaleIntercept", 0.0)
    try:
        raw = pydicom.dcmread(im.path).pixel_array
        hu = (
            raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
            if (slope, inter) != (1.0, 0.0)
            else raw.astype(np.float32)
        )
        decoder = "pydicom"
    except Exception as exc_pd:  # an encoding pydicom has no decoder for: GDCM applies the rescale itself
        try:
            hu = sitk.GetArrayFromImage(sitk.ReadImage(str(im.path), sitk.sitkFloat32))[0]
            decoder = "SimpleITK"
        except Exception as exc_itk:
            ts = getattr(getattr(pydicom.dcmread(im.path, stop_before_pixels=True), "file_meta", None), "TransferSyntaxUID", "?")
            raise _error(
                label, im.path, f"series {uid}: pixel data cannot be decoded (transfer syntax {ts}; pydicom: {exc_pd}; SimpleITK: {str(exc_itk).strip().splitlines()[-1]})",
                "decompress the series (e.g. gdcmconv --raw) or install a pydicom decoder plugin (pylibjpeg)",
            ) from None  # fmt: skip
    if hu.shape != (rows, cols):
        raise _error(
            label,
            im.path,
            f"series {uid}: pixel data has shape {hu.shape}, the header says {rows} x {cols}",
            "the file is corrupt; export the series again",
        )
    return hu, decoder, (slope, inter)


def _read_voxels(images: list[_Image], targets, d, label, uid, out=None):
    """The slices stacked (z, y, x) float32 HU; with ``targets`` (positions along the normal)
    interpolated linearly between the two nearest slices. Returns (array, decoder counts,
    rescale pairs with counts, interpolated target indices). ``out``: an array-like taking slice
    assignment to write the slices into (a VolumeWriter; the array returned is its ``array``)
    instead of a new array."""
    rows, cols = int(images[0].ds.Rows), int(images[0].ds.Columns)
    decoders: dict[str, int] = {}
    rescales: dict[tuple, int] = {}
    cache: dict[int, np.ndarray] = {}

    def get(k):
        if k not in cache:
            hu, dec, rs = _read_slice(images[k], label, uid)
            decoders[dec] = decoders.get(dec, 0) + 1
            rescales[rs] = rescales.get(rs, 0) + 1
            if len(cache) >= 2:  # slices are visited in order: keep the last two
                del cache[min(cache)]
            cache[k] = hu
        return cache[k]

    interpolated: list[int] = []
    if targets is None:
        out = np.empty((len(images), rows, cols), np.float32) if out is None else out
        for k in range(len(images)):
            out[k] = get(k)
    else:
        out = np.empty((len(targets), rows, cols), np.float32) if out is None else out
        for j, t in enumerate(targets):
            k = int(np.clip(np.searchsorted(d, t, side="right") - 1, 0, len(d) - 2))
            w = float(np.clip((t - d[k]) / (d[k + 1] - d[k]), 0.0, 1.0))
            if w < 1e-6:
                out[j] = get(k)
            elif w > 1 - 1e-6:
                out[j] = get(k + 1)
            else:
                out[j] = (1 - w) * get(k) + w * get(k + 1)
                interpolated.append(j)
    rescale_list = [{"slope": s, "intercept": i, "n_slices": c} for (s, i), c in rescales.items()]
    return (out if isinstance(out, np.ndarray) else out.array), decoders, rescale_list, interpolated


def _cross_check_sitk(first: _Image, vol: Volume, label: str, uid: str) -> list[str]:
    """SimpleITK's reading of the first slice must give the same origin, axes and pixel
    spacing (else refuse: the headers are ambiguous); the same values are checked too (a
    difference is reported as a warning, naming the largest one)."""
    try:
        img = sitk.ReadImage(str(first.path), sitk.sitkFloat32)
    except RuntimeError as exc:
        return [f"SimpleITK cannot read {first.path.name} for the cross-check: {str(exc).strip().splitlines()[-1]}"]
    direction = np.reshape(img.GetDirection(), (3, 3)) if img.GetDimension() == 3 else None
    ok = (
        direction is not None
        and np.allclose(img.GetOrigin(), vol.origin, atol=1e-3)
        and np.allclose(img.GetSpacing()[:2], vol.spacing[:2], atol=1e-5)
        and np.allclose(direction[:, :2], vol.direction_matrix[:, :2], atol=1e-4)
    )
    if not ok:
        raise _error(
            label, first.path, f"series {uid}: SimpleITK reads another geometry from this file (origin {img.GetOrigin()}, spacing "
            f"{img.GetSpacing()}, direction {img.GetDirection()}) than its headers give (origin {vol.origin}, spacing {vol.spacing[:2]})",
            "the geometry tags are ambiguous; export the series again, or convert it to NIfTI and check it by eye",
        )  # fmt: skip
    ref = sitk.GetArrayFromImage(img)[0]  # the grid's first slice is this file's, resampled or not
    diff = float(np.abs(ref - vol.array[0]).max()) if ref.shape == vol.array[0].shape else math.inf
    if diff > 1e-3 * max(1.0, float(np.abs(ref).max())):
        return [
            f"pydicom and SimpleITK decode {first.path.name} differently (largest difference {diff:g}); pydicom's values are used"
        ]
    return []


# --------------------------------------------------------------------------------------------
# SimpleITK formats


def _read_sitk_file(path: Path, fmt: str, label: str) -> Volume:
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()
        raise _error(
            label,
            path,
            f"SimpleITK cannot read the file ({msg[-1] if msg else 'unknown error'})",
            "check that the file is complete and holds a 3D image",
        ) from None
    warnings = []
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise _error(
            label,
            path,
            f"the image has {img.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector)",
            "give a grey-value CT volume",
        )
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
        warnings.append("4D image with one time point read as 3D")
    if img.GetDimension() != 3:
        raise _error(
            label, path, f"expected a 3D image, got {img.GetDimension()}D of size {img.GetSize()}", "give a 3D CT volume"
        )
    pixel_type = img.GetPixelIDTypeAsString()
    vol = Volume(
        sitk.GetArrayFromImage(img).astype(np.float32, copy=False), img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    )
    direction = vol.direction_matrix
    if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHONORMAL_ATOL):
        raise _error(label, path, "the image's direction matrix is not orthonormal", "resample the image onto an orthogonal grid")
    vol.meta = {
        "stored_pixel_type": pixel_type,
        "units": "as stored",
        "units_note": f"{fmt} files carry no intensity unit: values are taken as stored (HU expected for CT)",
        "warnings": warnings,
    }
    return vol


# --------------------------------------------------------------------------------------------
# Scanco


def _is_aim_header(head: bytes) -> bool:
    if head.startswith(b"AIMDATA_V030"):
        return True
    return len(head) >= 8 and struct.unpack_from("<2i", head) == (20, 140)  # v020 pre-header: its size, then the image struct's


def _vax_double(b: bytes) -> float:
    """A VAX G-float (Scanco's calibration values): 16-bit words in reverse order give an IEEE
    double with an exponent larger by 2, hence the factor 1/4."""
    words = [b[i : i + 2] for i in range(0, 8, 2)]
    return struct.unpack("<d", b"".join(reversed(words)))[0] * 0.25


# fields of the 512-byte ISQ header (little-endian int32 unless named otherwise): offset, name
_ISQ_INT_FIELDS = {
    16: "data_type", 20: "nr_of_bytes", 24: "nr_of_blocks", 28: "patient_index", 32: "scanner_id",
    44: "dimx_p", 48: "dimy_p", 52: "dimz_p", 56: "dimx_um", 60: "dimy_um", 64: "dimz_um",
    68: "slice_thickness_um", 72: "slice_increment_um", 76: "slice_1_pos_um",
    80: "min_data_value", 84: "max_data_value", 88: "mu_scaling", 92: "nr_of_samples",
    96: "nr_of_projections", 100: "scandist_um", 104: "scanner_type", 108: "sampletime_us",
    112: "index_measurement", 116: "site", 120: "reference_line_um", 124: "recon_alg",
    168: "energy_v", 172: "intensity_ua", 508: "data_offset_blocks",
}  # fmt: skip
_ISQ_NAME = (128, 40)


def read_isq_header(path: str | os.PathLike, label: str = "") -> dict:
    """The fields of a Scanco ISQ header, and from its extended header (when there is one) the
    calibration: ``mu_water`` (1/cm), density slope/intercept and unit. Raises
    :class:`ScanImportError` if the file is not an ISQ file or its header does not add up."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(ISQ_BLOCK)
        if not head.startswith(ISQ_MAGIC):
            what = "a Scanco AIM file" if _is_aim_header(head) else f"not a Scanco ISQ file (it starts with {head[:16]!r})"
            raise _error(label, path, f"{what}", "give an ISQ file (header CTDATA-HEADER_V1), or convert the scan to NIfTI/MHA")
        if len(head) < ISQ_BLOCK:
            raise _error(label, path, f"ISQ header truncated ({len(head)} of 512 bytes)", "copy the file again from the scanner")
        h = {name: struct.unpack_from("<i", head, off)[0] for off, name in _ISQ_INT_FIELDS.items()}
        h["patient_name_present"] = bool(head[_ISQ_NAME[0] : sum(_ISQ_NAME)].strip(b" \0"))
        h["header_bytes"] = (h["data_offset_blocks"] + 1) * ISQ_BLOCK
        ext = fh.read(h["header_bytes"] - ISQ_BLOCK) if h["data_offset_blocks"] > 0 else b""
    dims = [h["dimx_p"], h["dimy_p"], h["dimz_p"]]
    um = [h["dimx_um"], h["dimy_um"], h["dimz_um"]]
    if h["data_type"] == 9 or h["dimz_um"] == 0:
        raise _error(
            label, path, "a Scanco RAD (radiograph) file, not a CT volume", "give the ISQ file of the reconstructed scan"
        )
    if min(dims) < 1 or min(um) < 1 or h["data_offset_blocks"] < 0:
        raise _error(
            label,
            path,
            f"ISQ header does not add up: dimensions {dims} pixels, {um} um, data offset {h['data_offset_blocks']} blocks",
            "copy the file again from the scanner",
        )
    h.update(_isq_calibration(ext))
    return h


def _isq_calibration(ext: bytes) -> dict:
    """Calibration fields of the ISQ extended header, best effort: the extended header is a list of
    named sub-headers (entries of 128 bytes: name at +8, 16 chars; size in blocks at +24), one of
    them ``Calibration``, holding the density unit (+648), slope (+664), intercept (+672) and
    mu_water (+688). Values that are not plausible are dropped, never guessed."""
    out: dict = {}
    if len(ext) < ISQ_BLOCK:
        return out
    directory, start = ext[:ISQ_BLOCK], 1  # blocks counted from the start of ``ext``
    if directory[8:24] == b"MultiHeader     ":
        directory, start = ext[ISQ_BLOCK : 2 * ISQ_BLOCK], 2
    for i in range(4):
        entry = directory[i * 128 : (i + 1) * 128]
        if len(entry) < 28:
            break
        size = struct.unpack_from("<i", entry, 24)[0]
        if size <= 0 or (start + size) * ISQ_BLOCK > len(ext):
            break
        if entry[8:24] == b"Calibration     ":
            cal = ext[start * ISQ_BLOCK : (start + size) * ISQ_BLOCK]
            if len(cal) >= 696:
                mu_water = _vax_double(cal[688:696])
                if MU_WATER_RANGE[0] <= mu_water <= MU_WATER_RANGE[1]:
                    out["mu_water_per_cm"] = mu_water
                slope, intercept = _vax_double(cal[664:672]), _vax_double(cal[672:680])
                if math.isfinite(slope) and math.isfinite(intercept) and slope != 0:
                    out["density_slope"], out["density_intercept"] = slope, intercept
                    out["density_unit"] = cal[648:664].split(b"\0")[0].decode("latin-1").strip()
            break
        start += size
    return out


def read_isq(path: str | os.PathLike, *, label: str = "", warnings: list[str] | None = None, out=None) -> Volume:
    """Read a Scanco ISQ file: int16 voxels, x fastest, after ``(data_offset + 1) * 512`` header
    bytes; spacing = dimension in um / dimension in pixels. Values become HU
    (``1000 * (v / mu_scaling - mu_water) / mu_water``) when the calibration gives mu_water, else
    stay in Scanco native units (``mu * mu_scaling``) with a warning. ISQ files carry no patient
    orientation: identity direction and origin 0 are used (registration sets the pose).
    ``out`` as in :func:`import_scan`: where the voxels go (default: a new array in memory).
    """
    path = Path(path)
    warnings = warnings if warnings is not None else []
    h = read_isq_header(path, label)
    nx, ny, nz = h["dimx_p"], h["dimy_p"], h["dimz_p"]
    need = h["header_bytes"] + 2 * nx * ny * nz
    size = path.stat().st_size
    if size < need:
        raise _error(
            label,
            path,
            f"ISQ file truncated: {size} bytes, the header needs {need} ({nx} x {ny} x {nz} int16 voxels)",
            "copy the file again from the scanner",
        )
    if size > need:
        warnings.append(f"{size - need} bytes after the voxel data ignored")
    spacing = tuple(h[f"dim{a}_um"] / h[f"dim{a}_p"] / 1000.0 for a in "xyz")
    mu_scaling, mu_water = h["mu_scaling"], h.get("mu_water_per_cm")
    if mu_scaling > 0 and mu_water:
        scale, offset, units = 1000.0 / (mu_scaling * mu_water), -1000.0, "HU"
    else:
        scale, offset, units = 1.0, 0.0, "scanco native (mu x mu_scaling)"
        warnings.append(
            f"no usable calibration (mu_scaling {mu_scaling}, mu_water {'absent' if mu_water is None else mu_water}): values left in Scanco native units, not HU"
        )
    raw = np.memmap(path, dtype="<i2", mode="r", offset=h["header_bytes"], shape=(nz, ny, nx))
    dest = np.empty((nz, ny, nx), np.float32) if out is None else out((nz, ny, nx), spacing, (0.0, 0.0, 0.0), np.eye(3))
    chunk = max(1, (64 << 20) // max(1, 2 * nx * ny))  # ~64 MB of int16 at a time: memory stays ~ the float32 result
    for z0 in range(0, nz, chunk):
        dest[z0 : z0 + chunk] = read_slab(raw, z0, z0 + chunk).astype(np.float32) * np.float32(scale) + np.float32(offset)
    del raw
    vol = Volume(dest if isinstance(dest, np.ndarray) else dest.array, spacing, (0.0, 0.0, 0.0))
    if h["nr_of_bytes"] > 0 and h["nr_of_bytes"] != 2 * nx * ny * nz:
        warnings.append(
            f"the header's byte count {h['nr_of_bytes']} differs from 2 x {nx} x {ny} x {nz} voxels; the dimensions are used"
        )
    if h["slice_thickness_um"] and abs(h["slice_thickness_um"] / 1000.0 - spacing[2]) > 1e-3:
        warnings.append(f"slice thickness {h['slice_thickness_um']} um differs from the slice spacing {spacing[2] * 1000:.1f} um")
    vol.meta = {
        "units": units,
        "orientation_note": "ISQ files carry no patient orientation: identity direction and origin (0, 0, 0); registration sets the pose",
        "mu_scaling": mu_scaling,
        "mu_water_per_cm": mu_water,
        "density_slope": h.get("density_slope"),
        "density_intercept": h.get("density_intercept"),
        "density_unit": h.get("density_unit"),
        "scanco_header": {
            k: v for k, v in h.items() if k not in ("mu_water_per_cm", "density_slope", "density_intercept", "density_unit")
        },
    }
    return vol
