"""Generators and discriminators of the GAN SR models (paper section 2.2).

Generators map an LR slice stack (N, C, H, W) already on the HR grid to the HR slice (N, 1, H, W)
of the same size; C is 1 (2D) or 2 * neighbours + 1 (2.5D, centre slice at channel C // 2).

- :class:`SRResNet`: SRGAN's generator (Ledig et al. 2017) without its upsampling blocks and
  with 16 + 4 residual blocks.
- :class:`VGGDiscriminator`: the VGG-style discriminator of SRGAN/ESRGAN, deepened so that a
  512 px patch is reduced to a 4 x 4 map before the dense head.
- :class:`RRDBNet`: ESRGAN/Real-ESRGAN's generator with 23 + 3 RRDB blocks, made same-size by
  pixel unshuffle (the scale-1 variant of BasicSR).
- :class:`UNetDiscriminatorSN`: Real-ESRGAN's U-Net discriminator with spectral normalization,
  one realness logit per pixel.

Written after the descriptions in the papers and the layouts of BasicSR and Real-ESRGAN (layer
sizes and initialization scales), so that parameter counts match the reference architectures.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm


def _scaled_kaiming_(modules, scale: float) -> None:
    """Kaiming-normal init of convolutions multiplied by ``scale``, biases zero.

    Deep residual trunks (ESRGAN, EDSR) start with small residual branches so that the sum of
    many blocks stays near the identity at initialization; BasicSR uses scale 0.1.
    """
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            m.weight.data.mul_(scale)
            if m.bias is not None:
                m.bias.data.zero_()


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    """``x`` padded at the bottom and right to a multiple of ``multiple`` (reflect where the
    image is large enough, replicate otherwise); returns the padded tensor and the original H, W."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if (ph < h and pw < w) else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


# --------------------------------------------------------------------------------------------
# SRGAN


class ResidualBlock(nn.Module):
    """SRResNet residual block: conv3-BN-PReLU-conv3-BN plus the identity (BN optional)."""

    def __init__(self, features: int, batch_norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(features) if batch_norm else nn.Identity()
        self.act = nn.PReLU()
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(features) if batch_norm else nn.Identity()
        if batch_norm:
            # the BN scale sets the size of the residual branch at initialization
            nn.init.constant_(self.bn2.weight, 0.1)
        else:
            _scaled_kaiming_([self.conv1, self.conv2], 0.1)

    def forward(self, x):
        return x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class SRResNet(nn.Module):
    """SRGAN's generator for same-size SR: no upsampling blocks, ``n_blocks + n_extra_blocks``
    residual blocks.

    Layout (Ledig et al. 2017, Fig. 4, upsampling removed): conv 9x9 + PReLU; the residual trunk;
    conv 3x3 + BN plus the long skip from the first features; conv 9x9 to ``out_channels``.
    The paper (section 2.2) adds four residual blocks "into the generator" because its inputs are
    larger than SRGAN's: they extend the trunk (16 + 4 = 20 identical blocks under the long skip),
    which widens the receptive field; the removed upsampling blocks are not replaced.

    ``global_skip``: the output is a residual on the input's centre channel (the LR slice being
    super-resolved), as BasicSR's MSRResNet adds the interpolated input; the network then learns
    the HR - LR detail. Returns (N, out_channels, H, W) for any H, W.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 1,
        features: int = 64,
        n_blocks: int = 16,
        n_extra_blocks: int = 4,
        batch_norm: bool = True,
        global_skip: bool = True,
    ):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.global_skip = bool(global_skip)
        self.head = nn.Sequential(nn.Conv2d(in_channels, features, 9, padding=4), nn.PReLU())
        self.body = nn.Sequential(*(ResidualBlock(features, batch_norm) for _ in range(n_blocks + n_extra_blocks)))
        self.body_end = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1, bias=not batch_norm),
            nn.BatchNorm2d(features) if batch_norm else nn.Identity(),
        )
        self.tail = nn.Conv2d(features, out_channels, 9, padding=4)
        if self.global_skip:
            # start near the identity: the tail's output is a small correction of the LR slice
            _scaled_kaiming_([self.tail], 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.head(x)
        out = self.tail(feat + self.body_end(self.body(feat)))
        if self.global_skip:
            c = self.in_channels // 2
            out = out + x[:, c : c + 1]
        return out


class VGGDiscriminator(nn.Module):
    """VGG-style discriminator (SRGAN, ESRGAN) for ``patch_size`` px patches; one logit per patch.

    ``conv3 + LReLU``, then stages of (conv3 stride 1, conv4 stride 2), each with BN and
    LeakyReLU 0.2, channels ``features * (1, 2, 4, 8, 8, ...)``, until the map is 4 x 4 (BasicSR
    uses 5 stages for 128 px and 6 for 256; 512 px needs 7, the demo's 64 px 4); then a dense
    head ``features * 8 * 16 -> 100 -> 1``. Sizes that are not 4 * 2^k use ceil(log2(size / 4))
    stages and an adaptive average pool to 4 x 4 before the head, so any patch at least as large
    as the configured one is accepted.
    """

    def __init__(self, in_channels: int = 1, features: int = 64, patch_size: int = 512):
        super().__init__()
        if patch_size < 8:
            raise ValueError(f"VGGDiscriminator: patch_size must be at least 8 px, not {patch_size}")
        self.patch_size = int(patch_size)
        self.n_stages = max(1, math.ceil(math.log2(patch_size / 4)))
        act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        layers: list[nn.Module] = [nn.Conv2d(in_channels, features, 3, 1, 1), act()]
        layers += [nn.Conv2d(features, features, 4, 2, 1, bias=False), nn.BatchNorm2d(features), act()]
        ch = features
        for i in range(1, self.n_stages):
            out = features * min(2**i, 8)
            layers += [nn.Conv2d(ch, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out), act()]
            layers += [nn.Conv2d(out, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), act()]
            ch = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(ch * 16, 100), act(), nn.Linear(100, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1)."""
        if min(x.shape[-2:]) < 2**self.n_stages:
            raise ValueError(
                f"VGGDiscriminator built for {self.patch_size} px patches ({self.n_stages} stride-2 stages) "
                f"got {tuple(x.shape[-2:])} px; build it with the training patch size"
            )
        return self.head(self.pool(self.features(x)))


# --------------------------------------------------------------------------------------------
# Real-ESRGAN


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs (growth ``growth``), residual scaled by 0.2 (ESRGAN)."""

    def __init__(self, features: int = 64, growth: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(features + i * growth, growth if i < 4 else features, 3, 1, 1) for i in range(5)
        )
        _scaled_kaiming_(self.convs, 0.1)

    def forward(self, x):
        feats = [x]
        for i, conv in enumerate(self.convs):
            y = conv(torch.cat(feats, 1))
            if i < 4:
                feats.append(F.leaky_relu(y, 0.2))
        return x + 0.2 * y


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, residual scaled by 0.2."""

    def __init__(self, features: int = 64, growth: int = 32):
        super().__init__()
        self.rdbs = nn.Sequential(*(ResidualDenseBlock(features, growth) for _ in range(3)))

    def forward(self, x):
        return x + 0.2 * self.rdbs(x)


class RRDBNet(nn.Module):
    """Real-ESRGAN's RRDBNet for same-size SR (BasicSR's scale-1 variant).

    Pixel unshuffle by ``unshuffle`` (the body runs at 1/unshuffle resolution on
    ``in_channels * unshuffle**2`` channels), conv 3x3, ``n_blocks + n_extra_blocks`` RRDBs
    (paper: 23 of Real-ESRGAN plus 3 for the larger inputs) and a conv under a long skip, then
    log2(unshuffle) x (nearest x2 upsampling + conv 3x3 + LReLU), conv 3x3 + LReLU, conv 3x3 to
    ``out_channels``. Any H, W: the input is padded (reflect) to a multiple of ``unshuffle`` and
    the output cropped back. Returns (N, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 1,
        features: int = 64,
        growth: int = 32,
        n_blocks: int = 23,
        n_extra_blocks: int = 3,
        unshuffle: int = 4,
    ):
        super().__init__()
        n_up = int(round(math.log2(unshuffle))) if unshuffle > 1 else 0
        if unshuffle < 1 or 2**n_up != unshuffle:
            raise ValueError(f"RRDBNet: unshuffle must be 1 or a power of 2, not {unshuffle}")
        self.in_channels, self.out_channels, self.unshuffle = int(in_channels), int(out_channels), int(unshuffle)
        self.conv_first = nn.Conv2d(in_channels * unshuffle**2, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(n_blocks + n_extra_blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        self.up = nn.ModuleList(nn.Conv2d(features, features, 3, 1, 1) for _ in range(n_up))
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = _pad_to_multiple(x, self.unshuffle)
        feat = F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.up:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        return out[..., :h, :w]


class UNetDiscriminatorSN(nn.Module):
    """Real-ESRGAN's U-Net discriminator with spectral normalization: a realness logit per pixel.

    conv3 (plain); three stride-2 conv4 (SN) to ``features * (2, 4, 8)``; three bilinear x2
    upsamplings each followed by conv3 (SN) down to ``features * (4, 2, 1)`` channels, with
    additive skips from the encoder when ``skip_connection``; two conv3 (SN); conv3 to 1 channel.
    LeakyReLU 0.2 throughout. Upsampling goes to the size of the matching encoder map, so any
    H, W works (for sizes divisible by 8 this is exactly x2). Returns (N, 1, H, W).
    """

    def __init__(self, in_channels: int = 1, features: int = 64, skip_connection: bool = True):
        super().__init__()
        f = features
        self.skip_connection = bool(skip_connection)
        sn = spectral_norm
        self.conv0 = nn.Conv2d(in_channels, f, 3, 1, 1)
        self.down = nn.ModuleList(
            [sn(nn.Conv2d(f, 2 * f, 4, 2, 1, bias=False)), sn(nn.Conv2d(2 * f, 4 * f, 4, 2, 1, bias=False)),
             sn(nn.Conv2d(4 * f, 8 * f, 4, 2, 1, bias=False))]
        )  # fmt: skip
        self.up = nn.ModuleList(
            [sn(nn.Conv2d(8 * f, 4 * f, 3, 1, 1, bias=False)), sn(nn.Conv2d(4 * f, 2 * f, 3, 1, 1, bias=False)),
             sn(nn.Conv2d(2 * f, f, 3, 1, 1, bias=False))]
        )  # fmt: skip
        self.extra = nn.ModuleList([sn(nn.Conv2d(f, f, 3, 1, 1, bias=False)), sn(nn.Conv2d(f, f, 3, 1, 1, bias=False))])
        self.conv_last = nn.Conv2d(f, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [F.leaky_relu(self.conv0(x), 0.2)]
        for conv in self.down:
            skips.append(F.leaky_relu(conv(skips[-1]), 0.2))
        feat = skips.pop()
        for conv in self.up:
            skip = skips.pop()
            feat = F.interpolate(feat, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            feat = F.leaky_relu(conv(feat), 0.2)
            if self.skip_connection:
                feat = feat + skip
        for conv in self.extra:
            feat = F.leaky_relu(conv(feat), 0.2)
        return self.conv_last(feat)
