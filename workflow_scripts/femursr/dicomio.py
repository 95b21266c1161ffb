"""Writing and reading CT DICOM series (one file per axial slice, CT Image Storage).

Geometry follows DICOM/ITK conventions: arrays are indexed (z, y, x); ``spacing`` is (x, y, z)
in mm; ``origin`` is the LPS position (mm) of the centre of voxel (0, 0, 0); ``direction`` is a
3x3 matrix whose columns are the x, y, z axes of the grid in LPS.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from .atomic import atomic_dir
from .volume import read_slab

HU_INTERCEPT = -1024.0


def deterministic_uid(*parts) -> str:
    """A valid UID (2.25 root) derived from ``parts``, so that reruns give the same UIDs."""
    # 2.25 root: the decimal form of a 128-bit number (ISO/IEC 9834-8), here a hash of ``parts``
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def write_ct_series(
    volume_hu: np.ndarray,
    spacing,
    origin,
    direction,
    out_dir: str | os.PathLike,
    *,
    patient_id: str,
    series_description: str,
    uid_key: str,
    series_number: int = 1,
    slice_thickness: float | None = None,
    kvp: float = 120.0,
    manufacturer: str = "femursr synthetic",
    model_name: str = "phantom",
    study_date: str = "20260101",
    extra: dict | None = None,
) -> list[Path]:
    """Write ``volume_hu`` (z, y, x, Hounsfield units) as a CT DICOM series in ``out_dir``.

    The series is written to a temporary folder beside ``out_dir`` and renamed into place, so
    a crash leaves no half-written series. Values are stored as int16 with RescaleSlope 1 and
    RescaleIntercept -1024. ``uid_key`` makes the Study/Series/Frame UIDs deterministic.
    ``volume_hu`` may be memory-mapped: it is converted slice by slice, so memory holds one slice
    (see :func:`femursr.volume.read_slab`). Returns the file paths in slice order.
    """
    vol = volume_hu if isinstance(volume_hu, np.ndarray) else np.asarray(volume_hu)
    if vol.ndim != 3:
        raise ValueError(f"{out_dir}: a CT series needs a 3D volume, got shape {vol.shape}")
    spacing = [float(s) for s in spacing]
    origin = np.asarray(origin, float)
    direction = np.asarray(direction, float).reshape(3, 3)

    out_dir = Path(out_dir)
    study_uid = deterministic_uid(uid_key, "study", patient_id)
    series_uid = deterministic_uid(uid_key, "series", series_number)
    frame_uid = deterministic_uid(uid_key, "frame")
    row_dir, col_dir, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    now = _dt.datetime(2026, 1, 1, 12, 0, 0)
    paths = []
    with atomic_dir(out_dir) as tmp:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate = study_date
        ds.SeriesDate = study_date
        ds.ContentDate = study_date
        ds.StudyTime = now.strftime("%H%M%S")
        ds.SeriesTime = ds.StudyTime
        ds.ContentTime = ds.StudyTime
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.Modality = "CT"
        ds.Manufacturer = manufacturer
        ds.ManufacturerModelName = model_name
        ds.SeriesDescription = series_description
        ds.SeriesNumber = series_number
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = f"{kvp:g}"
        ds.BodyPartExamined = "HIP"
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row, column spacing
        ds.SliceThickness = f"{(slice_thickness or spacing[2]):.6f}"
        ds.SpacingBetweenSlices = f"{spacing[2]:.6f}"
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = f"{HU_INTERCEPT:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "400"
        ds.WindowWidth = "2000"
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        for k in range(vol.shape[0]):
            pos = origin + k * spacing[2] * normal
            sop_uid = deterministic_uid(uid_key, "instance", series_number, k)
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
            ds.SliceLocation = f"{float(pos @ normal):.6f}"
            stored = np.round(read_slab(vol, k, k + 1)[0] - HU_INTERCEPT)
            if stored.min() < -32768 or stored.max() > 32767:
                raise ValueError(f"{out_dir}: HU values out of the int16 range after rescale (slice {k})")
            ds.PixelData = stored.astype(np.int16).tobytes()
            p = tmp / f"IM{k + 1:05d}.dcm"
            ds.save_as(p, enforce_file_format=True)
            paths.append(out_dir / p.name)
    return paths


def read_ct_series_pydicom(folder: str | os.PathLike):
    """Read a single-series folder with pydicom only: returns (hu (z,y,x), spacing, origin, direction).

    Slices are sorted by their position along the slice normal. This is a plain reader used to
    cross-check files; the workflow's importer (with its checks) lives in the import stage.
    """
    files = sorted(Path(folder).glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .dcm files")
    dss = [pydicom.dcmread(f) for f in files]
    iop = np.array(dss[0].ImageOrientationPatient, float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    dss.sort(key=lambda d: float(np.array(d.ImagePositionPatient, float) @ normal))
    pos = np.array([np.array(d.ImagePositionPatient, float) for d in dss])
    dz = np.diff(pos @ normal)
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    ps = [float(v) for v in dss[0].PixelSpacing]
    spacing = (ps[1], ps[0], float(np.median(dz)) if len(dz) else float(dss[0].SliceThickness))
    direction = np.stack([row, col, normal], axis=1)
    return hu.astype(np.float32), spacing, pos[0], direction
