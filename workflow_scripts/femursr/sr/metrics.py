"""Image quality of SR output in torch: PSNR and SSIM of images in [0, 1].

Both follow scikit-image's definitions (``skimage.metrics``) so that values can be compared
with published ones: PSNR = 10 log10(data_range^2 / MSE); SSIM of Wang et al. (2004) with an
11 x 11 Gaussian window of sigma 1.5 (scikit-image's ``gaussian_weights=True``,
``use_sample_covariance=False``), averaged over the pixels whose window lies inside the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # the window's radius in sigmas, as scipy.ndimage.gaussian_filter (11 px)
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        return x[:, None]
    if x.dim() == 4:
        return x
    raise ValueError(f"expected an image (H, W), (N, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image: shape (N,) for (N, C, H, W) or (N, H, W) input, () for (H, W).

    Identical images give ``inf``."""
    p, t = _as_batch(pred).double(), _as_batch(target).double()
    if p.shape != t.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = ((p - t) ** 2).flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range**2 / mse)
    return out[0] if pred.dim() == 2 else out


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    """Normalized 1D Gaussian of radius ``int(truncate * sigma + 0.5)`` (11 taps for sigma 1.5)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Mean SSIM per image (channels averaged): shape (N,), or () for an (H, W) image.

    Images must be at least 11 x 11 pixels (the window)."""
    p, t = _as_batch(pred).double(), _as_batch(target).double()
    if p.shape != t.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    n, c, h, w = p.shape
    g = gaussian_window(sigma).to(p.device)
    k = g.numel()
    if h < k or w < k:
        raise ValueError(f"ssim: images of {h} x {w} px are smaller than the {k} x {k} window")
    p, t = p.reshape(n * c, 1, h, w), t.reshape(n * c, 1, h, w)

    def blur(x):  # separable Gaussian, valid part only
        x = F.conv2d(x, g.view(1, 1, k, 1))
        return F.conv2d(x, g.view(1, 1, 1, k))

    mu_p, mu_t = blur(p), blur(t)
    s_pp = blur(p * p) - mu_p**2
    s_tt = blur(t * t) - mu_t**2
    s_pt = blur(p * t) - mu_p * mu_t
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_p * mu_t + c1) * (2 * s_pt + c2)) / ((mu_p**2 + mu_t**2 + c1) * (s_pp + s_tt + c2))
    out = s.flatten(1).mean(1).view(n, c).mean(1)
    return out[0] if pred.dim() == 2 else out
