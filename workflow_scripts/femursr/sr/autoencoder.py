"""The KL-regularized autoencoder of the latent diffusion models (paper sections 2.2 and 3.1).

Trained once on HR slices (``models.autoencoder``; the machinery feeds it the HR patches and
validates ``predict(hr)`` against ``hr``); the LDM (:mod:`femursr.sr.ldm`) and ResShift read its
weights. The network is :func:`femursr.sr.latent.build_vae` (diffusers ``AutoencoderKL``, LDM's
kl-f8 shape, 1 channel, 6 latent channels, factor 8). The loss is LDM's
``LPIPSWithDiscriminator`` adapted:

* phase ``pretrain``: reconstruction (``mse`` as in the paper, or ``l1`` as LDM) of a sample of
  the posterior, + ``perceptual_weight`` x VGG19 feature distance
  (:class:`~femursr.sr.losses.PerceptualLoss`, off without weights: LDM uses LPIPS, which needs
  weights we do not download) + ``kl_weight`` x KL(q(z|x) || N(0, I)). LDM sums the
  reconstruction over pixels and the KL over latent elements (kl_weight 1e-6 relative to that);
  here both are divided by the pixels of a patch, which keeps LDM's balance with mean losses.
  LDM's learnable output log-variance is left at its initial value 0 (not learned).
* phase ``gan``: the same plus the hinge adversarial term of a PatchGAN discriminator
  (:class:`PatchDiscriminator`, pix2pix/taming ``NLayerDiscriminator``); its weight is LDM's
  adaptive weight (``loss.adaptive_weight``, default on: ||grad NLL|| / ||grad G|| at the
  decoder's last layer, clamped to [0, 1e4]) times ``loss.gan_weight`` (kl-f8: 0.5), or
  ``gan_weight`` alone when the adaptive weight is off. Discriminator: hinge loss.

Adam with LDM's betas (0.5, 0.9), constant rates (LDM: no schedule): pretrain at
``pretrain.lr``, gan at ``gan.lr`` for both networks (the paper: 4.5e-5). No EMA (LDM's first
stage keeps none).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from .base import Phase, PhaseSetup, SRModel, StepContext, count_parameters
from .gan import _frozen
from .latent import VAE_DEFAULTS, build_vae, crop, deep_merged, pad_to_multiple, vae_factor
from .losses import PerceptualLoss

AUTOENCODER_DEFAULTS: dict = {
    "pretrain": {"epochs": 2, "lr": 4.5e-5},
    "gan": {"epochs": 2, "lr": 4.5e-5},
    "betas": [0.5, 0.9],
    "network": copy.deepcopy(VAE_DEFAULTS),
    "discriminator": {"features": 64, "layers": 3},
    "loss": {
        "reconstruction": "mse",
        "perceptual_weight": 1.0,
        "perceptual_layers": {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0},
        "kl_weight": 1.0e-6,
        "gan_weight": 0.5,
        "adaptive_weight": True,
    },
}


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix; taming's ``NLayerDiscriminator``): a 4 x 4 convolution
    with stride 2, ``layers - 1`` more stride-2 stages doubling the features (at most 8 x),
    one stride-1 stage, and a 1-channel 4 x 4 convolution; batch norm after every convolution
    but the first and last, LeakyReLU 0.2. Output: a logit per overlapping patch (70 x 70 px
    receptive field for 3 layers). Initialized as pix2pix (N(0, 0.02); BN weights N(1, 0.02))."""

    def __init__(self, in_channels: int = 1, features: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, features, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            mods += [nn.Conv2d(features * prev, features * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(features * mult), nn.LeakyReLU(0.2, True)]
        mods.append(nn.Conv2d(features * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def kl_per_pixel(mean: torch.Tensor, logvar: torch.Tensor, pixels: int) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over a sample's latent, averaged over the
    batch, divided by ``pixels`` (the image's pixels)."""
    mean, logvar = mean.float(), logvar.float().clamp(-30.0, 20.0)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
    return kl.mean() / pixels


class Autoencoder(SRModel):
    """KL autoencoder of HR slices: ``models.autoencoder`` (see the module docstring)."""

    name = "autoencoder"
    validation_input = "hr"
    inference_modules = ("vae",)

    def __init__(self, in_channels: int = 1, params: dict | None = None, perceptual_weights: str | None = None):
        if int(in_channels) != 1:
            raise ValueError(f"autoencoder: trained on single HR slices (in_channels 1), not {in_channels}; the registry builds it with dims 2d")
        super().__init__(in_channels)
        self.params = p = deep_merged(AUTOENCODER_DEFAULTS, params)
        self.vae = build_vae(p["network"])
        d = p["discriminator"]
        self.discriminator = PatchDiscriminator(1, int(d["features"]), int(d["layers"]))
        loss = p["loss"]
        if loss["reconstruction"] not in ("l1", "mse"):
            raise ValueError(f"models.autoencoder.loss.reconstruction must be l1 or mse, not {loss['reconstruction']!r}")
        self.reconstruction_loss = F.l1_loss if loss["reconstruction"] == "l1" else F.mse_loss
        self.perceptual_weights = perceptual_weights
        self.perceptual = PerceptualLoss(perceptual_weights, loss["perceptual_layers"]) if float(loss["perceptual_weight"]) > 0 else None

    @property
    def factor(self) -> int:
        return vae_factor(self.vae)

    @property
    def perceptual_on(self) -> bool:
        return self.perceptual is not None and self.perceptual.enabled

    # ---- the contract
    def phases(self) -> list[Phase]:
        return [Phase("pretrain", int(self.params["pretrain"]["epochs"])), Phase("gan", int(self.params["gan"]["epochs"]))]

    def _adam(self, module: nn.Module, lr: float) -> torch.optim.Adam:
        return torch.optim.Adam(module.parameters(), lr=float(lr), betas=tuple(self.params["betas"]))

    def configure_phase(self, phase: str, iterations: int) -> PhaseSetup:
        if phase == "pretrain":
            return PhaseSetup({"vae": self._adam(self.vae, self.params["pretrain"]["lr"])})
        if phase == "gan":
            lr = self.params["gan"]["lr"]
            return PhaseSetup({"vae": self._adam(self.vae, lr), "discriminator": self._adam(self.discriminator, lr)})
        raise ValueError(f"autoencoder: unknown phase {phase!r} (pretrain, gan)")

    def _reconstruct(self, hr: torch.Tensor):
        """Reconstruction of ``hr`` ([0, 1]) from a posterior sample, and the posterior."""
        post = self.vae.encode(2.0 * hr - 1.0).latent_dist
        rec = (self.vae.decode(post.sample()).sample + 1.0) / 2.0
        return rec, post

    def _adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """LDM's weight of the adversarial term: ||grad nll|| / ||grad g_loss|| at the decoder's
        last convolution, clamped to [0, 1e4], not differentiated."""
        last = self.vae.decoder.conv_out.weight
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (g_nll.float().norm() / (g_adv.float().norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def training_step(self, phase: str, lr: torch.Tensor, hr: torch.Tensor, setup: PhaseSetup, ctx: StepContext) -> dict[str, float]:
        if phase not in ("pretrain", "gan"):
            raise ValueError(f"autoencoder: unknown phase {phase!r} (pretrain, gan)")
        f = self.factor
        if hr.shape[-2] % f or hr.shape[-1] % f:
            raise ValueError(f"autoencoder: training patches of {tuple(hr.shape[-2:])} px are not a multiple of the downsampling factor {f}; set training.patch_size_px to a multiple of {f}")
        loss = self.params["loss"]
        hr = hr.float()
        pixels = hr.shape[-2] * hr.shape[-1]
        out: dict[str, torch.Tensor] = {}
        with _frozen(self.discriminator):
            with ctx.autocast():
                rec, post = self._reconstruct(hr)
                nll = self.reconstruction_loss(rec.float(), hr)
                out["l_rec"] = nll
                if self.perceptual_on:
                    l_percep = float(loss["perceptual_weight"]) * self.perceptual(rec, hr)
                    nll = nll + l_percep
                    out["l_percep"] = l_percep
                l_kl = float(loss["kl_weight"]) * kl_per_pixel(post.mean, post.logvar, pixels)
                out["l_kl"] = l_kl
                total = nll + l_kl
                if phase == "gan":
                    g_loss = -self.discriminator(rec).float().mean()
                    weight = torch.as_tensor(float(loss["gan_weight"]), device=hr.device)
                    if loss["adaptive_weight"]:
                        weight = weight * self._adaptive_weight(nll, g_loss)
                    total = total + weight * g_loss
                    out.update(l_g_gan=g_loss, gan_weight=weight)
            ctx.backward_step(total, setup.optimizers["vae"], "vae")
        out["l_total"] = total
        if phase == "gan":
            with ctx.autocast():
                real = self.discriminator(hr).float()
                fake = self.discriminator(rec.detach()).float()
                l_d = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
            ctx.backward_step(l_d, setup.optimizers["discriminator"], "discriminator")
            out.update(l_d=l_d, out_d_real=real.detach().mean(), out_d_fake=fake.detach().mean())
        return {k: float(v.detach().item()) for k, v in out.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (N, 1, H, W) in [0, 1] of images ``x`` (N, 1, H, W), any H, W
        (replicate-padded to a multiple of 8 and cropped back): decoder of the posterior mean."""
        xp, size = pad_to_multiple(x.float(), self.factor)
        post = self.vae.encode(2.0 * xp - 1.0).latent_dist
        rec = (self.vae.decode(post.mode()).sample.float() + 1.0) / 2.0
        return crop(rec, size).clamp_(0.0, 1.0)

    def record(self) -> dict:
        p = self.params
        lc = int(self.vae.config.latent_channels)
        return {
            "name": self.name,
            "in_channels": self.in_channels,
            "parameters": {"vae": count_parameters(self.vae), "discriminator": count_parameters(self.discriminator)},
            "networks": {"vae": "diffusers.AutoencoderKL", "discriminator": "PatchDiscriminator", "network": copy.deepcopy(p["network"]), "discriminator_shape": copy.deepcopy(p["discriminator"])},
            "latent": {"channels": lc, "factor": self.factor, "of_512_px": [lc, 512 // self.factor, 512 // self.factor]},
            "loss": copy.deepcopy(p["loss"]),
            "perceptual": {
                "on": self.perceptual_on,
                "weights": self.perceptual_weights,
                "why_off": None if self.perceptual_on else ("loss.perceptual_weight is 0" if self.perceptual is None else "no VGG19 weights file given"),
            },
            "optimizer": {"type": "Adam", "betas": list(p["betas"]), "schedule": "constant"},
            "phases": [{"name": ph.name, "epochs": ph.epochs} for ph in self.phases()],
        }
