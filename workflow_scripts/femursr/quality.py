"""Image quality of a volume against the HR (paper section 3.2): SSIM, PSNR, GSSIM and LPIPS on
whole axial slices, averaged over the slices that hold femur.

* SSIM: Wang et al. (2004) with their parameters: Gaussian window sigma 1.5 (11 x 11), K1 0.01,
  K2 0.03, population covariances; the mean over the slice after cropping the 5-pixel border the
  window cannot cover. This equals ``skimage.metrics.structural_similarity(..., gaussian_weights=
  True, sigma=1.5, use_sample_covariance=False, data_range=L)``.
* PSNR: ``10 log10(L^2 / MSE)`` per slice.
* GSSIM: gradient-based SSIM (Chen, Yang & Xie 2006, reference 5 of the paper): SSIM's luminance
  term on the images and its contrast-structure term on the Sobel gradient-magnitude images.
* LPIPS (Zhang et al. 2018) with the ``lpips`` package's AlexNet variant. Its backbone needs
  ImageNet weights that cannot be downloaded here: :func:`load_lpips` takes a torchvision AlexNet
  weights file (or a torch cache folder holding one) and raises :class:`LpipsUnavailable` with
  the fix when there is none; callers record "LPIPS unavailable: no backbone weights".

``L``, the data range, is 1 for the normalized volumes of the workflow.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

K1, K2, SIGMA, TRUNCATE = 0.01, 0.03, 1.5, 3.5
PAD = int(TRUNCATE * SIGMA + 0.5)  # half the window: 5 pixels for sigma 1.5


def _moments(x: np.ndarray, y: np.ndarray):
    f = lambda a: ndi.gaussian_filter(a, SIGMA, truncate=TRUNCATE, mode="reflect")  # noqa: E731
    ux, uy = f(x), f(y)
    vx = f(x * x) - ux * ux
    vy = f(y * y) - uy * uy
    vxy = f(x * y) - ux * uy
    return ux, uy, vx, vy, vxy


def _crop_mean(m: np.ndarray) -> float:
    return float(m[PAD:-PAD, PAD:-PAD].mean(dtype=np.float64))


def _check_slice(x, y):
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"need two 2D slices of one shape, got {x.shape} and {y.shape}")
    if min(x.shape) <= 2 * PAD:
        raise ValueError(f"slice {x.shape} is smaller than the {2 * PAD + 1}-pixel SSIM window")


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM of two 2D slices (Wang et al. 2004 parameters)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    _check_slice(x, y)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    ux, uy, vx, vy, vxy = _moments(x, y)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return _crop_mean(s)


def gradient_magnitude(x: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of a 2D slice."""
    x = np.asarray(x, np.float64)
    return np.hypot(ndi.sobel(x, 0, mode="reflect"), ndi.sobel(x, 1, mode="reflect"))


def gssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Mean gradient-based SSIM (Chen et al. 2006): luminance of the images, contrast and
    structure of their gradient magnitudes. 1 for identical slices, falling as ``y`` loses edges."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    _check_slice(x, y)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    ux, uy, _, _, _ = _moments(x, y)
    _, _, gx, gy, gxy = _moments(gradient_magnitude(x), gradient_magnitude(y))
    s = ((2 * ux * uy + c1) / (ux * ux + uy * uy + c1)) * ((2 * gxy + c2) / (gx + gy + c2))
    return _crop_mean(s)


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical slices)."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


class LpipsUnavailable(RuntimeError):
    """LPIPS cannot be computed: no AlexNet backbone weights were given or found."""


def find_alexnet_weights(path: str | os.PathLike | None) -> Path:
    """The AlexNet weights file named by ``path``: the file itself, or a folder (a ``TORCH_HOME``
    or its ``hub/checkpoints``) holding torchvision's ``alexnet-*.pth``."""
    if not path:
        raise LpipsUnavailable(
            "LPIPS unavailable: no backbone weights. Set evaluation.lpips_backbone to a torchvision "
            "AlexNet weights file (alexnet-owt-7be5be79.pth, from a machine with internet access) or "
            "to a torch cache folder holding it."
        )
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for pattern in ("alexnet-*.pth", "checkpoints/alexnet-*.pth", "hub/checkpoints/alexnet-*.pth"):
            hits = sorted(glob.glob(str(p / pattern)))
            if hits:
                return Path(hits[0])
    raise LpipsUnavailable(
        f"LPIPS unavailable: no backbone weights at {p} (looked for the file, and for alexnet-*.pth in it, "
        "in checkpoints/ and in hub/checkpoints/); fix evaluation.lpips_backbone"
    )


def load_lpips(backbone: str | os.PathLike | None, device: str = "cpu"):
    """The ``lpips`` AlexNet model with its backbone loaded from ``backbone`` (no download).

    The linear calibration layers ship with the ``lpips`` package; the backbone's state dict must
    be torchvision's AlexNet (its ``features.*`` tensors are copied into LPIPS's slices).
    """
    weights = find_alexnet_weights(backbone)
    import lpips
    import torch
    import torchvision

    state = torch.load(weights, map_location="cpu", weights_only=True)
    reference = torchvision.models.alexnet(weights=None)
    try:
        reference.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise LpipsUnavailable(f"LPIPS unavailable: {weights} is not a torchvision AlexNet state dict ({err})") from None
    model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    for block in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for name, layer in block.named_children():
            layer.load_state_dict(reference.features[int(name)].state_dict())
    return model.eval().to(device)


def lpips_slices(model, x: np.ndarray, y: np.ndarray, batch: int = 16) -> np.ndarray:
    """LPIPS of each slice pair of two (n, h, w) stacks in [0, 1]."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            a = torch.from_numpy(np.ascontiguousarray(x[i : i + batch], np.float32))[:, None].to(device)
            b = torch.from_numpy(np.ascontiguousarray(y[i : i + batch], np.float32))[:, None].to(device)
            d = model(a.repeat(1, 3, 1, 1) * 2 - 1, b.repeat(1, 3, 1, 1) * 2 - 1)
            out.append(d.reshape(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def femur_slices(mask: np.ndarray, step: int = 1) -> np.ndarray:
    """Indices of the axial slices (axis 0) that hold femur, every ``step``-th."""
    idx = np.flatnonzero(np.asarray(mask).reshape(len(mask), -1).any(axis=1))
    if idx.size == 0:
        raise ValueError("the femur mask is empty: no slice to measure image quality on")
    return idx[:: max(1, int(step))]


def volume_quality(pred, ref, mask, lpips_model=None, data_range: float = 1.0, step: int = 1) -> dict:
    """Mean SSIM, PSNR, GSSIM (and LPIPS when a model is given) over the femur slices.

    ``pred`` and ``ref`` are (z, y, x) arrays on one grid (e.g. memory-mapped volumes); slices
    are read one at a time.
    """
    if pred.shape != ref.shape or mask.shape != ref.shape:
        raise ValueError(f"volumes differ in shape: {pred.shape}, {ref.shape}, mask {mask.shape}")
    idx = femur_slices(mask, step)
    rows = {"ssim": [], "psnr": [], "gssim": []}
    for z in idx:
        a, b = np.asarray(pred[z], np.float64), np.asarray(ref[z], np.float64)
        rows["ssim"].append(ssim(a, b, data_range))
        rows["psnr"].append(psnr(a, b, data_range))
        rows["gssim"].append(gssim(a, b, data_range))
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out["slices"] = int(idx.size)
    if lpips_model is not None:
        vals = [lpips_slices(lpips_model, np.asarray(pred[idx[i : i + 16]]), np.asarray(ref[idx[i : i + 16]])) for i in range(0, idx.size, 16)]
        out["lpips"] = float(np.concatenate(vals).mean())
    return out


LPIPS_UNAVAILABLE = "LPIPS unavailable: no backbone weights"


def quality_record(pred, ref, mask, *, method: str, subject: str, lpips_model=None, lpips_note: str = "", timing: dict | None = None, step: int = 1) -> dict:
    """One row of the image-quality table: the volume's metrics against the HR, and its T/V.

    ``pred``, ``ref``, ``mask`` are :class:`femursr.volume.Volume` s on one grid; ``timing`` is
    the inference record written beside an SR volume (T/V in ``seconds``), None for the LR.
    """
    for name, vol in ((method, pred), ("femur mask", mask)):
        if not ref.same_grid(vol):
            raise ValueError(
                f"subject {subject}: the {name} volume is not on the HR grid (shape {vol.shape} vs "
                f"{ref.shape}); rerun its preprocessing or inference"
            )
    q = volume_quality(pred.array, ref.array, mask.array > 0, lpips_model=lpips_model, step=step)
    row = {"subject": subject, "method": method, **q}
    if lpips_model is None:
        row["lpips"] = float("nan")
        row["lpips_note"] = lpips_note or LPIPS_UNAVAILABLE
    row["seconds_per_volume"] = float(timing["seconds"]) if timing else float("nan")
    return row


def quality_table(rows: list[dict]) -> "pd.DataFrame":
    """Methods as rows: mean SSIM, PSNR, LPIPS, GSSIM over the test subjects, and mean T/V (s)."""
    import pandas as pd

    from .tables import method_label, method_order

    df = pd.DataFrame(rows)
    agg = df.groupby("method").agg(
        subjects=("subject", "nunique"),
        ssim=("ssim", "mean"),
        psnr=("psnr", "mean"),
        lpips=("lpips", "mean"),
        gssim=("gssim", "mean"),
        seconds_per_volume=("seconds_per_volume", "mean"),
    )
    agg = agg.loc[method_order(agg.index)]
    agg.insert(0, "label", [method_label(m) for m in agg.index])
    notes = df.groupby("method")["lpips_note"].first() if "lpips_note" in df else None
    agg["note"] = [notes.get(m) if notes is not None and isinstance(notes.get(m), str) else "" for m in agg.index]
    return agg.reset_index()
