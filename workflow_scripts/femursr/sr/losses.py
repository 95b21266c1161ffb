"""Losses of the GAN SR models: VGG19 perceptual loss, adversarial loss, and unsharp masking.

Images are (N, 1, H, W) in [0, 1] (normalized HU).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

#: torchvision's ``vgg19().features`` in order: layer names as in BasicSR / ESRGAN
#: (``convX_Y`` is the output before its ReLU)
VGG19_LAYERS = (
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "conv3_4", "relu3_4", "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "conv4_4", "relu4_4", "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "conv5_4", "relu5_4", "pool5",
)  # fmt: skip

#: ImageNet statistics of [0, 1] RGB images, which torchvision's VGG19 weights expect
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualLoss(nn.Module):
    """L1 distance of VGG19 features (Johnson et al.; ESRGAN's layers before activation).

    ``weights_path``: a torchvision-format VGG19 state dict (``torchvision.models.vgg19`` keys
    ``features.*``, classifier keys optional), e.g. ImageNet weights ``vgg19-dcbb9e9d.pth``.
    Nothing is downloaded. ``None`` switches the loss off: :attr:`enabled` is False, and the
    loss is 0 with a warning logged at its first use (not when a model is only built for
    inference). A path that is missing or is not a VGG19 state dict is
    an error naming the file.

    ``layer_weights``: {layer name (see :data:`VGG19_LAYERS`): weight}. The loss is
    ``sum_l w_l * mean |phi_l(x) - phi_l(y)|``, the single channel repeated to RGB and
    normalized with ImageNet statistics. ``criterion``: ``l1`` or ``l2``.

    The VGG is frozen, kept in eval mode and out of ``state_dict`` (it is an input, read from
    ``weights_path`` when the model is built, not a trained weight); it follows ``.to()``.
    """

    def __init__(self, weights_path: str | Path | None, layer_weights: dict[str, float] | None = None, criterion: str = "l1"):
        super().__init__()
        self.layer_weights = dict(layer_weights or {"conv5_4": 1.0})
        unknown = sorted(set(self.layer_weights) - set(VGG19_LAYERS))
        if unknown:
            raise ValueError(f"PerceptualLoss: unknown VGG19 layers {unknown}; known: {', '.join(VGG19_LAYERS)}")
        if criterion not in ("l1", "l2"):
            raise ValueError(f"PerceptualLoss: criterion must be l1 or l2, not {criterion!r}")
        self.criterion = criterion
        self.weights_path = None if weights_path is None else str(weights_path)
        self._warned = False
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # not a registered submodule, so that it stays out of state_dict and parameter counts
        self._vgg: list[nn.Sequential] = []
        if self.weights_path is not None:
            self._vgg.append(_load_vgg19_features(Path(self.weights_path), max(VGG19_LAYERS.index(n) for n in self.layer_weights)))

    @property
    def enabled(self) -> bool:
        return bool(self._vgg)

    def _warn_disabled(self) -> None:
        if not self._warned:
            log.warning("perceptual loss is off: no VGG19 weights file was given (pretrained weights are never downloaded)")
            self._warned = True

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for vgg in self._vgg:
            vgg._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for vgg in self._vgg:
            vgg.eval()
        return self

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """VGG19 features of (N, 1 or 3, H, W) images in [0, 1] at the configured layers."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = {}
        for name, layer in zip(VGG19_LAYERS, self._vgg[0]):
            x = layer(x)
            if name in self.layer_weights:
                out[name] = x
        return out

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted feature distance of ``x`` to ``target`` (a scalar; 0 when disabled)."""
        if not self.enabled:
            self._warn_disabled()
            return x.new_zeros(())
        fx = self.features(x)
        with torch.no_grad():
            ft = self.features(target.detach())
        dist = F.l1_loss if self.criterion == "l1" else F.mse_loss
        return sum(w * dist(fx[n], ft[n]) for n, w in self.layer_weights.items())


def _load_vgg19_features(path: Path, last_index: int) -> nn.Sequential:
    """torchvision VGG19 ``features[: last_index + 1]`` with the weights of ``path``, frozen."""
    import torchvision

    if not path.is_file():
        raise FileNotFoundError(f"VGG19 weights file for the perceptual loss not found: {path}")
    try:
        # memory-mapped: the classifier (~0.5 GB of a full file) is never read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{path}: not a readable PyTorch state dict of torchvision's VGG19 ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a torchvision VGG19 state dict (expected a dict of tensors)")
    other = sorted(k for k in state if not k.startswith(("features.", "classifier.")))
    feats = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    with torch.device("meta"):  # layout only; every weight comes from the file
        net = torchvision.models.vgg19(weights=None).features
    expected = net.state_dict()
    missing = sorted(set(expected) - set(feats))
    unexpected = sorted(set(feats) - set(expected))
    wrong = sorted(k for k in set(expected) & set(feats) if feats[k].shape != expected[k].shape)
    if other or missing or unexpected or wrong:
        parts = []
        if other:
            parts.append(f"keys outside features/classifier {other[:4]}")
        if missing:
            parts.append(f"missing features.{{{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}}}")
        if unexpected:
            parts.append(f"unexpected features.{{{', '.join(unexpected[:4])}}}")
        if wrong:
            parts.append(f"wrong shapes at features.{{{', '.join(wrong[:4])}}}")
        raise ValueError(f"{path}: not a torchvision VGG19 state dict: {'; '.join(parts)}")
    net = net[: last_index + 1].to_empty(device="cpu")
    net.load_state_dict({k: v for k, v in feats.items() if int(k.split(".")[0]) <= last_index})
    net = net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class GANLoss(nn.Module):
    """Adversarial loss on discriminator logits.

    ``vanilla``: binary cross-entropy with logits (SRGAN, ESRGAN, Real-ESRGAN); ``lsgan``: mean
    squared distance to the label. ``forward(logits, target_is_real)`` compares every logit (one
    per patch or per pixel) with the real or fake label and returns the mean, unweighted: the
    model applies the generator's adversarial weight (the discriminator's weight is 1).
    """

    def __init__(self, gan_type: str = "vanilla", real_label: float = 1.0, fake_label: float = 0.0):
        super().__init__()
        if gan_type not in ("vanilla", "lsgan"):
            raise ValueError(f"GANLoss: gan_type must be vanilla or lsgan, not {gan_type!r}")
        self.gan_type, self.real_label, self.fake_label = gan_type, float(real_label), float(fake_label)

    def forward(self, logits: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        target = torch.full_like(logits, self.real_label if target_is_real else self.fake_label)
        if self.gan_type == "vanilla":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.mse_loss(logits, target)


# --------------------------------------------------------------------------------------------
# unsharp masking (Real-ESRGAN's "+": sharpened targets for the L1 and perceptual losses)


def gaussian_kernel1d(size: int, sigma: float = 0.0) -> torch.Tensor:
    """Normalized 1D Gaussian of ``size`` taps; ``sigma <= 0`` takes OpenCV's
    ``getGaussianKernel`` rule ``0.3 * ((size - 1) / 2 - 1) + 0.8`` (8.0 px for 51 taps)."""
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _reflect101_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``pad`` on each side, mirrored about the edge
    samples (OpenCV BORDER_REFLECT_101, torch 'reflect'), for any ``pad`` (repeated mirroring)."""
    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.abs() % period
    return torch.where(i >= n, period - i, i)


def gaussian_blur(img: torch.Tensor, kernel1d: torch.Tensor) -> torch.Tensor:
    """Separable blur of (N, C, H, W) with mirrored borders (OpenCV's default border)."""
    n, c, h, w = img.shape
    k = kernel1d.to(device=img.device, dtype=img.dtype)
    p = k.numel() // 2
    x = img.reshape(n * c, 1, h, w)
    x = x.index_select(2, _reflect101_index(h, p, img.device)).index_select(3, _reflect101_index(w, p, img.device))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return x.reshape(n, c, h, w)


def usm_sharpen(
    img: torch.Tensor,
    radius: int = 50,
    sigma: float = 0.0,
    weight: float = 0.5,
    threshold: float = 10.0,
    value_range: float = 1.0,
) -> torch.Tensor:
    """Unsharp masking as Real-ESRGAN sharpens its targets (BasicSR ``USMSharp``).

    With B the Gaussian blur of I (``radius`` taps, made odd; ``sigma`` as in
    :func:`gaussian_kernel1d`): K = clip(I + weight * (I - B)); the mask M = 1 where
    |I - B| exceeds ``threshold``, blurred by the same Gaussian; output M * K + (1 - M) * I.

    ``threshold`` is on the 0-255 scale of 8-bit images, where it was defined; ``img`` holds
    values in [0, ``value_range``] (our images: [0, 1]), so the residual is compared with
    ``threshold * value_range / 255`` and K is clipped to [0, ``value_range``]. Returns a tensor
    shaped like ``img``.
    """
    if radius % 2 == 0:
        radius += 1
    kernel = gaussian_kernel1d(radius, sigma)
    blur = gaussian_blur(img, kernel)
    residual = img - blur
    mask = (residual.abs() > threshold * value_range / 255.0).to(img.dtype)
    soft_mask = gaussian_blur(mask, kernel)
    sharp = (img + weight * residual).clamp(0.0, value_range)
    return soft_mask * sharp + (1.0 - soft_mask) * img


__all__ = ["PerceptualLoss", "GANLoss", "usm_sharpen", "gaussian_blur", "gaussian_kernel1d", "VGG19_LAYERS"]
