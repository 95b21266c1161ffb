"""nnU-Net trainer with a configurable, small budget, for the femur masks on a CPU (demo, CI).

``nnUNetTrainer_femursr`` is the stock 3D nnU-Net training (same network, loss, augmentation,
optimizer and learning-rate schedule) with three differences:

* the budget (epochs, iterations per epoch, validation iterations per epoch) is set by the
  caller (``femursr.nnunet.train``) instead of nnU-Net's 1000 x 250 + 50;
* zero validation iterations per epoch are allowed (the pseudo Dice is then logged as NaN);
* the final validation predicts each validation case once, in this process, without mirroring
  test-time augmentation and without resampling back to the raw grid, and reports the Dice on
  the preprocessed grid. The stock one (sliding window with 8 mirrorings, a pool of 8 spawned
  exporters, resampling, metrics on the raw files) takes minutes per case on a CPU.

nnU-Net looks trainer classes up by name inside its own package; ``femursr.nnunet`` builds this
one directly and resolves its name itself when predicting, so nothing is copied into nnU-Net.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

# The budget when the caller gives none: a few minutes on 2 CPU cores for tiny cases.
DEFAULT_EPOCHS = 1
DEFAULT_ITERATIONS_PER_EPOCH = 20
DEFAULT_VAL_ITERATIONS = 2


class nnUNetTrainer_femursr(nnUNetTrainer):
    """Stock nnU-Net training with a small, configurable budget and a cheap final validation."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        # the signature must stay nnU-Net's: the base class records it to rebuild the trainer
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = DEFAULT_EPOCHS
        self.num_iterations_per_epoch = DEFAULT_ITERATIONS_PER_EPOCH
        self.num_val_iterations_per_epoch = DEFAULT_VAL_ITERATIONS

    def set_budget(self, epochs: int | None = None, iterations_per_epoch: int | None = None, val_iterations: int | None = None) -> None:
        """Set the training budget (``None`` keeps the current value). Call before training."""
        if self.was_initialized:
            # the poly learning-rate schedule is built from num_epochs in initialize()
            raise RuntimeError("set the budget before the trainer is initialized")
        for name, value, low in (("epochs", epochs, 1), ("iterations_per_epoch", iterations_per_epoch, 1), ("val_iterations", val_iterations, 0)):
            if value is not None and (int(value) != value or value < low):
                raise ValueError(f"nnU-Net budget: {name} must be an integer >= {low}, got {value!r}")
        if epochs is not None:
            self.num_epochs = int(epochs)
        if iterations_per_epoch is not None:
            self.num_iterations_per_epoch = int(iterations_per_epoch)
        if val_iterations is not None:
            self.num_val_iterations_per_epoch = int(val_iterations)

    def on_validation_epoch_end(self, val_outputs: list):
        if val_outputs:
            return super().on_validation_epoch_end(val_outputs)
        # no validation iterations: keep exactly one (NaN) value per epoch, as the logger needs
        n_fg = len(self.label_manager.foreground_regions if self.label_manager.has_regions else self.label_manager.foreground_labels)
        self.logger.log("mean_fg_dice", float("nan"), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [float("nan")] * n_fg, self.current_epoch)
        self.logger.log("val_losses", float("nan"), self.current_epoch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Dice of each validation case on the preprocessed grid (one pass, no mirroring).

        Writes ``validation/summary.json`` in the fold folder: per case and mean foreground Dice
        per label. Returns that dict.
        """
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.set_deep_supervision_enabled(False)
        self.network.eval()
        predictor = nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=True,
            device=self.device, verbose=False, verbose_preprocessing=False, allow_tqdm=False,
        )  # fmt: skip
        predictor.manual_initialization(
            self.network, self.plans_manager, self.configuration_manager, None, self.dataset_json,
            self.__class__.__name__, None,
        )  # fmt: skip
        _, val_keys = self.do_split()
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys, folder_with_segs_from_previous_stage=None)
        labels = [int(v) for v in self.label_manager.foreground_labels]
        cases = {}
        with torch.no_grad():
            for key in dataset_val.identifiers:
                data, seg, _, _ = dataset_val.load_case(key)
                logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data[:])))
                pred = logits.argmax(0).cpu().numpy()
                truth = np.asarray(seg[:])[0]
                cases[key] = {str(lab): _dice(pred == lab, truth == lab) for lab in labels}
                self.print_to_log_file(f"validation {key}: Dice {cases[key]}")
        mean = {str(lab): float(np.nanmean([c[str(lab)] for c in cases.values()])) if cases else float("nan") for lab in labels}
        summary = {"kind": "preprocessed grid, no mirroring", "cases": cases, "mean": mean}
        out = os.path.join(self.output_folder, "validation")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        self.print_to_log_file(f"Mean validation Dice (preprocessed grid): {mean}")
        self.set_deep_supervision_enabled(True)
        return summary


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    n = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / n) if n else float("nan")
