"""The Swin-UNet denoiser of ResShift and its LR feature extractor (paper section 2.2).

The layout is ResShift's ``UNetModelSwin`` (Yue et al. 2023): a diffusion U-Net (guided
diffusion's, with residual blocks conditioned on the timestep by scale and shift of the group
norm) in which the first residual block of every level listed in ``swin_levels``, on the way
down and on the way up, and the middle block are followed by a Swin transformer layer: a 1 x 1
projection to ``swin_embed_dim`` channels, ``swin_depth`` blocks of window attention (the odd
ones on windows shifted by half a window), a 1 x 1 projection back. As in ResShift, the
normalization inside the Swin blocks is a group norm on the feature map and their MLP is made of
1 x 1 convolutions.

The input is the noisy latent concatenated with the features that :class:`LRFeatureExtractor`
computes from the original LR slice (1 channel in 2D, 5 in 2.5D). ResShift builds that extractor
whenever its LQ image is larger than the latent grid: per factor 2, a 3 x 3 convolution, SiLU and
a stride-2 3 x 3 convolution that doubles the channels (16 -> 32 -> 64 -> 128 for a factor of 8).
It is learnable (unlike a pixel unshuffle, which would only rearrange 64 pixels into channels),
brings the LR's full-resolution detail to the 8x coarser latent grid, and takes the 2.5D stack by
its first convolution's input channels alone, as the paper's "feature extractor adapted for five
channels" says.

Sizes: the U-Net halves the grid ``len(channel_mult) - 1`` times, so the latent is padded
(replicated) at the bottom and right to a multiple of :attr:`SwinUNet.size_multiple` and cropped
back. Windows work for any feature-map size: each attention block pads the map to whole windows
and masks the padded tokens out of the attention (besides the usual mask of the shifted windows),
so a token attends only to real tokens of its own window. Shifted windows are used at every size
(a map of one window included), so the blocks compute the same thing on the training patches as
on whole slices.

Blocks taken from libraries: diffusers' ``ResnetBlock2D`` (``scale_shift`` time embedding),
``Downsample2D``, ``Upsample2D``, ``Timesteps`` and ``TimestepEmbedding``; timm's
``WindowAttention`` (relative position bias), ``window_partition``, ``window_reverse`` and
``Mlp``. The last convolution of every residual block and of the output are zero-initialized,
as in guided diffusion and ResShift.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

#: ResShift's realsr_swinunet_realesrgan256 network (the schema's defaults, the paper's network)
SWINUNET_DEFAULTS: dict = {
    "channels": 160,
    "channel_mult": [1, 2, 2, 4],
    "res_blocks": 2,
    "swin_levels": [0, 1, 2, 3],
    "swin_depth": 2,
    "swin_embed_dim": 192,
    "swin_head_channels": 32,
    "window_size": 8,
    "mlp_ratio": 4.0,
    "norm_groups": 32,
    "dropout": 0.0,
}

#: ResShift's extractor starts at 16 channels and doubles them at every factor 2
EXTRACTOR_DEFAULTS: dict = {"base_channels": 16}

_MASKED = -100.0  # Swin's additive attention mask: exp(-100) is 0 in float32 and bfloat16


def _check_groups(what: str, channels: int, groups: int) -> None:
    if channels % groups:
        raise ValueError(f"Swin-UNet: {what} has {channels} channels, not a multiple of norm_groups {groups}; change network.norm_groups or the channels")


class LRFeatureExtractor(nn.Module):
    """LR slice (N, C, H, W) in [0, 1] -> features (N, out_channels, H / factor, W / factor).

    ResShift's extractor: ``log2(factor)`` stages of 3 x 3 conv, SiLU, stride-2 3 x 3 conv that
    doubles the channels; ``out_channels = base_channels * factor``. The LR enters as
    ``2 x - 1``, the range the autoencoder sees.
    """

    def __init__(self, in_channels: int, factor: int = 8, base_channels: int = 16):
        super().__init__()
        stages = int(round(math.log2(factor)))
        if factor < 2 or 2**stages != factor:
            raise ValueError(f"LR feature extractor: factor must be a power of 2 (the autoencoder's downsampling), not {factor}")
        layers: list[nn.Module] = []
        ch, base = int(in_channels), int(base_channels)
        for _ in range(stages):
            layers += [nn.Conv2d(ch, base, 3, padding=1), nn.SiLU(), nn.Conv2d(base, 2 * base, 3, stride=2, padding=1)]
            ch = base = 2 * base
        self.layers = nn.Sequential(*layers)
        self.in_channels = int(in_channels)
        self.factor = int(factor)
        self.out_channels = ch

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.layers(2.0 * lr - 1.0)


class SwinBlock(nn.Module):
    """One Swin transformer block on a (B, C, H, W) map: group norm, (shifted) window attention
    with relative position bias, residual; group norm, 1 x 1-conv MLP, residual. Any H, W."""

    def __init__(self, dim: int, heads: int, window: int, shift: bool, mlp_ratio: float, groups: int, dropout: float = 0.0):
        super().__init__()
        from timm.layers import Mlp
        from timm.models.swin_transformer import WindowAttention

        self.window = int(window)
        self.shift = self.window // 2 if shift else 0
        self.norm1 = nn.GroupNorm(groups, dim)
        self.attn = WindowAttention(dim, num_heads=heads, window_size=self.window, qkv_bias=True, proj_drop=dropout)
        self.norm2 = nn.GroupNorm(groups, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), use_conv=True, drop=dropout)

    def attention_mask(self, h: int, w: int, device, dtype) -> torch.Tensor | None:
        """Additive mask (windows, N, N) for a map of h x w tokens padded to whole windows and
        rolled by the shift: 0 where key and query lie in the same region of the rolled map and
        the key is a real token, -100 elsewhere; ``None`` when nothing is masked."""
        ws, s = self.window, self.shift
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        if not s and (hp, wp) == (h, w):
            return None
        from timm.models.swin_transformer import window_partition

        region = torch.zeros((1, hp, wp, 1), device=device)
        if s:
            cuts = ((0, hp - ws), (hp - ws, hp - s), (hp - s, hp)), ((0, wp - ws), (wp - ws, wp - s), (wp - s, wp))
            n = 0
            for y0, y1 in cuts[0]:
                for x0, x1 in cuts[1]:
                    region[:, y0:y1, x0:x1] = n
                    n += 1
        valid = torch.zeros((1, hp, wp, 1), device=device)
        valid[:, :h, :w] = 1
        if s:
            valid = torch.roll(valid, shifts=(-s, -s), dims=(1, 2))
        region = window_partition(region, (ws, ws)).reshape(-1, ws * ws)
        valid = window_partition(valid, (ws, ws)).reshape(-1, ws * ws)
        mask = (region[:, None, :] != region[:, :, None]) | (valid[:, None, :] == 0)
        return torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill_(mask, _MASKED)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        from timm.models.swin_transformer import window_partition, window_reverse

        b, c, h, w = x.shape
        ws, s = self.window, self.shift
        x = x.permute(0, 2, 3, 1)  # B H W C
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = window_partition(x, (ws, ws)).reshape(-1, ws * ws, c)
        mask = self.attention_mask(h, w, x.device, torch.float32)
        out = self.attn(windows, mask=mask)
        out = window_reverse(out.reshape(-1, ws, ws, c), (ws, ws), hp, wp)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        return out[:, :h, :w].permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SwinLayer(nn.Module):
    """ResShift's ``BasicLayer`` with patch size 1: 1 x 1 conv to ``embed_dim``, ``depth`` Swin
    blocks (every second one shifted), 1 x 1 conv back to ``channels``."""

    def __init__(self, channels: int, embed_dim: int, heads: int, window: int, depth: int, mlp_ratio: float, groups: int, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, embed_dim, 1)
        self.blocks = nn.ModuleList(SwinBlock(embed_dim, heads, window, i % 2 == 1, mlp_ratio, groups, dropout) for i in range(depth))
        self.proj_out = nn.Conv2d(embed_dim, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for blk in self.blocks:
            x = blk(x)
        return self.proj_out(x)


class _Step(nn.ModuleList):
    """Layers applied in turn; residual blocks also get the timestep embedding."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        from diffusers.models.resnet import ResnetBlock2D

        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResnetBlock2D) else layer(h)
        return h


class SwinUNet(nn.Module):
    """The denoiser: (noisy latent (N, latent_channels, h, w), timesteps (N,), LR (N, lr_channels,
    factor h, factor w)) -> (N, out_channels, h, w), any h, w.

    ``lr_channels`` 0 builds no feature extractor (the input is the latent alone). The network
    keys are those of :data:`SWINUNET_DEFAULTS`; ``extractor`` those of
    :data:`EXTRACTOR_DEFAULTS`.
    """

    def __init__(self, latent_channels: int, out_channels: int | None = None, lr_channels: int = 1, factor: int = 8, network: dict | None = None, extractor: dict | None = None):
        super().__init__()
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.upsampling import Upsample2D

        net = {**SWINUNET_DEFAULTS, **(network or {})}
        ext = {**EXTRACTOR_DEFAULTS, **(extractor or {})}
        unknown = sorted(set(net) - set(SWINUNET_DEFAULTS)) + sorted(set(ext) - set(EXTRACTOR_DEFAULTS))
        if unknown:
            raise ValueError(f"Swin-UNet: unknown key(s) {unknown}; network keys: {', '.join(SWINUNET_DEFAULTS)}; feature_extractor keys: {', '.join(EXTRACTOR_DEFAULTS)}")
        self.network = net
        mc, mult = int(net["channels"]), [int(m) for m in net["channel_mult"]]
        nres, groups, drop = int(net["res_blocks"]), int(net["norm_groups"]), float(net["dropout"])
        swin_levels = {int(v) for v in net["swin_levels"]}
        if not mult:
            raise ValueError("Swin-UNet: network.channel_mult is empty")
        if swin_levels - set(range(len(mult))):
            raise ValueError(f"Swin-UNet: swin_levels {sorted(swin_levels)} name levels that channel_mult {mult} does not have (0 ... {len(mult) - 1})")
        embed, head_ch = int(net["swin_embed_dim"]), int(net["swin_head_channels"])
        if embed % head_ch:
            raise ValueError(f"Swin-UNet: swin_embed_dim {embed} is not a multiple of swin_head_channels {head_ch}")
        for m in mult:
            _check_groups("a level", mc * m, groups)
        _check_groups("the Swin layers (swin_embed_dim)", embed, groups)
        heads = embed // head_ch
        out_channels = int(out_channels or latent_channels)
        self.latent_channels, self.out_channels = int(latent_channels), out_channels
        self.levels = len(mult)

        def res(cin, cout):
            return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=4 * mc, groups=groups, dropout=drop, time_embedding_norm="scale_shift", eps=1e-5)

        def swin(ch):
            return SwinLayer(ch, embed, heads, int(net["window_size"]), int(net["swin_depth"]), float(net["mlp_ratio"]), groups, drop)

        self.time_proj = Timesteps(mc, flip_sin_to_cos=True, downscale_freq_shift=0)  # [cos, sin] as guided diffusion
        self.time_embedding = TimestepEmbedding(mc, 4 * mc)
        if lr_channels:
            self.feature_extractor = LRFeatureExtractor(lr_channels, factor, int(ext["base_channels"]))
            cond = self.feature_extractor.out_channels
        else:
            self.feature_extractor = None
            cond = 0
        self.factor = int(factor)
        ch = mc * mult[0]
        self.conv_in = nn.Conv2d(latent_channels + cond, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch]
        for level, m in enumerate(mult):
            for j in range(nres):
                layers = [res(ch, mc * m)]
                ch = mc * m
                if level in swin_levels and j == 0:
                    layers.append(swin(ch))
                self.down.append(_Step(layers))
                skips.append(ch)
            if level != len(mult) - 1:
                self.down.append(_Step([Downsample2D(ch, use_conv=True, out_channels=ch, padding=1)]))
                skips.append(ch)
        self.middle = _Step([res(ch, ch), swin(ch), res(ch, ch)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(nres + 1):
                layers = [res(ch + skips.pop(), mc * m)]
                ch = mc * m
                if level in swin_levels and i == 0:
                    layers.append(swin(ch))
                if level and i == nres:
                    layers.append(Upsample2D(ch, use_conv=True))
                self.up.append(_Step(layers))
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        for mod in self.modules():
            if isinstance(mod, ResnetBlock2D):
                nn.init.zeros_(mod.conv2.weight)
                nn.init.zeros_(mod.conv2.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def size_multiple(self) -> int:
        """The latent's height and width are padded to a multiple of this (2 per downsampling)."""
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, lr: torch.Tensor | None = None) -> torch.Tensor:
        h0, w0 = x.shape[-2:]
        m = self.size_multiple
        ph, pw = (-h0) % m, (-w0) % m
        if self.feature_extractor is not None:
            if lr is None:
                raise ValueError("Swin-UNet: built with an LR feature extractor, but no LR was given")
            want = (h0 * self.factor, w0 * self.factor)
            if tuple(lr.shape[-2:]) != want:
                raise ValueError(f"Swin-UNet: LR of {tuple(lr.shape[-2:])} px for a latent of {(h0, w0)}; expected {want} (factor {self.factor})")
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            if lr is not None and self.feature_extractor is not None:
                lr = F.pad(lr, (0, pw * self.factor, 0, ph * self.factor), mode="replicate")
        emb = self.time_embedding(self.time_proj(t.reshape(-1)).to(x.dtype))
        if self.feature_extractor is not None:
            x = torch.cat([x, self.feature_extractor(lr).to(x.dtype)], dim=1)
        h = self.conv_in(x)
        hs = [h]
        for step in self.down:
            h = step(h, emb)
            hs.append(h)
        h = self.middle(h, emb)
        for step in self.up:
            h = step(torch.cat([h, hs.pop()], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[..., :h0, :w0]
