"""Inference over whole volumes, and the weights file it reads (paper sections 2.2 and 3.1).

Every axial slice of a volume that holds femur is super-resolved (2.5D: with its neighbours, the
edge slices repeated), in batches of slices, either whole or, where a whole slice does not fit
on the device, in square tiles that overlap and are blended with linear ramps. Slices without
femur are not computed: the output is masked with the femur mask, as the HR is, and is 0 there.
Values are clipped to [0, 1].

Diffusion models are stochastic: their noise comes from torch's generator, seeded per volume; with
several samples per slice the volume is their mean, and the voxel-wise standard deviation is
written beside it (a map of where the model is unsure, i.e. of hallucination risk).

The time per volume (T/V, section 3.1) is the wall time of that loop (reading the slices from
the memory-mapped LR included, writing the NIfTI excluded), after one warm-up batch, with the
device synchronized before the clock is read.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_file
from .base import SRModel, StepContext
from .data import axial_stack

log = logging.getLogger("femursr.sr.infer")

WEIGHTS_FORMAT = 1


# ------------------------------------------------------------------ the weights used for inference
def inference_state(model: SRModel) -> dict:
    """The part of ``model.state_dict()`` that :meth:`SRModel.predict` needs: the submodules named
    in ``model.inference_modules`` (all of the state when that is ``None``), on the CPU."""
    keep = getattr(model, "inference_modules", None)
    state = model.state_dict()
    if keep is not None:
        prefixes = tuple(f"{m}." for m in keep)
        state = {k: v for k, v in state.items() if k.startswith(prefixes) or k in keep}
    return {k: v.detach().cpu() for k, v in state.items()}


def save_generator(model: SRModel, path, *, name: str, dims: str, neighbours: int, params: dict) -> Path:
    """Write the weights for inference with what rebuilds the model (registry name, dims,
    neighbours, the config block), atomically."""
    blob = {
        "format": WEIGHTS_FORMAT,
        "model": name,
        "dims": dims,
        "neighbours": int(neighbours),
        "in_channels": int(model.in_channels),
        "params": params,
        "state_dict": inference_state(model),
    }
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(blob, tmp)
    return path


def load_generator(path, device="cpu", build=None) -> SRModel:
    """The model saved by :func:`save_generator`, in eval mode on ``device``.

    It is rebuilt from the registry (``build``: a stand-in for
    :func:`femursr.sr.registry.build_model`, for tests) without perceptual weights, which
    inference does not use; every weight of its inference modules must be in the file."""
    path = Path(path)
    if build is None:
        from .registry import build_model as build
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: SR weights not found; train the model first (rule train_sr)") from None
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not a femursr SR weights file (format {WEIGHTS_FORMAT}); retrain the model (rule train_sr)")
    model = build(blob["model"], blob["dims"], blob["neighbours"], blob["params"], perceptual_weights=None)
    if model.in_channels != blob["in_channels"]:
        raise ValueError(f"{path}: saved for {blob['in_channels']} input channels, the model builds {model.in_channels}")
    own = model.state_dict()
    keep = getattr(model, "inference_modules", None)
    needed = [k for k in own if keep is None or k.split(".")[0] in keep]
    missing = [k for k in needed if k not in blob["state_dict"]]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} weight(s) of model {blob['model']} are missing (first: {missing[0]}); the file "
            "was written by another version of the model code: retrain (delete the model's folder and rerun)"
        )
    model.load_state_dict({k: v for k, v in blob["state_dict"].items() if k in own}, strict=False)
    return model.to(device).eval()


# ------------------------------------------------------------------ tiles
def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of ``tile`` px covering ``0 ... size - 1`` with at least ``overlap`` px of
    overlap; the last tile ends at the border (no tile reaches outside the image)."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, {tile}), not {overlap}")
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return starts


def _ramp(n: int, overlap: int, rise: bool, fall: bool) -> np.ndarray:
    """1D blending weights of one tile: linear from 1/(overlap+1) to 1 over ``overlap`` px on the
    sides that border another tile (``rise``: the start, ``fall``: the end), 1 elsewhere."""
    w = np.ones(n, np.float32)
    r = np.arange(1, overlap + 1, dtype=np.float32) / (overlap + 1)
    if overlap and rise:
        w[:overlap] = np.minimum(w[:overlap], r)
    if overlap and fall:
        w[n - overlap :] = np.minimum(w[n - overlap :], r[::-1])
    return w


def tiles(height: int, width: int, tile: int, overlap: int):
    """Yields (y0, x0, h, w, weight) for the tiles of an image; ``weight`` (h, w) blends them."""
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    h, w = min(tile, height), min(tile, width)
    ov_y, ov_x = min(overlap, h - 1), min(overlap, w - 1)
    for iy, y0 in enumerate(ys):
        wy = _ramp(h, ov_y, iy > 0, iy < len(ys) - 1)
        for ix, x0 in enumerate(xs):
            wx = _ramp(w, ov_x, ix > 0, ix < len(xs) - 1)
            yield y0, x0, h, w, wy[:, None] * wx[None, :]


# ------------------------------------------------------------------ volumes
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _predict(model: SRModel, batch: np.ndarray, device, ctx: StepContext) -> np.ndarray:
    x = torch.from_numpy(batch).to(device, non_blocking=True)
    with torch.no_grad(), ctx.autocast():
        y = model.predict(x)
    return y.float().cpu().numpy()[:, 0]


def predict_slices(model: SRModel, stacks: np.ndarray, device, ctx: StepContext, tile_px: int | None = None, overlap_px: int = 32) -> np.ndarray:
    """SR of a batch of slice stacks (B, C, H, W) -> (B, H, W), whole or tiled and blended."""
    b, _, height, width = stacks.shape
    if tile_px is None or (tile_px >= height and tile_px >= width):
        return _predict(model, stacks, device, ctx)
    acc = np.zeros((b, height, width), np.float32)
    norm = np.zeros((height, width), np.float32)
    for y0, x0, h, w, weight in tiles(height, width, tile_px, overlap_px):
        out = _predict(model, np.ascontiguousarray(stacks[:, :, y0 : y0 + h, x0 : x0 + w]), device, ctx)
        acc[:, y0 : y0 + h, x0 : x0 + w] += out * weight
        norm[y0 : y0 + h, x0 : x0 + w] += weight
    return acc / norm


def infer_volume(
    model: SRModel,
    lr: np.ndarray,
    mask: np.ndarray,
    *,
    device="cpu",
    amp: str = "off",
    batch_slices: int = 4,
    tile_px: int | None = None,
    overlap_px: int = 32,
    label: str = "volume",
    samples: int = 1,
    seed: int = 0,
    std_out: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """SR of every axial slice of ``lr`` (z, y, x) in [0, 1] that holds femur in ``mask``.

    Returns the SR volume (float32, same shape, masked, clipped to [0, 1]) and the timing record
    (``seconds`` = T/V, slices computed, device, batch and tile sizes). ``model.in_channels``
    decides 2D or 2.5D.

    A stochastic model (diffusion) draws from torch's generator, seeded with ``seed`` when the
    timed loop starts, so a volume is reproducible for a given seed, batch and tile size. With
    ``samples`` > 1 it is run that many times on every batch: the volume returned is the mean of
    the (clipped) samples, and ``std_out`` (same shape, float32), if given, receives their
    voxel-wise standard deviation (ddof 0), a map of where the model is unsure. T/V is then the
    time of all samples."""
    if lr.shape != mask.shape:
        raise ValueError(f"{label}: LR shape {lr.shape} differs from the femur mask's {mask.shape}")
    samples = int(samples)
    if samples < 1:
        raise ValueError(f"{label}: samples must be at least 1, not {samples}")
    if samples > 1 and not model.stochastic:
        raise ValueError(f"{label}: model {model.name} is deterministic; several samples would all be equal (set samples: 1)")
    if std_out is not None and std_out.shape != lr.shape:
        raise ValueError(f"{label}: std_out has shape {std_out.shape}, the LR {lr.shape}")
    device = torch.device(device)
    ctx = StepContext(device, "off" if amp is False else amp)
    neighbours = (model.in_channels - 1) // 2
    model.eval()
    femur_slices = np.flatnonzero(np.asarray(mask).reshape(mask.shape[0], -1).any(axis=1))
    batches = [femur_slices[i : i + batch_slices] for i in range(0, len(femur_slices), batch_slices)]

    def stacks(zs):
        return np.stack([axial_stack(lr, int(z), neighbours) for z in zs])

    out = np.zeros(lr.shape, np.float32)
    try:
        if batches:  # warm-up: kernels, allocator, caches
            predict_slices(model, stacks(batches[0]), device, ctx, tile_px, overlap_px)
        _sync(device)
        if model.stochastic:
            torch.manual_seed(int(seed))
        t0 = time.perf_counter()
        for zs in batches:
            inside = np.asarray(mask[zs]) != 0
            x = stacks(zs)
            total = sq = None
            for _ in range(samples):
                sr = np.clip(predict_slices(model, x, device, ctx, tile_px, overlap_px), 0.0, 1.0).astype(np.float64)
                total = sr if total is None else total + sr
                sq = sr * sr if sq is None else sq + sr * sr
            mean = total / samples
            out[zs] = mean * inside
            if std_out is not None:
                std_out[zs] = np.sqrt(np.maximum(sq / samples - mean * mean, 0.0)) * inside
        _sync(device)
        seconds = time.perf_counter() - t0
    except torch.OutOfMemoryError:
        raise MemoryError(
            f"{label}: out of GPU memory with {batch_slices} slice(s) of {lr.shape[1]} x {lr.shape[2]} px"
            f"{'' if tile_px is None else f' in tiles of {tile_px} px'}; lower training.inference_batch_slices "
            "or set training.inference_tile_px"
        ) from None
    timing = {
        "seconds": seconds,
        "slices": int(lr.shape[0]),
        "slices_computed": int(len(femur_slices)),
        "seconds_per_slice": seconds / max(1, len(femur_slices)),
        "slice_px": [int(lr.shape[1]), int(lr.shape[2])],
        "in_channels": int(model.in_channels),
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "amp": ctx.amp,
        "batch_slices": int(batch_slices),
        "tile_px": tile_px,
        "tile_overlap_px": overlap_px if tile_px is not None else None,
        "warmup_batches": 1 if batches else 0,
        "samples": samples,
        "seed": int(seed) if model.stochastic else None,
    }
    return out, timing


def run_inference(
    generator,
    lr,
    hr,
    mask,
    out,
    timing_out,
    *,
    device="auto",
    amp="off",
    batch_slices: int = 4,
    tile_px: int | None = None,
    overlap_px: int = 32,
    subject: str = "",
    samples: int = 1,
    seed: int = 0,
    std_out=None,
    build=None,
) -> dict:
    """Apply the model in ``generator`` to the prepared LR volume ``lr`` of one subject; write the
    SR volume ``out`` (NIfTI, the HR's grid and geometry, masked, [0, 1]) and its timing
    ``timing_out`` (JSON: T/V in ``seconds``), both atomically. Returns the timing record.

    ``samples`` > 1 (stochastic models): ``out`` is the mean of the samples and ``std_out`` (a
    NIfTI path, required then) their voxel-wise standard deviation (see :func:`infer_volume`)."""
    if int(samples) > 1 and std_out is None:
        raise ValueError("samples > 1: give std_out, the file for the voxel-wise standard deviation")
    import json

    from ..volume import read_volume, write_volume
    from .train import select_device

    dev = select_device(device)
    model = load_generator(generator, dev, build=build)
    label = f"subject {subject}" if subject else str(lr)
    lr_v, hr_v, mask_v = read_volume(lr), read_volume(hr), read_volume(mask)
    for name, vol, path in (("HR", hr_v, hr), ("femur mask", mask_v, mask)):
        if not lr_v.same_grid(vol):
            raise ValueError(f"{label}: the {name} {path} (shape {vol.shape}) is not on the grid of the LR {lr} (shape {lr_v.shape}); rerun this subject's preprocessing")
    std = np.zeros(lr_v.shape, np.float32) if std_out is not None else None
    sr, timing = infer_volume(
        model, lr_v.array, mask_v.array, device=dev, amp=amp, batch_slices=batch_slices, tile_px=tile_px, overlap_px=overlap_px, label=label, samples=samples, seed=seed, std_out=std
    )
    write_volume(hr_v.with_array(sr), out)
    if std_out is not None:
        write_volume(hr_v.with_array(std), std_out)
    timing = {"subject": subject, "model": model.name, "in_channels": model.in_channels, "weights": str(generator), **timing}
    with atomic_file(timing_out) as tmp:
        tmp.write_text(json.dumps(timing, indent=2) + "\n")
    log.info("%s: %d of %d slices in %.2f s (T/V) on %s", label, timing["slices_computed"], timing["slices"], timing["seconds"], timing["device"])
    return timing
