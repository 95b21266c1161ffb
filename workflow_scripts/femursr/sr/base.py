"""The contract between an SR model and the machinery that trains and applies it.

A model (:class:`SRModel`) owns its networks (as submodules, EMA copies included), its losses and
how one training step updates them; it declares its training phases (for a GAN: generator
pre-training, then adversarial training; for a diffusion model: one phase), and for each phase
the optimizers and the per-iteration learning-rate schedulers.

The machinery (``femursr.sr.train``) owns everything around a step: the device, mixed precision,
data, epochs, validation, logging, checkpoints and resume. It never looks inside a model: it
calls :meth:`SRModel.phases`, :meth:`SRModel.configure_phase`, :meth:`SRModel.training_step`,
:meth:`SRModel.on_step_end`, :meth:`SRModel.predict` and :meth:`SRModel.record`, and saves
``model.state_dict()`` plus the optimizers', schedulers' and scalers' states.

Tensors: ``lr`` is (N, C, H, W) with C = 1 (2D) or 2 * neighbours + 1 (2.5D; the centre slice is
channel C // 2), values in [0, 1] (normalized HU); ``hr`` and the output are (N, 1, H, W).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Phase:
    """One stage of training: ``name`` (e.g. ``pretrain``, ``gan``, ``train``) and its epochs."""

    name: str
    epochs: int


@dataclass
class PhaseSetup:
    """What a model hands the machinery at the start of a phase.

    ``optimizers`` by name (e.g. ``generator``, ``discriminator``); ``schedulers`` by the same
    names, stepped once per iteration by the machinery (built with the phase's total number of
    iterations known, see :meth:`SRModel.configure_phase`).
    """

    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = field(default_factory=dict)


class StepContext:
    """Device and mixed precision for one training step, given to :meth:`SRModel.training_step`.

    ``amp`` is ``"off"``, ``"bf16"`` or ``"fp16"``. Mixed precision applies on CUDA only (on the
    CPU the step runs in float32 whatever ``amp`` says). fp16 uses one gradient scaler per
    optimizer; bf16 needs none.
    """

    def __init__(self, device: torch.device, amp: str = "off", optimizer_names=()):
        if amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp must be off, bf16 or fp16, not {amp!r}")
        self.device = torch.device(device)
        self.amp = amp if self.device.type == "cuda" else "off"
        use_scaler = self.amp == "fp16"
        self.scalers = {
            name: torch.amp.GradScaler("cuda", enabled=use_scaler) for name in optimizer_names
        }

    def autocast(self):
        """Context manager for the forward passes and losses of a step."""
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, name: str) -> None:
        """Backward pass of ``loss`` and one step of ``optimizer`` (scaled under fp16)."""
        scaler = self.scalers.get(name)
        if scaler is None:
            scaler = self.scalers[name] = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def state_dict(self) -> dict:
        return {name: s.state_dict() for name, s in self.scalers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, s in state.items():
            if name in self.scalers:
                self.scalers[name].load_state_dict(s)


class SRModel(torch.nn.Module):
    """Base class of every SR model; subclasses implement the methods that raise here.

    Subclasses keep all networks (and EMA copies) as submodules so that ``state_dict`` holds the
    whole model, and take their hyper-parameters from the config block ``models.<name>``.
    """

    #: registry name, e.g. ``srgan``
    name: str = ""

    #: the top-level submodules (and buffers) that :meth:`predict` uses, e.g.
    #: ``("generator", "generator_ema")``: only their weights go into the file that inference
    #: reads (``femursr.sr.infer.save_generator``). ``None``: the whole ``state_dict``.
    inference_modules: tuple[str, ...] | None = None

    #: what validation feeds :meth:`predict`: ``"lr"`` (SR models) or ``"hr"`` (the autoencoder,
    #: whose validation figures are those of its reconstruction of the HR)
    validation_input: str = "lr"

    #: ``True`` for models whose :meth:`predict` draws random numbers (diffusion models): they use
    #: torch's global generator, which the machinery seeds; inference may draw several samples
    stochastic: bool = False

    #: ``True`` for models in the latent space of a trained autoencoder (LDM, ResShift). Their
    #: config block names the autoencoder's block (key ``autoencoder``); the machinery adds that
    #: block's ``network`` to the params as ``autoencoder_network`` before building the model,
    #: and calls :meth:`load_autoencoder` with the trained autoencoder's weights file before
    #: training. The autoencoder is a submodule listed in :attr:`inference_modules`, so the
    #: model's own weights file is enough for inference.
    needs_autoencoder: bool = False

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = int(in_channels)

    def phases(self) -> list[Phase]:
        """The training phases in order (phases with 0 epochs are skipped by the machinery)."""
        raise NotImplementedError

    def configure_phase(self, phase: str, iterations: int) -> PhaseSetup:
        """Optimizers and per-iteration schedulers for ``phase``, which runs ``iterations`` steps.

        Called at the start of every phase and again on resume (before the saved states are
        loaded into what it returns), so it must build fresh objects every time.
        """
        raise NotImplementedError

    def training_step(self, phase: str, lr: torch.Tensor, hr: torch.Tensor, setup: PhaseSetup, ctx: StepContext) -> dict[str, float]:
        """One iteration: forward, losses, and ``ctx.backward_step`` for each optimizer it steps.

        Returns the losses as floats for logging (e.g. ``{"l_pix": ..., "l_d": ...}``).
        """
        raise NotImplementedError

    def load_autoencoder(self, path) -> None:
        """Load the trained autoencoder's weights (models with :attr:`needs_autoencoder`)."""
        raise NotImplementedError(f"model {self.name} does not use an autoencoder")

    def on_step_end(self, phase: str) -> None:
        """After each iteration (e.g. update the EMA of the generator). Default: nothing."""

    @torch.no_grad()
    def predict(self, lr: torch.Tensor) -> torch.Tensor:
        """SR of a batch (N, C, H, W) -> (N, 1, H, W), with the weights used for inference (EMA
        where the model keeps one). Must accept any H, W (whole slices, not only patches)."""
        raise NotImplementedError

    def record(self) -> dict:
        """JSON-able description for the run record: networks, parameter counts, which loss
        terms are on (e.g. the perceptual loss off for want of VGG weights)."""
        return {
            "name": self.name,
            "in_channels": self.in_channels,
            "parameters": {n: count_parameters(m) for n, m in self.named_children()},
        }


def count_parameters(module: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` over parameters; buffers copied."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)
