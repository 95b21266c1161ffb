"""The latent space shared by the latent diffusion models (paper sections 2.2 and 3.1).

The LDM and ResShift work on the latents of one KL-regularized autoencoder trained on HR-CT
slices (:class:`femursr.sr.autoencoder.Autoencoder`): a 512 x 512 slice becomes 6 x 64 x 64
(downsampling factor 8, 6 latent channels). The network is diffusers' ``AutoencoderKL`` with the
shape of CompVis/latent-diffusion's ``kl-f8`` first stage (``ch`` 128, ``ch_mult`` 1, 2, 4, 4,
2 residual blocks per level, attention only in the middle block), made single-channel and with 6
latent channels instead of 4.

Conventions shared by every model that uses this module:

* images are [0, 1] (normalized HU); the VAE sees them as ``2 x - 1`` in [-1, 1], as LDM's
  first stage does, and :func:`decode_latent` maps back (not clipped);
* a latent is the VAE's latent times ``scale`` (LDM's ``scale_factor``, set by ``scale_by_std``
  to 1 / std of the training latents so that they have about unit variance);
* sizes that are not a multiple of what the networks need are padded at the bottom and right
  edges (:func:`pad_to_multiple`) and cropped back (:func:`crop`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.nn import functional as F

#: the paper-scale autoencoder (schema ``models.autoencoder.network``): LDM kl-f8's shape
#: (ch 128, ch_mult [1, 2, 4, 4], num_res_blocks 2, GroupNorm 32), 1 channel, 6 latent channels
VAE_DEFAULTS: dict = {
    "latent_channels": 6,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
}

#: downsampling factor of the study's autoencoder
VAE_FACTOR = 8


def deep_merged(defaults: dict, params: dict | None) -> dict:
    """``params`` over ``defaults``, recursively for nested blocks (a partial block keeps the
    defaults of the keys it leaves out); lists and other values are replaced whole."""
    out = copy.deepcopy(defaults)
    for k, v in (params or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merged(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _network(network: dict | None) -> dict:
    net = {**copy.deepcopy(VAE_DEFAULTS), **copy.deepcopy(network or {})}
    unknown = sorted(set(net) - set(VAE_DEFAULTS))
    if unknown:
        raise ValueError(f"autoencoder network: unknown key(s) {unknown}; known: {', '.join(VAE_DEFAULTS)}")
    return net


def build_vae(network: dict | None = None):
    """A ``diffusers.AutoencoderKL`` (1 channel in and out) with the shape ``network`` (the
    config block ``models.autoencoder.network``, over :data:`VAE_DEFAULTS`), randomly
    initialized. Raises ValueError when its downsampling factor is not 8 or the group norm does
    not divide every level's channels."""
    from diffusers import AutoencoderKL

    net = _network(network)
    blocks = [int(c) for c in net["block_out_channels"]]
    factor = 2 ** (len(blocks) - 1)
    if factor != VAE_FACTOR:
        raise ValueError(
            f"autoencoder network: block_out_channels {blocks} has {len(blocks)} levels, a downsampling factor of "
            f"2^{len(blocks) - 1} = {factor}; the study's autoencoder downsamples by {VAE_FACTOR}: give 4 levels "
            "(models.autoencoder.network.block_out_channels)"
        )
    groups = int(net["norm_num_groups"])
    bad = [c for c in blocks if c % groups]
    if bad:
        raise ValueError(
            f"autoencoder network: norm_num_groups {groups} does not divide the channels {bad} of "
            f"block_out_channels {blocks}; change models.autoencoder.network.norm_num_groups"
        )
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        block_out_channels=tuple(blocks),
        layers_per_block=int(net["layers_per_block"]),
        latent_channels=int(net["latent_channels"]),
        norm_num_groups=groups,
    )


def vae_factor(vae) -> int:
    """Downsampling factor of a VAE built by :func:`build_vae` (8)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae) -> int:
    return int(vae.config.latent_channels)


def load_vae_state(path) -> dict:
    """The VAE weights (keys without the ``vae.`` prefix) of an autoencoder weights file written
    by :func:`femursr.sr.infer.save_generator` for the ``autoencoder`` model. Raises
    FileNotFoundError (train the autoencoder first) or ValueError (not such a file)."""
    from .infer import WEIGHTS_FORMAT

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: autoencoder weights not found; train the autoencoder first (rule train_autoencoder)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{path}: not a readable femursr weights file ({type(e).__name__}: {e}); retrain the autoencoder (rule train_autoencoder)") from None
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT or "state_dict" not in blob:
        raise ValueError(f"{path}: not a femursr SR weights file (format {WEIGHTS_FORMAT}); retrain the autoencoder (rule train_autoencoder)")
    if blob.get("model") != "autoencoder":
        raise ValueError(
            f"{path}: weights of model {blob.get('model')!r}, not of the autoencoder; the latent diffusion models need the "
            "file written by rule train_autoencoder (models.<name>.autoencoder names its config block)"
        )
    state = {k[len("vae.") :]: v for k, v in blob["state_dict"].items() if k.startswith("vae.")}
    if not state:
        raise ValueError(f"{path}: an autoencoder weights file without VAE weights (no keys 'vae.*'); retrain the autoencoder (rule train_autoencoder)")
    return state


# ------------------------------------------------------------------ padding
def pad_to_multiple(x: torch.Tensor, m: int, mode: str = "replicate") -> tuple[torch.Tensor, tuple[int, int]]:
    """``x`` (N, C, H, W) padded at the bottom and right to multiples of ``m`` (``replicate``,
    ``reflect`` or ``constant`` zeros), and its original (H, W) for :func:`crop`."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        if mode == "reflect" and (ph >= h or pw >= w):
            mode = "replicate"  # reflection cannot pad more than the size less one
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The top-left ``size`` (H, W) of ``x`` (undoes :func:`pad_to_multiple`)."""
    return x[..., : size[0], : size[1]]


# ------------------------------------------------------------------ latents
def encode_latent(vae, x: torch.Tensor, scale, sample: bool = False) -> torch.Tensor:
    """Latent (N, latent_channels, H/8, W/8) of images ``x`` (N, 1, H, W) in [0, 1], H and W
    multiples of 8: the posterior's mean, or with ``sample`` a draw from it (global torch RNG),
    times ``scale`` (a float or a 0-d tensor). Gradients flow when enabled."""
    dist = vae.encode(2.0 * x - 1.0).latent_dist
    z = dist.sample() if sample else dist.mode()
    return z * scale


def decode_latent(vae, z: torch.Tensor, scale) -> torch.Tensor:
    """Images (N, 1, 8 h, 8 w) in about [0, 1] (not clipped) of latents ``z`` scaled by ``scale``."""
    return (vae.decode(z / scale).sample + 1.0) / 2.0


def pixel_unshuffle_condition(lr: torch.Tensor, factor: int) -> torch.Tensor:
    """The LR (N, C, H, W) rearranged onto the latent grid: (N, C * factor^2, H / factor,
    W / factor), every pixel kept (``pixel_shuffle`` inverts it). H and W must be multiples of
    ``factor`` (pad first)."""
    h, w = lr.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"pixel_unshuffle_condition: {h} x {w} px is not a multiple of {factor}; pad with pad_to_multiple first")
    return F.pixel_unshuffle(lr, factor)
