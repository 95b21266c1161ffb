"""ResShift in the latent space of the study's autoencoder (paper sections 2.2 and 3.1).

ResShift (Yue et al. 2023) builds a Markov chain of ``T`` steps from the HR latent ``x0`` to the
LR latent ``y`` by shifting the residual ``e0 = y - x0``:

    q(x_t | x0, y) = N(x0 + eta_t e0, kappa^2 eta_t I),    eta_1 ~ 0, eta_T ~ 1,

whose posterior is ``q(x_{t-1} | x_t, x0) = N(eta_{t-1}/eta_t x_t + alpha_t/eta_t x0,
kappa^2 eta_{t-1}/eta_t alpha_t I)`` with ``alpha_t = eta_t - eta_{t-1}``. Sampling starts at
``y + kappa sqrt(eta_T) eps`` and takes ``T`` posterior steps, each with the network's estimate of
``x0`` (ResShift's ``predict_type: xstart``, trained on the MSE to the HR latent, ``t`` uniform).
Here (indices 0 ... T - 1 in code, as ResShift's) ``sqrt(eta_t)`` follows ResShift's
"exponential" schedule (:func:`eta_schedule`).

:class:`ResShiftSR` is the SR model ``resshift``: the frozen autoencoder (``vae``, from
``femursr.sr.latent``) encodes the HR slice and the LR slice's centre channel to the chain's two
ends; the denoiser is :class:`~femursr.sr.swinunet.SwinUNet`, conditioned by its feature extractor
on the original LR slice (1 channel, or 5 in 2.5D: the neighbours enter only there); an
exponential moving average of the denoiser (extractor included) is what :meth:`predict` uses.
As in ResShift, the network's input ``x_t`` is divided by ``sqrt(kappa^2 eta_t + 1)`` (its std
for unit-variance latents: ``normalize_input``) and latents are the VAE's times ``scale_factor``
(ResShift's, 1.0; ``null`` sets it to 1 / std of the first training batch's HR latents, as LDM's
``scale_by_std``). The VAE's latent is its posterior mean (ResShift samples the posterior of its
KL autoencoder; for a trained VAE the two differ by a negligible amount, and the mean keeps the
chain's ends deterministic).

Hyper-parameters: the config block ``models.resshift`` (schema ``config/schemas/config.schema.yaml``);
:data:`RESSHIFT_DEFAULTS` repeats the schema's defaults (a test keeps the two in step). Defaults
are the paper's (4.5e-5, 8 steps, cosine) and, where it is silent, ResShift's
``realsr_swinunet_realesrgan256.yaml`` (kappa 2, p 0.3, minimum noise level 0.04, final
sqrt(eta) 0.99, floor of the cosine 2e-5, EMA 0.999, the Swin-UNet), except ``epochs``, which is
the demo's 2 as for every model (config/paper.yaml holds the paper's 150).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import Phase, PhaseSetup, SRModel, StepContext, count_parameters, ema_update
from .gan import merged
from .swinunet import EXTRACTOR_DEFAULTS, SWINUNET_DEFAULTS, SwinUNet

RESSHIFT_DEFAULTS: dict = {
    "epochs": 2,
    "lr": 4.5e-5,
    "lr_min": 2.0e-5,
    "scheduler": "cosine",
    "betas": [0.9, 0.999],
    "steps": 8,
    "kappa": 2.0,
    "power": 0.3,
    "min_noise_level": 0.04,
    "etas_end": 0.99,
    "normalize_input": True,
    "scale_factor": 1.0,
    "network": copy.deepcopy(SWINUNET_DEFAULTS),
    "feature_extractor": copy.deepcopy(EXTRACTOR_DEFAULTS),
    "ema_decay": 0.999,
    "ema_warmup": False,
    "samples": 1,
    "autoencoder": "autoencoder",
}


# ------------------------------------------------------------------ the chain
def eta_schedule(steps: int, kappa: float, power: float, min_noise_level: float, etas_end: float) -> np.ndarray:
    """ResShift's "exponential" schedule: ``sqrt(eta_t)`` for t = 0 ... steps - 1 (float64).

    ``sqrt(eta_t) = a (b / a) ** ((t / (T - 1)) ** power)`` with ``a = min(min_noise_level /
    kappa, min_noise_level)`` and ``b = etas_end``: geometric in ``(t / (T - 1)) ** power`` from
    ``a`` to ``b`` (``power`` < 1 spends more steps near the LR end). One step: ``[etas_end]``.
    """
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"ResShift: steps must be at least 1, not {steps}")
    if kappa <= 0 or min_noise_level <= 0 or power <= 0:
        raise ValueError(f"ResShift: kappa ({kappa}), min_noise_level ({min_noise_level}) and power ({power}) must be positive")
    start = min(min_noise_level / kappa, min_noise_level)
    if not 0 < etas_end <= 1 or start >= etas_end:
        raise ValueError(f"ResShift: etas_end (the final sqrt(eta), {etas_end}) must be in ({start:g}, 1] (above min(min_noise_level / kappa, min_noise_level))")
    if steps == 1:
        return np.array([float(etas_end)])
    frac = np.linspace(0.0, 1.0, steps) ** float(power)
    return start * (etas_end / start) ** frac


def _at(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``arr[t]`` shaped (N, 1, 1, ...) to broadcast over ``like``, in its dtype."""
    return arr[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class ResShiftDiffusion(nn.Module):
    """The residual-shifting chain of ``T = len(sqrt_etas)`` steps (t = 0 ... T - 1).

    Its schedule and posterior coefficients are non-persistent float64 buffers (they move with
    the model; they are rebuilt from the configuration, never saved)."""

    def __init__(self, sqrt_etas, kappa: float, normalize_input: bool = True):
        super().__init__()
        s = torch.as_tensor(np.asarray(sqrt_etas, dtype=np.float64))
        if s.ndim != 1 or not len(s) or (s <= 0).any() or (s > 1).any():
            raise ValueError(f"ResShift: sqrt_etas must be a 1-D sequence in (0, 1], not {s.tolist()}")
        etas = s**2
        prev = torch.cat([etas.new_zeros(1), etas[:-1]])
        alpha = etas - prev
        self.kappa = float(kappa)
        self.normalize_input = bool(normalize_input)
        for name, value in {
            "sqrt_etas": s,
            "etas": etas,
            "etas_prev": prev,
            "posterior_variance": self.kappa**2 * prev / etas * alpha,
            "posterior_coef_xt": prev / etas,
            "posterior_coef_x0": alpha / etas,
        }.items():
            self.register_buffer(name, value, persistent=False)

    @property
    def steps(self) -> int:
        return int(self.etas.shape[0])

    def q_mean_variance(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``x0 + eta_t (y - x0)`` and variance ``kappa^2 eta_t`` of q(x_t | x0, y)."""
        eta = _at(self.etas, t, x0)
        return x0 + eta * (y - x0), self.kappa**2 * eta.expand_as(x0)

    def q_sample(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A draw of x_t ~ q(x_t | x0, y) (``noise`` standard normal, drawn if not given)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return x0 + _at(self.etas, t, x0) * (y - x0) + self.kappa * _at(self.sqrt_etas, t, x0) * noise

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0) (at t = 0: mean x0, variance 0)."""
        mean = _at(self.posterior_coef_xt, t, xt) * xt + _at(self.posterior_coef_x0, t, xt) * x0
        return mean, _at(self.posterior_variance, t, xt).expand_as(xt)

    def prior_sample(self, y: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_T ~ N(y, kappa^2 eta_T): ``y + kappa sqrt(eta_T) noise``."""
        if noise is None:
            noise = torch.randn_like(y)
        return y + self.kappa * self.sqrt_etas[-1].to(y.dtype) * noise

    def scale_input(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's input: ``x_t / sqrt(kappa^2 eta_t + 1)`` (ResShift's normalize_input for
        latents), or ``x_t`` itself."""
        if not self.normalize_input:
            return xt
        return xt / torch.sqrt(self.kappa**2 * _at(self.etas, t, xt) + 1.0)

    @torch.no_grad()
    def sample(self, denoiser, y: torch.Tensor, cond=None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_0 drawn through the chain from the LR latent ``y``: the prior sample, then ``T``
        posterior steps, each with ``denoiser(scale_input(x_t, t), t, cond)`` as x0 (exactly T
        calls). Noise from torch's global generator."""
        x = self.prior_sample(y, noise)
        for i in reversed(range(self.steps)):
            t = torch.full((y.shape[0],), i, device=y.device, dtype=torch.long)
            x0 = denoiser(self.scale_input(x, t), t, cond).to(x.dtype)
            mean, var = self.posterior(x0, x, t)
            x = mean + var.sqrt() * torch.randn_like(x) if i > 0 else mean
        return x


# ------------------------------------------------------------------ the SR model
class ResShiftSR(SRModel):
    """ResShift 2D / 2.5D in the autoencoder's latent space: ``models.resshift``."""

    name = "resshift"
    needs_autoencoder = True
    stochastic = True
    defaults = RESSHIFT_DEFAULTS

    def __init__(self, in_channels: int, params: dict | None = None, perceptual_weights: str | None = None):
        super().__init__(in_channels)
        from .latent import build_vae, latent_channels, vae_factor

        self.params = merged(self.defaults, params)
        p = self.params
        if "autoencoder_network" not in p:
            raise ValueError(
                "resshift: params lack 'autoencoder_network' (the network block of the autoencoder named by "
                f"models.resshift.autoencoder, {p['autoencoder']!r}); the training machinery adds it (femursr.sr.train)"
            )
        self.vae = build_vae(p["autoencoder_network"]).requires_grad_(False).eval()
        self.factor = vae_factor(self.vae)
        self.latent_channels = latent_channels(self.vae)
        self.denoiser = SwinUNet(self.latent_channels, self.latent_channels, self.in_channels, self.factor, p["network"], p["feature_extractor"])
        self.ema_decay = float(p["ema_decay"])
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"models.resshift.ema_decay must be in [0, 1), not {self.ema_decay}")
        if self.ema_decay > 0:
            self.denoiser_ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        else:
            self.denoiser_ema = None
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        if p["scheduler"] not in ("cosine", "constant"):
            raise ValueError(f"models.resshift.scheduler must be cosine or constant, not {p['scheduler']!r}")
        sqrt_etas = eta_schedule(p["steps"], float(p["kappa"]), float(p["power"]), float(p["min_noise_level"]), float(p["etas_end"]))
        self.diffusion = ResShiftDiffusion(sqrt_etas, float(p["kappa"]), bool(p["normalize_input"]))
        fixed = p["scale_factor"]
        if fixed is not None and not float(fixed) > 0:
            raise ValueError(f"models.resshift.scale_factor must be positive or null (1 / std of the training latents), not {fixed}")
        # NaN until the first training step when it is to be measured (null)
        self.register_buffer("scale_factor", torch.tensor(float("nan") if fixed is None else float(fixed)))

    # ---- weights
    @property
    def inference_modules(self) -> tuple[str, ...]:
        return ("vae", "denoiser_ema" if self.denoiser_ema is not None else "denoiser", "scale_factor")

    def load_autoencoder(self, path) -> None:
        """The trained autoencoder's VAE weights (``latent.load_vae_state``) into ``vae``;
        raises naming the file when they do not fit the VAE this block's network builds."""
        from .latent import load_vae_state

        state = load_vae_state(path)
        try:
            self.vae.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(
                f"{path}: the autoencoder's weights do not fit the VAE built from models.{self.params['autoencoder']}.network "
                f"({str(e).splitlines()[0]}); retrain the autoencoder or fix its network block"
            ) from None

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: always in inference mode
        return self

    # ---- training
    def phases(self) -> list[Phase]:
        return [Phase("train", int(self.params["epochs"]))]

    def configure_phase(self, phase: str, iterations: int) -> PhaseSetup:
        if phase != "train":
            raise ValueError(f"resshift: unknown phase {phase!r} (train)")
        p = self.params
        opt = torch.optim.Adam(self.denoiser.parameters(), lr=float(p["lr"]), betas=tuple(p["betas"]))
        if p["scheduler"] == "cosine":
            # ResShift: cosine annealing per iteration down to lr_min
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations), eta_min=float(p["lr_min"]))
        else:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[], gamma=1.0)
        return PhaseSetup({"denoiser": opt}, {"denoiser": sched})

    def _check_patch(self, hr: torch.Tensor) -> None:
        m = self.factor * self.denoiser.size_multiple
        if hr.shape[-2] % m or hr.shape[-1] % m:
            raise ValueError(
                f"resshift: training patches of {tuple(hr.shape[-2:])} px; the autoencoder (x{self.factor}) and the "
                f"Swin-UNet's {self.denoiser.levels - 1} downsamplings need multiples of {m} px: set training.patch_size_px "
                "to a multiple, or shorten models.resshift.network.channel_mult"
            )

    def centre(self, lr: torch.Tensor) -> torch.Tensor:
        """The centre slice (N, 1, H, W) of an LR stack."""
        c = lr.shape[1] // 2
        return lr[:, c : c + 1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent (float32) of images (N, 1, H, W) in [0, 1]: posterior mean times scale_factor."""
        from .latent import encode_latent

        return encode_latent(self.vae, x, self.scale_factor, sample=False).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        from .latent import decode_latent

        return decode_latent(self.vae, z, self.scale_factor)

    def training_step(self, phase: str, lr: torch.Tensor, hr: torch.Tensor, setup: PhaseSetup, ctx: StepContext) -> dict[str, float]:
        if phase != "train":
            raise ValueError(f"resshift: unknown phase {phase!r} (train)")
        self._check_patch(hr)
        with torch.no_grad():
            if torch.isnan(self.scale_factor):
                from .latent import encode_latent

                with ctx.autocast():
                    z = encode_latent(self.vae, hr, 1.0).float()
                self.scale_factor.fill_(1.0 / z.std().clamp_min(1e-8))  # LDM's scale_by_std
            with ctx.autocast():
                z0 = self.encode(hr)
                zy = self.encode(self.centre(lr))
        t = torch.randint(0, self.diffusion.steps, (hr.shape[0],), device=hr.device)
        zt = self.diffusion.q_sample(z0, zy, t)
        with ctx.autocast():
            pred = self.denoiser(self.diffusion.scale_input(zt, t), t, lr)
            loss = F.mse_loss(pred.float(), z0)
        ctx.backward_step(loss, setup.optimizers["denoiser"], "denoiser")
        return {"l_mse": float(loss.detach().item())}

    def current_ema_decay(self) -> float:
        """``ema_decay``, or with ``ema_warmup`` the smaller ``(1 + n) / (10 + n)`` after n
        updates (short runs such as the demo)."""
        if self.params["ema_warmup"]:
            n = int(self.ema_steps.item())
            return min(self.ema_decay, (1.0 + n) / (10.0 + n))
        return self.ema_decay

    def on_step_end(self, phase: str) -> None:
        if self.denoiser_ema is None:
            return
        ema_update(self.denoiser_ema, self.denoiser, self.current_ema_decay())
        self.ema_steps += 1

    # ---- inference
    def pad_multiple(self) -> int:
        """Slices are padded (reflected) to a multiple of this many pixels: the VAE's factor
        times the Swin-UNet's 2 per downsampling."""
        return self.factor * self.denoiser.size_multiple

    @torch.no_grad()
    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        """SR (N, 1, H, W) in [0, 1] of LR stacks (N, C, H, W), any H, W: encode the centre slice,
        draw from the chain with the EMA denoiser (``T`` evaluations; noise from torch's global
        generator), decode, crop."""
        from .latent import crop, pad_to_multiple

        if torch.isnan(self.scale_factor):
            raise RuntimeError("resshift: scale_factor was never measured (scale_factor null and no training step taken)")
        net = self.denoiser_ema if self.denoiser_ema is not None else self.denoiser
        was_training = net.training
        net.eval()
        try:
            x, size = pad_to_multiple(lr, self.pad_multiple(), "reflect")
            zy = self.encode(self.centre(x))
            z = self.diffusion.sample(net, zy, x)
            return crop(self.decode(z).float(), size).clamp_(0.0, 1.0)
        finally:
            net.train(was_training)

    def evaluations_per_slice(self) -> dict[str, int]:
        """Network evaluations to super-resolve one slice."""
        return {"vae_encoder": 1, "denoiser": self.diffusion.steps, "vae_decoder": 1}

    def record(self) -> dict:
        p = self.params
        vae_params = sum(v.numel() for v in self.vae.parameters())
        return {
            "name": self.name,
            "in_channels": self.in_channels,
            "parameters": {
                "denoiser": count_parameters(self.denoiser),
                "feature_extractor": count_parameters(self.denoiser.feature_extractor),
                "vae (frozen)": vae_params,
            },
            "networks": {
                "denoiser": "SwinUNet",
                "network": copy.deepcopy(p["network"]),
                "feature_extractor": {**copy.deepcopy(p["feature_extractor"]), "out_channels": self.denoiser.feature_extractor.out_channels},
                "autoencoder": {"block": p["autoencoder"], "network": copy.deepcopy(p["autoencoder_network"]), "factor": self.factor, "latent_channels": self.latent_channels},
            },
            "chain": {
                "steps": self.diffusion.steps,
                "kappa": self.diffusion.kappa,
                "sqrt_etas": [round(float(v), 6) for v in self.diffusion.sqrt_etas],
                "normalize_input": self.diffusion.normalize_input,
                "scale_factor": None if math.isnan(float(self.scale_factor)) else float(self.scale_factor),
            },
            "evaluations_per_slice": self.evaluations_per_slice(),
            "ema": {"decay": self.ema_decay, "warmup": bool(p["ema_warmup"])} if self.denoiser_ema is not None else None,
            "loss": "mse on x0 (the HR latent), t uniform",
            "phases": [{"name": ph.name, "epochs": ph.epochs, "lr": p["lr"], "scheduler": p["scheduler"], "lr_min": p["lr_min"]} for ph in self.phases()],
        }
