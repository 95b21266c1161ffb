"""Latent diffusion SR (LDM, Rombach et al. 2022; paper sections 2.2 and 3.1): ``models.ldm``.

A denoising U-Net on the latent of the shared autoencoder (:mod:`femursr.sr.autoencoder`; the
VAE is a frozen submodule, so the weights file is self-contained), conditioned as LDM-SR
conditions on the LR image (``concat_mode``): the LR slice, 2D or 2.5D, in [-1, 1], is
pixel-unshuffled by the autoencoder's factor 8 onto the latent's grid (a 512 px slice: C x 64
channels of 64 x 64, no information lost) and concatenated to the noisy latent.

* **Latent**: a sample of the VAE's posterior of the HR times ``latent_scale``, set from the
  first training batch to 1 / std of those latents (LDM's ``scale_by_std``); the buffer is saved
  with the weights.
* **Training** (one phase ``train``): DDPM with ``train_timesteps`` steps and LDM-SR's schedule
  (``models/ldm/bsr_sr/config.yaml``: ``linear_start`` 0.0015, ``linear_end`` 0.0155, which
  LDM's ``make_beta_schedule("linear")`` spaces linearly in sqrt(beta), i.e. diffusers'
  ``scaled_linear``); t uniform, MSE between the true noise and the U-Net's prediction (LDM-SR:
  ``loss_type: l2``, eps parameterization). AdamW (LDM's optimizer, torch's default weight
  decay 0.01) at a constant rate (LDM-SR has no scheduler), with LDM's optional
  ``LambdaLinearScheduler`` warm-up (``warmup_steps``, default 0: none). EMA of the U-Net
  (LDM's ``LitEma``: decay 0.9999, warm-up ``(1 + n) / (10 + n)``), used for prediction.
* **Prediction**: DDIM (diffusers ``DDIMScheduler``, LDM's settings: no clipping, the final
  step to alpha_bar_0, timesteps 1, 1 + k, ... with k = T // steps) from Gaussian noise, exactly
  ``sample_steps`` U-Net evaluations and ``eta`` from config, then one decoder pass. The slice
  is replicate-padded to a multiple of 8 x 2^(U-Net levels - 1) px and cropped back.
* **U-Net** (diffusers ``UNet2DModel``): LDM-SR's ``openaimodel.UNetModel`` shape, model
  channels 160 with multipliers 1, 2, 2, 4, 2 residual blocks per level, 32 channels per
  attention head, attention at downsampling rate 8 (LDM-SR's ``attention_resolutions`` [16, 8]
  against rates 1, 2, 4, 8) and in the middle block.
"""

from __future__ import annotations

import copy

import torch
from torch.nn import functional as F

from .base import Phase, PhaseSetup, SRModel, StepContext, count_parameters, ema_update
from .latent import (
    VAE_DEFAULTS,
    build_vae,
    crop,
    decode_latent,
    deep_merged,
    encode_latent,
    load_vae_state,
    pad_to_multiple,
    pixel_unshuffle_condition,
    vae_factor,
)

LDM_DEFAULTS: dict = {
    "epochs": 2,
    "lr": 1.0e-5,
    "warmup_steps": 0,
    "train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0015,
    "beta_end": 0.0155,
    "sample_steps": 30,
    "eta": 0.0,
    "network": {
        "block_out_channels": [160, 320, 320, 640],
        "layers_per_block": 2,
        "attention_levels": [False, False, False, True],
        "attention_head_dim": 32,
        "norm_num_groups": 32,
    },
    "ema_decay": 0.9999,
    "ema_warmup": True,
    "samples": 1,
    "autoencoder": "autoencoder",
}



def build_unet(network: dict, in_channels: int, out_channels: int):
    """diffusers ``UNet2DModel`` for ``network`` (the ``models.ldm.network`` block)."""
    from diffusers import UNet2DModel

    blocks = [int(c) for c in network["block_out_channels"]]
    attn = [bool(a) for a in network["attention_levels"]]
    if len(attn) != len(blocks):
        raise ValueError(f"models.ldm.network: attention_levels has {len(attn)} entries, block_out_channels {len(blocks)}; give one per level")
    groups, head = int(network["norm_num_groups"]), int(network["attention_head_dim"])
    bad = [c for c in blocks if c % groups]
    if bad:
        raise ValueError(f"models.ldm.network: norm_num_groups {groups} does not divide the channels {bad} of block_out_channels {blocks}")
    bad = [c for c, a in zip(blocks, attn) if a and c % head] + ([blocks[-1]] if blocks[-1] % head else [])
    if bad:
        raise ValueError(f"models.ldm.network: attention_head_dim {head} does not divide the channels {sorted(set(bad))} of the levels with attention")
    return UNet2DModel(
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(blocks),
        layers_per_block=int(network["layers_per_block"]),
        attention_head_dim=head,
        norm_num_groups=groups,
        add_attention=True,
    )


class LatentDiffusionSR(SRModel):
    """LDM-SR in the autoencoder's latent space: ``models.ldm`` (see the module docstring)."""

    name = "ldm"
    needs_autoencoder = True
    stochastic = True

    def __init__(self, in_channels: int, params: dict | None = None, perceptual_weights: str | None = None):
        super().__init__(in_channels)
        params = dict(params or {})
        self.autoencoder_network = deep_merged(VAE_DEFAULTS, params.pop("autoencoder_network", None))
        self.params = p = deep_merged(LDM_DEFAULTS, params)
        for key in ("train_timesteps", "sample_steps", "samples"):
            if int(p[key]) < 1:
                raise ValueError(f"models.ldm.{key} must be at least 1, not {p[key]}")
        if int(p["sample_steps"]) > int(p["train_timesteps"]):
            raise ValueError(f"models.ldm.sample_steps ({p['sample_steps']}) cannot exceed train_timesteps ({p['train_timesteps']})")
        self.vae = build_vae(self.autoencoder_network).requires_grad_(False).eval()
        self.factor = vae_factor(self.vae)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.condition_channels = self.in_channels * self.factor**2
        self.unet = build_unet(p["network"], self.latent_channels + self.condition_channels, self.latent_channels)
        self.ema_decay = float(p["ema_decay"])
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"models.ldm.ema_decay must be in [0, 1), not {self.ema_decay}")
        self.unet_ema = copy.deepcopy(self.unet).requires_grad_(False) if self.ema_decay > 0 else None
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        #: LDM's scale_factor; 0 until the first training batch sets it
        self.register_buffer("latent_scale", torch.zeros(()))
        self._scale_known = False  # latent_scale read once (a device sync), not at every step
        from diffusers import DDIMScheduler, DDPMScheduler

        schedule = dict(
            num_train_timesteps=int(p["train_timesteps"]),
            beta_schedule=str(p["beta_schedule"]),
            beta_start=float(p["beta_start"]),
            beta_end=float(p["beta_end"]),
            clip_sample=False,
            prediction_type="epsilon",
        )
        self.ddpm = DDPMScheduler(**schedule)
        self.ddim = DDIMScheduler(**schedule, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")

    # ---- the autoencoder
    def load_autoencoder(self, path) -> None:
        """Load the trained autoencoder's VAE weights (``save_generator``'s file of the
        ``autoencoder`` model) into the frozen :attr:`vae`."""
        state = load_vae_state(path)
        try:
            self.vae.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ValueError(
                f"{path}: the autoencoder's weights do not fit the VAE built from the network block of "
                f"models.{self.params['autoencoder']} ({self.autoencoder_network}); was it trained with another network "
                f"block? Retrain the autoencoder (rule train_autoencoder). ({first[1] if len(first) > 1 else first[0]})"
            ) from None
        self.vae.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: always in inference mode
        return self

    # ---- helpers
    @property
    def inference_modules(self) -> tuple[str, ...]:
        return ("vae", "unet_ema" if self.unet_ema is not None else "unet", "latent_scale")

    @property
    def pad_multiple(self) -> int:
        """Image size multiple the networks need: the VAE's factor times the U-Net's 2^(levels-1)."""
        return self.factor * 2 ** (len(self.params["network"]["block_out_channels"]) - 1)

    def condition(self, lr: torch.Tensor) -> torch.Tensor:
        """The LR (N, C, H, W) in [0, 1] as the U-Net's condition (N, C * 64, H / 8, W / 8) in [-1, 1]."""
        return pixel_unshuffle_condition(2.0 * lr.float() - 1.0, self.factor)

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The forward process: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise."""
        return self.ddpm.add_noise(z0, noise, t)

    def alphas_cumprod(self) -> torch.Tensor:
        return self.ddpm.alphas_cumprod

    def _scale_is_set(self) -> bool:
        if not self._scale_known:
            self._scale_known = bool(float(self.latent_scale) > 0)
        return self._scale_known

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._scale_known = False  # the loaded latent_scale is read at the next use
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _scale(self) -> torch.Tensor:
        if not self._scale_is_set():
            raise RuntimeError("ldm: latent_scale is not set; the model has not been trained (it is set from the first training batch)")
        return self.latent_scale

    def current_ema_decay(self) -> float:
        """``ema_decay``, or with ``ema_warmup`` LDM's ``min(ema_decay, (1 + n) / (10 + n))`` after n updates."""
        if self.params["ema_warmup"]:
            n = int(self.ema_steps.item())
            return min(self.ema_decay, (1.0 + n) / (10.0 + n))
        return self.ema_decay

    # ---- the contract
    def phases(self) -> list[Phase]:
        return [Phase("train", int(self.params["epochs"]))]

    def configure_phase(self, phase: str, iterations: int) -> PhaseSetup:
        if phase != "train":
            raise ValueError(f"ldm: unknown phase {phase!r} (train)")
        opt = torch.optim.AdamW(self.unet.parameters(), lr=float(self.params["lr"]))
        warm = int(self.params["warmup_steps"])
        # LDM's LambdaLinearScheduler: the factor rises linearly from 1e-6 to 1 over the warm-up
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s >= warm else 1e-6 + (1.0 - 1e-6) * s / warm)
        return PhaseSetup({"unet": opt}, {"unet": sched})

    def training_step(self, phase: str, lr: torch.Tensor, hr: torch.Tensor, setup: PhaseSetup, ctx: StepContext) -> dict[str, float]:
        if phase != "train":
            raise ValueError(f"ldm: unknown phase {phase!r} (train)")
        m = self.pad_multiple
        if hr.shape[-2] % m or hr.shape[-1] % m:
            raise ValueError(
                f"ldm: training patches of {tuple(hr.shape[-2:])} px are not a multiple of {m} px (VAE factor {self.factor} x "
                f"2^(U-Net levels - 1)); set training.patch_size_px to a multiple of {m} or use fewer U-Net levels"
            )
        with torch.no_grad():
            with ctx.autocast():
                z = encode_latent(self.vae, hr.float(), 1.0, sample=True)
            z = z.float()
            if not self._scale_is_set():  # LDM's scale_by_std, on the first batch
                self.latent_scale.copy_(1.0 / z.flatten().std().clamp_min(1e-8))
                self._scale_known = True
            z0 = z * self.latent_scale
            cond = self.condition(lr)
        noise = torch.randn_like(z0)
        t = torch.randint(0, int(self.params["train_timesteps"]), (z0.shape[0],), device=z0.device)
        zt = self.q_sample(z0, t, noise)
        with ctx.autocast():
            eps = self.unet(torch.cat([zt, cond], dim=1), t).sample
            loss = F.mse_loss(eps.float(), noise)
        ctx.backward_step(loss, setup.optimizers["unet"], "unet")
        return {"l_eps": float(loss.detach().item())}

    def on_step_end(self, phase: str) -> None:
        if self.unet_ema is not None:
            ema_update(self.unet_ema, self.unet, self.current_ema_decay())
        self.ema_steps += 1

    @torch.no_grad()
    def sample_latent(self, cond: torch.Tensor, net=None) -> torch.Tensor:
        """DDIM from Gaussian noise (global torch RNG) to a latent (N, latent_channels, h, w),
        given the condition (N, C * 64, h, w): exactly ``sample_steps`` evaluations of ``net``."""
        net = net if net is not None else (self.unet_ema if self.unet_ema is not None else self.unet)
        sched = self.ddim
        sched.set_timesteps(int(self.params["sample_steps"]))
        eta = float(self.params["eta"])
        z = torch.randn((cond.shape[0], self.latent_channels, *cond.shape[-2:]), device=cond.device, dtype=torch.float32)
        for t in sched.timesteps:
            eps = net(torch.cat([z, cond.to(z.dtype)], dim=1), t).sample
            z = sched.step(eps.float(), t, z, eta=eta).prev_sample
        return z

    @torch.no_grad()
    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        """One SR sample (N, 1, H, W) in [0, 1] of the LR (N, C, H, W), any H, W: DDIM with the
        EMA U-Net, then the decoder. Draws from the global torch RNG."""
        scale = self._scale()
        x, size = pad_to_multiple(lr.float(), self.pad_multiple)
        z = self.sample_latent(self.condition(x))
        out = decode_latent(self.vae, z, scale).float()
        return crop(out, size).clamp_(0.0, 1.0)

    def network_evaluations(self) -> dict:
        """Network passes per predicted slice: U-Net calls and decoder calls."""
        return {"unet": int(self.params["sample_steps"]), "decoder": 1}

    def record(self) -> dict:
        p = self.params
        return {
            "name": self.name,
            "in_channels": self.in_channels,
            "parameters": {"unet": count_parameters(self.unet), "vae (frozen)": sum(x.numel() for x in self.vae.parameters())},
            "networks": {
                "unet": "diffusers.UNet2DModel",
                "unet_in_channels": self.latent_channels + self.condition_channels,
                "condition_channels": self.condition_channels,
                "network": copy.deepcopy(p["network"]),
                "autoencoder": p["autoencoder"],
                "autoencoder_network": copy.deepcopy(self.autoencoder_network),
            },
            "diffusion": {
                "train_timesteps": int(p["train_timesteps"]),
                "beta_schedule": p["beta_schedule"],
                "beta_start": float(p["beta_start"]),
                "beta_end": float(p["beta_end"]),
                "sampler": "DDIM",
                "sample_steps": int(p["sample_steps"]),
                "eta": float(p["eta"]),
                "latent_scale": None if self.latent_scale.is_meta else float(self.latent_scale),
            },
            "network_evaluations_per_slice": self.network_evaluations(),
            "optimizer": {"type": "AdamW", "lr": float(p["lr"]), "warmup_steps": int(p["warmup_steps"])},
            "ema": {"decay": self.ema_decay, "warmup": bool(p["ema_warmup"])} if self.unet_ema is not None else None,
            "samples": int(p["samples"]),
            "phases": [{"name": ph.name, "epochs": ph.epochs} for ph in self.phases()],
        }
