"""SRGAN and Real-ESRGAN+ as :class:`~femursr.sr.base.SRModel` s (paper sections 2.2 and 3.1).

Both train in two phases: ``pretrain`` (the generator alone on a pixel loss) and ``gan`` (the
pre-trained generator, the same module, against a discriminator). Adam with BasicSR's betas
(0.9, 0.99); an exponential moving average of the generator (decay 0.999 as in BasicSR and
Real-ESRGAN) is updated after every step of both phases and used by :meth:`predict`.

- **SRGAN** (``models.srgan``): :class:`~femursr.sr.networks.SRResNet` (16 + 4 residual
  blocks, no upsampling) and :class:`~femursr.sr.networks.VGGDiscriminator`. Pre-training on
  MSE, as SRResNet was trained (Ledig et al.; the paper's 1e-4 is theirs), with a multi-step
  schedule; GAN phase: pixel + VGG19 content loss + 1e-3 x adversarial, discriminator at 1e-6.
- **Real-ESRGAN+** (``models.realesrgan``): :class:`~femursr.sr.networks.RRDBNet` (23 + 3
  RRDBs, pixel unshuffle) and :class:`~femursr.sr.networks.UNetDiscriminatorSN`. Pre-training
  on L1 (Real-ESRNet), constant rate; GAN phase: L1 1.0 and perceptual 1.0 against the
  unsharp-masked target, GAN 0.1 against the plain target (Real-ESRGAN's "+", x4plus options),
  discriminator at 1e-4. No synthetic degradation: the LR is a real scan.

Hyper-parameters come from the config block (schema: ``config/schemas/config.schema.yaml``,
defaults there are the paper's architecture); :data:`SRGAN_DEFAULTS` and
:data:`REALESRGAN_DEFAULTS` repeat them so that a partial block also works outside Snakemake
(a test keeps the two in step).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.nn import functional as F

from .base import Phase, PhaseSetup, SRModel, StepContext, count_parameters, ema_update
from .losses import GANLoss, PerceptualLoss, usm_sharpen
from .networks import RRDBNet, SRResNet, UNetDiscriminatorSN, VGGDiscriminator

_ADAM_BETAS = [0.9, 0.99]

SRGAN_DEFAULTS: dict = {
    "pretrain": {"epochs": 2, "lr": 1.0e-4, "scheduler": "multistep"},
    "gan": {"epochs": 2, "lr_generator": 1.0e-4, "lr_discriminator": 1.0e-6},
    "gan_scheduler": "multistep",
    "multistep": {"milestones": [0.125, 0.25, 0.5, 0.75], "gamma": 0.5},
    "betas": _ADAM_BETAS,
    "ema_decay": 0.999,
    "ema_warmup": False,
    "network": {
        "generator": {"features": 64, "n_blocks": 16, "n_extra_blocks": 4, "batch_norm": True, "global_skip": True},
        "discriminator": {"features": 64, "patch_size": 512},
    },
    "loss": {
        "pixel": "mse",
        "pixel_weight": 1.0,
        "perceptual_weight": 1.0,
        "perceptual_layers": {"conv5_4": 1.0},
        "gan_weight": 1.0e-3,
        "gan_type": "vanilla",
    },
}

REALESRGAN_DEFAULTS: dict = {
    "pretrain": {"epochs": 2, "lr": 2.0e-4, "scheduler": "constant"},
    "gan": {"epochs": 2, "lr_generator": 1.0e-4, "lr_discriminator": 1.0e-4},
    "gan_scheduler": "constant",
    "multistep": {"milestones": [0.5], "gamma": 0.5},
    "betas": _ADAM_BETAS,
    "ema_decay": 0.999,
    "ema_warmup": False,
    "network": {
        "generator": {"features": 64, "growth": 32, "n_blocks": 23, "n_extra_blocks": 3, "unshuffle": 4},
        "discriminator": {"features": 64, "skip_connection": True},
    },
    "loss": {
        "pixel": "l1",
        "pixel_weight": 1.0,
        "perceptual_weight": 1.0,
        "perceptual_layers": {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0},
        "gan_weight": 0.1,
        "gan_type": "vanilla",
    },
    "usm": {"pixel": True, "perceptual": True, "gan": False, "radius": 50, "sigma": 0.0, "weight": 0.5, "threshold": 10.0},
}


_WHOLE = ("perceptual_layers", "pretrain", "gan")


def merged(defaults: dict, params: dict | None) -> dict:
    """``params`` over ``defaults``, recursively for nested blocks, except those in
    :data:`_WHOLE`, which a given block replaces (a VGG layer left out is not used; a ``gan``
    block with ``lr`` alone sets both rates, not just the ones the defaults leave unset)."""
    out = copy.deepcopy(defaults)
    for k, v in (params or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in _WHOLE:
            out[k] = merged(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """Parameters of ``module`` excluded from autograd inside the block (the discriminator while
    the generator's loss flows through it), restored afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


class _TwoPhaseGAN(SRModel):
    """Shared two-phase GAN training; subclasses build the networks and pick the targets."""

    defaults: dict = {}

    def __init__(self, in_channels: int, params: dict | None = None, perceptual_weights: str | None = None):
        super().__init__(in_channels)
        self.params = merged(self.defaults, params)
        p = self.params
        self.generator = self.build_generator()
        self.discriminator = self.build_discriminator()
        self.ema_decay = float(p["ema_decay"])
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"models.{self.name}.ema_decay must be in [0, 1), not {self.ema_decay}")
        if self.ema_decay > 0:
            self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
            self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        else:
            self.generator_ema = None
        loss = p["loss"]
        if loss["pixel"] not in ("l1", "mse"):
            raise ValueError(f"models.{self.name}.loss.pixel must be l1 or mse, not {loss['pixel']!r}")
        self.pixel_loss = F.l1_loss if loss["pixel"] == "l1" else F.mse_loss
        self.gan_loss = GANLoss(loss["gan_type"])
        self.perceptual_weights = perceptual_weights
        if float(loss["perceptual_weight"]) > 0:
            self.perceptual = PerceptualLoss(perceptual_weights, loss["perceptual_layers"])
        else:
            self.perceptual = None

    # ---- to be provided by subclasses
    def build_generator(self) -> torch.nn.Module:
        raise NotImplementedError

    def build_discriminator(self) -> torch.nn.Module:
        raise NotImplementedError

    def targets(self, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Targets of the pixel, perceptual and adversarial terms (``pixel``, ``perceptual``, ``gan``)."""
        return {"pixel": hr, "perceptual": hr, "gan": hr}

    # ---- the contract
    @property
    def inference_modules(self) -> tuple[str, ...]:
        """Submodules that :meth:`predict` uses (what ``femursr.sr.infer`` saves for inference)."""
        return ("generator_ema",) if self.generator_ema is not None else ("generator",)

    @property
    def perceptual_on(self) -> bool:
        return self.perceptual is not None and self.perceptual.enabled

    def _phase_block(self, phase: str) -> dict:
        """The ``pretrain`` or ``gan`` block, keys it leaves out taken from the defaults (for
        ``gan``, a bare ``lr`` is the rate of both networks)."""
        given, default = self.params[phase], self.defaults[phase]
        out = {**default, **given}
        if phase == "gan" and "lr" in given:
            out["lr_generator"] = given.get("lr_generator", given["lr"])
            out["lr_discriminator"] = given.get("lr_discriminator", given["lr"])
        return out

    def phases(self) -> list[Phase]:
        return [Phase(n, int(self._phase_block(n)["epochs"])) for n in ("pretrain", "gan")]

    def _scheduler(self, kind: str, optimizer, iterations: int):
        if kind == "constant":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[], gamma=1.0)
        if kind == "multistep":
            ms = self.params["multistep"]
            milestones = sorted({max(1, round(float(f) * iterations)) for f in ms["milestones"]})
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=float(ms["gamma"]))
        if kind == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, iterations))
        raise ValueError(f"models.{self.name}: unknown scheduler {kind!r} (constant, multistep, cosine)")

    def _adam(self, module: torch.nn.Module, lr: float):
        return torch.optim.Adam(module.parameters(), lr=float(lr), betas=tuple(self.params["betas"]))

    def configure_phase(self, phase: str, iterations: int) -> PhaseSetup:
        p = self.params
        if phase == "pretrain":
            pre = self._phase_block("pretrain")
            opt = self._adam(self.generator, pre["lr"])
            sched = self._scheduler(pre["scheduler"], opt, iterations)
            return PhaseSetup({"generator": opt}, {"generator": sched})
        if phase == "gan":
            g = self._phase_block("gan")
            opts = {
                "generator": self._adam(self.generator, g["lr_generator"]),
                "discriminator": self._adam(self.discriminator, g["lr_discriminator"]),
            }
            kind = p["gan_scheduler"]
            return PhaseSetup(opts, {n: self._scheduler(kind, o, iterations) for n, o in opts.items()})
        raise ValueError(f"{self.name}: unknown phase {phase!r} (pretrain, gan)")

    def training_step(self, phase: str, lr: torch.Tensor, hr: torch.Tensor, setup: PhaseSetup, ctx: StepContext) -> dict[str, float]:
        loss = self.params["loss"]
        self.check_patch(hr)  # at the first step, not after a whole pre-training phase
        with torch.no_grad():
            tgt = self.targets(hr.float())
        if phase == "pretrain":
            with ctx.autocast():
                sr = self.generator(lr)
                l_pix = float(loss["pixel_weight"]) * self.pixel_loss(sr.float(), tgt["pixel"])
            ctx.backward_step(l_pix, setup.optimizers["generator"], "generator")
            return {"l_pix": l_pix.item()}
        if phase != "gan":
            raise ValueError(f"{self.name}: unknown phase {phase!r} (pretrain, gan)")
        out: dict[str, float] = {}
        # generator: the discriminator judges but is not updated
        with _frozen(self.discriminator):
            with ctx.autocast():
                sr = self.generator(lr)
                l_pix = float(loss["pixel_weight"]) * self.pixel_loss(sr.float(), tgt["pixel"])
                l_g = l_pix
                if self.perceptual_on:
                    l_percep = float(loss["perceptual_weight"]) * self.perceptual(sr, tgt["perceptual"])
                    l_g = l_g + l_percep
                    out["l_percep"] = l_percep
                l_g_gan = float(loss["gan_weight"]) * self.gan_loss(self.discriminator(sr).float(), True)
                l_g = l_g + l_g_gan
            ctx.backward_step(l_g, setup.optimizers["generator"], "generator")
        out.update(l_pix=l_pix, l_g_gan=l_g_gan)
        # discriminator: real targets against the (detached) generator output
        with ctx.autocast():
            real = self.discriminator(tgt["gan"]).float()
            fake = self.discriminator(sr.detach()).float()
            l_d_real = self.gan_loss(real, True)
            l_d_fake = self.gan_loss(fake, False)
            l_d = l_d_real + l_d_fake
        ctx.backward_step(l_d, setup.optimizers["discriminator"], "discriminator")
        out.update(l_d_real=l_d_real, l_d_fake=l_d_fake, out_d_real=real.detach().mean(), out_d_fake=fake.detach().mean())
        return {k: float(v.detach().item()) for k, v in out.items()}

    def check_patch(self, hr: torch.Tensor) -> None:
        """Raise when the training patches do not fit the discriminator (default: any size fits)."""

    def current_ema_decay(self) -> float:
        """The decay of the next EMA update: ``ema_decay``, or with ``ema_warmup`` the smaller
        ``(1 + n) / (10 + n)`` after n updates, so that short runs (the demo) average recent
        weights instead of keeping the random initialization."""
        if self.params["ema_warmup"]:
            n = int(self.ema_steps.item())
            return min(self.ema_decay, (1.0 + n) / (10.0 + n))
        return self.ema_decay

    def on_step_end(self, phase: str) -> None:
        if self.generator_ema is None:
            return
        ema_update(self.generator_ema, self.generator, self.current_ema_decay())
        self.ema_steps += 1

    @torch.no_grad()
    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        """SR of (N, C, H, W) -> (N, 1, H, W) in [0, 1] by the EMA generator (the trained one when
        ``ema_decay`` is 0), in eval mode (BN running statistics), any H, W."""
        net = self.generator_ema if self.generator_ema is not None else self.generator
        was_training = net.training
        net.eval()
        try:
            return net(lr).clamp_(0.0, 1.0)
        finally:
            net.train(was_training)

    def record(self) -> dict:
        p = self.params
        rec = {
            "name": self.name,
            "in_channels": self.in_channels,
            "parameters": {"generator": count_parameters(self.generator), "discriminator": count_parameters(self.discriminator)},
            "networks": {
                "generator": type(self.generator).__name__,
                "discriminator": type(self.discriminator).__name__,
                **copy.deepcopy(p["network"]),
            },
            "ema": {"decay": self.ema_decay, "warmup": bool(p["ema_warmup"])} if self.generator_ema is not None else None,
            "loss": copy.deepcopy(p["loss"]),
            "perceptual": {
                "on": self.perceptual_on,
                "weights": self.perceptual_weights,
                "why_off": None
                if self.perceptual_on
                else ("loss.perceptual_weight is 0" if self.perceptual is None else "no VGG19 weights file given"),
            },
            "phases": [{"name": ph.name, "epochs": ph.epochs} for ph in self.phases()],
        }
        if "usm" in p:
            rec["usm"] = copy.deepcopy(p["usm"])
        return rec


class SRGAN(_TwoPhaseGAN):
    """SRGAN (Ledig et al. 2017) for same-size CT SR: ``models.srgan``."""

    name = "srgan"
    defaults = SRGAN_DEFAULTS

    def build_generator(self):
        return SRResNet(self.in_channels, 1, **self.params["network"]["generator"])

    def build_discriminator(self):
        return VGGDiscriminator(1, **self.params["network"]["discriminator"])

    def check_patch(self, hr: torch.Tensor) -> None:
        size = self.discriminator.patch_size
        if tuple(hr.shape[-2:]) != (size, size):
            raise ValueError(
                f"srgan: training patches are {tuple(hr.shape[-2:])} px but the VGG discriminator was built for "
                f"{size} px; set models.srgan.network.discriminator.patch_size to training.patch_size_px"
            )


class RealESRGANPlus(_TwoPhaseGAN):
    """Real-ESRGAN+ (Wang et al. 2021, x4plus training) for same-size CT SR: ``models.realesrgan``."""

    name = "realesrgan"
    defaults = REALESRGAN_DEFAULTS

    def build_generator(self):
        return RRDBNet(self.in_channels, 1, **self.params["network"]["generator"])

    def build_discriminator(self):
        return UNetDiscriminatorSN(1, **self.params["network"]["discriminator"])

    def targets(self, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        u = self.params["usm"]
        sharp = usm_sharpen(hr, radius=int(u["radius"]), sigma=float(u["sigma"]), weight=float(u["weight"]), threshold=float(u["threshold"]))
        return {k: sharp if u[k] else hr for k in ("pixel", "perceptual", "gan")}
