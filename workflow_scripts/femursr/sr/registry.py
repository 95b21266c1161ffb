"""Model registry: a model name in config -> the :class:`~femursr.sr.base.SRModel` that builds it.

Every model is constructed the same way::

    cls(in_channels, params, perceptual_weights=None)

with ``params`` the config block ``models.<name>`` (defaults filled by the schema) and
``perceptual_weights`` the path of a torchvision-format VGG19 weights file (or ``None``: the
perceptual term is off and the model's :meth:`record` says so). Modules are imported only when a
model is built, so that listing names costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only when a model is built: the workflow reads MODELS at parse time
    from .base import SRModel

#: name -> "module:Class" (module relative to femursr.sr)
MODELS: dict[str, str] = {
    "srgan": "gan:SRGAN",
    "realesrgan": "gan:RealESRGANPlus",
    "ldm": "ldm:LatentDiffusionSR",
    "resshift": "resshift:ResShiftSR",
}

#: models that are not SR models but are trained by the same machinery: the autoencoder whose
#: latent space the diffusion models work in (trained on HR slices, dims 2d)
AUXILIARY: dict[str, str] = {
    "autoencoder": "autoencoder:Autoencoder",
}

#: names as they appear in rule targets: ``{model}_{dims}``, dims in 2d, 25d
DIMS = ("2d", "25d")


def model_class(name: str) -> type[SRModel]:
    try:
        target = MODELS[name] if name in MODELS else AUXILIARY[name]
    except KeyError:
        raise KeyError(f"unknown SR model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def in_channels(dims: str, neighbours: int) -> int:
    """Input channels of a ``dims`` variant: 1 for 2D, 2 * neighbours + 1 for 2.5D."""
    if dims == "2d":
        return 1
    if dims == "25d":
        return 2 * int(neighbours) + 1
    raise ValueError(f"dims must be one of {DIMS}, not {dims!r}")


def build_model(name: str, dims: str, neighbours: int, params: dict, perceptual_weights: str | None = None) -> SRModel:
    """The model ``name`` for ``dims`` (2d or 25d) with its config block ``params``."""
    return model_class(name)(in_channels(dims, neighbours), params, perceptual_weights=perceptual_weights)
