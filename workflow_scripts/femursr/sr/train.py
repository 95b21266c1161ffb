"""The training loop shared by every SR model: phases, data, device, mixed precision, validation,
logging, checkpoints and resume (paper section 3.1).

A model (:class:`~femursr.sr.base.SRModel`) says what its phases are and what one step does; this
module does the rest:

* **Data**: ``samples_per_epoch // batch_size`` steps per epoch; the batches of step ``s`` of
  epoch ``e`` are the samples ``(e, s * B) ... (e, s * B + B - 1)`` of a
  :class:`~femursr.sr.data.PatchDataset` (``e`` counted over all phases), the same with any
  number of DataLoader workers.
* **Device and AMP**: ``device`` auto|cpu|cuda|cuda:N; ``amp`` off|bf16|fp16 through
  :class:`~femursr.sr.base.StepContext` (CUDA only).
* **Each step**: ``training_step``, then one step of every scheduler of the phase, then
  ``on_step_end`` (EMA). Losses go to TensorBoard every ``log_every_steps`` steps.
* **Each epoch**: validation PSNR and SSIM on a fixed set of validation patches (prediction
  clipped to [0, 1]), the epoch's mean losses and learning rates, appended to ``metrics.csv``
  (long format: phase, epoch, global_step, metric, value) and TensorBoard.
* **Checkpoints** (``checkpoint.pt`` in the run folder, replaced atomically) every
  ``checkpoint_every_steps`` steps and at the end of every epoch: the model's state (EMA
  included), the phase's optimizers, schedulers and gradient scalers, the random states (torch,
  CUDA, numpy, python), the position (phase, epoch, step) and the running loss sums of the epoch.
* **Resume**: a run folder with a checkpoint continues from it, after checking that it was
  written for the same configuration (a hash of the settings that change the result); metrics
  and TensorBoard events written after the checkpoint are dropped. A run resumed from a
  checkpoint ends with the weights an uninterrupted run has (bit for bit on the CPU).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..atomic import atomic_file, file_sha256
from .base import SRModel, StepContext
from .data import EpochSampler
from .metrics import psnr, ssim

log = logging.getLogger("femursr.sr.train")

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
METRICS_COLUMNS = ("phase", "epoch", "global_step", "metric", "value")


class CheckpointMismatch(RuntimeError):
    """The run folder holds a checkpoint of another configuration."""


class TrainingStopped(RuntimeError):
    """Training stopped on request (SIGTERM/SIGINT) after writing a checkpoint."""


# ------------------------------------------------------------------ device, AMP, configuration
def select_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {spec!r}: torch sees no CUDA GPU (torch.cuda.is_available() is False); set training.device to auto or cpu")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {spec!r}")


def normalize_amp(amp) -> str:
    """``off`` for YAML's ``off``/``false`` (which YAML reads as False), else the string."""
    return "off" if amp is False or amp is None else str(amp)


def config_hash(config: dict) -> str:
    """SHA-256 of the configuration that determines a training run's result."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _differences(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ------------------------------------------------------------------ random states
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _py_state_to_tensor(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_py_state_from_tensor(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def _py_state_to_tensor(st) -> dict:
    version, internal, gauss = st
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _py_state_from_tensor(d) -> tuple:
    return (d["version"], tuple(int(v) for v in d["internal"].tolist()), d["gauss"])


# ------------------------------------------------------------------ checkpoints
@dataclass
class Position:
    """Where training is: phase index, epoch within the phase, step within the epoch (all
    counting what is done), and steps done in total."""

    phase_index: int = 0
    epoch: int = 0
    step: int = 0
    global_step: int = 0


def save_checkpoint(path, *, model, setup, ctx, position: Position, config: dict, epoch_sums: dict, phase_name: str) -> None:
    """Write the training state atomically (temporary name, then ``os.replace``)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "config_hash": config_hash(config),
        "config": json.loads(json.dumps(config, default=str)),
        "position": asdict(position),
        "phase": phase_name,
        "model": model.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in setup.optimizers.items()} if setup else {},
        "schedulers": {k: s.state_dict() for k, s in setup.schedulers.items()} if setup else {},
        "scalers": ctx.state_dict() if ctx else {},
        "rng": _rng_state(),
        "epoch_sums": epoch_sums,
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, config: dict, device="cpu") -> dict:
    """Read a checkpoint and check that it belongs to ``config``; raises
    :class:`CheckpointMismatch` naming the settings that differ and the fix."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointMismatch(f"{path}: cannot be read ({type(e).__name__}: {e}); delete it to train from the start") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatch(f"{path}: checkpoint format {state.get('format')} (expected {CHECKPOINT_FORMAT}); delete {path.parent} to train from the start")
    if state["config_hash"] != config_hash(config):
        diff = _differences(state.get("config", {}), json.loads(json.dumps(config, default=str)))
        raise CheckpointMismatch(
            f"{path} was written by a training run with another configuration ({'; '.join(diff[:8]) or 'hash differs'}). "
            f"Delete the folder {path.parent} to train afresh with the new configuration, or restore the configuration "
            "to resume the old run."
        )
    return state


class MetricsLog:
    """``metrics.csv`` of a run (long format), kept consistent with the checkpoint on resume."""

    def __init__(self, path, resume_step: int | None):
        self.path = Path(path)
        rows = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["global_step"]) <= resume_step]
        with atomic_file(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, METRICS_COLUMNS)
                w.writeheader()
                w.writerows(rows)

    def append(self, phase: str, epoch: int, global_step: int, values: dict) -> None:
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            for k, v in values.items():
                w.writerow([phase, epoch, global_step, k, f"{v:.8g}"])
            f.flush()
            os.fsync(f.fileno())


class _LogStream:
    """A file for tqdm that sends each refresh of the bar to the log as one line."""

    def __init__(self, logger):
        self.logger = logger

    def write(self, s):
        s = s.strip("\r\n ")
        if s:
            self.logger.info(s)

    def flush(self):
        pass


class _StopRequest:
    """Turns SIGTERM/SIGINT (a scheduler's time limit, Ctrl-C) into a flag the loop checks."""

    def __init__(self, enabled: bool):
        self.flag = None
        self._old = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.flag:  # asked twice: stop now, from the last checkpoint
            self.restore()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.flag = signal.Signals(signum).name

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------ validation
@torch.no_grad()
def evaluate(model: SRModel, loader, device, ctx: StepContext) -> dict:
    """Mean PSNR (dB) and SSIM of ``model.predict`` (clipped to [0, 1]) over ``loader``.

    ``predict`` gets the LR, or the HR for models whose :attr:`~SRModel.validation_input` is
    ``"hr"`` (the autoencoder). A stochastic model draws its noise from a generator seeded the
    same way at every validation (forked, so training's random stream is not touched), so that
    the figures of successive epochs differ only by the weights."""
    was_training = model.training
    model.eval()
    p, s = [], []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=model.stochastic):
        if model.stochastic:
            torch.manual_seed(0)
        for lr, hr in loader:
            x = hr if model.validation_input == "hr" else lr
            with ctx.autocast():
                pred = model.predict(x.to(device, non_blocking=True))
            pred = pred.float().clamp(0, 1).cpu()
            p.append(psnr(pred, hr))
            s.append(ssim(pred, hr))
    model.train(was_training)
    if not p:
        return {}
    return {"psnr": float(torch.cat(p).mean()), "ssim": float(torch.cat(s).mean())}


# ------------------------------------------------------------------ the loop
@dataclass
class FitResult:
    global_step: int
    resumed_from: int | None
    seconds: float
    device: str
    amp: str
    validation: dict


def _loader(dataset, sampler, batch_size, num_workers, device):
    # a private generator: creating the loader must not draw from the global torch RNG, whose
    # state the checkpoint restores
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
    )


def fit(
    model: SRModel,
    train_data,
    val_data,
    run_dir,
    *,
    config: dict,
    batch_size: int,
    samples_per_epoch: int,
    validation_samples: int = 0,
    device="auto",
    amp="off",
    num_workers: int = 0,
    checkpoint_every_steps: int = 100,
    log_every_steps: int = 10,
    tensorboard: bool = True,
    progress: bool = True,
    callback=None,
    handle_signals: bool = False,
) -> FitResult:
    """Train ``model`` through its phases, resuming from ``run_dir/checkpoint.pt`` if present.

    ``train_data`` and ``val_data`` are indexed by ``(epoch, i)`` keys (:class:`PatchDataset`);
    the validation set is the samples ``(0, 0 ... validation_samples - 1)`` of ``val_data``.
    ``config``: what the checkpoint must match (see :func:`config_hash`). ``callback(position)``
    is called after every step (tests raise from it to simulate a kill).
    Returns a :class:`FitResult`; the model is left on ``device`` with its final weights.
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(device)
    amp = normalize_amp(amp)
    steps_per_epoch = int(samples_per_epoch) // int(batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"samples_per_epoch ({samples_per_epoch}) must be at least batch_size ({batch_size})")
    phases = list(model.phases())
    if len({p.name for p in phases}) != len(phases):
        raise ValueError(f"model {model.name}: phase names repeat: {[p.name for p in phases]}")
    total_steps = sum(p.epochs for p in phases) * steps_per_epoch
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.to(device)
    model.train()

    ckpt_path = run_dir / CHECKPOINT
    state, pos, resumed_from = None, Position(), None
    if ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, config, device="cpu")
        model.load_state_dict(state["model"])
        pos = Position(**state["position"])
        _set_rng_state(state["rng"])
        resumed_from = pos.global_step
        where = phases[pos.phase_index].name if pos.phase_index < len(phases) else "end"
        log.info("resuming from %s: phase %s, epoch %d, step %d (%d of %d steps done)", ckpt_path, where, pos.epoch, pos.step, pos.global_step, total_steps)
    metrics = MetricsLog(run_dir / "metrics.csv", resumed_from)
    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_from if resumed_from else None)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=pos.global_step, file=_LogStream(log), mininterval=30, ascii=True, ncols=100, unit="step")
    val_loader = None
    if val_data is not None and validation_samples > 0:
        val_loader = _loader(val_data, EpochSampler(0, 0, validation_samples), batch_size, num_workers, device)
    stop = _StopRequest(handle_signals)
    resume = pos  # where this run starts; `pos` follows the training
    last_val = {}
    global_step = pos.global_step
    epoch_base = 0
    try:
        for pi, phase in enumerate(phases):
            if pi < resume.phase_index or phase.epochs <= 0:
                epoch_base += max(0, phase.epochs)
                continue
            setup = model.configure_phase(phase.name, phase.epochs * steps_per_epoch)
            ctx = StepContext(device, amp, optimizer_names=tuple(setup.optimizers))
            resuming = state is not None and resume.phase_index == pi
            sums = {}
            if resuming:
                for kind, objs in (("optimizers", setup.optimizers), ("schedulers", setup.schedulers)):
                    if set(state[kind]) != set(objs):
                        raise CheckpointMismatch(f"{ckpt_path}: phase {phase.name} has {kind} {sorted(state[kind])}, the model now builds {sorted(objs)}; delete {run_dir} to start afresh")
                    for k, obj in objs.items():
                        obj.load_state_dict(state[kind][k])
                ctx.load_state_dict(state["scalers"])
                sums = state["epoch_sums"]
            log.info("phase %s: %d epoch(s) of %d steps (batch %d) on %s, amp %s", phase.name, phase.epochs, steps_per_epoch, batch_size, device, ctx.amp)
            for epoch in range(resume.epoch if resuming else 0, phase.epochs):
                mid_epoch = resuming and epoch == resume.epoch
                start = resume.step if mid_epoch else 0
                if not mid_epoch:
                    sums = {}
                t_epoch = time.perf_counter()
                sampler = EpochSampler(epoch_base + epoch, start * batch_size, steps_per_epoch * batch_size)
                loader = _loader(train_data, sampler, batch_size, num_workers, device)
                for step, (lr, hr) in enumerate(loader, start=start):
                    lr = lr.to(device, non_blocking=True)
                    hr = hr.to(device, non_blocking=True)
                    losses = model.training_step(phase.name, lr, hr, setup, ctx)
                    for sched in setup.schedulers.values():
                        sched.step()
                    model.on_step_end(phase.name)
                    global_step += 1
                    losses = {k: float(v) for k, v in losses.items()}
                    for k, v in losses.items():
                        if not math.isfinite(v):
                            if ctx.amp != "fp16":  # under fp16 the gradient scaler skips such steps
                                raise FloatingPointError(f"model {model.name}, phase {phase.name}, step {global_step}: loss {k} is {v}; lower the learning rate")
                            log.warning("step %d: loss %s is %s (fp16; the gradient scaler skips the step)", global_step, k, v)
                            continue
                        sums[k] = sums.get(k, 0.0) + v
                    sums["_n"] = sums.get("_n", 0) + 1
                    pos = Position(pi, epoch, step + 1, global_step)
                    if writer is not None and global_step % log_every_steps == 0:
                        for k, v in losses.items():
                            writer.add_scalar(f"train/{phase.name}/{k}", v, global_step)
                    if bar is not None:
                        bar.set_postfix_str(f"{phase.name} e{epoch + 1}/{phase.epochs} " + " ".join(f"{k}={v:.4g}" for k, v in losses.items()), refresh=False)
                        bar.update(1)
                    if global_step % checkpoint_every_steps == 0 or stop.flag:
                        save_checkpoint(ckpt_path, model=model, setup=setup, ctx=ctx, position=pos, config=config, epoch_sums=sums, phase_name=phase.name)
                    if stop.flag:
                        raise TrainingStopped(f"{stop.flag} received: checkpoint written at step {global_step} ({ckpt_path}); rerun to resume")
                    if callback is not None:
                        callback(pos)
                # end of epoch: validation, metrics, checkpoint
                n = sums.get("_n", 0)
                values = {f"train_{k}": v / n for k, v in sums.items() if k != "_n" and n}
                if val_loader is not None:
                    last_val = evaluate(model, val_loader, device, ctx)
                    values.update({f"val_{k}": v for k, v in last_val.items()})
                for name, opt in setup.optimizers.items():
                    values[f"lr_{name}"] = opt.param_groups[0]["lr"]
                values["epoch_seconds"] = time.perf_counter() - t_epoch
                metrics.append(phase.name, epoch + 1, global_step, values)
                if writer is not None:
                    for k, v in values.items():
                        writer.add_scalar(f"epoch/{phase.name}/{k}", v, global_step)
                    writer.flush()
                log.info("phase %s epoch %d/%d (step %d): %s", phase.name, epoch + 1, phase.epochs, global_step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
                pos = Position(pi, epoch + 1, 0, global_step)
                sums = {}
                save_checkpoint(ckpt_path, model=model, setup=setup, ctx=ctx, position=pos, config=config, epoch_sums=sums, phase_name=phase.name)
            state = None
            epoch_base += phase.epochs
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return FitResult(global_step, resumed_from, time.perf_counter() - t_start, str(device), StepContext(device, amp).amp, last_val)


# ------------------------------------------------------------------ one model of the study
#: settings of the ``training`` config block that change the result of a run (the others say
#: where and how fast it runs, or concern inference)
RESULT_KEYS = ("patch_size_px", "batch_size", "samples_per_epoch", "neighbours", "validation_patches", "amp")


def _last_validation(metrics_csv: Path) -> dict:
    rows = list(csv.DictReader(open(metrics_csv, newline=""))) if metrics_csv.is_file() else []
    last = max((int(r["global_step"]) for r in rows), default=None)
    return {r["metric"][4:]: float(r["value"]) for r in rows if int(r["global_step"]) == last and r["metric"].startswith("val_")}


def train_sr(
    *,
    name: str,
    dims: str,
    model_params: dict,
    training: dict,
    seed: int,
    train,
    validation,
    run_dir,
    generator,
    record,
    metrics,
    perceptual_weights: str | None = None,
    autoencoder=None,
    build=None,
    callback=None,
    handle_signals: bool = False,
) -> dict:
    """Train model ``name`` in ``dims`` (2d, 25d) on the ``train`` subjects
    (:class:`~femursr.sr.data.SubjectFiles`), validating on ``validation``; write the weights for
    inference (``generator``), the run record (``record``, JSON) and the metrics (``metrics``).

    ``training`` is the config block ``training``, ``model_params`` the block ``models.<name>``.
    The run's state lives in ``run_dir`` (checkpoint, live metrics, TensorBoard), so a killed
    run resumes there. ``autoencoder``: the trained autoencoder's weights file, for models that
    work in its latent space (``model_params`` then holds ``autoencoder_network``); its content
    hash is part of the run's configuration, so a retrained autoencoder makes an old checkpoint
    refuse to resume. ``build`` stands in for the registry's ``build_model`` (tests).
    Returns the record.
    """
    from .data import PatchDataset, index_subject
    from .infer import save_generator

    if build is None:
        from .registry import build_model as build
    neighbours = int(training["neighbours"]) if dims == "25d" else 0
    train, validation = list(train), list(validation)
    config = {
        "model": name,
        "dims": dims,
        "params": model_params,
        "training": {**{k: training[k] for k in RESULT_KEYS}, "neighbours": neighbours, "amp": normalize_amp(training["amp"])},
        "seed": int(seed),
        "train": [s.subject for s in train],
        "validation": [s.subject for s in validation],
        "perceptual_weights": perceptual_weights,
    }
    if autoencoder is not None:
        config["autoencoder_sha256"] = file_sha256(autoencoder)
    seed_everything(int(seed))
    model = build(name, dims, training["neighbours"], model_params, perceptual_weights=perceptual_weights)
    if model.needs_autoencoder:
        if autoencoder is None:
            raise ValueError(f"model {name} works in the latent space of an autoencoder, but none was given; train it first (rule train_autoencoder)")
        model.load_autoencoder(autoencoder)
        log.info("autoencoder weights from %s (sha256 %s)", autoencoder, config["autoencoder_sha256"][:12])
    elif autoencoder is not None:
        raise ValueError(f"model {name} does not use an autoencoder, but {autoencoder} was given")
    log.info("model %s %s: %d input channel(s); %s", name, dims, model.in_channels, json.dumps(model.record(), default=str))
    t = time.perf_counter()
    femur = {s.subject: index_subject(s) for s in train + validation}
    log.info(
        "femur index of %d subject(s): %.1f M voxels in %.1f MB of runs, %.1f s",
        len(femur), sum(f.total for f in femur.values()) / 1e6, sum(f.nbytes for f in femur.values()) / 1e6, time.perf_counter() - t,
    )
    patch = int(training["patch_size_px"])
    train_data = PatchDataset(train, patch, neighbours, seed, stream="train", augment=True, femur=[femur[s.subject] for s in train])
    val_data = PatchDataset(validation, patch, neighbours, seed, stream="validation", augment=False, femur=[femur[s.subject] for s in validation])
    run_dir = Path(run_dir)
    result = fit(
        model,
        train_data,
        val_data,
        run_dir,
        config=config,
        batch_size=int(training["batch_size"]),
        samples_per_epoch=int(training["samples_per_epoch"]),
        validation_samples=int(training["validation_patches"]),
        device=training["device"],
        amp=training["amp"],
        num_workers=int(training["num_workers"]),
        checkpoint_every_steps=int(training["checkpoint_every_steps"]),
        log_every_steps=int(training["log_every_steps"]),
        callback=callback,
        handle_signals=handle_signals,
    )
    save_generator(model, generator, name=name, dims=dims, neighbours=int(training["neighbours"]), params=model_params)
    with atomic_file(metrics) as tmp:
        tmp.write_bytes((run_dir / "metrics.csv").read_bytes())
    steps_per_epoch = int(training["samples_per_epoch"]) // int(training["batch_size"])
    rec = {
        **model.record(),
        "model": name,
        "dims": dims,
        "neighbours": neighbours,
        "phases": [{"name": p.name, "epochs": p.epochs} for p in model.phases()],
        "steps_per_epoch": steps_per_epoch,
        "steps": result.global_step,
        "batch_size": int(training["batch_size"]),
        "samples_per_epoch": int(training["samples_per_epoch"]),
        "patch_size_px": patch,
        "device": result.device,
        "amp": result.amp,
        "seconds_this_run": result.seconds,
        "resumed_from_step": result.resumed_from,
        "validation": result.validation or _last_validation(run_dir / "metrics.csv"),
        "validation_patches": int(training["validation_patches"]),
        "train_subjects": config["train"],
        "validation_subjects": config["validation"],
        "perceptual_weights": perceptual_weights,
        "autoencoder": None if autoencoder is None else {"weights": str(autoencoder), "sha256": config["autoencoder_sha256"]},
        "config_hash": config_hash(config),
        "run_dir": str(run_dir),
        "torch": torch.__version__,
    }
    with atomic_file(record) as tmp:
        tmp.write_text(json.dumps(rec, indent=2, default=str) + "\n")
    return rec
